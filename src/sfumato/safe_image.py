"""Image files from outside (init images, masks, control images, ``--from-png``, PNG-embedded
embeddings): decoded within bounds, every failure a one-line :class:`SfumatoError`.

The pixel count is read from the header and checked before any pixel is decoded, so a
decompression bomb (a 20000² PNG of a few KB) costs nothing; whatever else goes wrong while
decoding untrusted bytes (truncation, corrupt chunks, oversized text chunks) is reported the same way.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from .errors import SfumatoError

FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
MAX_PIXELS = 89_478_485   # Pillow's own warning threshold (≈ 9459²): here an error, not a warning


def open_image(path: str | Path, field: str, *, max_pixels: int = MAX_PIXELS, load: bool = True) -> Image.Image:
    """The image file at ``path``, decoded (``load``) or only opened with its header and text chunks
    read; a SfumatoError naming ``field`` if it is missing, not an image, too large or corrupt."""
    path = Path(path)
    def fail(why: str) -> SfumatoError:
        return SfumatoError(f"{field}: cannot read image {path}: {why}")

    if not path.is_file():
        raise fail("not found" if not path.exists() else "not a file")
    try:
        image = Image.open(path, formats=FORMATS)
    except Image.DecompressionBombError:
        raise fail(f"it has too many pixels (at most {max_pixels})") from None
    except Exception as e:  # noqa: BLE001 — untrusted bytes: any failure is "not an image"
        raise fail(f"not a PNG, JPEG, WebP, BMP, GIF or TIFF image ({_reason(e)})") from None
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise fail(f"it is {width}x{height}, over the limit of {max_pixels} pixels")
    if load:
        try:
            image.load()
        except Exception as e:  # noqa: BLE001
            image.close()
            raise fail(f"it cannot be decoded ({_reason(e)})") from None
    return image


def _reason(e: Exception) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text[:160]}" if text else type(e).__name__
