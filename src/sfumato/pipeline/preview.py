"""A cheap latent → RGB preview, no VAE: one linear map per latent pixel.

The factors are AUTOMATIC1111's "Approx cheap" ones (a linear fit of decoded colours to latents;
SD 1.x and 2.x share a VAE, SDXL has its own). They apply to latents as the sampler sees them
(already multiplied by the VAE's scaling factor) and give RGB in [−1, 1].

Models outside those families (the bundled model, custom small models) get factors fitted once to
their own VAE decoder by least squares (:func:`fit_factors`).
"""

from __future__ import annotations

import torch
from torch import Tensor

# rows: latent channels 0..3; columns: R, G, B
LATENT_RGB_FACTORS: dict[str, tuple[tuple[float, float, float], ...]] = {
    "sd": (
        (0.298, 0.207, 0.208),
        (0.187, 0.286, 0.173),
        (-0.158, 0.189, 0.264),
        (-0.184, -0.271, -0.473),
    ),
    "sdxl": (
        (0.3448, 0.4168, 0.4395),
        (-0.1953, -0.0290, 0.0250),
        (0.1074, 0.0886, -0.0163),
        (-0.3730, -0.2499, -0.2088),
    ),
}


def latent_to_rgb(latents: Tensor, family_kind: str = "sd", factors: Tensor | None = None,
                  bias: Tensor | None = None) -> Tensor:
    """uint8 [B, h, w, 3] preview of latents [B, C, h, w] (one preview pixel per latent pixel).

    ``family_kind``: ``"sd"`` for SD 1.x/2.x latents, ``"sdxl"`` for SDXL's (base and refiner);
    ``factors`` ([C, 3]) and ``bias`` ([3]), when given, replace the family's table.
    """
    if factors is None:
        if family_kind not in LATENT_RGB_FACTORS:
            raise ValueError(f"family_kind: unknown {family_kind!r}; valid: {', '.join(LATENT_RGB_FACTORS)}")
        factors = torch.tensor(LATENT_RGB_FACTORS[family_kind], dtype=torch.float32)
    factors = factors.to(latents.device, torch.float32)
    if latents.ndim != 4 or latents.shape[1] != factors.shape[0]:
        raise ValueError(f"latents: expected [B, {factors.shape[0]}, h, w], got {list(latents.shape)}")
    rgb = torch.einsum("bchw,cr->bhwr", latents.float(), factors)
    if bias is not None:
        rgb = rgb + bias.to(rgb)
    return ((rgb + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


@torch.no_grad()
def fit_factors(encode, factor: int, size: int = 8, samples: int = 16) -> tuple[Tensor, Tensor]:
    """Least-squares ``factors`` [C, 3] and ``bias`` [3] from a latent pixel to the colour of the
    ``factor``×``factor`` block it encodes. ``encode`` takes images in [−1, 1] [B, 3, H, W] and
    returns scaled latents; the images are seeded random colour patches (2×2 latent pixels each),
    the plain regions a cheap preview should get right."""
    g = torch.Generator().manual_seed(0)
    patches = torch.rand(samples, 3, size // 2, size // 2, generator=g) * 2 - 1
    colours = patches.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)        # [B, 3, h, w]
    z = encode(colours.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3))
    channels = z.shape[1]
    x = torch.cat([z.permute(0, 2, 3, 1).reshape(-1, channels), torch.ones(z.numel() // channels, 1)], dim=1)
    y = colours.permute(0, 2, 3, 1).reshape(-1, 3)
    solution = torch.linalg.lstsq(x.float(), y).solution                              # [C + 1, 3]
    return solution[:channels], solution[channels]
