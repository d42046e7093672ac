"""Samplers against their oracles: k-diffusion's samplers on the same denoiser, σ's and noise, and
diffusers' DDIM / PNDM (PLMS) / UniPC / LCM schedulers driven by the equivalent ε-model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import k_diffusion.sampling as KS
from diffusers import DDIMScheduler, LCMScheduler, PNDMScheduler, UniPCMultistepScheduler
from sfumato.diffusion.denoiser import Denoiser
from sfumato.diffusion.samplers import (
    SAMPLER_ALIASES, SAMPLER_DISPLAY, SAMPLERS, StepRecord, get_sampler, resolve_sampler, sampler_sigmas,
)
from sfumato.diffusion.schedule import DiscreteSchedule, get_sigmas, scaled_linear_alphas_cumprod

SHAPE = (2, 4, 8, 8)
STEPS = 8
# Stable Diffusion's scheduler_config.json (v1.x); each diffusers scheduler takes what it knows.
SD_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, trained_betas=None,
)


class EpsNet(nn.Module):
    """A small random ε-model, nonlinear in x and in t, with some spatial mixing."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1 = nn.Parameter(torch.randn(8, 4, generator=g) * 0.5)
        self.w2 = nn.Parameter(torch.randn(4, 8, generator=g) * 0.5)

    def forward(self, x_in, t, cond=None):
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, 1, 1, 1)
        mixed = x_in + 0.5 * x_in.roll(1, dims=-1) - 0.3 * x_in.roll(1, dims=-2)
        h = torch.tanh(torch.einsum("oc,bchw->bohw", self.w1, mixed)) * (1 + 0.3 * torch.sin(t / 150))
        return torch.einsum("co,bohw->bchw", self.w2, h) + 0.2 * x_in


def make_denoiser(alphas_cumprod=None):
    net = EpsNet().requires_grad_(False)
    schedule = DiscreteSchedule(scaled_linear_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod)
    den = Denoiser(net, schedule, "eps")
    return net, schedule, (lambda x, sigma: den(x, sigma, None))


def seeded_noise(seed: int):
    """A noise sampler returning the same tensors in call order for the same seed."""
    g = torch.Generator().manual_seed(seed)
    return lambda sigma, sigma_next: torch.randn(SHAPE, generator=g)


def rel_err(ours, ref) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


def start(seed: int = 1) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


# -- k-diffusion ---------------------------------------------------------------------------------

K_SAMPLERS = [  # (ours, k-diffusion's, takes noise_sampler, options)
    ("euler", KS.sample_euler, False, {}),
    ("euler_a", KS.sample_euler_ancestral, True, {}),
    ("heun", KS.sample_heun, False, {}),
    ("dpm2", KS.sample_dpm_2, False, {}),
    ("dpm2_a", KS.sample_dpm_2_ancestral, True, {}),
    ("lms", KS.sample_lms, False, {}),
    ("dpmpp_2m", KS.sample_dpmpp_2m, False, {}),
    ("dpmpp_2s_a", KS.sample_dpmpp_2s_ancestral, True, {}),
    ("dpmpp_sde", KS.sample_dpmpp_sde, True, {}),
    ("dpmpp_2m_sde", KS.sample_dpmpp_2m_sde, True, {}),
    ("dpmpp_2m_sde", KS.sample_dpmpp_2m_sde, True, {"solver_type": "heun"}),
    ("dpmpp_3m_sde", KS.sample_dpmpp_3m_sde, True, {}),
    ("euler_a", KS.sample_euler_ancestral, True, {"eta": 0.5}),
    ("dpmpp_sde", KS.sample_dpmpp_sde, True, {"r": 0.3}),
    ("lms", KS.sample_lms, False, {"order": 2}),
]


@pytest.mark.parametrize("scheduler", ["normal", "karras"])
@pytest.mark.parametrize("name,k_fn,stochastic,options", K_SAMPLERS)
def test_matches_k_diffusion(name, k_fn, stochastic, options, scheduler):
    _, schedule, denoise = make_denoiser()
    sigmas = get_sigmas(schedule, scheduler, STEPS)
    x = start() * sigmas[0]
    extra = {"noise_sampler": seeded_noise(7)} if stochastic else {}
    ref = k_fn(denoise, x, sigmas, disable=True, **extra, **options)
    extra = {"noise_sampler": seeded_noise(7)} if stochastic else {}
    ours = SAMPLERS[name](denoise, x, sigmas, **extra, **options)
    assert rel_err(ours, ref) <= 1e-5


@pytest.mark.parametrize("name,k_fn", [("euler", KS.sample_euler), ("heun", KS.sample_heun),
                                       ("dpm2", KS.sample_dpm_2)])
def test_churn_matches_k_diffusion(name, k_fn):
    """s_churn > 0: k-diffusion draws torch.randn_like once per step, as our default noise does."""
    _, schedule, denoise = make_denoiser()
    sigmas = get_sigmas(schedule, "karras", STEPS)
    x = start() * sigmas[0]
    options = dict(s_churn=2.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.003)
    torch.manual_seed(3)
    ref = k_fn(denoise, x, sigmas, disable=True, **options)
    torch.manual_seed(3)
    ours = SAMPLERS[name](denoise, x, sigmas, **options)
    assert rel_err(ours, ref) <= 1e-5
    assert rel_err(SAMPLERS[name](denoise, x, sigmas), ref) > 1e-3   # the churn did something


# -- diffusers' timestep schedulers --------------------------------------------------------------

def run_diffusers(scheduler, net, x_t, steps, **step_kwargs):
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        eps = net(x_t, t)
        kwargs = {k: (v() if callable(v) else v) for k, v in step_kwargs.items()}
        x_t = scheduler.step(eps, t, x_t, **kwargs).prev_sample
    return x_t


def run_ours(name, sigmas, denoise, x_t, **options):
    """Same start in σ-space (x = x_t·√(1+σ²)), result mapped back to diffusers' sample."""
    x = SAMPLERS[name](denoise, x_t * (1 + sigmas[0] ** 2) ** 0.5, sigmas, **options)
    return x / (1 + sigmas[-1] ** 2) ** 0.5


@pytest.mark.parametrize("steps", [1, 10, 30])
def test_ddim_matches_diffusers(steps):
    ref_sched = DDIMScheduler.from_config(SD_SCHEDULER_CONFIG)
    net, schedule, denoise = make_denoiser(ref_sched.alphas_cumprod)
    x_t = start()
    ref = run_diffusers(ref_sched, net, x_t, steps)
    ours = run_ours("ddim", sampler_sigmas("ddim", None, schedule, steps), denoise, x_t)
    assert rel_err(ours, ref) <= 1e-4


def test_ddim_eta_matches_diffusers():
    ref_sched = DDIMScheduler.from_config(SD_SCHEDULER_CONFIG)
    net, schedule, denoise = make_denoiser(ref_sched.alphas_cumprod)
    x_t, g = start(), torch.Generator().manual_seed(5)
    ref = run_diffusers(ref_sched, net, x_t, 12, eta=1.0, variance_noise=lambda: torch.randn(SHAPE, generator=g))
    ours = run_ours("ddim", sampler_sigmas("ddim", None, schedule, 12), denoise, x_t, eta=1.0,
                    noise_sampler=seeded_noise(5))
    assert rel_err(ours, ref) <= 1e-4


@pytest.mark.parametrize("steps", [1, 2, 6, 25])
def test_plms_matches_diffusers(steps):
    ref_sched = PNDMScheduler.from_config(SD_SCHEDULER_CONFIG)
    net, schedule, denoise = make_denoiser(ref_sched.alphas_cumprod)
    x_t, calls = start(), []
    ref = run_diffusers(ref_sched, net, x_t, steps)
    ours = run_ours("plms", sampler_sigmas("plms", None, schedule, steps), denoise, x_t, callback=calls.append)
    assert rel_err(ours, ref) <= 1e-4
    assert len(calls) == steps


@pytest.mark.parametrize("order,steps", [(2, 10), (3, 12), (2, 1), (1, 5)])
def test_unipc_matches_diffusers(order, steps):
    ref_sched = UniPCMultistepScheduler.from_config(SD_SCHEDULER_CONFIG, solver_order=order)
    net, schedule, denoise = make_denoiser(ref_sched.alphas_cumprod)
    x_t = start()
    ref = run_diffusers(ref_sched, net, x_t, steps)
    ours = run_ours("unipc", sampler_sigmas("unipc", None, schedule, steps), denoise, x_t, order=order)
    assert rel_err(ours, ref) <= 1e-4


@pytest.mark.parametrize("steps", [1, 4, 50])
def test_lcm_matches_diffusers(steps):
    ref_sched = LCMScheduler.from_config(SD_SCHEDULER_CONFIG)
    net, schedule, denoise = make_denoiser(ref_sched.alphas_cumprod)
    x_t = start()
    ref = run_diffusers(ref_sched, net, x_t, steps, generator=torch.Generator().manual_seed(9))
    ours = run_ours("lcm", sampler_sigmas("lcm", None, schedule, steps), denoise, x_t, noise_sampler=seeded_noise(9))
    assert rel_err(ours, ref) <= 1e-4


# -- names, callbacks, determinism -----------------------------------------------------------------

def test_alias_table():
    assert set(SAMPLER_DISPLAY) == set(SAMPLERS)
    expected = {
        "Euler": ("euler", None), "Euler a": ("euler_a", None), "Heun": ("heun", None), "LMS": ("lms", None),
        "LMS Karras": ("lms", "karras"), "DPM2": ("dpm2", None), "DPM2 a": ("dpm2_a", None),
        "DPM2 Karras": ("dpm2", "karras"), "DPM2 a Karras": ("dpm2_a", "karras"),
        "DPM++ 2M": ("dpmpp_2m", "karras"), "DPM++ 2M Karras": ("dpmpp_2m", "karras"),
        "DPM++ SDE Karras": ("dpmpp_sde", "karras"), "DPM++ 2M SDE": ("dpmpp_2m_sde", "exponential"),
        "DPM++ 2M SDE Karras": ("dpmpp_2m_sde", "karras"), "DPM++ 3M SDE": ("dpmpp_3m_sde", "exponential"),
        "DPM++ 2S a": ("dpmpp_2s_a", "karras"), "DPM++ 2S a Karras": ("dpmpp_2s_a", "karras"),
        "DDIM": ("ddim", None), "PLMS": ("plms", None), "UniPC": ("unipc", None), "LCM": ("lcm", None),
    }
    for display, target in expected.items():
        assert SAMPLER_ALIASES[display] == target
        assert resolve_sampler(display) == target
        assert resolve_sampler(display.upper()) == target
    for name, display in SAMPLER_DISPLAY.items():
        assert resolve_sampler(name) == SAMPLER_ALIASES[display]
        assert resolve_sampler(name)[0] == name
    assert resolve_sampler(" dpm++ 2m karras ") == ("dpmpp_2m", "karras")
    assert get_sampler("DPM++ 2M Karras") is SAMPLERS["dpmpp_2m"]


@pytest.mark.parametrize("bad", ["euler_ancestral", "DPM++ 4M", ""])
def test_unknown_sampler_lists_valid_names(bad):
    for fn in (resolve_sampler, get_sampler):
        with pytest.raises(ValueError, match="valid samplers: .*euler.*DPM\\+\\+ 2M Karras"):
            fn(bad)


def test_sampler_sigmas():
    schedule = DiscreteSchedule(scaled_linear_alphas_cumprod())
    assert torch.equal(sampler_sigmas("euler", "normal", schedule, 10), schedule.normal(10))
    assert torch.equal(sampler_sigmas("DPM++ 2M", None, schedule, 10), get_sigmas(schedule, "karras", 10))
    assert torch.equal(sampler_sigmas("ddim", "karras", schedule, 10), get_sigmas(schedule, "karras", 10))
    k11 = get_sigmas(schedule, "karras", 11)   # A1111's discard_next_to_last_sigma
    assert torch.equal(sampler_sigmas("dpm2", "karras", schedule, 10), torch.cat([k11[:-2], k11[-1:]]))
    for name in SAMPLERS:
        assert len(sampler_sigmas(name, None, schedule, 10)) == 11
    with pytest.raises(ValueError, match="valid schedulers"):
        sampler_sigmas("euler", "cosine", schedule, 10)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_callback_once_per_step(name):
    _, schedule, denoise = make_denoiser()
    sigmas = get_sigmas(schedule, "karras", 5)
    calls: list[StepRecord] = []
    SAMPLERS[name](denoise, start() * sigmas[0], sigmas, callback=calls.append, noise_sampler=seeded_noise(0))
    assert [c.index for c in calls] == list(range(5)) and {c.total for c in calls} == {5}
    assert [c.sigma for c in calls] == pytest.approx(sigmas[:-1].tolist())
    assert all(c.denoised.shape == SHAPE and c.x.shape == SHAPE for c in calls)


STOCHASTIC = [("euler_a", {}), ("dpm2_a", {}), ("dpmpp_2s_a", {}), ("dpmpp_sde", {}), ("dpmpp_2m_sde", {}),
              ("dpmpp_3m_sde", {}), ("lcm", {}), ("ddim", {"eta": 1.0})]


@pytest.mark.parametrize("name,options", STOCHASTIC)
def test_noise_sampler_determines_output(name, options):
    _, schedule, denoise = make_denoiser()
    sigmas = get_sigmas(schedule, "normal", 6)
    x = start() * sigmas[0]
    run = lambda seed: SAMPLERS[name](denoise, x, sigmas, noise_sampler=seeded_noise(seed), **options)  # noqa: E731
    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3
