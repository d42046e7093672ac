"""The denoiser D(x, σ, cond) → x̂0: the one place that knows the model's prediction type.

A discrete-time SD UNet predicts either the noise ε (SD 1.x, SD 2.x base, SDXL) or the velocity
v (SD 2.x 768-v). Both are turned into an x̂0 estimate with k-diffusion's scalings (σ_data = 1):

    c_in = 1/√(σ²+1)   ε-model: x̂0 = x − σ·ε            v-model: x̂0 = x/(σ²+1) − σ/√(σ²+1)·v

The same object gives the training loss (``Denoiser.loss``), with the model's own target, so
training and inference cannot disagree on the prediction type.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
from torch import Tensor

from .schedule import DiscreteSchedule

Prediction = Literal["eps", "v"]
PREDICTIONS: tuple[str, ...] = ("eps", "v")

# model(x_in, t, cond) -> raw network output (ε or v), same shape as x_in
ModelFn = Callable[[Tensor, Tensor, object], Tensor]


class Denoiser:
    """Wraps a raw network into x̂0 = D(x, σ, cond)."""

    def __init__(self, model: ModelFn, schedule: DiscreteSchedule, prediction: Prediction):
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        self.model = model
        self.schedule = schedule
        self.prediction = prediction

    def __call__(self, x: Tensor, sigma: Tensor, cond: object) -> Tensor:
        s = sigma.to(torch.float32).reshape(-1, *([1] * (x.ndim - 1)))
        c_in = 1 / (s**2 + 1) ** 0.5
        t = self.schedule.sigma_to_t(sigma.to(torch.float32))
        out = self.model((x * c_in).to(x.dtype), t, cond)
        if self.prediction == "eps":
            return x - out * s
        return x / (s**2 + 1) - out * s * c_in

    def loss(self, x0: Tensor, noise: Tensor, sigma: Tensor, cond: object) -> Tensor:
        """Per-sample training loss at noise levels ``sigma`` [B]: the mean squared error of the raw
        output against the model's own target — ε (the noise) for an ε-model, v = (x0·c_skip − x)/c_out
        for a v-model, as k-diffusion's DiscreteEpsDDPMDenoiser / DiscreteVDDPMDenoiser compute it
        (x = x0 + σ·noise, fed as x·c_in at the timestep of σ)."""
        s = sigma.to(torch.float32).reshape(-1, *([1] * (x0.ndim - 1)))
        c_in = 1 / (s**2 + 1) ** 0.5
        noised = x0 + noise * s
        out = self.model((noised * c_in).to(x0.dtype), self.schedule.sigma_to_t(sigma.to(torch.float32)), cond).float()
        if self.prediction == "eps":
            target = noise
        else:
            c_skip, c_out = 1 / (s**2 + 1), -s * c_in
            target = (x0 - c_skip * noised) / c_out
        return (out - target.float()).pow(2).flatten(1).mean(1)
