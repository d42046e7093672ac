"""Samplers: pure functions of a denoiser over a σ schedule (k-diffusion's formulation).

Each sampler takes ``denoise(x, σ) → x̂0`` (guidance, masks and model details are already wrapped
in), the starting latents ``x`` (noise already scaled by σ_0), and the σ schedule ending at 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

DenoiseFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class StepRecord:
    """What a per-step callback receives."""

    index: int
    total: int
    sigma: float
    x: Tensor
    denoised: Tensor


StepCallback = Callable[[StepRecord], None]


def sample_euler(denoise: DenoiseFn, x: Tensor, sigmas: Tensor, callback: StepCallback | None = None) -> Tensor:
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 2 without churn)."""
    s_in = x.new_ones([x.shape[0]], dtype=torch.float32)
    n = len(sigmas) - 1
    for i in range(n):
        denoised = denoise(x, sigmas[i] * s_in)
        d = (x - denoised) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
        if callback is not None:
            callback(StepRecord(i, n, float(sigmas[i]), x, denoised))
    return x


SAMPLERS: dict[str, Callable[..., Tensor]] = {"euler": sample_euler}


def get_sampler(name: str) -> Callable[..., Tensor]:
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; valid samplers: {', '.join(sorted(SAMPLERS))}") from None
