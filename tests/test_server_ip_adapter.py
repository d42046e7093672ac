"""IP-Adapter units as sd-webui-controlnet's API sends them (a unit whose module is an
``ip-adapter_clip_*`` preprocessor and whose model is the adapter), driven by the unmodified
webuiapi client: the server's image equals the library's for the same adapter, image, weight and
window; the CLIP image encoder the module names comes from the models folder's clip_vision/."""

from __future__ import annotations

import hashlib
import shutil

import numpy as np
import pytest
import requests
import webuiapi

from conftest import live_server
from sfumato.pipeline.params import IPAdapterSpec
from sfumato.server.app import ServerConfig, create_app
from test_ip_adapter import PROMPT, smooth_image, world  # noqa: F401 — the tiny world fixture


@pytest.fixture(scope="module")
def server(world):  # noqa: F811
    models = world["root"] / "server-models"
    (models / "ControlNet").mkdir(parents=True)
    (models / "clip_vision").mkdir()
    shutil.copy(world["model"], models / "tiny.safetensors")
    shutil.copy(world["paths"]["a"], models / "ControlNet" / "ip-a.safetensors")
    shutil.copy(world["encoder_dir"] / "model.safetensors", models / "clip_vision" / "clip_h.safetensors")
    shutil.copy(world["encoder_dir"] / "config.json", models / "clip_vision" / "config.json")
    config = ServerConfig(model=models / "tiny.safetensors", models_dir=models, watermark=False, dtype="fp32")
    with live_server(create_app(config)) as port:
        yield port, models


def test_an_ip_adapter_unit_equals_the_library(server, world):  # noqa: F811
    port, models = server
    api = webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler="Euler", steps=3)
    assert {"ip-adapter_clip_sd15", "ip-adapter_clip_sdxl"} <= set(api.controlnet_module_list())
    digest = hashlib.sha256((models / "ControlNet" / "ip-a.safetensors").read_bytes()).hexdigest()[:8]
    assert f"ip-a [{digest}]" in api.controlnet_model_list()
    image = smooth_image(5)
    unit = webuiapi.ControlNetUnit(image=image, module="ip-adapter_clip_sd15", model=f"ip-a [{digest}]", weight=0.6,
                                   guidance_start=0.0, guidance_end=0.7)
    got = api.txt2img(prompt=PROMPT, seed=7, cfg_scale=5, width=64, height=64, controlnet_units=[unit])
    spec = IPAdapterSpec(world["paths"]["a"], image.convert("RGB"), 0.6, 0.0, 0.7, world["encoder_dir"])
    want = world["pipe"].txt2img(PROMPT, steps=3, cfg_scale=5.0, seed=7, width=64, height=64, sampler="euler",
                                 ip_adapters=[spec], watermark=False)
    assert np.array_equal(np.asarray(got.image.convert("RGB")), np.asarray(want.images[0]))
    assert "ip-adapter_clip_sd15" in got.info["infotexts"][0]
    plain = world["pipe"].txt2img(PROMPT, steps=3, cfg_scale=5.0, seed=7, width=64, height=64, sampler="euler",
                                  watermark=False)
    assert not np.array_equal(np.asarray(got.image.convert("RGB")), np.asarray(plain.images[0]))


@pytest.mark.parametrize("unit, field, fragment", [
    (dict(module="ip-adapter_clip_sdxl"), "module", "clip_g"),          # its encoder is not in clip_vision/
    (dict(module="ip-adapter_clip_sd15", weight=5), "weight", "must be in [0, 2]"),
    (dict(module="ip-adapter_clip_sd15", guidance_start=0.9, guidance_end=0.1), "guidance_start", ""),
])
def test_bad_ip_adapter_units_name_the_field(server, unit, field, fragment):
    port, _ = server
    body = dict(prompt=PROMPT, steps=2, width=64, height=64, alwayson_scripts={"controlnet": {"args": [
        dict(image=webuiapi.raw_b64_img(smooth_image(1)), model="ip-a", **unit)]}})
    r = requests.post(f"http://127.0.0.1:{port}/sdapi/v1/txt2img", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["field"] == f"alwayson_scripts.controlnet.args[0].{field}" and fragment in r.json()["detail"]
