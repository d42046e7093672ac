"""Stable unCLIP's image-embedding noise augmentation (ldm's ``CLIPEmbeddingNoiseAugmentation``).

The CLIP image embedding is normalised by the embedding statistics (``data_mean`` / ``data_std``;
zeros and ones when a checkpoint carries none, as ldm's configs without a stats file), noised to a
chosen level on a DDPM schedule (Stable unCLIP: ``squaredcos_cap_v2`` over 1000 steps), scaled back,
and the level's sinusoidal embedding ([cos, sin], the UNet's own timestep embedding) is appended. The
result is the UNet's ``y`` vector (``label_emb``). Attribute names are the checkpoint's
``noise_augmentor.`` keys; the schedule's square roots are kept as the file has them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .unet import timestep_embedding


def squaredcos_cap_v2_betas(timesteps: int = 1000, max_beta: float = 0.999) -> Tensor:
    """The cosine schedule (Nichol & Dhariwal) as ldm's ``make_beta_schedule("squaredcos_cap_v2")``
    computes it, in float64."""
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return torch.tensor([min(1 - alpha_bar((i + 1) / timesteps) / alpha_bar(i / timesteps), max_beta)
                         for i in range(timesteps)], dtype=torch.float64)


class NoiseAugmentor(nn.Module):
    """``forward(embeds [B, E], levels [B] ints, noise [B, E]) → [B, 2E]``: noised embeds, level embedding."""

    def __init__(self, dim: int, timesteps: int = 1000, max_noise_level: int = 1000):
        super().__init__()
        self.dim, self.max_noise_level = dim, max_noise_level
        alphas_cumprod = torch.cumprod(1 - squaredcos_cap_v2_betas(timesteps), 0)
        self.register_buffer("sqrt_alphas_cumprod", alphas_cumprod.sqrt().float())
        self.register_buffer("sqrt_one_minus_alphas_cumprod", (1 - alphas_cumprod).sqrt().float())
        self.register_buffer("data_mean", torch.zeros(1, dim))
        self.register_buffer("data_std", torch.ones(1, dim))

    @property
    def timesteps(self) -> int:
        return self.sqrt_alphas_cumprod.shape[0]

    def forward(self, embeds: Tensor, levels: Tensor, noise: Tensor) -> Tensor:
        levels = levels.long().to(embeds.device)
        mean, std = self.data_mean.to(embeds), self.data_std.to(embeds)
        x = (embeds - mean) * (1.0 / std)
        a = self.sqrt_alphas_cumprod.to(embeds)[levels][:, None]
        s = self.sqrt_one_minus_alphas_cumprod.to(embeds)[levels][:, None]
        x = a * x + s * noise.to(embeds)
        x = x * std + mean
        return torch.cat([x, timestep_embedding(levels, self.dim).to(x.dtype)], dim=1)
