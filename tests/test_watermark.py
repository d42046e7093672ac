"""The invisible watermark against the reference ``invisible-watermark`` package (imwatermark):
its encoder gives the same pixels, its standard decoder reads our payload back."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sfumato.pipeline.watermark import SD_PAYLOAD, add_watermark

imwatermark = pytest.importorskip("imwatermark")


def _image(detail: int, size: tuple[int, int] = (512, 512), seed: int = 0) -> Image.Image:
    """Random colours on a ``detail``×``detail`` grid, smoothly upscaled: low detail is smooth."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (detail, detail, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)


def _bgr(image: Image.Image) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(image)[:, :, ::-1])


def _reference(image: Image.Image, payload: bytes = SD_PAYLOAD) -> np.ndarray:
    """The original scripts' ``put_watermark``: RGB → BGR, encode with dwtDct, back to RGB."""
    encoder = imwatermark.WatermarkEncoder()
    encoder.set_watermark("bytes", payload)
    return encoder.encode(_bgr(image), "dwtDct")[:, :, ::-1]


@pytest.mark.parametrize("detail, size", [(16, (512, 512)), (96, (512, 512)), (40, (517, 389)), (64, (1024, 64))])
def test_same_pixels_as_the_reference_encoder(detail, size):
    image = _image(detail, size)
    np.testing.assert_array_equal(np.asarray(add_watermark(image)), _reference(image))


def test_standard_decoder_reads_the_payload():
    image = add_watermark(_image(96))
    assert imwatermark.WatermarkDecoder("bytes", 136).decode(_bgr(image), "dwtDct") == b"StableDiffusionV1"
    sd2 = add_watermark(_image(96, seed=1), b"SDV2")   # the SD 2.x scripts' payload
    assert imwatermark.WatermarkDecoder("bytes", 32).decode(_bgr(sd2), "dwtDct") == b"SDV2"


def test_changes_pixels_only_slightly():
    image = _image(16)
    before, after = np.asarray(image, dtype=np.float64), np.asarray(add_watermark(image), dtype=np.float64)
    mse = np.mean((after - before) ** 2)
    assert 0 < mse and 10 * np.log10(255**2 / mse) > 35


def test_images_under_256x256_pixels_are_untouched():
    small = _image(16, (255, 256))
    assert add_watermark(small) is small
    with pytest.raises(RuntimeError, match="too small"):   # the reference refuses them too
        _reference(small)
