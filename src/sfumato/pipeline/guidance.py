"""Guidance and the step clock: how one denoiser evaluation becomes x̂0 for a sampler.

:class:`StepClock` is the one place the step is known. It wraps the denoiser a sampler calls: each
call is an *evaluation* (``evaluation`` counts them; DeepCache caches by it) at σ, whose position in
the stage's schedule is the *step* (``step``, and ``fraction`` = step / steps; the prompt schedule and
ControlNet spans read them). A pass that continues a schedule (the refiner's tail) keeps counting.

:class:`Guidance` is ``denoise(x, σ) → x̂0``: classifier-free guidance over composable (AND) prompts,
guidance rescale, and inpainting's latent blending; samplers never learn about any of it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..errors import NonFiniteOutputError
from ..text.conditioner import Cond

DenoiseFn = Callable[[Tensor, Tensor], Tensor]


class StepClock:
    """Steps and evaluations of one sampling pass over ``schedule[start:]`` (``schedule``: the
    stage's whole σ schedule, its last entry the final σ)."""

    def __init__(self, schedule: Tensor, start: int = 0):
        self.schedule, self.start = schedule, start
        self.evaluation = -1        # index of the current evaluation in this pass (−1: none yet)
        self.step = start           # the step of the current evaluation, in the whole schedule
        self._passes: list[Tensor] = []

    @property
    def fraction(self) -> float:
        """The current step as a fraction of the schedule's steps, 0 … 1."""
        return self.step / max(len(self.schedule) - 1, 1)

    def wrap(self, denoise: DenoiseFn) -> DenoiseFn:
        """``denoise`` with each call an evaluation: the step is read from σ (the nearest in the
        schedule: a second-order sampler's corrector evaluation counts toward the next step)."""
        tail = self.schedule[self.start:]

        def evaluate(x: Tensor, sigma: Tensor) -> Tensor:
            self.evaluation += 1
            self.step = self.start + int((tail - float(sigma[0])).abs().argmin())
            return denoise(x, sigma)

        return evaluate


class Guidance:
    """x̂0 with classifier-free guidance over composable (AND) prompts, guidance rescale, and
    inpainting's latent masking (``blend``: (init latent, latent mask)) for the ``denoiser``
    D(x, σ, (cond, image conditioning)) of one engine. The prompt schedules ``conds`` are read at the
    clock's step (a refiner's tail goes on where the base pass stopped, as in A1111)."""

    def __init__(self, denoiser: Callable, conds: tuple, settings: tuple[float, float], clock: StepClock,
                 image_cond: Tensor | None = None, blend: tuple[Tensor, Tensor] | None = None):
        self.denoiser, (self.cond, self.uncond) = denoiser, conds
        self.cfg_scale, self.rescale = settings
        self.clock, self.image_cond, self.blend = clock, image_cond, blend
        self.name = "the model"
        # hooks that read row 0 of a UNet call as the uncond row (IP-Adapter; ControlNet's "control"
        # mode) need it evaluated even at CFG 1: the run loop clears this for them
        self.cfg1_skips_uncond = True

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        step = self.clock.step
        cond, weights = self.cond.at(step)
        uncond, _ = self.uncond.at(step)
        b = x.shape[0]
        owner = self.cond.owner.to(x.device)                      # image of each conditioning row
        x_in = torch.cat([x, x[owner]])
        s_in = torch.cat([sigma, sigma[owner]])
        ic = torch.cat([self.image_cond, self.image_cond[owner]]) if self.image_cond is not None else None
        both = Cond.cat([uncond, cond])
        out = torch.empty_like(x_in)
        # At CFG 1 with weights summing to 1, u + (Σ w·c − u) is Σ w·c: the uncond rows are not
        # evaluated (half the UNet work; what diffusers and ComfyUI do for few-step models).
        skip_uncond = self.cfg1_skips_uncond and self.cfg_scale == 1 and self.rescale == 0 and \
            bool((weights.sum(1) == 1).all())
        # One UNet call per image (its uncond row and its cond rows): the result for an image then
        # does not depend on the batch size, so item i of a batch equals a single run with seed + i.
        for i in range(b):
            rows = b + (self.cond.owner == i).nonzero().flatten()
            if not skip_uncond:
                rows = torch.cat([torch.tensor([i]), rows])
            out[rows] = self.denoiser(x_in[rows], s_in[rows], (both.rows(rows), ic[rows] if ic is not None else None))
        u, c = out[:b], out[b:]
        w = weights.to(x.dtype)
        if skip_uncond:
            x0 = torch.einsum("bn,nchw->bchw", w, c)
        else:
            x0 = u + self.cfg_scale * torch.einsum("bn,nchw->bchw", w, c - u[owner])
        if self.rescale > 0:
            x0 = self._rescale(x, sigma, x0, torch.einsum("bn,nchw->bchw", w / w.sum(1, keepdim=True), c))
        if self.blend is not None:
            init_latent, latent_mask = self.blend
            x0 = init_latent * (1 - latent_mask) + latent_mask * x0
        if not torch.isfinite(x0).all():   # NaN/inf would end as a black image passed off as a result
            raise NonFiniteOutputError(f"the UNet of {self.name} produced NaN or infinite values at step "
                                       f"{self.clock.step + 1} (σ = {float(sigma[0]):.4g}); try another dtype (fp32)")
        return x0

    def _rescale(self, x: Tensor, sigma: Tensor, x0_cfg: Tensor, x0_cond: Tensor) -> Tensor:
        """Guidance rescale (Lin et al. 2023), on the implied noise: match the conditional
        prediction's standard deviation, blended by φ."""
        s = sigma.view(-1, 1, 1, 1)
        eps_cfg, eps_cond = (x - x0_cfg) / s, (x - x0_cond) / s
        dims = (1, 2, 3)
        rescaled = eps_cfg * (eps_cond.std(dim=dims, keepdim=True) / eps_cfg.std(dim=dims, keepdim=True))
        eps = self.rescale * rescaled + (1 - self.rescale) * eps_cfg
        return x - eps * s
