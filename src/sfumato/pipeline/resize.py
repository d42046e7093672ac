"""Upscaling a finished image, as A1111's extras tab does: a PIL filter (Lanczos, Nearest) or the SD
x4 upscaler model, to a scale or a size.

The x4 model makes exactly four times its input; another scale is reached as A1111 reaches it with
its 4x upscalers: the model's output resized with Lanczos to the size asked for, the model run
again on its own output while that is still short of it. A diffusion upscaler needs a seed: extras
take none, so :data:`X4_SEED` (fixed) makes the same result every time; steps and noise level are
the model's usual 20 and 20.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

from PIL import Image

from .params import ParamError

if TYPE_CHECKING:
    from ..api import Pipeline

FILTERS = {"lanczos": Image.LANCZOS, "nearest": Image.NEAREST}
X4_STEPS, X4_NOISE, X4_SEED = 20, 20, 0
MAX_SCALE = 8


def upscaled_size(image: Image.Image, scale: float | None = None, size: tuple[int, int] | None = None,
                  crop: bool = True) -> tuple[int, int, tuple[int, int] | None]:
    """(width, height, crop to) of upscaling ``image`` by ``scale``, or to ``size``: the scale that
    covers it, then a centre crop to it when ``crop`` (A1111's "Crop to fit")."""
    if (scale is None) == (size is None):
        raise ParamError("scale", "give a scale or a size")
    if scale is not None:
        if not 0 < scale <= MAX_SCALE:
            raise ParamError("scale", f"must be in (0, {MAX_SCALE}], got {scale}")
        return round(image.width * scale), round(image.height * scale), None
    w, h = size
    if w < 1 or h < 1:
        raise ParamError("size", f"must be positive, got {w}x{h}")
    s = max(w / image.width, h / image.height)
    return round(image.width * s), round(image.height * s), (w, h) if crop else None


def upscale_image(image: Image.Image, upscaler: str | Pipeline, scale: float | None = None,
                  size: tuple[int, int] | None = None, *, crop: bool = True, watermark: bool = True,
                  callback: Callable | None = None) -> Image.Image:
    """``image`` upscaled by ``upscaler`` ("lanczos", "nearest", "none", or an x4 upscaler Pipeline;
    its images watermarked unless ``watermark`` is False, as generated images are)."""
    w, h, box = upscaled_size(image, scale, size, crop)
    image = image.convert("RGB")
    if isinstance(upscaler, str):
        key = upscaler.strip().lower()
        if key not in (*FILTERS, "none"):
            raise ParamError("upscaler", f"unknown upscaler {upscaler!r}; valid: Lanczos, Nearest, None, or an x4 model")
        out = image if key == "none" else image.resize((w, h), FILTERS[key])
    else:
        if not upscaler.model.spec.is_upscaler:
            raise ParamError("upscaler", f"{upscaler.model_name} is not an x4 upscaler model")
        out = image
        for _ in range(max(1, math.ceil(math.log(max(w / image.width, h / image.height), 4) - 1e-9))):
            out = upscaler.upscale(out, steps=X4_STEPS, noise_level=X4_NOISE, seed=X4_SEED, watermark=watermark,
                                   callback=callback).images[0]
        if out.size != (w, h):
            out = out.resize((w, h), Image.LANCZOS)
    if box is not None:
        left, top = (out.width - box[0]) // 2, (out.height - box[1]) // 2
        out = out.crop((left, top, left + box[0], top + box[1]))
    return out
