"""A1111's scripts and extras as the unmodified client ``webuiapi`` drives them against a real
server: the X/Y/Z plot, extras upscaling (Lanczos and an x4 upscaler model), the hires pass's own
sampler and prompt, and sfumato's additions to the requests (depth maps, attention maps). Every
image the server returns is compared with the library's own call for the same settings, or with
PIL for Lanczos."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import requests
import webuiapi
from PIL import Image

import sfumato
from conftest import write_tiny_model
from golden_world import DEPTH, X4
from sfumato.pipeline.attention_maps import generate_with_maps, overlay
from sfumato.pipeline.infotext import params_from_infotext
from sfumato.server.app import ServerConfig, create_app
from sfumato.server.xyz import AXES

PROMPT = "a red circle on a blue background"
SIZE = dict(width=64, height=64)
KW = dict(dtype="fp32")


def _xyz_args(x=(0, ""), y=(0, ""), z=(0, ""), *, legend=True, lone=True, sub_grids=False, keep_seeds=False):
    """A1111 1.7–1.10's 18 script_args; an axis is (type index, values text or dropdown list)."""
    out = []
    for index, values in (x, y, z):
        out += [index, values if isinstance(values, str) else "", values if isinstance(values, list) else []]
    return out + [legend, lone, sub_grids, keep_seeds, False, False, False, 0, False]


def _axis(label: str, mode: str = "txt2img") -> int:
    return [a[0] for a in AXES[mode]].index(label)


def _rgb(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    write_tiny_model(root / "sd.safetensors", seed=0)
    write_tiny_model(root / "other.safetensors", seed=11)
    write_tiny_model(root / "depth.safetensors", DEPTH, seed=2)
    (root / "upscalers").mkdir()
    write_tiny_model(root / "upscalers" / "x4.safetensors", X4, seed=3)
    return root


@pytest.fixture(scope="module")
def server(models):
    from conftest import live_server

    config = ServerConfig(model=models / "sd.safetensors", models_dir=models, watermark=False, dtype="fp32")
    with live_server(create_app(config)) as port:
        yield port


@pytest.fixture(scope="module")
def api(server):
    return webuiapi.WebUIApi(host="127.0.0.1", port=server, sampler="Euler", steps=3)


@pytest.fixture(scope="module")
def sd(models):
    return sfumato.load(models / "sd.safetensors", **KW)


# -- X/Y/Z plot ----------------------------------------------------------------------------------------

def test_xyz_plot_seed_by_steps_gives_the_grid_and_every_cell(api, sd):
    args = _xyz_args((_axis("Seed"), "1, 2"), (_axis("Steps"), "2-3"), legend=False)
    result = api.txt2img(prompt=PROMPT, seed=7, cfg_scale=5, script_name="X/Y/Z plot", script_args=args, **SIZE)
    assert len(result.images) == 5                       # the grid, then the 4 cells
    grid, cells = result.images[0], result.images[1:]
    assert grid.size == (128, 128)                       # no legend: exactly the cells, 2 x 2
    for i, (seed, steps) in enumerate([(1, 2), (2, 2), (1, 3), (2, 3)]):   # x fastest
        direct = sd.txt2img(PROMPT, seed=seed, steps=steps, sampler="euler", cfg_scale=5, watermark=False, **SIZE)
        assert np.array_equal(_rgb(cells[i]), _rgb(direct.images[0])), (seed, steps)
        r, c = divmod(i, 2)
        assert np.array_equal(_rgb(grid)[r * 64:(r + 1) * 64, c * 64:(c + 1) * 64], _rgb(direct.images[0]))
        assert f"Seed: {seed}" in cells[i].info["parameters"] and f"Steps: {steps}" in cells[i].info["parameters"]
    text = grid.info["parameters"]
    assert "Script: X/Y/Z plot" in text and "X Type: Seed" in text and "Y Type: Steps" in text
    assert result.info["infotexts"][0] == text and len(result.info["infotexts"]) == 5


def test_xyz_plot_sampler_schedule_cfg_and_prompt_sr(api, sd):
    args = _xyz_args((_axis("Sampler"), ["Euler", "DPM++ 2M"]), (_axis("Prompt S/R"), "red, green"),
                     (_axis("Schedule type"), ["Karras"]))
    result = api.txt2img(prompt=PROMPT, seed=4, script_name="x/y/z plot", script_args=args, **SIZE)
    grid, cells = result.images[0], result.images[1:]
    assert len(cells) == 4 and grid.width > 128 and grid.height > 128    # the legend adds margins
    for cell, (sampler, prompt) in zip(cells, [("euler", PROMPT), ("dpmpp_2m", PROMPT),
                                               ("euler", PROMPT.replace("red", "green")),
                                               ("dpmpp_2m", PROMPT.replace("red", "green"))]):
        direct = sd.txt2img(prompt, seed=4, steps=3, sampler=sampler, scheduler="karras", watermark=False, **SIZE)
        assert np.array_equal(_rgb(cell), _rgb(direct.images[0])), (sampler, prompt)
        assert "Schedule type: Karras" in cell.info["parameters"]
    args = _xyz_args((_axis("CFG Scale"), "1-3 [2]"))
    cells = api.txt2img(prompt=PROMPT, seed=4, script_name="x/y/z plot", script_args=args, **SIZE).images[1:]
    for cell, cfg in zip(cells, (1.0, 3.0)):
        direct = sd.txt2img(PROMPT, seed=4, steps=3, cfg_scale=cfg, sampler="euler", watermark=False, **SIZE)
        assert np.array_equal(_rgb(cell), _rgb(direct.images[0])), cfg


def test_xyz_plot_checkpoint_name_and_denoising_in_img2img(api, models, sd):
    init = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    args = _xyz_args((_axis("Checkpoint name", "img2img"), ["sd", "other"]), (_axis("Denoising", "img2img"), "0.5, 0.8"))
    result = api.img2img(images=[init], prompt=PROMPT, seed=9, script_name="x/y/z plot", script_args=args, **SIZE)
    other = sfumato.load(models / "other.safetensors", **KW)
    cells = result.images[1:]
    for cell, (pipe, strength) in zip(cells, [(sd, 0.5), (other, 0.5), (sd, 0.8), (other, 0.8)]):
        direct = pipe.img2img(PROMPT, init, seed=9, steps=3, strength=strength, sampler="euler", watermark=False, **SIZE)
        assert np.array_equal(_rgb(cell), _rgb(direct.images[0])), (pipe.model_name, strength)
    assert "Model: other" in cells[1].info["parameters"]
    # the plot switched models per cell and switched back: a plain request runs on the default
    plain = api.txt2img(prompt=PROMPT, seed=9, **SIZE)
    assert plain.info["sd_model_name"] == "sd"


@pytest.mark.parametrize("args, fragment", [
    (_xyz_args((_axis("Face restore"), "true")), "Face restore"),
    (_xyz_args((_axis("UniPC Order"), "1,2")), "not supported"),
    (_xyz_args((_axis("Steps"), "2, many")), "'many'"),
    (_xyz_args((_axis("Sampler"), ["Euler", "No such sampler"])), "No such sampler"),
    (_xyz_args((_axis("Prompt S/R"), "purple, green")), "did not find 'purple'"),
    (_xyz_args((99, "1")), "x_type"),
    ([1, "1,2"], "18 script_args"),
])
def test_xyz_plot_bad_axes_are_a_422_naming_script_args(server, args, fragment):
    r = requests.post(f"http://127.0.0.1:{server}/sdapi/v1/txt2img",
                      json=dict(prompt=PROMPT, steps=2, script_name="x/y/z plot", script_args=args, **SIZE))
    assert r.status_code == 422, r.text
    assert r.json()["field"] == "script_args" and fragment in r.json()["detail"]


def test_xyz_plot_through_the_job_api_and_its_axis_list(server):
    base = f"http://127.0.0.1:{server}"
    axes = requests.get(f"{base}/v1/xyz/axes", params={"mode": "txt2img"}).json()
    labels = [a["label"] for a in axes]
    assert labels[:5] == ["Nothing", "Seed", "Var. seed", "Var. strength", "Steps"]   # A1111's indices
    assert labels.index("Hires steps") == 5 and "Image CFG Scale" not in labels
    assert "Image CFG Scale" in [a["label"] for a in requests.get(f"{base}/v1/xyz/axes",
                                                                  params={"mode": "img2img"}).json()]
    job = requests.post(f"{base}/v1/jobs", json=dict(mode="txt2img", prompt=PROMPT, steps=2, seed=1,
                                                     script_name="x/y/z plot",
                                                     script_args=_xyz_args((1, "1,2"), lone=False), **SIZE)).json()
    for _ in range(600):
        status = requests.get(f"{base}/v1/jobs/{job['id']}").json()
        if status["status"] not in ("queued", "running"):
            break
        __import__("time").sleep(0.05)
    assert status["status"] == "done" and len(status["result"]["images"]) == 1   # the grid only


# -- extras ----------------------------------------------------------------------------------------------

def test_extras_lanczos_single_and_batch(api):
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (24, 40, 3), dtype=np.uint8))
    out = api.extra_single_image(image=image, upscaler_1="Lanczos", upscaling_resize=2.5)
    assert np.array_equal(_rgb(out.image), _rgb(image.resize((100, 60), Image.LANCZOS)))
    assert "Postprocess upscaler: Lanczos" in out.info
    batch = api.extra_batch_images(images=[image, image.transpose(Image.ROTATE_90)], upscaler_1="Nearest",
                                   resize_mode=1, upscaling_resize_w=80, upscaling_resize_h=48, upscaling_crop=True)
    assert [im.size for im in batch.images] == [(80, 48), (80, 48)]
    assert np.array_equal(_rgb(batch.images[0]), _rgb(image.resize((80, 48), Image.NEAREST)))


def test_extras_x4_upscaler_model_equals_the_library(api, models):
    names = [u["name"] for u in api.get_upscalers()]
    assert {"None", "Lanczos", "Nearest", "x4"} <= set(names)
    low = Image.fromarray(np.random.default_rng(2).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    out = api.extra_single_image(image=low, upscaler_1="x4", upscaling_resize=4)
    x4 = sfumato.load(models / "upscalers" / "x4.safetensors", **KW)
    direct = x4.upscale(low, steps=20, noise_level=20, seed=0, watermark=False)
    assert out.image.size == (64, 64)
    assert np.array_equal(_rgb(out.image), _rgb(direct.images[0]))
    half = api.extra_single_image(image=low, upscaler_1="x4", upscaling_resize=2)   # x4, then Lanczos down
    assert np.array_equal(_rgb(half.image), _rgb(direct.images[0].resize((32, 32), Image.LANCZOS)))


@pytest.mark.parametrize("body, field", [
    (dict(upscaler_1="ESRGAN_4x"), "upscaler_1"),
    (dict(upscaler_1="Lanczos", gfpgan_visibility=0.5), "gfpgan_visibility"),
    (dict(upscaler_1="Lanczos", upscaling_resize=100), "upscaling_resize"),
    (dict(upscaler_1="../sd"), "upscaler_1"),
])
def test_extras_bad_requests_are_a_422_naming_the_field(server, body, field):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    r = requests.post(f"http://127.0.0.1:{server}/sdapi/v1/extra-single-image",
                      json=dict(image=base64.b64encode(buffer.getvalue()).decode(), **body))
    assert r.status_code == 422 and r.json()["field"] == field, r.text


# -- the hires pass's own sampler and prompt -------------------------------------------------------------

def test_hires_sampler_and_prompt(api, sd):
    hires = dict(enable_hr=True, hr_scale=1.5, hr_upscaler="Latent", denoising_strength=0.6, hr_second_pass_steps=2)
    out = api.txt2img(prompt=PROMPT, seed=3, hr_sampler_name="DPM++ 2M", hr_prompt="a green square",
                      **hires, **SIZE)
    direct = sd.txt2img(PROMPT, seed=3, steps=3, sampler="euler", hires_scale=1.5, hires_denoise=0.6,
                        hires_steps=2, hires_sampler="dpmpp_2m", hires_prompt="a green square", watermark=False, **SIZE)
    assert np.array_equal(_rgb(out.image), _rgb(direct.images[0]))
    text = out.image.info["parameters"]
    assert "Hires sampler: DPM++ 2M" in text and "Hires prompt: a green square" in text
    same = sd.txt2img(PROMPT, seed=3, steps=3, sampler="euler", hires_scale=1.5, hires_denoise=0.6, hires_steps=2,
                      watermark=False, **SIZE)
    named_same = sd.txt2img(PROMPT, seed=3, steps=3, sampler="euler", hires_scale=1.5, hires_denoise=0.6,
                            hires_steps=2, hires_sampler="euler", hires_prompt=PROMPT, watermark=False, **SIZE)
    assert np.array_equal(_rgb(same.images[0]), _rgb(named_same.images[0]))     # "same" is the same
    assert not np.array_equal(_rgb(same.images[0]), _rgb(direct.images[0]))     # and another one is not
    for key in ("hires_sampler", "hires_prompt"):   # each alone changes the second pass
        alone = sd.txt2img(PROMPT, seed=3, steps=3, sampler="euler", hires_scale=1.5, hires_denoise=0.6,
                           hires_steps=2, watermark=False, **{key: "dpmpp_2m" if key == "hires_sampler"
                                                             else "a green square"}, **SIZE)
        assert not np.array_equal(_rgb(alone.images[0]), _rgb(same.images[0])), key
    settings = params_from_infotext(text)                               # and the infotext reads back
    assert (settings["hires_sampler"], settings["hires_prompt"]) == ("dpmpp_2m", "a green square")


# -- sfumato's additions: depth maps and attention maps ---------------------------------------------------

def _b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_depth_map_through_the_server_equals_the_library(server, models):
    init = Image.fromarray(np.random.default_rng(3).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    depth = Image.fromarray(np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (64, 1)))
    r = requests.post(f"http://127.0.0.1:{server}/sdapi/v1/img2img", json=dict(
        prompt=PROMPT, seed=5, steps=3, sampler_name="Euler", denoising_strength=0.7, init_images=[_b64(init)],
        depth_map=_b64(depth), override_settings={"sd_model_checkpoint": "depth"}, **SIZE))
    assert r.status_code == 200, r.text
    got = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    direct = sfumato.load(models / "depth.safetensors", **KW).img2img(
        PROMPT, init, seed=5, steps=3, strength=0.7, sampler="euler", depth_map=depth, watermark=False, **SIZE)
    assert np.array_equal(_rgb(got), _rgb(direct.images[0]))


def test_a_depth_map_for_a_model_without_depth_is_a_422(server):
    buffer = io.BytesIO()
    Image.new("L", (64, 64)).save(buffer, format="PNG")
    data = base64.b64encode(buffer.getvalue()).decode()
    r = requests.post(f"http://127.0.0.1:{server}/sdapi/v1/img2img",
                      json=dict(prompt=PROMPT, steps=2, init_images=[data], depth_map=data, **SIZE))
    assert r.status_code == 422 and r.json()["field"] == "depth_map", r.text


def test_attention_maps_come_with_the_images(server, sd):
    r = requests.post(f"http://127.0.0.1:{server}/sdapi/v1/txt2img",
                      json=dict(prompt=PROMPT, steps=3, seed=6, batch_size=2, sampler_name="Euler",
                                attention_maps=True, **SIZE))
    assert r.status_code == 200, r.text
    body = r.json()
    result, maps = generate_with_maps(sd, PROMPT, seed=6, steps=3, batch_size=2, sampler="euler", watermark=False,
                                      **SIZE)
    assert len(body["attention_maps"]) == 2
    for i, per_image in enumerate(body["attention_maps"]):
        assert [m["word"] for m in per_image] == list(maps[i])
        for m in per_image:
            got = Image.open(io.BytesIO(base64.b64decode(m["image"])))
            expected = overlay(result.images[i], maps[i][m["word"]])
            assert np.array_equal(_rgb(got), _rgb(expected)), (i, m["word"])
    plain = requests.post(f"http://127.0.0.1:{server}/sdapi/v1/txt2img",
                          json=dict(prompt=PROMPT, steps=3, seed=6, **SIZE)).json()
    assert "attention_maps" not in plain



@pytest.mark.parametrize("body, field", [
    (dict(hr_sampler_name="No such sampler"), "hr_sampler_name"),
    (dict(hr_scheduler="nope"), "hr_scheduler"),
    (dict(hr_checkpoint_name="../sd"), "hr_checkpoint_name"),
])
def test_bad_hires_fields_are_a_422_naming_them(server, body, field):
    r = requests.post(f"http://127.0.0.1:{server}/sdapi/v1/txt2img",
                      json=dict(prompt=PROMPT, steps=2, enable_hr=True, hr_scale=1.5, **body, **SIZE))
    assert r.status_code == 422 and r.json()["field"] == field, r.text
