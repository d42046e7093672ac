"""The SD safety checker (issue 16, item 4): the published layout loads (transformers 4's and 5's
keys, safetensors or an allow-listed .bin, with or without config.json), scores and flags exactly
as diffusers' StableDiffusionSafetyChecker on the same random weights, and hides and reports
flagged images in the library, the command line and the server."""

from __future__ import annotations

import base64
import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import sfumato
from conftest import live_server
from sfumato.checkpoint.io import save_file
from sfumato.checkpoint.safety import load_safety_checker
from sfumato.commands import main
from sfumato.errors import ParamError
from sfumato.pipeline.clip_image import preprocess_clip
from sfumato.pipeline.safety import hide
from sfumato.server.app import ServerConfig, create_app
from test_webui import browser  # noqa: F401 — the headless chromium fixture

PROMPT = "a red circle on a blue background"


def _reference(seed: int = 0):
    """diffusers' checker at a tiny size (ViT 32 px, patch 8, width 32), randomly perturbed."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    config = CLIPConfig(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=32, patch_size=8),
                        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4), projection_dim=16)
    torch.manual_seed(seed)
    checker = StableDiffusionSafetyChecker(config).eval()
    with torch.no_grad():
        for name, p in checker.named_parameters():
            if "embeds" in name and "weights" not in name:
                p.copy_(torch.randn_like(p))
            elif "weights" not in name:
                p.add_(torch.randn_like(p) * 0.05)
    return checker


def _thresholds(checker, pixels: torch.Tensor) -> None:
    """Thresholds inside the spread of the images' similarities: some images flagged, some not,
    and special-care hits that raise later scores by 0.01."""
    from diffusers.pipelines.stable_diffusion.safety_checker import cosine_distance

    with torch.no_grad():
        embeds = checker.visual_projection(checker.vision_model(pixels)[1])
        special = cosine_distance(embeds, checker.special_care_embeds)
        concept = cosine_distance(embeds, checker.concept_embeds)
        checker.special_care_embeds_weights.copy_(special.median(dim=0).values)
        checker.concept_embeds_weights.copy_(concept.max(dim=0).values - 0.004)


def _images(n: int = 12) -> list[Image.Image]:
    rng = np.random.default_rng(3)
    return [Image.fromarray(rng.integers(0, 255, (40 + 3 * i, 48, 3), dtype=np.uint8)) for i in range(n)]


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """The reference checker, saved as transformers saves it (config.json + model.safetensors)."""
    checker = _reference()
    pixels = preprocess_clip(_images(), size=32)
    _thresholds(checker, pixels)
    folder = tmp_path_factory.mktemp("safety") / "safety_checker"
    checker.save_pretrained(folder)
    return checker, folder, pixels


def test_flags_equal_diffusers_and_the_tower_equals_transformers(published):
    reference, folder, pixels = published
    ours = load_safety_checker(folder)
    _, want = reference(clip_input=pixels, images=[np.zeros((1, 1, 3)) for _ in range(len(pixels))])
    got = ours(pixels)
    assert got.flagged == list(want) and 0 < sum(want) < len(want)      # some flagged, some not
    with torch.no_grad():
        ref_embeds = reference.visual_projection(reference.vision_model(pixels)[1])
    embeds = ours.vision_model(pixels).image_embeds
    assert (embeds - ref_embeds).abs().max().item() < 1e-5
    assert any(any(s > 0 for s in special) for special in got.special_scores)   # the 0.01 rule is exercised


def test_the_published_variants_load_alike(published, tmp_path):
    reference, folder, pixels = published
    expected = load_safety_checker(folder)(pixels)
    sd = reference.state_dict()
    legacy = {("vision_model." + k if k.startswith("vision_model.") else k): v.contiguous() for k, v in sd.items()}
    torch.save(legacy, tmp_path / "pytorch_model.bin")                  # transformers 4's doubled prefix, a pickle
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "alone.safetensors")
    model = tmp_path / "model"                                          # a diffusers model folder
    shutil.copytree(folder, model / "safety_checker")
    for path in (tmp_path, model):
        assert load_safety_checker(path)(pixels).flagged == expected.flagged
    with pytest.raises(ParamError) as e:   # shapes alone: a 32-wide tower matches no preset, so heads are unknown
        load_safety_checker(tmp_path / "alone.safetensors")
    assert e.value.field == "safety_checker"


@pytest.mark.parametrize("make, fragment", [
    (lambda d: d / "nothing-here", "not found"),
    (lambda d: d, "holds no"),
    (lambda d: save_file({"x": torch.zeros(2)}, d / "x.safetensors") or d / "x.safetensors", "not a safety checker"),
])
def test_bad_paths_are_errors_naming_the_field(tmp_path, make, fragment):
    with pytest.raises(ParamError) as e:
        load_safety_checker(make(tmp_path))
    assert e.value.field == "safety_checker" and fragment in e.value.message


def _always(published, tmp_path, flag: bool):
    """The published checker with thresholds that flag everything (or nothing)."""
    reference, folder, _ = published
    out = tmp_path / ("always" if flag else "never")
    shutil.copytree(folder, out)
    sd, _ = sfumato.checkpoint.io.load_file(out / "model.safetensors")
    for key in ("concept_embeds_weights", "special_care_embeds_weights"):
        sd[key] = torch.full_like(sd[key], -2.0 if flag else 2.0)
    save_file(sd, out / "model.safetensors")
    return out


def test_the_pipeline_hides_and_reports_flagged_images(published, tmp_path):
    plain = sfumato.load(dtype="fp32").txt2img(PROMPT, seed=2, steps=3)
    pipe = sfumato.load(dtype="fp32", safety_checker=_always(published, tmp_path, True))   # the Python API's way
    flagged = pipe.txt2img(PROMPT, seed=2, steps=3, batch_size=2)
    assert [item.nsfw for item in flagged.items] == [True, True]
    assert all(np.asarray(im).max() == 0 for im in flagged.images)       # black, as the reference
    assert "Safety checker: flagged (blacked out)" in flagged.items[0].infotext
    pipe.safety_action = "blur"
    blurred = pipe.txt2img(PROMPT, seed=2, steps=3, watermark=False)
    checker, pipe.safety_checker = pipe.safety_checker, None
    unchecked = pipe.txt2img(PROMPT, seed=2, steps=3, watermark=False).images[0]
    pipe.safety_checker = checker
    assert blurred.items[0].nsfw and "flagged (blurred)" in blurred.items[0].infotext
    assert np.array_equal(np.asarray(blurred.images[0]), np.asarray(hide(unchecked, "blur")))
    assert not np.array_equal(np.asarray(blurred.images[0]), np.asarray(unchecked))
    pipe.safety_checker = load_safety_checker(_always(published, tmp_path, False))
    passed = pipe.txt2img(PROMPT, seed=2, steps=3)
    assert passed.items[0].nsfw is False and "Safety checker" not in passed.items[0].infotext
    assert np.array_equal(np.asarray(passed.images[0]), np.asarray(plain.images[0]))


def test_the_command_line_and_the_server_report_it(published, tmp_path, capsys):
    always = _always(published, tmp_path, True)
    out = tmp_path / "x.png"
    code = main(["txt2img", PROMPT, "--steps", "2", "--safety-checker", str(always), "-o", str(out)])
    printed = capsys.readouterr()
    assert code == 0 and "flagged by the safety checker" in printed.out
    assert np.asarray(Image.open(out).convert("RGB")).max() == 0
    code = main(["txt2img", PROMPT, "--safety-checker", str(tmp_path / "none"), "-o", str(out)])
    assert code == 2 and "--safety-checker" in capsys.readouterr().err
    import requests

    app = create_app(ServerConfig(safety_checker=always, safety_action="blur", watermark=False))
    with live_server(app) as port:
        r = requests.post(f"http://127.0.0.1:{port}/sdapi/v1/txt2img",
                          json=dict(prompt=PROMPT, steps=2, width=64, height=64, batch_size=2))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["nsfw"] == [True, True]
    assert "flagged (blurred)" in json.loads(body["info"])["infotexts"][0]
    image = Image.open(io.BytesIO(base64.b64decode(body["images"][0])))
    assert np.asarray(image.convert("RGB")).max() > 0


def test_the_web_ui_marks_a_flagged_image(published, tmp_path, browser):  # noqa: F811 — test_webui's fixture
    import re

    from test_webui import TIMEOUT_MS

    app = create_app(ServerConfig(safety_checker=_always(published, tmp_path, True)), pipeline=sfumato.load())
    with live_server(app) as port:
        page = browser.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(f"http://127.0.0.1:{port}/")
        page.locator("#status").filter(has_text=re.compile("^ready$")).wait_for()
        page.fill("#prompt", PROMPT)
        page.fill("#steps", "2")
        page.click("#generate")
        page.locator("#gallery .flag").wait_for()
        assert page.inner_text("#gallery .flag") == "Flagged by the safety checker"
        assert "Safety checker: flagged (blacked out)" in page.inner_text("#gallery figcaption pre")
        page.close()
