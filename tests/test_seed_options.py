"""A1111's "Resize seed from width/height" and "Eta noise seed delta" (ENSD) are reachable from the
Python API, the command line and the server (issue 13: ImageNoise had them, nothing could use them)."""

from __future__ import annotations

import json

import torch
from fastapi.testclient import TestClient

import sfumato
from sfumato.cli import main
from sfumato.diffusion.noise import ImageNoise
from sfumato.pipeline.infotext import params_from_infotext, read_image_parameters
from sfumato.server.app import ServerConfig, create_app

KW = dict(steps=3, seed=5, width=64, height=64, watermark=False)


def test_seed_resize_draws_the_seeds_noise_at_the_other_size():
    pipe = sfumato.load(dtype="fp32")
    plain = pipe.txt2img("a red circle", **KW)
    resized = pipe.txt2img("a red circle", seed_resize_from_w=48, seed_resize_from_h=48, **KW)
    assert not torch.equal(plain.latents, resized.latents)
    assert "Seed resize from: 48x48" in resized.items[0].infotext
    settings = params_from_infotext(resized.items[0].infotext)
    assert (settings["seed_resize_from_w"], settings["seed_resize_from_h"]) == (48, 48)
    # the noise the loop starts from is ImageNoise's own resize (the 48² seed noise centred)
    noise = ImageNoise((4, 8, 8), [5], seed_resize_from=(48, 48)).initial()
    assert not torch.equal(noise, ImageNoise((4, 8, 8), [5]).initial())


def test_ensd_changes_ancestral_samplers_only():
    pipe = sfumato.load(dtype="fp32")
    for sampler, changes in (("euler_a", True), ("euler", False)):
        a = pipe.txt2img("a red circle", sampler=sampler, **KW).latents
        b = pipe.txt2img("a red circle", sampler=sampler, eta_noise_seed_delta=31337, **KW)
        assert torch.equal(a, b.latents) is not changes
        assert "ENSD: 31337" in b.items[0].infotext


def test_command_line_and_server_reach_them(tmp_path, capsys):
    out = tmp_path / "x.png"
    assert main(["txt2img", "a red circle", "--steps", "2", "--seed-resize-from-w", "48", "--seed-resize-from-h",
                 "56", "--eta-noise-seed-delta", "7", "--sampler", "euler_a", "-o", str(out)]) == 0
    text = read_image_parameters(out)
    assert "Seed resize from: 48x56" in text and "ENSD: 7" in text
    app = create_app(ServerConfig(), pipeline=sfumato.load())
    with TestClient(app, base_url="http://127.0.0.1") as client:
        body = {"prompt": "a red circle", "steps": 2, "width": 64, "height": 64, "seed": 5, "sampler_name": "Euler a",
                "seed_resize_from_w": 48, "seed_resize_from_h": 56, "override_settings": {"eta_noise_seed_delta": 7}}
        r = client.post("/sdapi/v1/txt2img", json=body)
        assert r.status_code == 200, r.text
        info = json.loads(r.json()["info"])
        assert (info["seed_resize_from_w"], info["seed_resize_from_h"]) == (48, 56)
        assert "ENSD: 7" in info["infotexts"][0]
        r = client.post("/sdapi/v1/txt2img", json={**body, "override_settings": {"eta_noise_seed_delta": -1}})
        assert r.status_code == 422 and r.json()["field"] == "override_settings.eta_noise_seed_delta"
