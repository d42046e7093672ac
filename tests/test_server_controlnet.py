"""sd-webui-controlnet's API (issue 14): units in ``alwayson_scripts`` and the ``/controlnet/*`` routes,
driven by the unmodified webuiapi client; the server's image equals the command line's for the same
ControlNet and settings, and the control modes scale residuals as the extension does."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import webuiapi
from PIL import Image

import sfumato
from conftest import live_server
from golden_world import build, image
from sfumato.adapters.controlnet import ControlUnit, canny, load_controlnet
from sfumato.cli import main
from sfumato.server.app import ServerConfig, create_app


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    files = build(tmp_path_factory.mktemp("cn-api") / "world")
    models = files["sd"].parent / "models"
    (models / "ControlNet").mkdir(parents=True)
    shutil.copy(files["sd"], models / "tiny.safetensors")
    shutil.copy(files["control0"], models / "ControlNet" / "control_tiny.safetensors")
    app = create_app(ServerConfig(models_dir=models, model=models / "tiny.safetensors", watermark=False))
    with live_server(app) as port:
        yield files, models, webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler="Euler", steps=3)


def test_version_models_and_modules(world):
    _, models, api = world
    assert api.has_controlnet and api.controlnet_version() == 2
    import hashlib

    digest = hashlib.sha256((models / "ControlNet" / "control_tiny.safetensors").read_bytes()).hexdigest()[:8]
    assert api.controlnet_model_list() == [f"control_tiny [{digest}]"]
    assert {"none", "canny", "threshold"} <= set(api.controlnet_module_list())


def test_detect_runs_the_preprocessor(world):
    *_, api = world
    picture = image(3, (64, 64))
    result = api.controlnet_detect([picture], module="canny", processor_res=64, threshold_a=100, threshold_b=200)
    got = np.asarray(result.images[0].convert("RGB"))
    assert np.array_equal(got, canny(picture, 100, 200))


def test_a_unit_gives_the_command_lines_image(world, tmp_path):
    files, models, api = world
    control = image(3, (64, 64))
    control.save(tmp_path / "control.png")
    title = api.controlnet_model_list()[0]
    unit = webuiapi.ControlNetUnit(image=control, module="canny", model=title, weight=0.8, resize_mode="Just Resize",
                                   threshold_a=100, threshold_b=200, guidance_start=0.1, guidance_end=0.9)
    served = api.txt2img(prompt="a red circle", seed=4, width=64, height=64, controlnet_units=[unit]).image
    assert 'ControlNet 0: "Module: canny, Model: control_tiny, Weight: 0.8' in served.info["parameters"]
    out = tmp_path / "cli.png"
    assert main(["txt2img", "a red circle", "--model", str(models / "tiny.safetensors"), "--seed", "4", "--steps", "3",
                 "--sampler", "Euler", "--no-watermark", "--control-model", str(models / "ControlNet" / "control_tiny.safetensors"),
                 "--control-image", str(tmp_path / "control.png"), "--control-preprocessor", "canny",
                 "--control-strength", "0.8", "--control-threshold-a", "100", "--control-threshold-b", "200",
                 "--control-start", "0.1", "--control-end", "0.9", "-o", str(out)]) == 0
    assert np.array_equal(np.asarray(served.convert("RGB")), np.asarray(Image.open(out).convert("RGB")))
    plain = api.txt2img(prompt="a red circle", seed=4, width=64, height=64).image
    assert not np.array_equal(np.asarray(plain), np.asarray(served))


def test_img2img_units_without_an_image_use_the_init_image(world):
    *_, api = world
    init = image(5, (64, 64))
    unit = webuiapi.ControlNetUnit(module="none", model=api.controlnet_model_list()[0], resize_mode="Just Resize")
    with_init = api.img2img(images=[init], prompt="a red circle", seed=2, denoising_strength=0.7,
                            controlnet_units=[unit]).image
    plain = api.img2img(images=[init], prompt="a red circle", seed=2, denoising_strength=0.7).image
    assert not np.array_equal(np.asarray(with_init), np.asarray(plain))


@pytest.mark.parametrize("scripts, field", [
    ({"ControlNet": {"args": [{"model": "control_tiny", "module": "depth_midas", "image": "x"}]}},
     "alwayson_scripts.ControlNet.args[0].module"),
    ({"ControlNet": {"args": [{"model": "nope", "module": "none"}]}}, "alwayson_scripts.ControlNet.args[0].model"),
    ({"ControlNet": {"args": [{"model": "control_tiny", "module": "none"}]}}, "alwayson_scripts.ControlNet.args[0].image"),
    ({"ControlNet": {"args": [{"model": "control_tiny", "module": "none", "image": "", "weight": "x"}]}},
     "alwayson_scripts.ControlNet.args[0].image"),
    ({"ADetailer": {"args": [True, {"ad_model": "face"}]}}, "alwayson_scripts.ADetailer.args[1].ad_model"),
])
def test_bad_units_name_the_field(world, scripts, field):
    *_, api = world
    r = api.session.post(f"{api.baseurl}/txt2img", json={"prompt": "x", "steps": 1, "width": 64, "height": 64,
                                                          "alwayson_scripts": scripts})
    assert r.status_code == 422 and r.json()["field"] == field, r.text


def test_unused_extensions_are_accepted_as_clients_send_them(world):
    *_, api = world
    r = api.session.post(f"{api.baseurl}/txt2img", json={"prompt": "x", "steps": 1, "width": 64, "height": 64,
                                                          "alwayson_scripts": {"ADetailer": {"args": [False]},
                                                                               "ControlNet": {"args": []}}})
    assert r.status_code == 200, r.text


def test_control_modes_scale_residuals_as_the_extension(world):
    """"My prompt is more important": residual i of n times 0.825^(n-1-i); "ControlNet is more important":
    that, and none on the unconditional row (the first of each call)."""
    files, *_ = world
    pipe = sfumato.load(files["sd"], dtype="fp32")
    cn = load_controlnet(files["control0"], pipe.model.spec.unet)
    hint = image(3, (64, 64))
    g = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([500.0, 500.0]), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        base = ControlUnit(cn, hint).residuals(x, t, ctx, None, 1)
        prompt = ControlUnit(cn, hint, mode="prompt").residuals(x, t, ctx, None, 1)
        control = ControlUnit(cn, hint, mode="control").residuals(x, t, ctx, None, 1)
    n = len(base)
    for i, (b, p, c) in enumerate(zip(base, prompt, control)):
        torch.testing.assert_close(p, b * 0.825 ** (n - 1 - i))
        assert torch.equal(c[0], torch.zeros_like(c[0])) and torch.equal(c[1], p[1])
