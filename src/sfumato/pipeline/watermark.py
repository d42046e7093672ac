"""The invisible watermark of the original Stable Diffusion scripts, in numpy alone.

The original ``txt2img.py`` marks every image with ``invisible-watermark``'s ``dwtDct`` method and
the bytes ``StableDiffusionV1``. That method, step by step (reproduced here so that its standard
decoder, ``WatermarkDecoder('bytes', 136).decode(bgr, 'dwtDct')``, reads our marks):

1. RGB → YUV with OpenCV's 8-bit fixed-point BT.601 formulas; only U carries the mark.
2. A one-level Haar DWT of U (cropped to a multiple of 4); the mark goes into the approximation
   band cA, in 4×4 blocks taken row by row, block k carrying payload bit k mod n (MSB first).
3. In each block, the coefficient of largest magnitude other than the first is moved to the
   quarter (bit 0) or three-quarter (bit 1) point of its cell in a lattice of step 36.
4. The inverse DWT, truncated to 8 bits, then YUV → RGB. The reference hands the horizontal and
   vertical detail bands to the inverse swapped, which transposes every 2×2 cell of U; kept, so
   that our output equals the reference encoder's pixel for pixel.

Despite its name the method applies no DCT to the blocks.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

SD_PAYLOAD = b"StableDiffusionV1"
MIN_PIXELS = 256 * 256   # the encoder refuses smaller images (by pixel count)
_STEP = 36.0             # lattice step for U (the method's default scales: Y 0, U 36)
_BLOCK = 4
_SHIFT = 14              # OpenCV's fixed-point YUV conversion: coefficients × 2^14
_HALF = 1 << (_SHIFT - 1)


def add_watermark(image: Image.Image, payload: bytes = SD_PAYLOAD) -> Image.Image:
    """``image`` (as RGB) with ``payload`` embedded as the original scripts do; images under
    256×256 pixels (by area) come back unchanged, as the reference encoder refuses them."""
    if image.width * image.height < MIN_PIXELS:
        return image
    rgb = np.asarray(image.convert("RGB"), dtype=np.int64)
    y, u, v = _rgb_to_yuv(rgb)
    h, w = u.shape[0] // 4 * 4, u.shape[1] // 4 * 4
    u[:h, :w] = _embed(u[:h, :w], np.unpackbits(np.frombuffer(payload, dtype=np.uint8)))
    return Image.fromarray(_yuv_to_rgb(y, u, v))


def _embed(u: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """Watermark one U plane (sides multiples of 4) through its Haar approximation band."""
    lo, hi = _haar(u.astype(np.float64), axis=0)
    ca, cv = _haar(lo, axis=1)
    ch, cd = _haar(hi, axis=1)
    ca = _mark(ca, bits)
    # the reference hands the inverse (cA, (cV, cH, cD)): horizontal and vertical details swapped
    out = _inverse_haar(_inverse_haar(ca, ch, axis=1), _inverse_haar(cv, cd, axis=1), axis=0)
    return np.clip(out, 0, 255).astype(np.int64)   # truncation, as the reference's uint8 store


# One Haar level along an axis with PyWavelets' filters and order of operations, so that every
# coefficient, and so every lattice decision and tie, is bit-for-bit the reference's.
_C = np.float64(0.7071067811865476)


def _haar(x: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.moveaxis(x, axis, 0)
    even, odd = x[0::2], x[1::2]
    return np.moveaxis(_C * odd + _C * even, 0, axis), np.moveaxis(-_C * odd + _C * even, 0, axis)


def _inverse_haar(approx: np.ndarray, detail: np.ndarray, axis: int) -> np.ndarray:
    a, d = np.moveaxis(approx, axis, 0), np.moveaxis(detail, axis, 0)
    out = np.empty((2 * a.shape[0],) + a.shape[1:])
    out[0::2] = _C * a + _C * d
    out[1::2] = _C * a - _C * d
    return np.moveaxis(out, 0, axis)


def _mark(ca: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """Quantise the largest non-first coefficient of each 4×4 block of ``ca`` (≥ 0 for U) onto
    the lattice point that encodes its bit."""
    rows, cols = ca.shape[0] // _BLOCK, ca.shape[1] // _BLOCK
    region = ca[: rows * _BLOCK, : cols * _BLOCK]
    blocks = region.reshape(rows, _BLOCK, cols, _BLOCK).transpose(0, 2, 1, 3).reshape(rows * cols, -1)
    pos = np.abs(blocks[:, 1:]).argmax(axis=1) + 1
    idx = np.arange(len(blocks))
    bit = bits[idx % len(bits)]
    blocks[idx, pos] = (blocks[idx, pos] // _STEP + 0.25 + 0.5 * bit) * _STEP
    out = ca.copy()
    out[: rows * _BLOCK, : cols * _BLOCK] = (
        blocks.reshape(rows, cols, _BLOCK, _BLOCK).transpose(0, 2, 1, 3).reshape(region.shape)
    )
    return out


def _descale(x: np.ndarray) -> np.ndarray:
    return (x + _HALF) >> _SHIFT


def _rgb_to_yuv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """OpenCV's COLOR_BGR2YUV for 8-bit images (Y = .299R + .587G + .114B, U = .492(B − Y) + 128,
    V = .877(R − Y) + 128, in 14-bit fixed point, saturated)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    y = _descale(r * 4899 + g * 9617 + b * 1868)
    u = np.clip(_descale((b - y) * 8061 + (128 << _SHIFT)), 0, 255)
    v = np.clip(_descale((r - y) * 14369 + (128 << _SHIFT)), 0, 255)
    return y, u, v


def _yuv_to_rgb(y: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """OpenCV's COLOR_YUV2BGR for 8-bit images, as uint8 RGB."""
    du, dv = u - 128, v - 128
    r = y + _descale(dv * 18678)
    g = y + _descale(du * -6472 + dv * -9519)
    b = y + _descale(du * 33292)
    return np.clip(np.stack([r, g, b], axis=-1), 0, 255).astype(np.uint8)
