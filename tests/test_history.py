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


def test_clips_are_kept_beside_the_frames_with_their_infotext(tmp_path):
    """An AnimateDiff job's GIF / WebP / MP4 is kept as sent, named by the seed of the job's infotext,
    listed with its type and parameters (GIF comment, WebP XMP) and resolved by its kind only."""
    import json

    from sfumato.pipeline.animate import save_clip

    text = "a red circle moving to the right\nSteps: 2, Seed: 41, Size: 8x8, AnimateDiff: \"model: m\""
    frames = [Image.new("RGB", (8, 8), (40 * k, 0, 0)) for k in range(3)]
    data = {}
    for kind in ("gif", "webp"):
        save_clip(frames, tmp_path / f"c.{kind}", 4, text)
        data[kind] = base64.b64encode((tmp_path / f"c.{kind}").read_bytes()).decode()
    mp4 = base64.b64encode(b"\x00\x00\x00\x18ftypisom" + b"\x00" * 16).decode()
    out = tmp_path / "outputs"
    names = history.save_result(out, {"images": [data["gif"], data["webp"], mp4, _b64(5)],
                                      "info": json.dumps({"infotexts": [text]})}, now=NOW)
    assert names == ["2026-03-04/00000-41", "2026-03-04/00001-41", "2026-03-04/00002-41", "2026-03-04/00003-5"]
    items = {i["name"]: i for i in history.list_items(out, 0, 10)["items"]}
    gif, webp, video = (items[f"2026-03-04/0000{k}-41"] for k in range(3))
    assert gif["url"].endswith("00000-41.gif") and gif["type"] == "image/gif" and gif["parameters"] == text
    assert webp["type"] == "image/webp" and webp["parameters"] == text
    assert video["type"] == "video/mp4" and video["parameters"] is None
    assert Image.open(out / "2026-03-04" / "00000-41.gif").n_frames == 3
    assert history.resolve(out, "2026-03-04/00000-41", "gif") is not None
    assert history.resolve(out, "2026-03-04/00000-41") is None            # no PNG of that name
    assert history.resolve(out, "2026-03-04/00000-41", "exe") is None
