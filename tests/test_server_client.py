"""The unmodified A1111 client library ``webuiapi`` against a real uvicorn server on a free
loopback port: the bundled model at 64×64 and a few steps."""

from __future__ import annotations

import base64
import hashlib
import io
import threading
import time

import numpy as np
import pytest
import webuiapi
from PIL import Image

import sfumato
from conftest import live_server
from sfumato.server.app import ServerConfig, create_app
from sfumato.data import BUNDLED_UNCLIP_PATH
from sfumato.train.bundled import BUNDLED_PATH

SIZE = dict(width=64, height=64)


@pytest.fixture(scope="module")
def pipe():
    return sfumato.load()


@pytest.fixture(scope="module")
def api(pipe):
    with live_server(create_app(ServerConfig(watermark=False), pipeline=pipe)) as port:
        yield webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler="Euler a", steps=4)


def test_lists_models_samplers_and_schedulers(api):
    short_hash = hashlib.sha256(BUNDLED_PATH.read_bytes()).hexdigest()[:10]
    title = f"bundled.safetensors [{short_hash}]"
    unclip = f"bundled-unclip.safetensors [{hashlib.sha256(BUNDLED_UNCLIP_PATH.read_bytes()).hexdigest()[:10]}]"
    assert sorted(api.util_get_model_names()) == sorted([title, unclip])   # the bundled model and its unCLIP variant
    assert api.util_get_current_model() == title
    names = api.util_get_sampler_names()
    assert {"Euler", "Euler a", "DPM++ 2M", "DPM++ 2M SDE", "DDIM", "UniPC"} <= set(names)
    assert {"automatic", "karras", "exponential"} <= set(api.util_get_scheduler_names())
    api.util_set_model("bundled")                    # webuiapi's closest-name switch, by title
    assert api.util_get_current_model() == title


def test_txt2img_matches_the_library_and_carries_infotext(api, pipe):
    result = api.txt2img(prompt="a red circle on a blue background", seed=3, cfg_scale=7, **SIZE)
    image = result.image
    assert image.size == (64, 64)
    assert result.info["all_seeds"] == [3] and result.info["sampler_name"] == "Euler a"
    assert result.parameters["prompt"] == "a red circle on a blue background"
    text = image.info["parameters"]
    assert "Steps: 4" in text and "Sampler: Euler a" in text and "Seed: 3" in text and "Size: 64x64" in text
    direct = pipe.txt2img("a red circle on a blue background", seed=3, steps=4, sampler="Euler a",
                          watermark=False, **SIZE)
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(direct.images[0]))


def test_img2img_inpaints_only_the_mask(api):
    init = Image.new("RGB", (64, 64), (20, 40, 200))
    init.paste((220, 30, 30), (16, 16, 48, 48))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))                  # repaint the left half
    result = api.img2img(images=[init], mask_image=mask, mask_blur=0, inpainting_fill=1, inpaint_full_res=False,
                         denoising_strength=0.9, prompt="a green triangle on a yellow background", seed=5, **SIZE)
    out = np.asarray(result.image.convert("RGB")).astype(int)
    src = np.asarray(init).astype(int)
    assert np.array_equal(out[:, 32:], src[:, 32:])  # outside the mask: the original, exactly
    assert np.abs(out[:, :32] - src[:, :32]).mean() > 10
    assert result.info["denoising_strength"] == 0.9
    assert result.parameters["init_images"] is None  # A1111 leaves the images out of the echo


def test_progress_then_interrupt(api, pipe):
    box: dict = {}
    worker = threading.Thread(target=lambda: box.update(result=api.txt2img(
        prompt="a square", seed=1, steps=60, batch_size=4, **SIZE)))
    start = time.monotonic()
    worker.start()
    progress = api.get_progress()
    while progress["state"]["sampling_step"] < 2:
        assert time.monotonic() - start < 60 and worker.is_alive()
        time.sleep(0.02)
        progress = api.get_progress()
    assert 0 < progress["progress"] < 1 and progress["eta_relative"] >= 0
    assert progress["state"]["job_count"] == 1 and progress["state"]["sampling_steps"] == 60
    assert Image.open(io.BytesIO(base64.b64decode(progress["current_image"]))).size == (16, 16)
    assert api.interrupt() == {}
    worker.join(60)
    result = box["result"]
    assert len(result.images) == 4                   # the latest x̂0 of the interrupted batch, as A1111
    assert result.info["all_seeds"] == [1, 2, 3, 4]
    idle = api.get_progress()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0
    # stopped early: far from the finished image of the same seed
    full = pipe.txt2img("a square", seed=1, steps=60, watermark=False, **SIZE).images[0]
    diff = np.abs(np.asarray(result.images[0].convert("RGB"), dtype=int) - np.asarray(full, dtype=int))
    assert diff.mean() > 5


def test_skip_moves_to_the_next_image(api, pipe):
    box: dict = {}
    worker = threading.Thread(target=lambda: box.update(result=api.txt2img(
        prompt="a square", seed=7, steps=40, n_iter=2, **SIZE)))
    start = time.monotonic()
    worker.start()
    progress = api.get_progress()
    while progress["state"]["sampling_step"] < 2 or progress["state"]["job_no"] != 0:
        assert time.monotonic() - start < 60 and worker.is_alive()
        time.sleep(0.02)
        progress = api.get_progress()
    assert api.skip() == {}
    worker.join(120)
    result = box["result"]
    assert len(result.images) == 2 and result.info["all_seeds"] == [7, 8]
    first, second = (np.asarray(im.convert("RGB"), dtype=int) for im in result.images)
    full = [np.asarray(pipe.txt2img("a square", seed=s, steps=40, sampler="Euler a", watermark=False, **SIZE)
                       .images[0], dtype=int)
            for s in (7, 8)]
    assert np.abs(first - full[0]).mean() > 5        # the skipped image: its latest x̂0
    assert np.array_equal(second, full[1])           # the next one ran to the end


def test_png_info_reads_back_the_parameters(api):
    image = api.txt2img(prompt="a blue triangle", negative_prompt="red", seed=11, steps=2, **SIZE).image
    info = api.png_info(image)
    assert info.info == image.info["parameters"]
    assert info.parameters["Prompt"] == "a blue triangle"
    assert info.parameters["Negative prompt"] == "red"
    assert info.parameters["Seed"] == "11" and info.parameters["Steps"] == "2"
