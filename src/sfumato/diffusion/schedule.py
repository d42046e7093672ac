"""The discrete DDPM noise schedule and σ schedules built on it.

A checkpoint's ``alphas_cumprod`` defines σ_t = sqrt((1 − ᾱ_t) / ᾱ_t) for the 1000 training
timesteps. Samplers work in σ; the UNet is fed the (fractional) timestep t(σ), interpolated in
log σ, exactly as k-diffusion's ``DiscreteSchedule`` does, so the same settings give the same
images as AUTOMATIC1111 and the original scripts.

Two families of σ schedules live here, all fp32 and ending with the σ the last step lands on:

* the named schedulers (``get_sigmas``): n + 1 values ending with 0, usable with any sampler;
* the timestep spacings of diffusers' DDIM / PNDM / UniPC / LCM schedulers under SD's scheduler
  config, which A1111's "Automatic" gives those samplers.
"""

from __future__ import annotations

import math

import numpy as np
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


# -- named schedulers ------------------------------------------------------------------------------

SCHEDULERS: tuple[str, ...] = ("normal", "karras", "exponential", "sgm_uniform", "simple", "trailing", "turbo")
TURBO_MAX_STEPS = 10   # the "turbo" schedule's timesteps: 999, 899, …, 99


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Karras et al. (2022), eq. 5: n σ's evenly spaced in σ^(1/ρ), then 0."""
    ramp = torch.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((hi + ramp * (lo - hi)) ** rho)


def exponential_sigmas(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """n σ's evenly spaced in log σ, then 0."""
    return _append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n).exp())


def sgm_uniform_sigmas(schedule: DiscreteSchedule, n: int) -> Tensor:
    """"SGM Uniform": n + 1 timesteps evenly spaced from T−1 to 0, the last dropped, then σ=0."""
    t = torch.linspace(len(schedule.sigmas) - 1, 0, n + 1)[:-1]
    return _append_zero(schedule.t_to_sigma(t))


def simple_sigmas(schedule: DiscreteSchedule, n: int) -> Tensor:
    """ComfyUI's "simple": every (T/n)-th training σ counted down from the top, then 0."""
    stride = len(schedule.sigmas) / n
    index = torch.tensor([len(schedule.sigmas) - 1 - int(i * stride) for i in range(n)])
    return _append_zero(schedule.sigmas[index])


def trailing_sigmas(schedule: DiscreteSchedule, n: int) -> Tensor:
    """diffusers' ``timestep_spacing="trailing"`` (what the model cards of SD-Turbo, SDXL-Turbo,
    SDXL-Lightning and Hyper-SD set): timesteps round(T − k·T/n) − 1 counted down from T − 1, then σ=0
    (one step lands on T − 1, the top of the schedule)."""
    steps = len(schedule.sigmas)
    # diffusers' np.arange(T, 0, −T/n) gives the same values, but n + 1 of them for some n (61, 103, …)
    t = np.round(steps - np.arange(n) * (steps / n)).astype(np.float32) - 1
    return _append_zero(schedule.sigmas[torch.from_numpy(t.astype(np.int64))])


def turbo_sigmas(schedule: DiscreteSchedule, n: int) -> Tensor:
    """ComfyUI's SDTurboScheduler: timesteps 999, 899, …, the first n of ten, then σ=0."""
    if not 1 <= n <= TURBO_MAX_STEPS:
        raise ValueError(f"the turbo schedule takes 1 to {TURBO_MAX_STEPS} steps, got {n}")
    t = torch.arange(TURBO_MAX_STEPS, 0, -1) * (len(schedule.sigmas) // TURBO_MAX_STEPS) - 1
    return _append_zero(schedule.sigmas[t[:n]])


def get_sigmas(schedule: DiscreteSchedule, name: str, n: int) -> Tensor:
    """The named scheduler's n + 1 σ's for ``schedule`` (karras / exponential span the model's σ range)."""
    if n < 1:
        raise ValueError(f"need at least one step, got {n}")
    if name == "normal":
        return schedule.normal(n)
    if name == "karras":
        return karras_sigmas(n, schedule.sigma_min, schedule.sigma_max)
    if name == "exponential":
        return exponential_sigmas(n, schedule.sigma_min, schedule.sigma_max)
    if name == "sgm_uniform":
        return sgm_uniform_sigmas(schedule, n)
    if name == "simple":
        return simple_sigmas(schedule, n)
    if name == "trailing":
        return trailing_sigmas(schedule, n)
    if name == "turbo":
        return turbo_sigmas(schedule, n)
    raise ValueError(f"unknown scheduler {name!r}; valid schedulers: {', '.join(SCHEDULERS)}")


# -- diffusers' timestep spacings (SD's scheduler config: steps_offset=1, set_alpha_to_one=False) --

def ddim_sigmas(schedule: DiscreteSchedule, n: int) -> Tensor:
    """DDIMScheduler / PNDMScheduler: "leading" timesteps k·⌊T/n⌋ + 1. The last step lands on ᾱ_0
    (set_alpha_to_one=False), so the schedule ends at σ(t=0), not 0, and the result keeps that
    little noise exactly as diffusers, the original DDIM/PLMS scripts and A1111 leave it."""
    ratio = len(schedule.sigmas) // n
    t = torch.arange(n - 1, -1, -1) * ratio + 1
    return torch.cat([schedule.sigmas[t], schedule.sigmas[:1]])


def unipc_sigmas(schedule: DiscreteSchedule, n: int) -> Tensor:
    """UniPCMultistepScheduler: "linspace" timesteps round(linspace(0, T−1, n+1)) from the top,
    the last dropped, then σ=0 (final_sigmas_type="zero")."""
    t = np.linspace(0, len(schedule.sigmas) - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    return _append_zero(schedule.sigmas[torch.from_numpy(t.copy())])


def lcm_sigmas(schedule: DiscreteSchedule, n: int, original_steps: int = 50) -> Tensor:
    """LCMScheduler: n timesteps picked evenly (by index) from the distillation schedule
    k·T/original_steps − 1, k = original_steps … 1; then σ=0."""
    if not 1 <= n <= original_steps:
        raise ValueError(f"LCM takes 1 to {original_steps} steps, got {n}")
    stride = len(schedule.sigmas) // original_steps
    origin = torch.arange(original_steps, 0, -1) * stride - 1
    index = np.floor(np.linspace(0, original_steps, n, endpoint=False)).astype(np.int64)
    return _append_zero(schedule.sigmas[origin[torch.from_numpy(index)]])
