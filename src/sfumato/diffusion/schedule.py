"""The discrete DDPM noise schedule and σ schedules built on it.

A checkpoint's ``alphas_cumprod`` defines σ_t = sqrt((1 − ᾱ_t) / ᾱ_t) for the 1000 training
timesteps. Samplers work in σ; the UNet is fed the (fractional) timestep t(σ), interpolated in
log σ, exactly as k-diffusion's ``DiscreteSchedule`` does, so the same settings give the same
images as AUTOMATIC1111 and the original scripts.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Stable Diffusion's training schedule: "scaled linear" β from 0.00085 to 0.012 over 1000 steps.
BETA_START = 0.00085
BETA_END = 0.012
NUM_TRAIN_TIMESTEPS = 1000


def scaled_linear_alphas_cumprod(
    beta_start: float = BETA_START, beta_end: float = BETA_END, steps: int = NUM_TRAIN_TIMESTEPS
) -> Tensor:
    """ᾱ_t for the scaled-linear β schedule, computed in float64 and stored as float32 (as LDM does)."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).to(torch.float32)


class DiscreteSchedule:
    """σ ↔ t conversion for a discrete-time model (log-σ interpolation, no quantisation)."""

    def __init__(self, alphas_cumprod: Tensor):
        ac = alphas_cumprod.detach().to(device="cpu", dtype=torch.float32)
        if ac.ndim != 1 or ac.numel() < 2:
            raise ValueError(f"alphas_cumprod must be a 1-D tensor of timesteps, got shape {tuple(ac.shape)}")
        self.alphas_cumprod = ac
        self.sigmas = ((1 - ac) / ac) ** 0.5
        self.log_sigmas = self.sigmas.log()

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def t_to_sigma(self, t: Tensor) -> Tensor:
        t = t.float()
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        log_sigmas = self.log_sigmas.to(sigma.device)
        log_sigma = sigma.float().log()
        dists = log_sigma - log_sigmas[:, None]
        low = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=log_sigmas.shape[0] - 2)
        high = low + 1
        lo, hi = log_sigmas[low], log_sigmas[high]
        w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
        return ((1 - w) * low + w * high).view(sigma.shape)

    def normal(self, n: int) -> Tensor:
        """A1111's "Automatic"/k-diffusion's default: n timesteps evenly spaced from T−1 to 0, then σ=0."""
        t = torch.linspace(len(self.sigmas) - 1, 0, n)
        return _append_zero(self.t_to_sigma(t))


def _append_zero(x: Tensor) -> Tensor:
    return torch.cat([x, x.new_zeros([1])])
