"""The hires pass on another checkpoint (A1111's ``hr_checkpoint_name`` / "Hires checkpoint"): the
first pass runs on the model, the second on the hires model, which also decodes. From the library
(``load(hires=)``), the command line (``--hires-checkpoint``) and the server (``hr_checkpoint_name``
through webuiapi)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import webuiapi
from PIL import Image

import sfumato
from conftest import TINY_SPEC, live_server, write_tiny_model
from golden_world import INPAINT9
from sfumato.commands import main
from sfumato.errors import ParamError
from sfumato.pipeline.infotext import params_from_infotext
from sfumato.server.app import ServerConfig, create_app

PROMPT = "a red circle on a blue background"
HIRES = dict(steps=3, seed=4, sampler="euler", hires_scale=1.5, hires_steps=2, hires_denoise=0.6, width=64, height=64)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hires-models")
    write_tiny_model(root / "a.safetensors", TINY_SPEC, seed=0)
    write_tiny_model(root / "b.safetensors", TINY_SPEC, seed=21)
    shutil.copy(root / "a.safetensors", root / "a-copy.safetensors")
    write_tiny_model(root / "inpaint.safetensors", INPAINT9, seed=1)
    return root


def _rgb(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def _run(pipe, **kw):
    """The image, and per stage the x̂0 of its first step (what each pass's model made first)."""
    first: dict[str, np.ndarray] = {}

    def callback(progress) -> None:
        first.setdefault(progress.stage, progress.denoised.clone().numpy())

    return pipe.txt2img(PROMPT, callback=callback, watermark=False, **{**HIRES, **kw}), first


@pytest.mark.parametrize("upscaler", ["latent", "lanczos"])
def test_the_same_weights_as_hires_model_change_nothing(models, upscaler):
    plain, _ = _run(sfumato.load(models / "a.safetensors", dtype="fp32"), hires_upscaler=upscaler)
    pipe = sfumato.load(models / "a.safetensors", hires=models / "a-copy.safetensors", dtype="fp32")
    same, _ = _run(pipe, hires_upscaler=upscaler)
    assert np.array_equal(_rgb(plain.images[0]), _rgb(same.images[0]))
    assert "Hires checkpoint: a-copy" in same.items[0].infotext
    assert params_from_infotext(same.items[0].infotext)["hires_checkpoint"] == "a-copy"


def test_the_first_pass_runs_on_the_model_and_the_second_on_the_hires_model(models):
    a = sfumato.load(models / "a.safetensors", dtype="fp32")
    b = sfumato.load(models / "b.safetensors", dtype="fp32")
    ab = sfumato.load(models / "a.safetensors", hires=models / "b.safetensors", dtype="fp32")
    (r_a, first_a), (r_b, first_b), (r_ab, first_ab) = _run(a), _run(b), _run(ab)
    assert np.array_equal(first_ab["base"], first_a["base"])           # the first pass: a's
    assert not np.array_equal(first_ab["base"], first_b["base"])
    assert not np.array_equal(first_ab["hires"], first_a["hires"])     # the second: not a's
    assert not np.array_equal(_rgb(r_ab.images[0]), _rgb(r_a.images[0]))
    assert not np.array_equal(_rgb(r_ab.images[0]), _rgb(r_b.images[0]))
    # without a hires pass the hires model is not used at all
    plain = ab.txt2img(PROMPT, steps=3, seed=4, sampler="euler", width=64, height=64, watermark=False)
    alone = a.txt2img(PROMPT, steps=3, seed=4, sampler="euler", width=64, height=64, watermark=False)
    assert np.array_equal(_rgb(plain.images[0]), _rgb(alone.images[0]))
    assert "Hires checkpoint" not in plain.items[0].infotext


def test_a_hires_model_of_another_latent_input_is_refused(models):
    pipe = sfumato.load(models / "a.safetensors", hires=models / "inpaint.safetensors", dtype="fp32")
    with pytest.raises(ParamError) as e:
        pipe.txt2img(PROMPT, **HIRES)
    assert e.value.field == "hires_checkpoint"
    with pytest.raises(ParamError) as e:
        sfumato.load(models / "a.safetensors", dtype="fp32").txt2img(PROMPT, hires_checkpoint="b", **HIRES)
    assert e.value.field == "hires_checkpoint" and "none is loaded" in e.value.message


def test_the_command_line_and_the_server_give_the_library_s_image(models, tmp_path, capsys):
    want, _ = _run(sfumato.load(models / "a.safetensors", hires=models / "b.safetensors", dtype="fp32"))
    out = tmp_path / "h.png"
    code = main([str(a) for a in ["txt2img", PROMPT, "--model", models / "a.safetensors", "--hires-checkpoint",
                                  models / "b.safetensors", "--dtype", "fp32", "--steps", 3, "--seed", 4,
                                  "--sampler", "euler", "--hires-scale", 1.5, "--hires-steps", 2,
                                  "--hires-denoise", 0.6, "--no-watermark", "-o", out]])
    assert code == 0, capsys.readouterr().err
    assert np.array_equal(_rgb(Image.open(out)), _rgb(want.images[0]))
    config = ServerConfig(model=models / "a.safetensors", models_dir=models, watermark=False, dtype="fp32")
    with live_server(create_app(config)) as port:
        api = webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler="Euler", steps=3)
        got = api.txt2img(prompt=PROMPT, seed=4, enable_hr=True, hr_scale=1.5, hr_second_pass_steps=2,
                          denoising_strength=0.6, hr_checkpoint_name="b", width=64, height=64)
        assert np.array_equal(_rgb(got.image), _rgb(want.images[0]))
        assert "Hires checkpoint: b" in got.info["infotexts"][0]
        plain = api.txt2img(prompt=PROMPT, seed=4, enable_hr=True, hr_scale=1.5, hr_second_pass_steps=2,
                            denoising_strength=0.6, width=64, height=64)     # the next request: a alone again
        assert not np.array_equal(_rgb(plain.image), _rgb(want.images[0]))
        for name, fragment in (("nope", "not found"), ("inpaint", "cannot continue")):
            with pytest.raises(RuntimeError) as e:
                api.txt2img(prompt=PROMPT, steps=2, enable_hr=True, hr_scale=1.5, hr_checkpoint_name=name,
                            width=64, height=64)
            status, body = e.value.args
            assert status == 422 and '"field":"hr_checkpoint_name"' in body and fragment in body, body
