"""The web UI's own routes (server/ui.py) on a bare app: the model's native size per family, and the
history routes, without loading a model."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from sfumato.checkpoint.specs import PRESETS
from sfumato.server import ui
from sfumato.server.app import _add_error_handlers


def _client(spec, outputs_dir: Path | None = None, few_step=None) -> TestClient:
    pipe = None if spec is None else SimpleNamespace(model=SimpleNamespace(spec=spec), family=spec.family,
                                                     few_step=few_step)
    state = SimpleNamespace(host=SimpleNamespace(pipe=pipe), defaults=SimpleNamespace(checkpoint="model"),
                            config=SimpleNamespace(outputs_dir=outputs_dir), title=lambda entry: f"{entry} [0123456789]")
    app = FastAPI()
    _add_error_handlers(app)
    ui.add_routes(app, state)
    return TestClient(app)


@pytest.mark.parametrize("family, size", [("sd1", 512), ("sd2", 512), ("sd2-v", 768), ("sdxl", 1024),
                                          ("sd2-unclip-h", 768)])
def test_the_model_gives_its_native_size(family, size):
    info = _client(PRESETS[family]).get("/v1/ui/model").json()
    assert info == {"family": family, "width": size, "height": size, "title": "model [0123456789]", "history": False,
                    "unclip": family.startswith("sd2-unclip"), "depth_estimator": False, "few_step": None}


def test_a_few_step_model_gives_its_settings():
    from sfumato.pipeline.fewstep import PRESETS as FEW

    info = _client(PRESETS["sd2"], few_step=FEW["turbo"]).get("/v1/ui/model").json()
    assert info["few_step"] == {"name": "turbo", "sampler": "Euler a", "scheduler": "trailing", "steps": 1,
                                "cfg_scale": 1.0}
    info = _client(PRESETS["sd1"], few_step=FEW["lcm"]).get("/v1/ui/model").json()
    assert info["few_step"]["sampler"] == "LCM" and info["few_step"]["scheduler"] == "automatic"


def test_no_model_between_two_is_a_503():
    assert _client(None).get("/v1/ui/model").status_code == 503


def test_history_off_and_on(tmp_path):
    off = _client(PRESETS["sd1"])
    assert off.get("/v1/history").json() == {"enabled": False, "items": [], "more": False}
    assert off.get("/v1/history/2026-01-01/00000-1.png").status_code == 404
    day = tmp_path / "2026-01-01"
    day.mkdir()
    (day / "00000-1.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    on = _client(PRESETS["sd1"], tmp_path)
    listing = on.get("/v1/history").json()
    assert listing["enabled"] and [i["name"] for i in listing["items"]] == ["2026-01-01/00000-1"]
    response = on.get("/v1/history/2026-01-01/00000-1.png")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    for bad in ("2026-01-01/00000-2.png", "2026-01-01/..%2F..%2Fx.png", "..%2F2026-01-01/00000-1.png",
                "2026-01-01/00000-1.gif", "2026-01-01/00000-1.exe"):
        assert on.get("/v1/history/" + bad).status_code == 404, bad
    (day / "00001-1.gif").write_bytes(b"GIF89a not really")   # a kept AnimateDiff clip
    assert on.get("/v1/history").json()["items"][0]["type"] == "image/gif"
    response = on.get("/v1/history/2026-01-01/00001-1.gif")
    assert response.status_code == 200 and response.headers["content-type"] == "image/gif"


def test_serve_takes_an_outputs_folder(tmp_path, monkeypatch, capsys):
    import uvicorn

    from sfumato.cli import main
    from sfumato.server import app as app_module

    made = []
    monkeypatch.setattr(app_module, "create_app", lambda config: made.append(config) or "app")
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)
    assert main(["serve", "--device", "cpu", "--outputs-dir", str(tmp_path / "out")]) == 0
    assert made[0].outputs_dir == tmp_path / "out"
    (tmp_path / "file").write_text("x")
    assert main(["serve", "--device", "cpu", "--outputs-dir", str(tmp_path / "file")]) == 2
    assert "--outputs-dir" in capsys.readouterr().err
