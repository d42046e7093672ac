"""σ schedules against k-diffusion / diffusers, and SGM Uniform / Simple against their definitions."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import k_diffusion.sampling as KS
from diffusers import DDIMScheduler, LCMScheduler, PNDMScheduler, UniPCMultistepScheduler
from k_diffusion.external import CompVisDenoiser
from sfumato.diffusion.schedule import (
    SCHEDULERS, DiscreteSchedule, ddim_sigmas, get_sigmas, lcm_sigmas,
    scaled_linear_alphas_cumprod, unipc_sigmas,
)

AC = scaled_linear_alphas_cumprod()
SD_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, trained_betas=None,
)
STEP_COUNTS = [1, 2, 7, 20, 30, 50]


def k_denoiser() -> CompVisDenoiser:
    return CompVisDenoiser(SimpleNamespace(alphas_cumprod=AC))


def assert_close(ours: torch.Tensor, ref: torch.Tensor, tol: float = 1e-5) -> None:
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    assert float((ours - ref.float()).abs().max() / ref.abs().max()) <= tol


def reference_sigmas() -> np.ndarray:
    ac = AC.double().numpy()
    return ((1 - ac) / ac) ** 0.5


@pytest.mark.parametrize("n", STEP_COUNTS)
def test_named_schedulers_match_k_diffusion(n):
    schedule, den = DiscreteSchedule(AC), k_denoiser()
    lo, hi = den.sigma_min.item(), den.sigma_max.item()
    assert_close(get_sigmas(schedule, "normal", n), den.get_sigmas(n))
    assert_close(get_sigmas(schedule, "karras", n), KS.get_sigmas_karras(n, lo, hi))
    assert_close(get_sigmas(schedule, "exponential", n), KS.get_sigmas_exponential(n, lo, hi))


@pytest.mark.parametrize("n", STEP_COUNTS)
def test_sgm_uniform_and_simple_follow_their_definitions(n):
    schedule, sigmas = DiscreteSchedule(AC), reference_sigmas()
    T = len(sigmas)
    # SGM Uniform: n+1 timesteps evenly from T−1 to 0, last dropped, σ by log-linear interpolation, then 0
    ts = [(T - 1) * (1 - i / n) for i in range(n)]
    sgm = [math.exp(np.interp(t, np.arange(T), np.log(sigmas))) for t in ts] + [0.0]
    assert_close(get_sigmas(schedule, "sgm_uniform", n), torch.tensor(sgm))
    # Simple: every (T/n)-th discrete σ from the top, then 0
    simple = [sigmas[T - 1 - math.floor(i * T / n)] for i in range(n)] + [0.0]
    assert_close(get_sigmas(schedule, "simple", n), torch.tensor(simple))


def test_schedules_shape_and_names():
    schedule = DiscreteSchedule(AC)
    for name in SCHEDULERS:
        n = 10 if name == "turbo" else 12    # the turbo schedule has ten timesteps
        sigmas = get_sigmas(schedule, name, n)
        assert sigmas.dtype == torch.float32 and len(sigmas) == n + 1 and sigmas[-1] == 0
        assert bool((sigmas[:-1] > sigmas[1:]).all())
    with pytest.raises(ValueError, match="valid schedulers: normal, karras, exponential, sgm_uniform, simple"):
        get_sigmas(schedule, "beta", 10)


def sigmas_at(scheduler, timesteps) -> torch.Tensor:
    ac = scheduler.alphas_cumprod[torch.as_tensor(timesteps, dtype=torch.long)]
    return ((1 - ac) / ac) ** 0.5


@pytest.mark.parametrize("n", STEP_COUNTS)
def test_timestep_spacings_match_diffusers(n):
    ddim = DDIMScheduler.from_config(SD_SCHEDULER_CONFIG)
    schedule = DiscreteSchedule(ddim.alphas_cumprod)
    ddim.set_timesteps(n)
    final = sigmas_at(ddim, [0])                     # set_alpha_to_one=False: the last step lands on ᾱ_0
    assert torch.equal(ddim_sigmas(schedule, n), torch.cat([sigmas_at(ddim, ddim.timesteps), final]))

    pndm = PNDMScheduler.from_config(SD_SCHEDULER_CONFIG)
    pndm.set_timesteps(n)
    plms_t = pndm.timesteps.unique(sorted=True).flip(0)   # PLMS repeats one timestep for its warm-up
    assert torch.equal(ddim_sigmas(schedule, n), torch.cat([sigmas_at(pndm, plms_t), final]))

    unipc = UniPCMultistepScheduler.from_config(SD_SCHEDULER_CONFIG)
    unipc.set_timesteps(n)
    assert torch.equal(unipc_sigmas(schedule, n), unipc.sigmas.float())

    lcm = LCMScheduler.from_config(SD_SCHEDULER_CONFIG)
    lcm.set_timesteps(n)
    assert torch.equal(lcm_sigmas(schedule, n), torch.cat([sigmas_at(lcm, lcm.timesteps), torch.zeros(1)]))


def test_lcm_step_limit():
    with pytest.raises(ValueError, match="LCM takes 1 to 50 steps"):
        lcm_sigmas(DiscreteSchedule(AC), 51)
