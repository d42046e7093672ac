"""Samplers: pure functions of a denoiser over a σ schedule (k-diffusion's formulation).

Every sampler has the signature ``sample_NAME(denoise, x, sigmas, *, callback=None,
noise_sampler=None, **options) -> Tensor``:

* ``denoise(x, σ_batch) → x̂0`` has guidance, masks and the model's prediction type wrapped in;
* ``x`` is already noised to σ_0 (txt2img: noise·σ_0; img2img: init + noise·σ_0);
* ``sigmas`` is the schedule, usually ending with 0 (see ``sampler_sigmas``);
* ``noise_sampler(σ, σ_next)`` supplies fresh noise to the stochastic samplers (default
  ``torch.randn_like(x)``). The samplers do not choose it: the pipeline gives the SDE samplers
  (DPM++ SDE / 2M SDE / 3M SDE) a per-image Brownian tree over the schedule's σ range, as A1111
  does (``brownian.BrownianNoise``), and the others the per-image streams of ``noise.ImageNoise``;
* ``callback(StepRecord)`` is called once per step with that step's x̂0.

The samplers k-diffusion has follow its maths and A1111's defaults (eta = 1, s_noise = 1,
s_churn = 0, LMS order 4, DPM++ SDE r = ½, DPM++ 2M SDE "midpoint"). DDIM, PLMS, UniPC and LCM
are diffusers' timestep schedulers rewritten in σ-space: with x = x_t·√(1+σ²) and
ε = (x − x̂0)/σ they give diffusers' results on the σ's of its timesteps (``schedule.ddim_sigmas``,
``unipc_sigmas``, ``lcm_sigmas``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from .schedule import SCHEDULERS, DiscreteSchedule, ddim_sigmas, get_sigmas, lcm_sigmas, unipc_sigmas

DenoiseFn = Callable[[Tensor, Tensor], Tensor]
NoiseSampler = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class StepRecord:
    """What a per-step callback receives: the step's σ, its input latents x and its x̂0."""

    index: int
    total: int
    sigma: float
    x: Tensor
    denoised: Tensor


StepCallback = Callable[[StepRecord], None]


# -- helpers -------------------------------------------------------------------------------------

def _noise_fn(x: Tensor, noise_sampler: NoiseSampler | None) -> NoiseSampler:
    return noise_sampler if noise_sampler is not None else (lambda sigma, sigma_next: torch.randn_like(x))


def _report(callback: StepCallback | None, i: int, sigmas: Tensor, x: Tensor, denoised: Tensor) -> None:
    if callback is not None:
        callback(StepRecord(i, len(sigmas) - 1, float(sigmas[i]), x, denoised))


def _ones(x: Tensor) -> Tensor:
    return x.new_ones([x.shape[0]], dtype=torch.float32)


def _to_d(x: Tensor, sigma: Tensor, denoised: Tensor) -> Tensor:
    """The probability-flow ODE's derivative dx/dσ = (x − x̂0)/σ (= ε)."""
    return (x - denoised) / sigma


def ancestral_step(sigma: Tensor, sigma_next: Tensor, eta: float = 1.0) -> tuple[Tensor, Tensor]:
    """Split σ → σ_next into a deterministic step to σ_down and fresh noise of std σ_up
    (σ_down² + σ_up² = σ_next²); eta = 0 is deterministic, eta = 1 is DDPM's ancestral step."""
    if not eta:
        return sigma_next, torch.zeros_like(sigma_next)
    up = torch.minimum(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    return (sigma_next**2 - up**2) ** 0.5, up


def _churn(x, sigmas, i, noise, s_churn, s_tmin, s_tmax, s_noise) -> tuple[Tensor, Tensor]:
    """Karras et al.'s stochastic "churn": raise σ_i to σ̂ = σ_i(1+γ) by adding noise."""
    gamma = min(s_churn / (len(sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigmas[i] <= s_tmax else 0.0
    sigma_hat = sigmas[i] * (gamma + 1)
    if gamma > 0:
        x = x + noise(sigmas[i], sigma_hat) * s_noise * (sigma_hat**2 - sigmas[i] ** 2) ** 0.5
    return x, sigma_hat


# -- single-step samplers --------------------------------------------------------------------------

def sample_euler(denoise: DenoiseFn, x: Tensor, sigmas: Tensor, *, callback: StepCallback | None = None,
                 noise_sampler: NoiseSampler | None = None, s_churn: float = 0.0, s_tmin: float = 0.0,
                 s_tmax: float = float("inf"), s_noise: float = 1.0) -> Tensor:
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 2)."""
    noise, s_in = _noise_fn(x, noise_sampler), _ones(x)
    for i in range(len(sigmas) - 1):
        x, sigma_hat = _churn(x, sigmas, i, noise, s_churn, s_tmin, s_tmax, s_noise)
        denoised = denoise(x, sigma_hat * s_in)
        _report(callback, i, sigmas, x, denoised)
        x = x + _to_d(x, sigma_hat, denoised) * (sigmas[i + 1] - sigma_hat)
    return x


def _euler_ancestral(denoise, x, sigmas, callback, noise_sampler, eta, s_noise) -> Tensor:
    noise, s_in = _noise_fn(x, noise_sampler), _ones(x)
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i] * s_in)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        _report(callback, i, sigmas, x, denoised)
        x = x + _to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        if eta and sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


def sample_euler_a(denoise: DenoiseFn, x: Tensor, sigmas: Tensor, *, callback: StepCallback | None = None,
                   noise_sampler: NoiseSampler | None = None, eta: float = 1.0, s_noise: float = 1.0) -> Tensor:
    """Ancestral sampling with Euler steps: step to σ_down, add noise σ_up."""
    return _euler_ancestral(denoise, x, sigmas, callback, noise_sampler, eta, s_noise)


def sample_ddim(denoise: DenoiseFn, x: Tensor, sigmas: Tensor, *, callback: StepCallback | None = None,
                noise_sampler: NoiseSampler | None = None, eta: float = 0.0) -> Tensor:
    """DDIM (Song et al. 2021). In σ-space its update x̂0 + √(σ_next² − s²)·ε + s·z, with DDIM's
    s = eta·σ_next·√(1 − σ_next²/σ²), is exactly an ancestral Euler step; eta = 0 (the default,
    as in diffusers and A1111) is plain Euler. Give it ``ddim_sigmas`` to reproduce DDIMScheduler."""
    return _euler_ancestral(denoise, x, sigmas, callback, noise_sampler, eta, 1.0)


def sample_heun(denoise: DenoiseFn, x: Tensor, sigmas: Tensor, *, callback: StepCallback | None = None,
                noise_sampler: NoiseSampler | None = None, s_churn: float = 0.0, s_tmin: float = 0.0,
                s_tmax: float = float("inf"), s_noise: float = 1.0) -> Tensor:
    """Heun's second-order method (Karras et al. 2022, Algorithm 2); Euler on the last step to 0."""
    noise, s_in = _noise_fn(x, noise_sampler), _ones(x)
    for i in range(len(sigmas) - 1):
        x, sigma_hat = _churn(x, sigmas, i, noise, s_churn, s_tmin, s_tmax, s_noise)
        denoised = denoise(x, sigma_hat * s_in)
        _report(callback, i, sigmas, x, denoised)
        d = _to_d(x, sigma_hat, denoised)
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = _to_d(x_2, sigmas[i + 1], denoise(x_2, sigmas[i + 1] * s_in))
            x = x + (d + d_2) / 2 * dt
    return x


def sample_dpm2(denoise: DenoiseFn, x: Tensor, sigmas: Tensor, *, callback: StepCallback | None = None,
                noise_sampler: NoiseSampler | None = None, s_churn: float = 0.0, s_tmin: float = 0.0,
                s_tmax: float = float("inf"), s_noise: float = 1.0) -> Tensor:
    """DPM-Solver-2 style midpoint steps (the derivative taken at the log-σ midpoint)."""
    noise, s_in = _noise_fn(x, noise_sampler), _ones(x)
    for i in range(len(sigmas) - 1):
        x, sigma_hat = _churn(x, sigmas, i, noise, s_churn, s_tmin, s_tmax, s_noise)
        denoised = denoise(x, sigma_hat * s_in)
        _report(callback, i, sigmas, x, denoised)
        x = _dpm2_step(denoise, x, sigma_hat, sigmas[i + 1], denoised, s_in)
    return x


def _dpm2_step(denoise, x, sigma, sigma_next, denoised, s_in) -> Tensor:
    d = _to_d(x, sigma, denoised)
    if sigma_next == 0:
        return x + d * (sigma_next - sigma)
    sigma_mid = sigma.log().lerp(sigma_next.log(), 0.5).exp()
    x_2 = x + d * (sigma_mid - sigma)
    d_2 = _to_d(x_2, sigma_mid, denoise(x_2, sigma_mid * s_in))
    return x + d_2 * (sigma_next - sigma)


def sample_dpm2_a(denoise: DenoiseFn, x: Tensor, sigmas: Tensor, *, callback: StepCallback | None = None,
                  noise_sampler: NoiseSampler | None = None, eta: float = 1.0, s_noise: float = 1.0) -> Tensor:
    """Ancestral sampling with DPM-Solver-2 steps to σ_down."""
    noise, s_in = _noise_fn(x, noise_sampler), _ones(x)
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i] * s_in)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        _report(callback, i, sigmas, x, denoised)
        x = _dpm2_step(denoise, x, sigmas[i], sigma_down, denoised, s_in)
        if sigma_down > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


def _sigma(t: Tensor) -> Tensor:
    """σ from the log-SNR-like time t = −log σ used by the DPM-Solver++ samplers."""
    return t.neg().exp()


def sample_dpmpp_2s_a(denoise: DenoiseFn, x: Tensor, sigmas: Tensor, *, callback: StepCallback | None = None,
                      noise_sampler: NoiseSampler | None = None, eta: float = 1.0, s_noise: float = 1.0) -> Tensor:
    """Ancestral sampling with DPM-Solver++(2S) single-step second-order steps to σ_down."""
    noise, s_in = _noise_fn(x, noise_sampler), _ones(x)
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i] * s_in)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        _report(callback, i, sigmas, x, denoised)
        if sigma_down == 0:
            x = x + _to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            t, t_next = -sigmas[i].log(), -sigma_down.log()
            h = t_next - t
            s = t + h / 2
            x_2 = (_sigma(s) / _sigma(t)) * x - (-h / 2).expm1() * denoised
            denoised_2 = denoise(x_2, _sigma(s) * s_in)
            x = (_sigma(t_next) / _sigma(t)) * x - (-h).expm1() * denoised_2
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


def sample_dpmpp_sde(denoise: DenoiseFn, x: Tensor, sigmas: Tensor, *, callback: StepCallback | None = None,
                     noise_sampler: NoiseSampler | None = None, eta: float = 1.0, s_noise: float = 1.0,
                     r: float = 0.5) -> Tensor:
    """DPM-Solver++ (stochastic), two evaluations per step with the intermediate point at ratio r.
    Noise comes from ``noise_sampler`` twice per step, over [σ_s, σ] and then [σ_next, σ] — increments
    of one Brownian path when it is a ``brownian.BrownianNoise``, as in A1111."""
    noise, s_in = _noise_fn(x, noise_sampler), _ones(x)
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i] * s_in)
        _report(callback, i, sigmas, x, denoised)
        if sigmas[i + 1] == 0:
            x = x + _to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
            continue
        t, t_next = -sigmas[i].log(), -sigmas[i + 1].log()
        h = t_next - t
        s = t + h * r
        fac = 1 / (2 * r)
        # to the intermediate point s
        sd, su = ancestral_step(_sigma(t), _sigma(s), eta)
        s_ = -sd.log()
        x_2 = (_sigma(s_) / _sigma(t)) * x - (t - s_).expm1() * denoised
        x_2 = x_2 + noise(_sigma(t), _sigma(s)) * s_noise * su
        denoised_2 = denoise(x_2, _sigma(s) * s_in)
        # to t_next with the combined x̂0
        sd, su = ancestral_step(_sigma(t), _sigma(t_next), eta)
        t_next_ = -sd.log()
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = (_sigma(t_next_) / _sigma(t)) * x - (t - t_next_).expm1() * denoised_d
        x = x + noise(_sigma(t), _sigma(t_next)) * s_noise * su
    return x


def sample_lcm(denoise: DenoiseFn, x: Tensor, sigmas: Tensor, *, callback: StepCallback | None = None,
               noise_sampler: NoiseSampler | None = None) -> Tensor:
    """Latent Consistency Model sampling: jump to x̂0, re-noise to σ_next (LCMScheduler's
    √ᾱ·x̂0 + √(1−ᾱ)·z in σ-space). LCMScheduler's boundary condition c_skip·x_t + c_out·x̂0 is
    left out: at its timesteps (t ≥ 19) c_skip < 1e-5 and c_out > 1 − 1e-5."""
    noise, s_in = _noise_fn(x, noise_sampler), _ones(x)
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i] * s_in)
        _report(callback, i, sigmas, x, denoised)
        x = denoised
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1]
    return x


# -- multistep samplers: each step reuses the x̂0 / ε of earlier steps -----------------------------

def _lms_coeff(t: list[float], i: int, order: int, j: int) -> float:
    """∫_{t_i}^{t_{i+1}} of the Lagrange basis polynomial through t_i … t_{i−order+1} that is 1 at t_{i−j}
    (a polynomial, so integrated exactly)."""
    basis = np.poly1d([1.0])
    for k in range(order):
        if k != j:
            basis = basis * np.poly1d([1.0, -t[i - k]]) * (1.0 / (t[i - j] - t[i - k]))
    antiderivative = basis.integ()
    return float(antiderivative(t[i + 1]) - antiderivative(t[i]))


def sample_lms(denoise: DenoiseFn, x: Tensor, sigmas: Tensor, *, callback: StepCallback | None = None,
               noise_sampler: NoiseSampler | None = None, order: int = 4) -> Tensor:
    """Linear multistep in σ on the ODE derivative, up to ``order`` past derivatives."""
    s_in, t = _ones(x), sigmas.tolist()
    ds: list[Tensor] = []
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i] * s_in)
        ds = [*ds, _to_d(x, sigmas[i], denoised)][-order:]
        _report(callback, i, sigmas, x, denoised)
        cur = len(ds)
        x = x + sum(_lms_coeff(t, i, cur, j) * d for j, d in enumerate(reversed(ds)))
    return x


def sample_dpmpp_2m(denoise: DenoiseFn, x: Tensor, sigmas: Tensor, *, callback: StepCallback | None = None,
                    noise_sampler: NoiseSampler | None = None) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022): exponential-integrator steps in t = −log σ on a
    second-order extrapolation of x̂0; first order on the first step and on the final step to 0."""
    s_in = _ones(x)
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i] * s_in)
        _report(callback, i, sigmas, x, denoised)
        t, t_next = -sigmas[i].log(), -sigmas[i + 1].log()
        h = t_next - t
        denoised_d = denoised
        if old_denoised is not None and sigmas[i + 1] > 0:
            r = (t + sigmas[i - 1].log()) / h          # h_last / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        x = (sigmas[i + 1] / sigmas[i]) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x


def sample_dpmpp_2m_sde(denoise: DenoiseFn, x: Tensor, sigmas: Tensor, *, callback: StepCallback | None = None,
                        noise_sampler: NoiseSampler | None = None, eta: float = 1.0, s_noise: float = 1.0,
                        solver_type: str = "midpoint") -> Tensor:
    """DPM-Solver++(2M) SDE; the last step to 0 returns x̂0. Noise from ``noise_sampler`` (the
    pipeline's is a Brownian tree, ``brownian.BrownianNoise``, as in A1111)."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    noise, s_in = _noise_fn(x, noise_sampler), _ones(x)
    old_denoised = h_last = None
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i] * s_in)
        _report(callback, i, sigmas, x, denoised)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        h = sigmas[i].log() - sigmas[i + 1].log()
        eta_h = eta * h
        decay = (-h - eta_h).expm1().neg()                    # 1 − e^{−(1+η)h}
        x = sigmas[i + 1] / sigmas[i] * (-eta_h).exp() * x + decay * denoised
        if old_denoised is not None:
            diff = (denoised - old_denoised) * (h / h_last)    # (x̂0 − x̂0_prev) / r
            if solver_type == "heun":
                x = x + (decay / (-h - eta_h) + 1) * diff
            else:
                x = x + 0.5 * decay * diff
        if eta:
            x = x + noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * eta_h).expm1().neg().sqrt() * s_noise
        old_denoised, h_last = denoised, h
    return x


def sample_dpmpp_3m_sde(denoise: DenoiseFn, x: Tensor, sigmas: Tensor, *, callback: StepCallback | None = None,
                        noise_sampler: NoiseSampler | None = None, eta: float = 1.0, s_noise: float = 1.0) -> Tensor:
    """DPM-Solver++(3M) SDE; the last step to 0 returns x̂0. Noise from ``noise_sampler`` (the
    pipeline's is a Brownian tree, ``brownian.BrownianNoise``, as in A1111)."""
    noise, s_in = _noise_fn(x, noise_sampler), _ones(x)
    denoised_1 = denoised_2 = h_1 = h_2 = None
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i] * s_in)
        _report(callback, i, sigmas, x, denoised)
        h = None
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = sigmas[i].log() - sigmas[i + 1].log()
            h_eta = h * (eta + 1)
            x = torch.exp(-h_eta) * x + (-h_eta).expm1().neg() * denoised
            phi_2 = h_eta.neg().expm1() / h_eta + 1
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                x = x + phi_2 * d1 - (phi_2 / h_eta - 0.5) * d2
            elif h_1 is not None:
                x = x + phi_2 * (denoised - denoised_1) / (h_1 / h)
            if eta:
                x = x + noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt() * s_noise
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


# Adams–Bashforth weights, newest ε first, for 1–4 stored values (PNDM's PLMS).
_ADAMS_BASHFORTH = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12),
                    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def sample_plms(denoise: DenoiseFn, x: Tensor, sigmas: Tensor, *, callback: StepCallback | None = None,
                noise_sampler: NoiseSampler | None = None) -> Tensor:
    """PLMS (Liu et al. 2022, PNDM with skip_prk_steps as SD uses it): DDIM steps — x + ε·Δσ in
    σ-space — on an Adams–Bashforth combination of the last four ε's. The first step is a
    "pseudo improved Euler" step (ε averaged with ε at the Euler-predicted point), so n steps take
    n + 1 evaluations. Give it ``ddim_sigmas`` to reproduce diffusers' PNDMScheduler."""
    s_in, n = _ones(x), len(sigmas) - 1
    history: list[Tensor] = []
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma * s_in)
        eps = _to_d(x, sigma, denoised)
        _report(callback, i, sigmas, x, denoised)
        if i == 0 and n > 1:
            x_2 = x + eps * (sigma_next - sigma)
            eps_2 = _to_d(x_2, sigma_next, denoise(x_2, sigma_next * s_in))
            eps_prime = (eps + eps_2) / 2
            history = [eps]
        else:
            history = [*history, eps][-4:]
            weights = _ADAMS_BASHFORTH[len(history)]
            eps_prime = sum(w * e for w, e in zip(weights, reversed(history)))
        x = x + eps_prime * (sigma_next - sigma)
    return x


def _unipc_rhos(rks: list[float], hh: float) -> list[float]:
    """Solve UniPC's order conditions Σ_k ρ_k r_k^(p−1) = b_p(hh), p = 1 … len(rks), with the bh2
    choice B(h) = e^hh − 1 (hh = −h)."""
    R = torch.tensor([[r**p for r in rks] for p in range(len(rks))], dtype=torch.float64)
    b, h_phi_k, factorial = [], math.expm1(hh) / hh - 1, 1
    for p in range(1, len(rks) + 1):
        b.append(h_phi_k * factorial / math.expm1(hh))
        factorial *= p + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return torch.linalg.solve(R, torch.tensor(b, dtype=torch.float64)).tolist()


def _unipc_update(x: Tensor, outs: list[Tensor], sig: list[float], lam: list[float], k: int, order: int,
                  model_t: Tensor | None = None) -> Tensor:
    """One UniPC-bh2 update from σ_k to σ_{k+1} in data-prediction form; ``outs`` ends with x̂0 at
    σ_k. With ``model_t`` (x̂0 at the predicted σ_{k+1}) it is the corrector UniC, else UniP."""
    m0 = outs[-1]
    hh = lam[k] - lam[k + 1]                                 # −h
    rks = [(lam[k - j] - lam[k]) / -hh for j in range(1, order)]
    d1s = [(outs[-1 - j] - m0) / r for j, r in enumerate(rks, start=1)]
    if model_t is None:
        rhos = [] if order == 1 else [0.5] if order == 2 else _unipc_rhos(rks, hh)
        res = sum(rho * d for rho, d in zip(rhos, d1s))
    else:
        rhos = [0.5] if order == 1 else _unipc_rhos([*rks, 1.0], hh)
        res = sum(rho * d for rho, d in zip(rhos[:-1], d1s)) + rhos[-1] * (model_t - m0)
    return (sig[k + 1] / sig[k]) * x - math.expm1(hh) * (m0 + res)


def sample_unipc(denoise: DenoiseFn, x: Tensor, sigmas: Tensor, *, callback: StepCallback | None = None,
                 noise_sampler: NoiseSampler | None = None, order: int = 2) -> Tensor:
    """UniPC (Zhao et al. 2023), bh2, data prediction, as diffusers' UniPCMultistepScheduler with its
    defaults: a UniP predictor of ``order`` (lower while warming up and on the last step) and,
    from the second step on, a UniC corrector of the previous step that reuses the new x̂0 (no
    extra evaluation). Give it ``unipc_sigmas`` to reproduce diffusers."""
    if order not in (1, 2, 3):
        raise ValueError(f"UniPC order must be 1, 2 or 3, got {order}")
    s_in, n = _ones(x), len(sigmas) - 1
    sig = sigmas.tolist()
    lam = [-math.log(s) if s > 0 else math.inf for s in sig]  # λ = log(α/σ_VP) = −log σ
    outs: list[Tensor] = []
    x_last, last_order = x, 1
    for i in range(n):
        denoised = denoise(x, sigmas[i] * s_in)
        if outs:
            x = _unipc_update(x_last, outs, sig, lam, i - 1, last_order, model_t=denoised)
        outs = [*outs, denoised][-order:]
        _report(callback, i, sigmas, x, denoised)
        last_order = min(order, n - i, i + 1)
        x_last = x
        x = _unipc_update(x, outs, sig, lam, i, last_order)
    return x


# -- registry, A1111 names, and each sampler's "Automatic" σ schedule ------------------------------

SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "euler": sample_euler, "euler_a": sample_euler_a, "heun": sample_heun, "dpm2": sample_dpm2,
    "dpm2_a": sample_dpm2_a, "lms": sample_lms, "dpmpp_2m": sample_dpmpp_2m, "dpmpp_2s_a": sample_dpmpp_2s_a,
    "dpmpp_sde": sample_dpmpp_sde, "dpmpp_2m_sde": sample_dpmpp_2m_sde, "dpmpp_3m_sde": sample_dpmpp_3m_sde,
    "ddim": sample_ddim, "plms": sample_plms, "unipc": sample_unipc, "lcm": sample_lcm,
}

SAMPLER_DISPLAY: dict[str, str] = {
    "euler": "Euler", "euler_a": "Euler a", "heun": "Heun", "dpm2": "DPM2", "dpm2_a": "DPM2 a", "lms": "LMS",
    "dpmpp_2m": "DPM++ 2M", "dpmpp_2s_a": "DPM++ 2S a", "dpmpp_sde": "DPM++ SDE", "dpmpp_2m_sde": "DPM++ 2M SDE",
    "dpmpp_3m_sde": "DPM++ 3M SDE", "ddim": "DDIM", "plms": "PLMS", "unipc": "UniPC", "lcm": "LCM",
}

# A1111 display names → (sampler, default scheduler; None = "normal"/the sampler's own spacing).
# Since A1111 1.9 the plain DPM++ names default to Karras (2M SDE / 3M SDE: Exponential); the
# older "… Karras" names remain as aliases.
SAMPLER_ALIASES: dict[str, tuple[str, str | None]] = {
    "Euler": ("euler", None), "Euler a": ("euler_a", None), "Heun": ("heun", None),
    "LMS": ("lms", None), "LMS Karras": ("lms", "karras"),
    "DPM2": ("dpm2", None), "DPM2 Karras": ("dpm2", "karras"),
    "DPM2 a": ("dpm2_a", None), "DPM2 a Karras": ("dpm2_a", "karras"),
    "DPM++ 2M": ("dpmpp_2m", "karras"), "DPM++ 2M Karras": ("dpmpp_2m", "karras"),
    "DPM++ 2S a": ("dpmpp_2s_a", "karras"), "DPM++ 2S a Karras": ("dpmpp_2s_a", "karras"),
    "DPM++ SDE": ("dpmpp_sde", "karras"), "DPM++ SDE Karras": ("dpmpp_sde", "karras"),
    "DPM++ 2M SDE": ("dpmpp_2m_sde", "exponential"), "DPM++ 2M SDE Karras": ("dpmpp_2m_sde", "karras"),
    "DPM++ 2M SDE Exponential": ("dpmpp_2m_sde", "exponential"),
    "DPM++ 3M SDE": ("dpmpp_3m_sde", "exponential"), "DPM++ 3M SDE Karras": ("dpmpp_3m_sde", "karras"),
    "DPM++ 3M SDE Exponential": ("dpmpp_3m_sde", "exponential"),
    "DDIM": ("ddim", None), "PLMS": ("plms", None), "UniPC": ("unipc", None), "LCM": ("lcm", None),
}

# "Automatic" for the timestep samplers is diffusers' spacing for them under SD's scheduler config.
TIMESTEP_SIGMAS: dict[str, Callable[[DiscreteSchedule, int], Tensor]] = {
    "ddim": ddim_sigmas, "plms": ddim_sigmas, "unipc": unipc_sigmas, "lcm": lcm_sigmas,
}

# A1111 computes one σ more for these and drops the next-to-last ("discard_next_to_last_sigma").
DISCARD_PENULTIMATE_SIGMA: frozenset[str] = frozenset({"dpm2", "dpm2_a", "dpmpp_3m_sde"})

_BY_NAME: dict[str, tuple[str, str | None]] = {
    **{k.lower(): v for k, v in SAMPLER_ALIASES.items()},
    **{name: SAMPLER_ALIASES[SAMPLER_DISPLAY[name]] for name in SAMPLERS},
}


def _valid_names() -> str:
    return ", ".join([*SAMPLERS, *SAMPLER_ALIASES])


def resolve_sampler(name: str) -> tuple[str, str | None]:
    """An internal or A1111 display name (any case) → (internal sampler, default scheduler or None).
    Internal names get the same default as their display name (e.g. dpmpp_2m → karras)."""
    try:
        return _BY_NAME[name.strip().lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"unknown sampler {name!r}; valid samplers: {_valid_names()}") from None


def implied_scheduler(name: str) -> str | None:
    """The scheduler an old combined A1111 label names (``DPM++ 2M Karras`` → karras, before A1111 1.9
    split the two); None for a plain sampler name, whose schedule is then the "Automatic" one."""
    label = name.strip().lower() if isinstance(name, str) else ""
    for suffix in (" karras", " exponential"):
        if label.endswith(suffix) and label in _BY_NAME:
            return _BY_NAME[label][1]
    return None


def get_sampler(name: str) -> Callable[..., Tensor]:
    """The sampler function for an internal or A1111 display name."""
    return SAMPLERS[resolve_sampler(name)[0]]


def sampler_sigmas(sampler: str, scheduler: str | None, schedule: DiscreteSchedule, n: int) -> Tensor:
    """The σ schedule A1111 would run ``sampler`` on for n steps (``scheduler`` None: the sampler's
    default). "normal" (A1111's "Automatic") means diffusers' timestep spacing for DDIM / PLMS /
    UniPC / LCM; other names go to ``get_sigmas``."""
    sampler, default = resolve_sampler(sampler)
    scheduler = scheduler or default or "normal"
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; valid schedulers: {', '.join(SCHEDULERS)}")
    if scheduler == "normal" and sampler in TIMESTEP_SIGMAS:
        return TIMESTEP_SIGMAS[sampler](schedule, n)
    if scheduler == "trailing" and sampler in ("ddim", "plms"):
        # DDIMScheduler(timestep_spacing="trailing") (Hyper-SD's card): its last step lands on ᾱ_0 too
        sigmas = get_sigmas(schedule, scheduler, n)
        return torch.cat([sigmas[:-1], schedule.sigmas[:1]])
    if sampler in DISCARD_PENULTIMATE_SIGMA:
        sigmas = get_sigmas(schedule, scheduler, n + 1)
        return torch.cat([sigmas[:-2], sigmas[-1:]])
    return get_sigmas(schedule, scheduler, n)
