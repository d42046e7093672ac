"""PIL images -> CLIP pixel tensors, pixel for pixel as transformers and open_clip prepare them.

Both resize the shortest edge to ``size`` with PIL bicubic (long edge ``int(size * long / short)``,
i.e. floored), centre-crop ``size`` x ``size``, scale to [0, 1] and normalise with OpenAI's
mean / std. They differ in three places, each reproduced here:

=================  ==========================================  ========================================
step               ``kind="openai"``: transformers'            ``kind="open_clip"``: open_clip's eval
                   ``CLIPImageProcessorPil`` (the PIL          transform (torchvision ``Resize``,
                   backend; transformers 4's slow one)          ``CenterCrop``, ``ToTensor``, ``Normalize``)
=================  ==========================================  ========================================
RGB conversion     first; alpha (RGBA, LA, P with              last, after the crop: plain
                   transparency) composited onto white         ``convert("RGB")``, alpha dropped
resize             of the RGB image                            of the image in its own mode (RGBA
                                                               premultiplied by PIL, L as L, ...)
crop offset        ``(resized - size) // 2`` (floor)           ``round((resized - size) / 2)``:
                                                               Python's round, half to even
=================  ==========================================  ========================================

Scaling to [0, 1] is ``float64(u8) * (1 / 255)`` cast to float32 in transformers and
``float32(u8) / 255`` in torchvision: the same float32 for all 256 byte values (a test checks), so
one path serves both. Normalisation is ``(x - mean) / std`` in float32 in both. Results equal the
references exactly (max abs diff 0; tests/test_clip_vision.py, transformers 5.24, open_clip 3.3).
Compositing alpha onto white is transformers 5's ``convert_to_rgb``; older releases dropped alpha.
transformers 5's default ``CLIPImageProcessor`` is the torchvision backend, which resizes a tensor
with its own bicubic kernel: not PIL-exact (one or two byte levels off at some pixels).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..models.clip_vision import normalize_clip


def _resize_shortest(image: Image.Image, size: int) -> Image.Image:
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    return image.resize((new_w, new_h), Image.Resampling.BICUBIC)


def _to_rgb_on_white(image: Image.Image) -> Image.Image:
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _crop(image: Image.Image, size: int, kind: str) -> Image.Image:
    w, h = image.size
    if kind == "openai":
        top, left = (h - size) // 2, (w - size) // 2
    else:
        # torchvision's CenterCrop: Python's round, half to even (55.5 -> 56, 56.5 -> 56)
        top, left = round((h - size) / 2.0), round((w - size) / 2.0)
    return image.crop((left, top, left + size, top + size))


def _one(image: Image.Image, size: int, kind: str) -> Tensor:
    if kind == "openai":
        image = _to_rgb_on_white(image)
    image = _crop(_resize_shortest(image, size), size, kind)
    u8 = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)
    return u8.to(torch.float32).div(255)


def preprocess_clip(
    images: list[Image.Image],
    size: int = 224,
    kind: Literal["openai", "open_clip"] = "openai",
) -> Tensor:
    """PIL images of any size and mode -> [B, 3, size, size] float32 normalised CLIP input."""
    if kind not in ("openai", "open_clip"):
        raise ValueError(f"kind: unknown {kind!r} (expected 'openai' or 'open_clip')")
    if size < 1:
        raise ValueError(f"size: must be positive, got {size}")
    if not images:
        raise ValueError("images: empty list")
    return normalize_clip(torch.stack([_one(image, size, kind) for image in images]))
