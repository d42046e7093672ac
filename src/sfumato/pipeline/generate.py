"""The generator: a request becomes a plan (``pipeline.plan``), and the one run loop
(``pipeline.run``) carries it out on the engines. txt2img, img2img, inpainting, outpainting, the
hires fix, the SDXL refiner hand-off, depth2img and the x4 upscaler are all this loop: img2img is a
slice of the σ schedule, inpainting latent blending or a 9-channel input, outpainting inpainting on a
padded canvas, hires fix a second stage from the first's latents, the refiner a second pass on the
schedule's tail, the upscaler a stage whose extra input is the low-res image."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack

import torch
from torch import Tensor

from ..adapters.embeddings import EmbeddingSet
from ..checkpoint.load import LoadedModel
from ..models.taesd import TinyDecoder
from .control import ControlNets
from .engine import Engine
from .guidance import Guidance, StepClock
from .image_prompt import ImagePrompts
from .params import GenerationParams
from .patches import Patch
from .plan import Plan, img2img_sigmas, plan
from .run import Generated, Progress, ProgressCallback, RunLoop, Tools

__all__ = ["Generated", "Generator", "Progress", "ProgressCallback", "guided_denoiser", "img2img_sigmas"]


class Generator:
    """Runs requests against a loaded model (and optionally an SDXL refiner)."""

    def __init__(self, model: LoadedModel, refiner: LoadedModel | None = None, embeddings: EmbeddingSet | None = None,
                 hires: LoadedModel | None = None):
        self.base = Engine(model, embeddings)
        self.refiner = Engine(refiner, embeddings) if refiner is not None else None
        self.hires = Engine(hires, embeddings) if hires is not None else None   # the hires pass's own model
        self.controlnets = ControlNets()
        self.image_prompts = ImagePrompts()   # IP-Adapters and their image encoders, cached like ControlNets
        self.tiny_decoder: TinyDecoder | None = None   # set: decodes the final images and the previews

    @property
    def engines(self) -> dict[str, Engine]:
        out = {"base": self.base, "refiner": self.refiner, "hires": self.hires}
        return {name: engine for name, engine in out.items() if engine is not None}

    def plan(self, p: GenerationParams) -> Plan:
        """The validated request's plan (no weights read)."""
        return plan(p.validated(), self.base, self.refiner, self.hires)

    @torch.no_grad()
    def run(self, p: GenerationParams, callback: ProgressCallback | None = None,
            patches: Sequence[Patch] = ()) -> Generated:
        """Plan ``p`` and carry the plan out, with ``patches`` attached for the whole run."""
        the_plan = self.plan(p)
        controlnets = self.controlnets.get(p.control, self.base)   # loaded now: a bad file fails before any work
        prompts = self.image_prompts.get(p.ip_adapters, self.base)   # loaded, checked and encoded now, likewise
        with ExitStack() as stack:
            for patch in patches:
                stack.enter_context(patch())
            tools = Tools(controlnets, self.tiny_decoder, callback, prompts)
            return RunLoop(p, self.engines, tools).run(the_plan)


def guided_denoiser(engine: Engine, cond, uncond, p: GenerationParams, sigmas: Tensor):
    """``denoise(x, σ) → x̂0`` of ``engine`` under the request's guidance over the schedule ``sigmas``
    (the step read from σ): what one pass of the loop samples, for oracles outside it."""
    clock = StepClock(sigmas)
    guidance = Guidance(engine.denoiser, (cond, uncond), (p.cfg_scale, p.guidance_rescale), clock)
    guidance.name = engine.name
    return clock.wrap(guidance)


_Guided = guided_denoiser   # its name before the engine redesign (the refiner parity test's oracle uses it)
