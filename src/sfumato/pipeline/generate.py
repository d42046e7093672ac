"""The one generation loop. txt2img, img2img, inpainting, outpainting, hires fix and the SDXL
refiner hand-off are all this loop: img2img is a slice of the σ schedule, inpainting a denoiser
wrapper (latent masking, or the 9-channel image conditioning of inpainting models), outpainting
inpainting on a padded canvas, hires fix a second img2img pass, the refiner a second model on the
tail of the schedule."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ..adapters.embeddings import EmbeddingSet
from ..adapters.tome import token_merging
from ..checkpoint.load import LoadedModel
from ..checkpoint.specs import PRESETS
from ..checkpoint.stream import module_device, resident, trim_heap
from ..diffusion.deepcache import deep_cache
from ..diffusion.denoiser import Denoiser
from ..diffusion.noise import ImageNoise
from ..diffusion.samplers import StepRecord, get_sampler, sampler_sigmas
from ..diffusion.schedule import DiscreteSchedule
from ..errors import NonFiniteOutputError
from ..models.layers import release_scratch
from ..models.taesd import TinyDecoder
from ..text.conditioner import Cond, Conditioner, SizeConditioning, build_schedule, match_lengths
from . import masks, tiling
from .control import ControlledDenoiser, ControlNets, Crop, control_units
from .depth import check_depth_request, depth_conditioning
from .params import GenerationParams


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


class _ModelRunner:
    """One loaded model: its conditioner, schedule and denoiser, and VAE encode/decode."""

    def __init__(self, model: LoadedModel, embeddings: EmbeddingSet | None = None):
        self.model = model
        self.spec = model.spec
        self.conditioner = Conditioner(model.spec, model.text_encoders, embeddings)
        self.schedule = DiscreteSchedule(model.alphas_cumprod)
        self.denoiser = Denoiser(self._unet_fn, self.schedule, model.spec.prediction)
        self.latent_channels = model.spec.unet.out_channels
        self.factor = 2 ** (len(model.spec.vae.ch_mult) - 1)

    @property
    def dtype(self) -> torch.dtype:
        """The UNet's compute dtype (fp32 for bf16 weights on a CPU without fast bf16)."""
        return self.model.unet.compute_dtype

    @cached_property
    def preview_factors(self) -> tuple[Tensor, Tensor] | None:
        """None for the SD / SDXL latent spaces (published factors); fitted to the VAE otherwise."""
        if self.spec.family in PRESETS:
            return None
        from .preview import fit_factors

        return fit_factors(self.encode, self.factor)

    @property
    def device(self) -> torch.device:
        return module_device(self.model.unet)

    def _unet_fn(self, x: Tensor, t: Tensor, cond: tuple[Cond, Tensor | None], unet: Callable | None = None) -> Tensor:
        """The UNet (or `unet`, a wrapper of it with the same call) on one batch of rows."""
        c, concat = cond
        if concat is not None:
            x = torch.cat([x, concat.to(x.dtype)], dim=1)
        dev, dt = self.device, self.dtype
        y = None if c.y is None else c.y.to(dev, dt) if c.y.is_floating_point() else c.y.to(dev)  # int: class labels
        return (unet or self.model.unet)(x.to(dev, dt), t.to(dev), c.context.to(dev, dt), y).float()

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """[-1, 1] images [B, 3, H, W] → scaled latents (the posterior's mode). Tiled (pipeline.tiling)
        above its size threshold, or always in low-memory mode."""
        vae, (tiled, tile, stats) = self.model.vae, self._tiling()
        with resident(vae):
            modes = [tiling.encode(vae, im.float().to(self.device), tiled, tile=tile, stats_size=stats).mode().float().cpu()
                     for im in images.split(1)]
        return torch.cat(modes) * self.spec.vae.scale_factor

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents → uint8 [B, H, W, 3]: z/scale, decode, clamp to [−1, 1], round to 0–255."""
        vae, (tiled, tile, stats) = self.model.vae, self._tiling()
        z = latents.float() / self.spec.vae.scale_factor
        # one image at a time: a batch's convolutions may round differently from a single image's
        with resident(vae):
            images = torch.cat([tiling.decode(vae, zi.to(self.device), tiled, tile=tile, stats_size=stats).float().cpu()
                                for zi in z.split(1)])
        if not torch.isfinite(images).all():
            raise NonFiniteOutputError(f"the VAE of {self.model.path.name} produced NaN or infinite values when "
                                       "decoding; try another dtype (fp32) or VAE")
        images = ((images.clamp(-1, 1) + 1) / 2 * 255).round().to(torch.uint8)
        return images.permute(0, 2, 3, 1)

    def _tiling(self) -> tuple[bool | None, int, int]:
        """(tiled, tile, statistics size) for the VAE: tiling's own rule (tiled above its
        AUTO_TILE_LATENT_PIXELS, beyond 1024² images), always tiled in low-memory mode."""
        if self.model.low_memory:
            return True, tiling.LOW_MEMORY_TILE, tiling.LOW_MEMORY_STATS_SIZE
        return None, tiling.DEFAULT_TILE, tiling.DEFAULT_STATS_SIZE

    def conditioning(self, p: GenerationParams, n: int, width: int, height: int):
        size = SizeConditioning(original=(height, width), target=(height, width))
        with resident(*self.model.text_encoders):   # low-memory mode: loaded for this call only
            cond = build_schedule(self.conditioner, [p.prompt] * n, p.steps, clip_skip=p.clip_skip, size=size)
            neg_size = replace(size, aesthetic_score=2.5)   # the refiner's negative aesthetic score
            uncond = build_schedule(self.conditioner, [p.negative_prompt] * n, p.steps, clip_skip=p.clip_skip,
                                    size=neg_size, negative=True)
        match_lengths(cond, uncond)
        return cond, uncond


class _Guided:
    """x̂0 with classifier-free guidance over composable (AND) prompts, guidance rescale, and
    inpainting's latent masking / image conditioning. Samplers see only ``denoise(x, σ)``."""

    def __init__(self, runner: _ModelRunner, cond, uncond, p: GenerationParams, sigmas: Tensor,
                 image_cond: Tensor | None = None, init_latent: Tensor | None = None, latent_mask: Tensor | None = None,
                 denoiser: Callable[[Tensor, Tensor, object], Tensor] | None = None):
        self.runner, self.cond, self.uncond, self.p = runner, cond, uncond, p
        self.sigmas = sigmas
        self.image_cond, self.init_latent, self.latent_mask = image_cond, init_latent, latent_mask
        self.denoiser = denoiser or runner.denoiser   # e.g. a ControlledDenoiser

    def step_of(self, sigma: Tensor) -> int:
        return int((self.sigmas - float(sigma[0])).abs().argmin())

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        step = self.step_of(sigma)
        cond, weights = self.cond.at(step)
        uncond, _ = self.uncond.at(step)
        b = x.shape[0]
        owner = self.cond.owner.to(x.device)                      # image of each conditioning row
        x_in = torch.cat([x, x[owner]])
        s_in = torch.cat([sigma, sigma[owner]])
        ic = torch.cat([self.image_cond, self.image_cond[owner]]) if self.image_cond is not None else None
        both = Cond.cat([uncond, cond])
        out = torch.empty_like(x_in)
        # One UNet call per image (its uncond row and its cond rows): the result for an image then
        # does not depend on the batch size, so item i of a batch equals a single run with seed + i.
        for i in range(b):
            rows = torch.cat([torch.tensor([i]), b + (self.cond.owner == i).nonzero().flatten()])
            out[rows] = self.denoiser(x_in[rows], s_in[rows], (both.rows(rows), ic[rows] if ic is not None else None))
        u, c = out[:b], out[b:]
        w = weights.to(x.dtype)
        x0 = u + self.p.cfg_scale * torch.einsum("bn,nchw->bchw", w, c - u[owner])
        if self.p.guidance_rescale > 0:
            x0 = self._rescale(x, sigma, x0, torch.einsum("bn,nchw->bchw", w / w.sum(1, keepdim=True), c))
        if self.latent_mask is not None and self.image_cond is None:
            x0 = self.init_latent * (1 - self.latent_mask) + self.latent_mask * x0
        if not torch.isfinite(x0).all():   # NaN/inf would end as a black image passed off as a result
            raise NonFiniteOutputError(f"the UNet of {self.runner.model.path.name} produced NaN or infinite values "
                                       f"at step {step + 1} (σ = {float(sigma[0]):.4g}); try another dtype (fp32)")
        return x0

    def _rescale(self, x: Tensor, sigma: Tensor, x0_cfg: Tensor, x0_cond: Tensor) -> Tensor:
        """Guidance rescale (Lin et al. 2023), on the implied noise: match the conditional
        prediction's standard deviation, blended by φ."""
        s = sigma.view(-1, 1, 1, 1)
        eps_cfg, eps_cond = (x - x0_cfg) / s, (x - x0_cond) / s
        dims = (1, 2, 3)
        rescaled = eps_cfg * (eps_cond.std(dim=dims, keepdim=True) / eps_cfg.std(dim=dims, keepdim=True))
        eps = self.p.guidance_rescale * rescaled + (1 - self.p.guidance_rescale) * eps_cfg
        return x - eps * s


def img2img_sigmas(sigmas: Tensor, steps: int, strength: float) -> Tensor:
    """A1111's img2img slice: t_enc = ⌊min(strength, 0.999)·steps⌋ steps from the tail."""
    t_enc = int(min(strength, 0.999) * steps)
    return sigmas[steps - t_enc - 1:]


class Generator:
    """Runs requests against a loaded model (and optionally an SDXL refiner)."""

    def __init__(self, model: LoadedModel, refiner: LoadedModel | None = None, embeddings: EmbeddingSet | None = None):
        self.base = _ModelRunner(model, embeddings)
        self.refiner = _ModelRunner(refiner, embeddings) if refiner is not None else None
        self.controlnets = ControlNets()
        self.tiny_decoder: TinyDecoder | None = None   # set: decodes the final images and the previews

    @torch.no_grad()
    def run(self, p: GenerationParams, callback: ProgressCallback | None = None) -> Generated:
        p.validated()
        if self.base.spec.is_upscaler or p.noise_level is not None:   # the x4 upscaler: its own request
            from .upscale import upscale

            return upscale(self, p, callback)
        check_depth_request(self.base.spec, p)
        self.controlnets.get(p.control, self.base)   # load (or reuse) them now: a bad file fails before any work
        if p.init_image is not None:
            return self._img2img(p, callback)
        return self._txt2img(p, callback)

    # -- txt2img (+ hires fix, + refiner) ------------------------------------------------------

    def _txt2img(self, p: GenerationParams, callback: ProgressCallback | None) -> Generated:
        r = self.base
        n = p.batch_size
        seeds, subseeds = _seeds(p)
        noise = self._noise(r, p, seeds, subseeds, p.width, p.height)
        sigmas = sampler_sigmas(p.sampler, p.scheduler, r.schedule, p.steps)
        x = noise.initial() * sigmas[0]
        latents = self._sample(r, p, n, p.width, p.height, x, sigmas, noise, callback, "base",
                               self._depth(r, p, p.width, p.height))
        if p.hires_scale > 1:
            latents = self._hires(p, latents, seeds, subseeds, callback)
        images = self._decode(latents)
        return Generated(images, seeds, subseeds, latents)

    def _sample(self, r: _ModelRunner, p, n, width, height, x, sigmas, noise, callback, stage,
                image_cond=None, init_latent=None, latent_mask=None, control_crop: Crop | None = None) -> Tensor:
        """Run the sampler over ``sigmas``; with a refiner, hand the schedule's tail over to it."""
        switch = None
        if self.refiner is not None and stage == "base" and p.refiner_switch < 1:
            switch = max(1, min(len(sigmas) - 1, int(round(p.refiner_switch * (len(sigmas) - 1)))))
        head = sigmas if switch is None else sigmas[: switch + 1]
        controlled = self._controlled(r, p, width, height, sigmas, control_crop)
        x = self._run_sampler(r, p, n, width, height, x, head, noise, callback, stage, image_cond, init_latent, latent_mask,
                              controlled)
        if switch is not None and switch < len(sigmas) - 1:
            x = self._run_sampler(self.refiner, p, n, width, height, x, sigmas[switch:], noise, callback, "refiner",
                                  None, init_latent, latent_mask if image_cond is None else None)
        return x

    def _controlled(self, r: _ModelRunner, p, width, height, sigmas, crop: Crop | None) -> ControlledDenoiser | None:
        """The base model's denoiser steered by the request's ControlNets over the whole schedule
        `sigmas` of this stage (a refiner's tail included); None without ControlNets."""
        if not p.control or r is not self.base:
            return None
        units = control_units(p.control, self.controlnets.get(p.control, r), width, height, crop)
        return ControlledDenoiser(r, units, sigmas)

    def _run_sampler(self, r, p, n, width, height, x, sigmas, noise, callback, stage, image_cond, init_latent, latent_mask,
                     denoiser=None):
        cond, uncond = r.conditioning(p, n, width, height)
        guided = _Guided(r, cond, uncond, p, sigmas, image_cond, init_latent, latent_mask, denoiser)

        def on_step(rec: StepRecord) -> None:
            if callback is not None:
                callback(Progress(stage, rec.index, rec.total, rec.sigma, rec.x, rec.denoised,
                                  "sdxl" if r.spec.is_sdxl else "sd", lambda: r.preview_factors,
                                  self.tiny_decoder.decode if self.tiny_decoder is not None else None))

        # by-stage loading: the UNet is read in for this pass and dropped after it (not per step)
        with _accelerations(r.model.unet, p) as wrap, resident(r.model.unet) if r.model.by_stage else nullcontext():
            x = get_sampler(p.sampler)(wrap(guided), x, sigmas, callback=on_step, noise_sampler=noise.noise_sampler())
        release_scratch()   # the pass's working memory back to the system before the next stage
        trim_heap()
        if latent_mask is not None and image_cond is None:
            x = init_latent * (1 - latent_mask) + latent_mask * x
        return x

    def _hires(self, p, latents, seeds, subseeds, callback) -> Tensor:
        r = self.base
        w, h = p.hires_width, p.hires_height
        if p.hires_upscaler == "latent":
            init = F.interpolate(latents, size=(h // r.factor, w // r.factor), mode="bilinear", antialias=False)
        else:
            pixels = [Image.fromarray(a.numpy()).resize((w, h), Image.LANCZOS) for a in r.decode(latents)]
            init = r.encode(_to_tensor(pixels))
        steps = p.hires_steps or p.steps
        # A1111: the second pass runs exactly `steps` steps of a schedule stretched by 1/denoise
        total = int(steps / min(p.hires_denoise, 0.999)) if p.hires_denoise > 0 else 0
        if total == 0:
            return init
        sigmas = sampler_sigmas(p.sampler, p.scheduler, r.schedule, total)[total - steps:]
        noise = self._noise(r, p, seeds, subseeds, w, h)
        x = init + noise.initial() * sigmas[0]
        return self._sample(r, p, p.batch_size, w, h, x, sigmas, noise, callback, "hires", self._depth(r, p, w, h))

    # -- img2img / inpainting ------------------------------------------------------------------

    def _img2img(self, p: GenerationParams, callback: ProgressCallback | None) -> Generated:
        r = self.base
        n = p.batch_size
        seeds, subseeds = _seeds(p)
        original = np.asarray(p.init_image.convert("RGB"))
        mask = masks.mask_array(p.mask) if p.mask is not None else None
        blurred = masks.gaussian_blur(mask, p.mask_blur) if mask is not None else None
        region = None
        work = Image.fromarray(original)
        work_mask = blurred
        if mask is not None and p.only_masked:
            region = masks.crop_region(mask, p.only_masked_padding, p.width / p.height)
            box = (region.left, region.top, region.right, region.bottom)
            work = work.crop(box)
            work_mask = blurred[region.top:region.bottom, region.left:region.right]
        work = work.resize((p.width, p.height), Image.LANCZOS)
        if work_mask is not None:
            work_mask = np.asarray(Image.fromarray((work_mask * 255).astype(np.uint8)).resize((p.width, p.height),
                                                                                             Image.LANCZOS)) / 255.0
        if p.strength == 0:
            images = [Image.fromarray(original.copy()) for _ in range(n)]
            return Generated(images, seeds, subseeds, torch.zeros(0))

        work_arr = np.asarray(work)
        if work_mask is not None and p.masked_content == "fill":
            work_arr = masks.fill_masked(work_arr, work_mask)
        init_latent = r.encode(_to_tensor([Image.fromarray(work_arr)] * 1)).repeat(n, 1, 1, 1)
        noise = self._noise(r, p, seeds, subseeds, p.width, p.height)
        first = noise.initial()

        latent_mask = image_cond = None
        if work_mask is not None:
            lh, lw = init_latent.shape[2:]
            lm = Image.fromarray((work_mask * 255).astype(np.uint8)).resize((lw, lh))
            latent_mask = torch.from_numpy(np.round(np.asarray(lm, dtype=np.float32) / 255.0))[None, None]
            if p.masked_content == "latent noise":
                init_latent = init_latent * (1 - latent_mask) + first * latent_mask
            elif p.masked_content == "latent nothing":
                init_latent = init_latent * (1 - latent_mask)
        if r.spec.unet.in_channels == 9:
            image_cond = self._inpaint_conditioning(r, work_arr, work_mask, n)
        image_cond = self._depth(r, p, p.width, p.height) if r.spec.is_depth else image_cond

        sigmas = img2img_sigmas(sampler_sigmas(p.sampler, p.scheduler, r.schedule, p.steps), p.steps, p.strength)
        x = init_latent + first * sigmas[0]
        crop = None if region is None else ((region.left, region.top, region.right, region.bottom), original.shape[1::-1])
        latents = self._sample(r, p, n, p.width, p.height, x, sigmas, noise, callback, "base",
                               image_cond, init_latent, latent_mask, control_crop=crop)
        generated = [np.asarray(im) for im in self._decode(latents)]
        if mask is None:
            return Generated([Image.fromarray(g) for g in generated], seeds, subseeds, latents)
        images = []
        for g in generated:
            if region is not None:
                g = np.asarray(Image.fromarray(g).resize(region.size, Image.LANCZOS))
                canvas = original.copy()
                canvas[region.top:region.bottom, region.left:region.right] = g
                g = canvas
            elif g.shape[:2] != original.shape[:2]:
                g = np.asarray(Image.fromarray(g).resize(original.shape[1::-1], Image.LANCZOS))
            images.append(Image.fromarray(masks.paste_back(original, g, blurred)))
        return Generated(images, seeds, subseeds, latents)

    def _depth(self, r: _ModelRunner, p: GenerationParams, width: int, height: int) -> Tensor | None:
        """The depth model's extra input at this size (None for other models)."""
        if not r.spec.is_depth:
            return None
        return depth_conditioning(p.depth_map, height // r.factor, width // r.factor, p.batch_size)

    def _inpaint_conditioning(self, r: _ModelRunner, image: np.ndarray, mask: np.ndarray | None, n: int) -> Tensor:
        """The 9-channel model's extra input: the (rounded) mask and the latent of the image with
        the masked area blanked, as the inpainting models were trained."""
        m = torch.from_numpy(np.round(mask if mask is not None else np.zeros(image.shape[:2]))).float()[None, None]
        pixels = _to_tensor([Image.fromarray(image)])
        masked = pixels * (1 - m)
        latent = r.encode(masked)
        lm = F.interpolate(m, size=latent.shape[2:])
        return torch.cat([lm, latent], dim=1).repeat(n, 1, 1, 1)

    # -- shared ------------------------------------------------------------------------------

    def _noise(self, r: _ModelRunner, p: GenerationParams, seeds, subseeds, width, height) -> ImageNoise:
        shape = (r.latent_channels, height // r.factor, width // r.factor)
        return ImageNoise(shape, seeds, subseeds=subseeds if p.subseed_strength > 0 else None,
                          subseed_strength=p.subseed_strength, rng=p.rng)

    def _decode(self, latents: Tensor) -> list[Image.Image]:
        runner = self.refiner if self.refiner is not None else self.base
        decode = self.tiny_decoder.decode if self.tiny_decoder is not None else runner.decode
        return [Image.fromarray(a.numpy()) for a in decode(latents)]


@contextmanager
def _accelerations(unet, p: GenerationParams) -> Iterator[Callable]:
    """The opt-in training-free accelerations for one sampler run: ToMe patches the UNet's
    transformer blocks, DeepCache its forward (both restored after). Yields the wrapper the guided
    denoiser goes through (DeepCache counts its evaluations)."""
    with token_merging(unet, p.tome_ratio), ExitStack() as stack:
        if p.deepcache_interval > 1:
            yield stack.enter_context(deep_cache(unet, p.deepcache_interval)).wrap
        else:
            yield lambda denoise: denoise


def _seeds(p: GenerationParams) -> tuple[list[int], list[int]]:
    seeds = [p.seed + i for i in range(p.batch_size)]
    subseeds = [p.subseed + i for i in range(p.batch_size)] if p.subseed_strength > 0 else []
    return seeds, subseeds


def _to_tensor(images: list[Image.Image]) -> Tensor:
    """PIL images → [-1, 1] float tensor [B, 3, H, W]."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images]) / 127.5 - 1
    return torch.from_numpy(arr).permute(0, 3, 1, 2)
