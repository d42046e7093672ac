"""Random requests (issue 13): whatever a caller builds — through ``GenerationParams`` or the server's
A1111 request models — only sfumato's typed errors come out (ParamError, the server's ApiError, the
request model's own validation error), and every valid request plans against every model family
without loading any weights (``ModelInfo``: a spec and its schedule only)."""

from __future__ import annotations

import math
import random

import pytest
from PIL import Image
from pydantic import ValidationError

from sfumato.checkpoint.specs import PRESETS
from sfumato.cli import main
from sfumato.data import BUNDLED_PATH
from sfumato.diffusion.samplers import SAMPLER_DISPLAY
from sfumato.errors import ParamError
from sfumato.pipeline.params import ControlSpec, GenerationParams
from sfumato.pipeline.plan import ModelInfo, Plan, plan
from sfumato.server import a1111
from sfumato.server.security import ApiError, Catalog, Limits

N = 600
FAMILIES = ["sd1", "sd1-inpaint", "sd2-v", "sd2-depth", "sd-x4-upscaler", "sdxl", "sdxl+refiner"]


def _image(rng: random.Random, mode: str = "RGB") -> Image.Image:
    return Image.new(mode, (rng.choice([8, 64, 96, 512]), rng.choice([8, 64, 512])), rng.randrange(256))


def _value(rng: random.Random, valid):
    """A valid value (from ``valid``) most of the time, else something odd."""
    if rng.random() < 0.92:
        return valid() if callable(valid) else rng.choice(valid)
    return rng.choice([-1, 0, 1, 7, 10**9, -(10**9), 2.5, math.nan, math.inf, -math.inf, "", "x", None, True, [],
                       "\ud800", "euler", "karras", 1e-12])


FIELDS = {
    "steps": lambda r: _value(r, [1, 2, 4, 20, 50, 60, 1000]),
    "cfg_scale": lambda r: _value(r, [0.0, 1.0, 7.0, 30.0]),
    "sampler": lambda r: _value(r, list(SAMPLER_DISPLAY) + list(SAMPLER_DISPLAY.values()) + ["DPM++ 2M Karras"]),
    "scheduler": lambda r: _value(r, [None, "normal", "karras", "exponential", "sgm_uniform", "simple"]),
    "seed": lambda r: _value(r, [-1, 0, 42, 2**32 - 1]),
    "width": lambda r: _value(r, [64, 512, 768, 1024, 8192]),
    "height": lambda r: _value(r, [64, 512, 768, 1016]),
    "batch_size": lambda r: _value(r, [1, 2, 4]),
    "clip_skip": lambda r: _value(r, [1, 2]),
    "subseed_strength": lambda r: _value(r, [0.0, 0.3, 1.0]),
    "guidance_rescale": lambda r: _value(r, [0.0, 0.7]),
    "strength": lambda r: _value(r, [0.0, 0.3, 0.75, 1.0]),
    "init_image": lambda r: _value(r, lambda: _image(r)),
    "mask": lambda r: _value(r, lambda: _image(r, "L")),
    "masked_content": lambda r: _value(r, ["fill", "original", "latent noise", "latent nothing"]),
    "only_masked": lambda r: _value(r, [True, False]),
    "hires_scale": lambda r: _value(r, [1.0, 1.5, 2.0]),
    "hires_steps": lambda r: _value(r, [0, 5, 60]),
    "hires_denoise": lambda r: _value(r, [0.0, 0.05, 0.5, 0.7]),
    "hires_upscaler": lambda r: _value(r, ["latent", "lanczos"]),
    "refiner": lambda r: _value(r, [None, "refiner"]),
    "refiner_switch": lambda r: _value(r, [0.0, 0.5, 0.8, 1.0]),
    "depth_map": lambda r: _value(r, lambda: _image(r, "L")),
    "noise_level": lambda r: _value(r, [None, 0, 20, 350, 400]),
    "control": lambda r: _value(r, lambda: [ControlSpec(BUNDLED_PATH, _image(r), start=r.choice([0, 0.5]))]),
    "tome_ratio": lambda r: _value(r, [0.0, 0.5]),
    "deepcache_interval": lambda r: _value(r, [1, 2, 3]),
}
PROMPTS = ["a red circle", "", "a [red:blue:0.5] circle", "[a|b] AND c :0.5", "(((x)))", "x <lora:y:0.5>",
           "x <hypernet:h>", "<lora::1>", "(x:1e400)", "a" * 70000, "x\ud800", "BREAK a BREAK"]


def _model(family: str) -> tuple[ModelInfo, ModelInfo | None]:
    if family == "sdxl+refiner":
        return ModelInfo(PRESETS["sdxl"]), ModelInfo(PRESETS["sdxl-refiner"])
    return ModelInfo(PRESETS[family]), None


def test_random_generation_params_raise_only_param_errors_and_valid_ones_plan():
    rng = random.Random(13)
    valid = planned = 0
    for _ in range(N):
        settings = {k: f(rng) for k, f in FIELDS.items() if rng.random() < 0.35}
        settings["prompt"] = rng.choice(PROMPTS)
        try:
            p = GenerationParams(**settings).validated()
        except ParamError:
            continue
        valid += 1
        for family in FAMILIES:
            try:
                result = plan(p, *_model(family))
            except ParamError:
                continue
            assert isinstance(result, Plan)
            planned += 1
            for stage in result.stages:
                assert stage.sigmas is None or len(stage.sigmas) >= 2
                assert all(0 <= ps.start < ps.stop < len(stage.sigmas) for ps in stage.passes)
    assert valid >= 60 and planned >= 100, (valid, planned)


def _a1111_body(rng: random.Random) -> dict:
    body = {"prompt": rng.choice(PROMPTS), "steps": rng.choice([1, 20, 60, 200]), "width": rng.choice([64, 512]),
            "height": rng.choice([64, 512])}
    options = {
        "sampler_name": ["Euler", "LCM", "DPM++ 2M", "nope", 3], "scheduler": ["Karras", "automatic", "x", None],
        "cfg_scale": [7, -1, "7"], "seed": [-1, 5, 2**40], "batch_size": [1, 2, 100], "n_iter": [1, 0, 50],
        "enable_hr": [True, False], "hr_scale": [1.5, 2, 0.5, 20], "hr_upscaler": ["Latent", "Lanczos", "ESRGAN"],
        "denoising_strength": [0.5, 2, -1, None], "restore_faces": [False, True], "styles": [[], ["s"]],
        "subseed_strength": [0, 0.5, 3], "hr_second_pass_steps": [0, 10, 1000], "tiling": [False, True],
        "override_settings": [{}, {"CLIP_stop_at_last_layers": 2}, {"sd_vae": "none.pt"}, {"bogus": 1}],
        "disable_extra_networks": [True, False], "refiner_checkpoint": [None, "r"], "eta": [None, 0.5],
        "seed_resize_from_w": [-1, 0, 512], "s_noise": [None, 1, 2],
    }
    for key in rng.sample(list(options), rng.randrange(0, 6)):
        body[key] = rng.choice(options[key])
    return body


def test_random_a1111_requests_raise_only_typed_errors_and_valid_ones_plan():
    rng = random.Random(14)
    catalog = Catalog(BUNDLED_PATH)
    defaults = a1111.Defaults(catalog.default)
    limits = Limits()
    built = 0
    bundled = ModelInfo(PRESETS["sd1"])
    for _ in range(N):
        body = _a1111_body(rng)
        try:
            req = a1111.Txt2ImgRequest.model_validate(body)
            work = a1111.build_work(req, defaults, catalog, limits)
        except (ValidationError, ApiError):
            continue
        built += 1
        try:
            assert isinstance(plan(work.params, bundled), Plan)
        except ParamError:
            pass
    assert built >= 50, built


def test_lcm_with_too_many_steps_is_one_line_and_exit_2(capsys):
    assert main(["txt2img", "x", "--sampler", "lcm", "--steps", "60", "-o", "never.png"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "steps" in err


@pytest.mark.parametrize("family", FAMILIES)
def test_planning_reads_no_weights(family, monkeypatch):
    """Planning a request touches only specs and schedules: no file is opened."""
    import builtins

    def no_open(*args, **kwargs):
        raise AssertionError(f"planning opened a file: {args[0]!r}")

    p = GenerationParams("a red circle", steps=4, width=64, height=64,
                         init_image=_image(random.Random(1)) if family == "sd-x4-upscaler" else None,
                         noise_level=20 if family == "sd-x4-upscaler" else None,
                         depth_map=_image(random.Random(2), "L") if family == "sd2-depth" else None).validated()
    models = _model(family)
    monkeypatch.setattr(builtins, "open", no_open)
    result = plan(p, *models)
    assert result.stages and result.stages[0].passes
