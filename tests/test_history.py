"""The server's history folder (server/history.py): saving a job's images, listing them newest first
(bounded), and resolving names only inside the folder."""

from __future__ import annotations

import base64
import io
import time

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from sfumato.server import history


def _b64(seed: int) -> str:
    info = PngInfo()
    info.add_text("parameters", f"a prompt\nSteps: 2, Sampler: Euler, Seed: {seed}, Size: 8x8")
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (seed % 256, 0, 0)).save(out, format="PNG", pnginfo=info)
    return base64.b64encode(out.getvalue()).decode()


NOW = time.mktime((2026, 3, 4, 12, 0, 0, 0, 0, -1))


def test_saves_numbered_pngs_with_their_infotext(tmp_path):
    names = history.save_result(tmp_path, {"images": [_b64(7), _b64(8)], "info": "{}"}, now=NOW)
    assert names == ["2026-03-04/00000-7", "2026-03-04/00001-8"]
    more = history.save_result(tmp_path, {"images": [_b64(9)]}, now=NOW)
    assert more == ["2026-03-04/00002-9"]
    saved = Image.open(tmp_path / "2026-03-04" / "00001-8.png")
    assert saved.info["parameters"].endswith("Seed: 8, Size: 8x8")
    assert not list(tmp_path.rglob("*.tmp"))


def test_no_folder_keeps_nothing_and_bad_images_do_not_raise(tmp_path):
    assert history.save_result(None, {"images": [_b64(1)]}) == []
    assert history.save_result(tmp_path, {"images": ["not base64!"]}, now=NOW) == []
    assert history.save_result(tmp_path, None) == []


def test_lists_newest_first_in_pages(tmp_path):
    history.save_result(tmp_path, {"images": [_b64(s) for s in range(5)]}, now=NOW)
    history.save_result(tmp_path, {"images": [_b64(99)]}, now=NOW + 86400)
    first = history.list_items(tmp_path, 0, 2)
    assert [i["name"] for i in first["items"]] == ["2026-03-05/00000-99", "2026-03-04/00004-4"] and first["more"]
    assert first["items"][0]["url"] == "v1/history/2026-03-05/00000-99.png"
    assert "Seed: 99" in first["items"][0]["parameters"]
    last = history.list_items(tmp_path, 4, 10)
    assert [i["name"] for i in last["items"]] == ["2026-03-04/00001-1", "2026-03-04/00000-0"] and not last["more"]
    assert len(history.list_items(tmp_path, 0, 10_000)["items"]) == 6     # limit capped, not refused
    assert history.list_items(tmp_path / "missing", 0, 5) == {"items": [], "more": False}


def test_resolves_only_names_it_gives(tmp_path):
    history.save_result(tmp_path, {"images": [_b64(3)]}, now=NOW)
    assert history.resolve(tmp_path, "2026-03-04/00000-3") == (tmp_path / "2026-03-04" / "00000-3.png").resolve()
    (tmp_path / "secret.png").write_bytes(b"x")
    for name in ("2026-03-04/00001-3", "../secret", "2026-03-04/../../secret", "2026-03-04/00000-3.png",
                 "/etc/passwd", "2026-03-04/00000-3/../00000-3", ""):
        assert history.resolve(tmp_path, name) is None, name
