"""Pixel-space helpers for img2img, inpainting and outpainting: mask blur, "only masked" crops,
masked-content fill, outpainting canvases and paste-back. All on PIL images / numpy arrays."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..errors import ParamError


def gaussian_blur(mask: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a float mask, kernel size 2·⌊2.5σ + 0.5⌋ + 1 (as A1111 sizes it)."""
    if sigma <= 0:
        return mask.astype(np.float32)
    radius = int(2.5 * sigma + 0.5)
    xs = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-(xs**2) / (2 * sigma**2))
    kernel /= kernel.sum()
    out = mask.astype(np.float64)
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="reflect" if out.shape[axis] > radius else "edge")
        out = np.apply_along_axis(lambda v: np.convolve(v, kernel, mode="valid"), axis, padded)
    return out.astype(np.float32)


def mask_array(mask: Image.Image) -> np.ndarray:
    """A mask image → float32 [H, W] in [0, 1] (white = repaint). Alpha-only masks use their alpha."""
    if mask.mode in ("RGBA", "LA"):
        mask = mask.getchannel("A")
    return np.asarray(mask.convert("L"), dtype=np.float32) / 255.0


@dataclass(frozen=True)
class CropRegion:
    left: int
    top: int
    right: int
    bottom: int

    @property
    def size(self) -> tuple[int, int]:
        return self.right - self.left, self.bottom - self.top


def crop_region(mask: np.ndarray, padding: int, aspect: float) -> CropRegion:
    """The masked area's bounding box grown by ``padding`` and then to the target aspect ratio
    (width / height), clipped to the image — A1111's "only masked" region."""
    h, w = mask.shape
    ys, xs = np.nonzero(mask > 0)
    if len(xs) == 0:
        return CropRegion(0, 0, w, h)
    left, right = max(xs.min() - padding, 0), min(xs.max() + 1 + padding, w)
    top, bottom = max(ys.min() - padding, 0), min(ys.max() + 1 + padding, h)
    cw, ch = right - left, bottom - top
    if cw / ch < aspect:     # too tall: widen
        grow = int(round(ch * aspect)) - cw
        left, right = _grow(left, right, grow, w)
    else:                    # too wide: heighten
        grow = int(round(cw / aspect)) - ch
        top, bottom = _grow(top, bottom, grow, h)
    return CropRegion(left, top, right, bottom)


def _grow(lo: int, hi: int, grow: int, limit: int) -> tuple[int, int]:
    lo -= grow // 2
    hi += grow - grow // 2
    if lo < 0:
        hi, lo = min(hi - lo, limit), 0
    if hi > limit:
        lo, hi = max(lo - (hi - limit), 0), limit
    return lo, hi


def fill_masked(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """"fill" masked content: replace the masked area by colours diffused in from its surroundings
    (repeated blurs of the unmasked pixels at shrinking radii), as A1111's fill does."""
    img = image.astype(np.float32)
    keep = (mask < 0.5).astype(np.float32)
    if keep.sum() == 0:
        return np.full_like(image, int(img.mean()))
    out = img * keep[..., None]
    weight = keep.copy()
    for sigma in (64, 32, 16, 8, 4, 2, 1):
        blurred = np.stack([gaussian_blur(out[..., c], sigma) for c in range(3)], -1)
        wblur = gaussian_blur(weight, sigma)
        filled = blurred / np.maximum(wblur, 1e-6)[..., None]
        missing = (weight < 0.5) & (wblur > 1e-3)
        out[missing] = filled[missing]
        weight = np.maximum(weight, missing.astype(np.float32))
    result = np.where(keep[..., None] > 0, img, out)
    return np.clip(result, 0, 255).astype(np.uint8)


def check_outpaint(left: object, right: object, up: object, down: object) -> None:
    """Outpainting's sides: pixels to add, each a non-negative multiple of 8, at least one of them
    non-zero; a ParamError naming the side (``left``, ``right``, ``up``, ``down``) otherwise."""
    for name, value in (("left", left), ("right", right), ("up", up), ("down", down)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value % 8:
            raise ParamError(name, f"must be a non-negative multiple of 8, got {value!r}")
    if not (left or right or up or down):
        raise ParamError("left", "outpainting needs at least one of left/right/up/down")


def outpaint_canvas(image: Image.Image, left: int, right: int, up: int, down: int) -> tuple[Image.Image, Image.Image]:
    """A larger canvas with the image in place, the new border pre-filled from the image's edges,
    and the mask of the new area (white = to generate)."""
    w, h = image.size
    arr = np.asarray(image.convert("RGB"))
    padded = np.pad(arr, ((up, down), (left, right), (0, 0)), mode="edge")
    mask = np.ones(padded.shape[:2], dtype=np.float32)
    mask[up:up + h, left:left + w] = 0
    filled = fill_masked(padded, mask)
    return Image.fromarray(filled), Image.fromarray((mask * 255).astype(np.uint8))


def dilate(mask: np.ndarray, amount: int) -> np.ndarray:
    """A boolean mask grown by a square of side ``amount`` (OpenCV's ``dilate`` with a centred kernel of
    ones: offsets −⌊amount/2⌋ … amount − 1 − ⌊amount/2⌋ on each axis)."""
    out = mask.astype(bool)
    lo, hi = -(amount // 2), amount - 1 - amount // 2
    for axis in (0, 1):
        n = out.shape[axis]
        grown = out.copy()
        for d in range(lo, hi + 1):
            if d == 0 or abs(d) >= n:
                continue
            dst, src = [slice(None)] * 2, [slice(None)] * 2   # grown[i] |= out[i + d]
            dst[axis], src[axis] = (slice(0, n - d), slice(d, n)) if d > 0 else (slice(-d, n), slice(0, n + d))
            grown[tuple(dst)] |= out[tuple(src)]
        out = grown
    return out


def paste_back(original: np.ndarray, generated: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Composite: generated where the (blurred) mask is 1, original where it is 0."""
    m = mask[..., None].astype(np.float32)
    out = generated.astype(np.float32) * m + original.astype(np.float32) * (1 - m)
    out = np.where(m == 0, original, np.clip(np.round(out), 0, 255))
    return out.astype(np.uint8)
