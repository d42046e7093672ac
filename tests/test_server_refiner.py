"""``refiner_checkpoint`` / ``refiner_switch_at`` (issue 14): the server loads the SDXL refiner named
from its models folder, hands it the schedule's tail, and gives the image the library gives."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import sfumato
from conftest import write_tiny_model
from sfumato.server.app import ServerConfig, create_app
from test_refiner import BASE, REFINER


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    models = tmp_path_factory.mktemp("refiner-models")
    base = write_tiny_model(models / "base.safetensors", BASE, seed=1)
    refiner = write_tiny_model(models / "refiner.safetensors", REFINER, seed=2)
    app = create_app(ServerConfig(models_dir=models, model=base, watermark=False))
    with TestClient(app, base_url="http://127.0.0.1") as client:
        yield client, base, refiner


BODY = {"prompt": "a red circle", "negative_prompt": "blurry", "steps": 4, "width": 64, "height": 64, "seed": 5,
        "sampler_name": "Euler"}


def _image(r) -> np.ndarray:
    assert r.status_code == 200, r.text
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB"))


def test_refiner_checkpoint_equals_the_library(world):
    client, base, refiner = world
    r = client.post("/sdapi/v1/txt2img", json={**BODY, "refiner_checkpoint": "refiner", "refiner_switch_at": 0.5})
    got = _image(r)
    text = json.loads(r.json()["info"])["infotexts"][0]
    assert "Refiner: refiner" in text and "Refiner switch at: 0.5" in text
    want = sfumato.load(base, refiner=refiner).txt2img("a red circle", "blurry", steps=4, width=64, height=64, seed=5,
                                                       sampler="euler", refiner_switch=0.5, watermark=False)
    assert np.array_equal(got, np.asarray(want.images[0]))
    plain = _image(client.post("/sdapi/v1/txt2img", json=BODY))       # no refiner: the base alone again
    assert not np.array_equal(plain, got)


@pytest.mark.parametrize("body, field", [
    ({"refiner_checkpoint": "nope"}, "refiner_checkpoint"),
    ({"refiner_checkpoint": "../x"}, "refiner_checkpoint"),
    ({"refiner_checkpoint": "refiner", "refiner_switch_at": 1.5}, "refiner_switch_at"),
    ({"refiner_switch_at": 0.5}, "refiner_switch_at"),
])
def test_bad_refiner_requests_name_the_field(world, body, field):
    client, *_ = world
    r = client.post("/sdapi/v1/txt2img", json={**BODY, **body})
    assert r.status_code == 422 and r.json()["field"] == field, r.text


def test_webuiapi_sends_the_refiner_as_a1111_clients_do(world):
    """webuiapi has no refiner argument: its clients send the A1111 fields with ``custom_post``."""
    import webuiapi

    from conftest import live_server

    _, base, refiner = world
    models = base.parent
    with live_server(create_app(ServerConfig(models_dir=models, model=base, watermark=False))) as port:
        api = webuiapi.WebUIApi(host="127.0.0.1", port=port)
        result = api.custom_post("sdapi/v1/txt2img", {**BODY, "refiner_checkpoint": "refiner", "refiner_switch_at": 0.5})
    want = sfumato.load(base, refiner=refiner).txt2img("a red circle", "blurry", steps=4, width=64, height=64, seed=5,
                                                       sampler="euler", refiner_switch=0.5, watermark=False)
    assert np.array_equal(np.asarray(result.image.convert("RGB")), np.asarray(want.images[0]))
    assert "Refiner: refiner" in result.info["infotexts"][0]
