"""A cheap latent → RGB preview, no VAE: one linear map per latent pixel.

The factors are AUTOMATIC1111's "Approx cheap" ones (a linear fit of decoded colours to latents;
SD 1.x and 2.x share a VAE, SDXL has its own). They apply to latents as the sampler sees them
(already multiplied by the VAE's scaling factor) and give RGB in [−1, 1].
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


def latent_to_rgb(latents: Tensor, family_kind: str = "sd") -> Tensor:
    """uint8 [B, h, w, 3] preview of latents [B, 4, h, w] (one preview pixel per latent pixel).

    ``family_kind``: ``"sd"`` for SD 1.x/2.x latents, ``"sdxl"`` for SDXL's (base and refiner).
    """
    if family_kind not in LATENT_RGB_FACTORS:
        raise ValueError(f"family_kind: unknown {family_kind!r}; valid: {', '.join(LATENT_RGB_FACTORS)}")
    factors = torch.tensor(LATENT_RGB_FACTORS[family_kind], dtype=torch.float32, device=latents.device)
    if latents.ndim != 4 or latents.shape[1] != factors.shape[0]:
        raise ValueError(f"latents: expected [B, {factors.shape[0]}, h, w], got {list(latents.shape)}")
    rgb = torch.einsum("bchw,cr->bhwr", latents.float(), factors)
    return ((rgb + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
