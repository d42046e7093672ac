"""The server's history: every finished job of the job API writes its images, as PNGs carrying
their infotext, into the outputs folder (``outputs/YYYY-MM-DD/00012-<seed>.png``), where the web
UI can browse them again after a restart; an AnimateDiff job's clips are kept beside them as they
were sent (``00013-<seed>.gif``, ``.webp``, ``.mp4``; the infotext in the file's metadata).

Writes are atomic (a reader sees a whole file or none); reading is bounded: a listing lists the
newest day folders only until it has ``offset + limit`` names, and reads the text chunks (not the
pixels) of at most ``limit`` (≤ 100) files.
"""

from __future__ import annotations

import base64
import binascii
import html
import io
import json
import logging
import re
import threading
import time
from pathlib import Path
from typing import Any

from PIL import Image

from ..checkpoint.io import atomic_path

log = logging.getLogger(__name__)

DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
FILE = re.compile(r"([0-9]{5,})-([0-9a-z]+)\.(png|gif|webp|mp4)")
CLIP_TYPES = {"gif": "image/gif", "webp": "image/webp", "mp4": "video/mp4"}
NAME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}/[0-9]{5,}-[0-9a-z]+")   # a history item's name: day/file stem
MAX_LIMIT = 100
_SEED = re.compile(r"(?:^|, )Seed: (-?[0-9]+)")
_lock = threading.Lock()


def _parameters(data: bytes | Path) -> str | None:
    """A PNG's infotext; from a file, only the chunks before the pixels are read."""
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
            text = image.info.get("parameters")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return text if isinstance(text, str) else None


def _kind(data: bytes) -> str | None:
    """What a job's image is, from its first bytes: a PNG, or a clip (GIF, WebP, MP4); None: neither."""
    if data.startswith(b"\x89PNG"):
        return "png"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[4:8] == b"ftyp":
        return "mp4"
    return None


def _job_infotext(result: dict) -> str | None:
    try:
        texts = json.loads(result.get("info") or "{}").get("infotexts") or []
    except (ValueError, AttributeError):
        return None
    return texts[0] if texts and isinstance(texts[0], str) else None


MAX_XMP_BYTES, MAX_CHUNKS = 1 << 20, 4096


def _clip_parameters(path: Path) -> str | None:
    """A kept clip's infotext: a GIF's comment (read with the header, before the first frame), a
    WebP's XMP description (its RIFF chunks walked by their headers, no frame decoded; bounded);
    MP4: not read back."""
    try:
        if path.suffix == ".gif":
            with Image.open(path) as clip:
                comment = clip.info.get("comment")
            return comment.decode("utf-8", "replace") if isinstance(comment, bytes) else None
        if path.suffix != ".webp":
            return None
        xmp = None
        with open(path, "rb") as f:
            if f.read(12)[8:12] != b"WEBP":
                return None
            for _ in range(MAX_CHUNKS):
                header = f.read(8)
                if len(header) < 8:
                    break
                size = int.from_bytes(header[4:], "little")
                if header[:4] == b"XMP ":
                    xmp = f.read(min(size, MAX_XMP_BYTES)).decode("utf-8", "replace")
                    break
                f.seek(size + (size & 1), 1)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    m = re.search(r"<dc:description>(.*?)</dc:description>", xmp or "", re.S)
    return html.unescape(m.group(1)) if m else None


def _next_number(day: Path) -> int:
    numbers = [int(m.group(1)) for p in day.iterdir() if (m := FILE.fullmatch(p.name))]
    return max(numbers, default=-1) + 1


def save_result(outputs_dir: Path | None, result: Any, now: float | None = None) -> list[str]:
    """Write ``result``'s images (A1111's response: base64 PNGs with infotext) into today's folder
    of ``outputs_dir``; returns the names written. ``None``: no history is kept. A failure to write
    is logged, never raised: the job has succeeded whether or not its copy on disk did."""
    if outputs_dir is None or not isinstance(result, dict):
        return []
    names: list[str] = []
    try:
        day = Path(outputs_dir) / time.strftime("%Y-%m-%d", time.localtime(now))
        day.mkdir(parents=True, exist_ok=True)
        with _lock:   # one numbering per folder, even if two servers' jobs finished at once in-process
            number = _next_number(day)
            for b64 in result.get("images") or []:
                data = base64.b64decode(b64, validate=True)
                kind = _kind(data)
                if kind is None:
                    continue
                text = _parameters(data) if kind == "png" else _job_infotext(result)
                seed = m.group(1) if text and (m := _SEED.search(text.rsplit("\n", 1)[-1])) else "image"
                path = day / f"{number:05d}-{seed.lstrip('-')}.{kind}"
                with atomic_path(path) as tmp:
                    tmp.write_bytes(data)
                names.append(f"{day.name}/{path.stem}")
                number += 1
    except (OSError, binascii.Error, ValueError) as e:
        log.warning("could not save a job's images to the outputs folder: %s", e)
    return names


def list_items(outputs_dir: Path, offset: int = 0, limit: int = 20) -> dict[str, Any]:
    """The newest items first: ``{"items": [{"name", "url", "parameters"}], "more": bool}``."""
    limit = max(1, min(limit, MAX_LIMIT))
    offset = max(0, offset)
    wanted = offset + limit + 1
    root = Path(outputs_dir)
    found: list[tuple[str, Path]] = []
    days = sorted((p for p in root.iterdir() if DAY.fullmatch(p.name) and p.is_dir() and not p.is_symlink()), reverse=True) \
        if root.is_dir() else []
    for day in days:
        files = sorted(((int(m.group(1)), p) for p in day.iterdir() if (m := FILE.fullmatch(p.name))), reverse=True)
        found += [(f"{day.name}/{p.stem}", p) for _, p in files]
        if len(found) >= wanted:
            break
    page = found[offset:offset + limit]
    items = []
    for name, path in page:
        if not path.is_file():
            continue
        kind = path.suffix[1:]
        text = _parameters(path) if kind == "png" else _clip_parameters(path)
        items.append({"name": name, "url": f"v1/history/{name}.{kind}", "parameters": text,
                      "type": "image/png" if kind == "png" else CLIP_TYPES[kind]})
    return {"items": items, "more": len(found) > offset + limit}


def resolve(outputs_dir: Path, name: str, kind: str = "png") -> Path | None:
    """The file of a history item's ``name`` (``day/stem``) and ``kind`` (png, gif, webp, mp4),
    inside ``outputs_dir``; None if the name is not one the history gives or the file is not there."""
    if not NAME.fullmatch(name) or kind not in ("png", *CLIP_TYPES):
        return None
    root = Path(outputs_dir).resolve()
    path = (root / f"{name}.{kind}").resolve()
    if not path.is_relative_to(root) or not path.is_file():
        return None
    return path
