"""Stable unCLIP through the server: A1111's img2img on an unCLIP checkpoint (the init image is the
image prompt, level 0), sfumato's ``unclip_images`` / ``unclip_noise_level`` on txt2img (variations
and mixing) and the job API; each image equals the library's for the same settings. Bad input is a
4xx naming the field."""

from __future__ import annotations

import base64
import io
import shutil

import numpy as np
import pytest
import requests
import webuiapi
from PIL import Image

from conftest import live_server
from sfumato.api import load
from sfumato.server.app import ServerConfig, create_app
from test_unclip import PROMPT, smooth_image, world  # noqa: F401 — the tiny world fixture


def b64(image: Image.Image) -> str:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def decode(text: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))).convert("RGB"))


@pytest.fixture(scope="module")
def server(world):  # noqa: F811
    models = world["root"] / "server-models"
    models.mkdir()
    shutil.copy(world["single"], models / "tiny-unclip.safetensors")
    config = ServerConfig(model=models / "tiny-unclip.safetensors", models_dir=models, watermark=False, dtype="fp32")
    with live_server(create_app(config)) as port:
        yield port


@pytest.fixture(scope="module")
def lib(world):  # noqa: F811
    return load(world["single"], dtype="fp32", device="cpu")


KW = dict(steps=3, cfg_scale=4.0, seed=5, width=64, height=64)


def test_variations_through_the_a1111_api_equal_the_library(server, lib):
    a, b = smooth_image(1).convert("RGB"), smooth_image(2, 56).convert("RGB")
    body = dict(prompt=PROMPT, sampler_name="Euler", unclip_images=[{"image": b64(a)}, {"image": b64(b), "weight": 0.4}],
                unclip_noise_level=100, **KW)
    r = requests.post(f"http://127.0.0.1:{server}/sdapi/v1/txt2img", json=body, timeout=120)
    assert r.status_code == 200, r.text
    want = lib.variations([(a, 1.0), (b, 0.4)], PROMPT, noise_level=100, sampler="euler", watermark=False, **KW)
    assert np.array_equal(decode(r.json()["images"][0]), np.asarray(want.images[0]))
    assert r.json()["parameters"]["unclip_images"] == [{"weight": 1.0}, {"weight": 0.4}]
    assert "unCLIP noise level: 100" in r.json()["info"]
    # the job API takes the same fields
    job = requests.post(f"http://127.0.0.1:{server}/v1/jobs", json={**body, "mode": "txt2img"}, timeout=30).json()
    for _ in range(600):
        state = requests.get(f"http://127.0.0.1:{server}/v1/jobs/{job['id']}", timeout=30).json()
        if state["status"] not in ("queued", "running"):
            break
        import time

        time.sleep(0.1)
    assert state["status"] == "done", state
    assert np.array_equal(decode(state["result"]["images"][0]), np.asarray(want.images[0]))


def test_a1111_img2img_embeds_its_init_image(server, lib):
    """webuiapi unmodified: img2img on an unCLIP model, as A1111 runs it."""
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server, sampler="Euler", steps=3)
    init = smooth_image(6, 64).crop((0, 0, 64, 64)).convert("RGB")
    got = api.img2img(images=[init], prompt=PROMPT, seed=5, cfg_scale=4, width=64, height=64, denoising_strength=0.8)
    want = lib.img2img(PROMPT, init, strength=0.8, sampler="euler", watermark=False, **KW)
    assert np.array_equal(np.asarray(got.image.convert("RGB")), np.asarray(want.images[0]))


@pytest.mark.parametrize("extra, field", [
    (dict(unclip_noise_level=1000), "unclip_noise_level"),
    (dict(unclip_images=[{"image": "not base64!"}]), "unclip_images[0].image"),
    (dict(unclip_images=[{"weight": 1.0}]), "unclip_images"),
    (dict(unclip_images=[{"image": "", "weight": 99}]), "unclip_images"),
])
def test_bad_unclip_fields_are_422(server, extra, field):
    r = requests.post(f"http://127.0.0.1:{server}/sdapi/v1/txt2img",
                      json=dict(prompt=PROMPT, **KW, **extra), timeout=60)
    assert r.status_code == 422, r.text
    assert field in r.text


def test_an_image_prompt_on_a_model_without_image_conditioning_is_422(tmp_path):
    image = b64(smooth_image(1).convert("RGB"))
    with live_server(create_app(ServerConfig(watermark=False, dtype="fp32"))) as port:   # the bundled model
        r = requests.post(f"http://127.0.0.1:{port}/sdapi/v1/txt2img",
                          json=dict(prompt="a red circle", steps=2, width=64, height=64,
                                    unclip_images=[{"image": image}]), timeout=60)
        assert r.status_code == 422 and "unclip_images" in r.text and "no image embedding" in r.text
        titles = [m["title"] for m in requests.get(f"http://127.0.0.1:{port}/sdapi/v1/sd-models", timeout=30).json()]
        assert any(t.startswith("bundled-unclip") for t in titles)   # listed beside the bundled model
