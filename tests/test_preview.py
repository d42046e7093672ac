"""The cheap latent preview: A1111's "Approx cheap" factors, one preview pixel per latent pixel."""

from __future__ import annotations

import pytest
import torch

from sfumato.pipeline.preview import latent_to_rgb


def _latent(*channels: float) -> torch.Tensor:
    return torch.tensor(channels, dtype=torch.float32).view(1, 4, 1, 1)


def test_shape_dtype_and_zero_is_mid_grey():
    out = latent_to_rgb(torch.zeros(2, 4, 5, 7))
    assert out.shape == (2, 5, 7, 3) and out.dtype == torch.uint8
    assert (out == 128).all()   # 0 ↦ the middle of [−1, 1]


@pytest.mark.parametrize("kind, latent, rgb", [
    # by hand from A1111's tables: 127.5 · (1 + row · sign), rounded
    ("sd", (0, 0, 0, -1), (151, 162, 188)),     # SD's fourth channel, negative: blue
    ("sd", (1, 0, 0, 0), (165, 154, 154)),
    ("sdxl", (1, 0, 0, 0), (171, 181, 184)),
    ("sdxl", (0, 1, 0, 0), (103, 124, 131)),
])
def test_factor_rows_give_their_colours(kind, latent, rgb):
    assert latent_to_rgb(_latent(*latent), kind).flatten().tolist() == list(rgb)


def test_each_pixel_depends_only_on_its_own_latent_and_saturates():
    torch.manual_seed(0)
    latents = torch.randn(3, 4, 4, 6) * 2
    out = latent_to_rgb(latents, "sdxl")
    for b, y, x in [(0, 0, 0), (1, 2, 5), (2, 3, 1)]:
        single = latent_to_rgb(latents[b:b + 1, :, y:y + 1, x:x + 1], "sdxl")
        assert torch.equal(out[b, y, x], single[0, 0, 0])
    assert latent_to_rgb(_latent(20, 0, 0, 0)).flatten().tolist() == [255, 255, 255]   # clamped, no wrap
    assert latent_to_rgb(_latent(-20, 0, 0, 0)).flatten().tolist() == [0, 0, 0]
    half = latent_to_rgb(latents.half(), "sdxl")
    assert (half.int() - out.int()).abs().max() <= 1


def test_rejects_unknown_kinds_and_shapes():
    with pytest.raises(ValueError, match="family_kind"):
        latent_to_rgb(torch.zeros(1, 4, 2, 2), "flux")
    with pytest.raises(ValueError, match="latents"):
        latent_to_rgb(torch.zeros(1, 16, 2, 2))


def test_bundled_model_previews_resemble_its_decoded_images():
    """Models outside SD/SDXL get factors fitted to their own decoder: the preview of the final x̂0
    is close to the decoded image (block means), far closer than SD's table would be."""
    import numpy as np

    import sfumato

    pipe = sfumato.load()
    seen = []
    result = pipe.txt2img("a yellow square on a blue background", seed=1, watermark=False, callback=seen.append)
    last = seen[-1]
    preview = last.preview()[0].astype(float)                                   # [16, 16, 3]
    decoded = np.asarray(result.images[0]).astype(float).reshape(16, 4, 16, 4, 3).mean(axis=(1, 3))
    sd_table = latent_to_rgb(last.denoised, "sd")[0].numpy().astype(float)
    assert np.abs(preview - decoded).mean() < 35          # a linear map: colours right, edges soft
    assert np.abs(sd_table - decoded).mean() > 2 * np.abs(preview - decoded).mean()
