"""The one run loop: a plan's stages carried out on the engines.

For each stage the loop makes the starting latents (noise, the init image's latents, or the previous
stage's grown), the extra UNet inputs the stage names, then runs each pass: the engine's prompt
conditioning, its denoiser (steered by ControlNets on base passes), guidance and the step clock
around it, and the pass's patches (ToMe, DeepCache, a streamed UNet held in memory, and on the base model
the request's IP-Adapter image prompts, which read the pass's step clock) attached for the sampler run
only. Then the VAE decodes, and an inpainting result is pasted back into the original.
Run-scoped patches (LoRA, hypernetworks, attention-map hooks) are attached by ``Generator.run``
around the whole loop. Every patch is detached on the way out, also when the run fails.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ..checkpoint.stream import trim_heap
from ..diffusion.brownian import BROWNIAN_SAMPLERS, BrownianNoise, sigma_span
from ..diffusion.noise import ImageNoise
from ..diffusion.samplers import NoiseSampler, StepRecord, get_sampler, resolve_sampler
from ..models.layers import release_scratch
from . import masks, patches
from .control import ControlledDenoiser, Crop, control_units
from .depth import depth_conditioning, inferred_depth
from .engine import Engine
from .guidance import Guidance, StepClock
from .images import to_pil, to_tensor
from .params import GenerationParams
from .plan import Pass, Plan, Stage
from .upscale import noised_low_res


@dataclass(frozen=True)
class Progress:
    """What a per-step callback receives."""

    stage: str            # "base", "hires" or "refiner"
    index: int            # step within the stage, from 0
    total: int            # steps in the stage
    sigma: float
    latents: Tensor       # current x (scaled latents, fp32)
    denoised: Tensor      # current x̂0 estimate
    family_kind: str = "sd"   # "sdxl" selects the SDXL preview factors
    # fitted (factors, bias) for models outside SD/SDXL; a callable so the fit runs only if a preview is asked for
    preview_factors: Callable[[], tuple[Tensor, Tensor] | None] | None = None
    # a tiny (TAESD-style) decoder's decode, when the generator has one: previews at full resolution
    decoder: Callable[[Tensor], Tensor] | None = None

    def preview(self) -> np.ndarray:
        """A cheap RGB preview of x̂0: uint8 [B, h, w, 3], through the tiny decoder when there is one,
        else a linear map (no VAE) at latent resolution."""
        from .preview import latent_to_rgb

        if self.decoder is not None:
            return self.decoder(self.denoised).numpy()
        factors, bias = (self.preview_factors and self.preview_factors()) or (None, None)
        return latent_to_rgb(self.denoised, self.family_kind, factors, bias).numpy()


ProgressCallback = Callable[[Progress], None]


@dataclass
class Generated:
    images: list[Image.Image]
    seeds: list[int]
    subseeds: list[int]
    latents: Tensor       # final latents (scaled), fp32


@dataclass
class Tools:
    """What a run uses beside the engines: the request's loaded ControlNets, a tiny decoder (final
    images and previews), the progress callback, and the request's IP-Adapter image prompts."""

    controlnets: list
    tiny_decoder: object | None = None
    callback: ProgressCallback | None = None
    image_prompts: list = field(default_factory=list)


@dataclass
class _Init:
    """The init image prepared for img2img: the original, the work image at the generation size
    (cropped to the masked region for only-masked), the blurred mask and the work mask."""

    original: np.ndarray
    work: np.ndarray
    blurred: np.ndarray | None = None
    work_mask: np.ndarray | None = None
    region: masks.CropRegion | None = None

    @property
    def crop(self) -> Crop | None:
        r = self.region
        return None if r is None else ((r.left, r.top, r.right, r.bottom), self.original.shape[1::-1])


class RunLoop:
    """Carries out one plan of the request ``p`` on ``engines`` ("base", and "refiner", "hires")."""

    def __init__(self, p: GenerationParams, engines: dict[str, Engine], tools: Tools):
        self.p, self.engines, self.tools = p, engines, tools
        self.init: _Init | None = None
        self._depth: Image.Image | None = None   # depth2img's map, inferred once per run when not given
        self.seeds = [p.seed + i for i in range(p.batch_size)]
        self.subseeds = [p.subseed + i for i in range(p.batch_size)] if p.subseed_strength > 0 else []

    def run(self, plan: Plan) -> Generated:
        p = self.p
        init = self.init = _prepare(p) if p.init_image is not None and p.noise_level is None else None
        if plan.decoder is None:   # strength 0: the init image as it is
            images = [Image.fromarray(init.original.copy()) for _ in range(p.batch_size)]
            return Generated(images, self.seeds, self.subseeds, torch.zeros(0))
        latents = None
        for stage in plan.stages:
            latents = self._stage(stage, latents, init)
        decode = self.tools.tiny_decoder.decode if self.tools.tiny_decoder is not None else \
            self.engines[plan.decoder].decode
        decoded = decode(latents)
        images = to_pil(decoded) if init is None or init.blurred is None else \
            [Image.fromarray(_paste_back(init, a.numpy())) for a in decoded]
        return Generated(images, self.seeds, self.subseeds, latents)

    # -- stages -------------------------------------------------------------------------------

    def _stage(self, stage: Stage, previous: Tensor | None, init: _Init | None) -> Tensor:
        width, height = stage.size
        blend = None
        if stage.kind == "img2img":
            x, noise, blend, inputs = self._from_init(stage, init)
        else:
            start = self._grow(previous, stage) if stage.kind == "hires" else None
            if stage.kind == "hires" and not stage.passes:
                return start
            noise = self._noise(width, height)
            x = noise.initial() * stage.sigmas[0] if start is None else start + noise.initial() * stage.sigmas[0]
            inputs = self._inputs(stage)
        noise_sampler = self._sampler_noise(stage, noise)
        for pass_ in stage.passes:
            takes_inputs = pass_.engine != "refiner"   # the base model's and a hires model's UNet (same inputs)
            x = self._pass(stage, pass_, x, noise_sampler, (inputs if takes_inputs else None, blend))
        return x

    def _from_init(self, stage: Stage, init: _Init):
        """img2img: the init latents (masked content applied), noise, the blend and the extra input."""
        r, p, n = self.engines["base"], self.p, self.p.batch_size
        work = init.work
        if init.work_mask is not None and p.masked_content == "fill":
            work = masks.fill_masked(work, init.work_mask)
        init_latent = r.encode(to_tensor([Image.fromarray(work)] * 1)).repeat(n, 1, 1, 1)
        noise = self._noise(*stage.size)
        first = noise.initial()
        latent_mask = None
        if init.work_mask is not None:
            lh, lw = init_latent.shape[2:]
            lm = Image.fromarray((init.work_mask * 255).astype(np.uint8)).resize((lw, lh))
            latent_mask = torch.from_numpy(np.round(np.asarray(lm, dtype=np.float32) / 255.0))[None, None]
            if p.masked_content == "latent noise":
                init_latent = init_latent * (1 - latent_mask) + first * latent_mask
            elif p.masked_content == "latent nothing":
                init_latent = init_latent * (1 - latent_mask)
        inputs = self._inputs(stage, work, init.work_mask)
        x = init_latent + first * stage.sigmas[0]
        return x, noise, (init_latent, latent_mask) if stage.blend else None, inputs

    def _inputs(self, stage: Stage, work: np.ndarray | None = None, work_mask: np.ndarray | None = None
                ) -> Tensor | None:
        """The base model's extra UNet input for the stage (both CFG rows get it)."""
        r, p, n = self.engines["base"], self.p, self.p.batch_size
        width, height = stage.size
        if stage.inputs == "depth":
            if self._depth is None:
                self._depth = inferred_depth(p, r.device, getattr(r.model, "depth_estimator", None))
            return depth_conditioning(self._depth, height // r.factor, width // r.factor, n)
        if stage.inputs == "inpaint":   # the (rounded) mask and the latent of the image with the masked area blanked
            m = torch.from_numpy(np.round(work_mask if work_mask is not None else np.zeros(work.shape[:2]))).float()
            masked = to_tensor([Image.fromarray(work)]) * (1 - m[None, None])
            latent = r.encode(masked)
            lm = F.interpolate(m[None, None], size=latent.shape[2:])
            return torch.cat([lm, latent], dim=1).repeat(n, 1, 1, 1)
        if stage.inputs == "low_res":
            return noised_low_res(r.spec, p.init_image, width // r.factor, height // r.factor, p.noise_level,
                                  self.seeds, p.rng)
        return None

    def _grow(self, latents: Tensor, stage: Stage) -> Tensor:
        """The hires pass's start: the previous latents at the new size, through the latent space
        (bilinear) or through pixels (decode, Lanczos, encode by the model of the hires pass)."""
        r = self.engines["base"]
        w, h = stage.size
        if stage.upscaler == "latent":
            return F.interpolate(latents, size=(h // r.factor, w // r.factor), mode="bilinear", antialias=False)
        pixels = [im.resize((w, h), Image.LANCZOS) for im in to_pil(r.decode(latents))]
        return self.engines[stage.passes[0].engine if stage.passes else "base"].encode(to_tensor(pixels))

    def _noise(self, width: int, height: int) -> ImageNoise:
        r, p = self.engines["base"], self.p
        shape = (r.latent_channels, height // r.factor, width // r.factor)
        return ImageNoise(shape, self.seeds, subseeds=self.subseeds if p.subseed_strength > 0 else None,
                          subseed_strength=p.subseed_strength, seed_resize_from=p.seed_resize_from, rng=p.rng,
                          eta_noise_seed_delta=p.eta_noise_seed_delta)

    def _sampler_noise(self, stage: Stage, noise: ImageNoise) -> NoiseSampler:
        """The noise the sampler draws as it goes: for the SDE samplers, as A1111 gives them, a Brownian
        tree per image with entropy the image's seed, over the whole schedule's σ range (one tree for
        the stage: its passes query the same path); for the others the images' streams after the
        initial noise."""
        if resolve_sampler(stage.sampler or self.p.sampler)[0] not in BROWNIAN_SAMPLERS:
            return noise.noise_sampler()
        span = stage.noise_span or sigma_span(stage.sigmas)
        return BrownianNoise(noise.shape, self.seeds, span, rng=self.p.rng)

    # -- one sampler pass -----------------------------------------------------------------------

    def _pass(self, stage: Stage, pass_: Pass, x: Tensor, noise_sampler: NoiseSampler, extra: tuple) -> Tensor:
        """Sample ``pass_`` of ``stage`` from ``x``; ``extra``: (image conditioning, (init latent, mask) to blend)."""
        engine, p = self.engines[pass_.engine], self.p
        image_cond, blend = extra
        sigmas = stage.sigmas[pass_.start: pass_.stop + 1]
        clock = StepClock(stage.sigmas, pass_.start)
        conds = engine.conditioning(_prompts_of(stage, p), p.batch_size, *stage.size)
        guidance = Guidance(self._denoiser(stage, pass_, engine, clock), conds, (p.cfg_scale, p.guidance_rescale),
                            clock, image_cond, blend)
        guidance.name = engine.name
        guidance.cfg1_skips_uncond = not (self.tools.image_prompts or getattr(engine.model.unet, "reads_uncond_row", False)
                                          or any(spec.mode == "control" for spec in p.control))
        with ExitStack() as stack:
            for patch in patches.pass_patches(engine.model, p, clock):
                stack.enter_context(patch())
            if pass_.engine == "base" and stage.kind != "upscale":   # image prompts steer the base model only
                stack.enter_context(patches.image_prompts(engine.model, self.tools.image_prompts, clock)())
            x = get_sampler(stage.sampler or p.sampler)(clock.wrap(guidance), x, sigmas, callback=self._progress(engine, pass_),
                                       noise_sampler=noise_sampler)
        release_scratch()   # the pass's working memory back to the system before the next stage
        trim_heap()
        if blend is not None:
            init_latent, latent_mask = blend
            x = init_latent * (1 - latent_mask) + latent_mask * x
        return x

    def _denoiser(self, stage: Stage, pass_: Pass, engine: Engine, clock: StepClock):
        """D(x, σ, cond) of the pass: the x4 upscaler's with its noise level as class label; the base
        model's steered by the request's ControlNets; else the engine's own."""
        if stage.kind == "upscale":
            return engine.labelled(self.p.noise_level)
        if stage.control and pass_.engine != "refiner":
            crop = self.init.crop if stage.kind == "img2img" and self.init is not None else None
            units = control_units(self.p.control, self.tools.controlnets, *stage.size, crop)
            return ControlledDenoiser(engine, units, clock)
        return engine.denoiser

    def _progress(self, engine: Engine, pass_: Pass) -> Callable[[StepRecord], None]:
        callback, tiny = self.tools.callback, self.tools.tiny_decoder
        kind = "sdxl" if engine.spec.is_sdxl else "sd"

        def on_step(rec: StepRecord) -> None:
            if callback is not None:
                callback(Progress(pass_.label, rec.index, rec.total, rec.sigma, rec.x, rec.denoised, kind,
                                  lambda: engine.preview_factors, tiny.decode if tiny is not None else None))

        return on_step


def _prompts_of(stage: Stage, p: GenerationParams) -> GenerationParams:
    """The request as a stage's passes read their prompts: the hires pass's own when it has them."""
    if stage.kind != "hires" or (p.hires_prompt is None and p.hires_negative_prompt is None):
        return p
    return replace(p, prompt=p.hires_prompt if p.hires_prompt is not None else p.prompt,
                   negative_prompt=p.hires_negative_prompt if p.hires_negative_prompt is not None
                   else p.negative_prompt)


def _prepare(p: GenerationParams) -> _Init:
    """The init image and mask at the generation size (only-masked: the masked region's crop)."""
    original = np.asarray(p.init_image.convert("RGB"))
    mask = masks.mask_array(p.mask) if p.mask is not None else None
    blurred = masks.gaussian_blur(mask, p.mask_blur) if mask is not None else None
    region = None
    work = Image.fromarray(original)
    work_mask = blurred
    if mask is not None and p.only_masked:
        region = masks.crop_region(mask, p.only_masked_padding, p.width / p.height)
        work = work.crop((region.left, region.top, region.right, region.bottom))
        work_mask = blurred[region.top:region.bottom, region.left:region.right]
    work = work.resize((p.width, p.height), Image.LANCZOS)
    if work_mask is not None:
        work_mask = np.asarray(Image.fromarray((work_mask * 255).astype(np.uint8)).resize((p.width, p.height),
                                                                                         Image.LANCZOS)) / 255.0
    return _Init(original, np.asarray(work), blurred, work_mask, region)


def _paste_back(init: _Init, generated: np.ndarray) -> np.ndarray:
    """An inpainting result back in the original: the region's crop resized into place (only-masked)
    or the whole image resized to the original's size, then blended in by the blurred mask."""
    g, original, region = generated, init.original, init.region
    if region is not None:
        g = np.asarray(Image.fromarray(g).resize(region.size, Image.LANCZOS))
        canvas = original.copy()
        canvas[region.top:region.bottom, region.left:region.right] = g
        g = canvas
    elif g.shape[:2] != original.shape[:2]:
        g = np.asarray(Image.fromarray(g).resize(original.shape[1::-1], Image.LANCZOS))
    return masks.paste_back(original, g, init.blurred)
