"""Images in and out: the one PIL ⇄ tensor conversion, and atomic PNG/JPEG/WebP writes that carry the infotext where
AUTOMATIC1111 puts it (a PNG ``parameters`` text chunk; EXIF ``UserComment`` for JPEG and WebP;
``infotext.read_image_parameters`` reads it back)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin
from torch import Tensor

from ..checkpoint.io import atomic_path
from ..errors import SfumatoError
from .infotext import user_comment_exif

FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
_JPEG_MARKER_MAX = 65533   # payload bytes of one JPEG APP1 segment


def to_pil(images: Tensor) -> list[Image.Image]:
    """uint8 [B, H, W, 3] → PIL images."""
    return [Image.fromarray(img.numpy()) for img in images]


def to_tensor(images: list[Image.Image]) -> Tensor:
    """PIL images → [-1, 1] float tensor [B, 3, H, W]."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images]) / 127.5 - 1
    return torch.from_numpy(arr).permute(0, 3, 1, 2)


def save_image(image: Image.Image, path: str | Path, parameters: str | None = None, *, quality: int = 95) -> Path:
    """Write ``image`` atomically in the format its extension names (.png, .jpg/.jpeg, .webp),
    with ``parameters`` (the infotext) stored as AUTOMATIC1111 stores it."""
    path = Path(path)
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise SfumatoError(f"output: unsupported image extension {path.suffix!r}; valid: {', '.join(FORMATS)}")
    if fmt == "PNG":
        return save_png(image, path, parameters)
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    options: dict = {"quality": quality}
    if parameters is not None:
        options["exif"] = user_comment_exif(parameters)
        if fmt == "JPEG" and len(options["exif"]) > _JPEG_MARKER_MAX:
            raise SfumatoError(f"output: the infotext is too long for JPEG's EXIF segment "
                               f"({len(options['exif'])} bytes, at most {_JPEG_MARKER_MAX}); save as PNG or WebP")
    with atomic_path(path) as tmp:
        image.save(tmp, format=fmt, **options)
    return path


def save_png(image: Image.Image, path: str | Path, parameters: str | None = None) -> Path:
    """Write a PNG atomically (whatever the extension), ``parameters`` in a text chunk."""
    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return Path(path)


def batch_paths(output: str | Path, n: int) -> list[Path]:
    """``out.png`` for one image; ``out-0.png``, ``out-1.png``, … for a batch."""
    output = Path(output)
    if n == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i}{output.suffix or '.png'}") for i in range(n)]
