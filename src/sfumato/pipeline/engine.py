"""The engine: one loaded model ready to sample — its conditioner, σ schedule and denoiser, VAE
encode/decode — and nothing about requests. The run loop (``pipeline.run``) drives engines; the
plan (``pipeline.plan``) needs only their spec and schedule."""

from __future__ import annotations

import logging
from dataclasses import replace
from functools import cached_property
from typing import Callable

import torch
from torch import Tensor

from ..adapters.embeddings import EmbeddingSet
from ..checkpoint.load import LoadedModel
from ..checkpoint.specs import PRESETS
from ..checkpoint.stream import module_device, resident
from ..diffusion.denoiser import Denoiser
from ..diffusion.schedule import DiscreteSchedule
from ..errors import NonFiniteOutputError
from ..text.conditioner import Cond, Conditioner, SizeConditioning, build_schedule, match_lengths
from . import tiling
from .params import GenerationParams

log = logging.getLogger(__name__)


class Engine:
    """One loaded model: its conditioner, schedule and denoiser, and VAE encode/decode.
    ``class_label``: a label every UNet call gets (the x4 upscaler's noise level), else None."""

    def __init__(self, model: LoadedModel, embeddings: EmbeddingSet | None = None):
        self.model = model
        self.spec = model.spec
        self.conditioner = Conditioner(model.spec, model.text_encoders, embeddings)
        self.schedule = DiscreteSchedule(model.alphas_cumprod)
        self.denoiser = Denoiser(self.unet_call, self.schedule, model.spec.prediction)
        self.latent_channels = model.spec.unet.out_channels
        self.factor = 2 ** (len(model.spec.vae.ch_mult) - 1)
        self.depth_estimator = getattr(model, "depth_estimator", None) is not None

    @property
    def name(self) -> str:
        return self.model.path.name

    @property
    def dtype(self) -> torch.dtype:
        """The UNet's compute dtype (fp32 for bf16 weights on a CPU without fast bf16)."""
        return self.model.unet.compute_dtype

    @property
    def device(self) -> torch.device:
        return module_device(self.model.unet)

    @cached_property
    def preview_factors(self) -> tuple[Tensor, Tensor] | None:
        """None for the SD / SDXL latent spaces (published factors); fitted to the VAE otherwise."""
        if self.spec.family in PRESETS:
            return None
        from .preview import fit_factors

        return fit_factors(self.encode, self.factor)

    def unet_call(self, x: Tensor, t: Tensor, cond: tuple[Cond, Tensor | None], unet: Callable | None = None) -> Tensor:
        """The UNet (or `unet`, a wrapper of it with the same call) on one batch of rows."""
        c, concat = cond
        if concat is not None:
            x = torch.cat([x, concat.to(x.dtype)], dim=1)
        dev, dt = self.device, self.dtype
        y = None if c.y is None else c.y.to(dev, dt) if c.y.is_floating_point() else c.y.to(dev)  # int: class labels
        backend = self.model.unet_backend
        if backend is not None:   # another runtime (backends.openvino) for the plain calls it can serve
            if unet is None:
                out = backend(x.to(dev, dt), t.to(dev), c.context.to(dev, dt), y)
                if out is not None:
                    return out.float()
            else:
                backend.note("ControlNet residuals (a wrapped UNet)")
        return (unet or self.model.unet)(x.to(dev, dt), t.to(dev), c.context.to(dev, dt), y).float()

    def labelled(self, label: int) -> Denoiser:
        """The denoiser with ``label`` as every UNet call's class label (the x4 upscaler's noise level)."""

        def call(x: Tensor, t: Tensor, cond: tuple[Cond, Tensor | None], unet: Callable | None = None) -> Tensor:
            c, concat = cond
            labels = torch.full((x.shape[0],), label, dtype=torch.long)
            return self.unet_call(x, t, (Cond(c.context, labels), concat), unet)

        return Denoiser(call, self.schedule, self.spec.prediction)

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
        vae = self.model.vae
        z = latents.float() / self.spec.vae.scale_factor
        images = self._decode(z)
        if not torch.isfinite(images).all() and vae.compute_dtype != torch.float32:
            # A1111's NaN check: a half-precision decode that overflowed is redone in fp32, and the VAE
            # stays in fp32 from then on (as with --no-half-vae)
            log.warning("the VAE of %s produced NaN/inf in %s: decoding again in fp32 (and from now on)",
                        self.name, str(vae.compute_dtype).removeprefix("torch."))
            vae.dtype_override = torch.float32
            images = self._decode(z)
        if not torch.isfinite(images).all():
            raise NonFiniteOutputError(f"the VAE of {self.name} produced NaN or infinite values when decoding; "
                                       "try another VAE")
        images = ((images.clamp(-1, 1) + 1) / 2 * 255).round().to(torch.uint8)
        return images.permute(0, 2, 3, 1)

    def _decode(self, z: Tensor) -> Tensor:
        vae, (tiled, tile, stats) = self.model.vae, self._tiling()
        backend = self.model.decoder_backend
        if backend is not None and (tiled or z.shape[-2] * z.shape[-1] > tiling.AUTO_TILE_LATENT_PIXELS):
            log.warning("the decoder backend does not run tiled decodes: this one (%d×%d latent) runs on torch",
                        z.shape[-1], z.shape[-2])
        elif backend is not None:
            images = [backend(zi) for zi in z.split(1)]
            if all(im is not None for im in images):
                return torch.cat(images).float()
        # one image at a time: a batch's convolutions may round differently from a single image's
        with resident(vae):
            return torch.cat([tiling.decode(vae, zi.to(self.device), tiled, tile=tile, stats_size=stats).float().cpu()
                              for zi in z.split(1)])

    def _tiling(self) -> tuple[bool | None, int, int]:
        """(tiled, tile, statistics size) for the VAE: tiling's own rule (tiled above its
        AUTO_TILE_LATENT_PIXELS, beyond 1024² images), always tiled in low-memory mode."""
        if self.model.low_memory:
            return True, tiling.LOW_MEMORY_TILE, tiling.LOW_MEMORY_STATS_SIZE
        return None, tiling.DEFAULT_TILE, tiling.DEFAULT_STATS_SIZE

    def conditioning(self, p: GenerationParams, n: int, width: int, height: int):
        """The (cond, uncond) prompt schedules of request ``p`` for ``n`` images of width × height."""
        size = SizeConditioning(original=(height, width), target=(height, width))
        with resident(*self.model.text_encoders):   # low-memory mode: loaded for this call only
            cond = build_schedule(self.conditioner, [p.prompt] * n, p.steps, clip_skip=p.clip_skip, size=size)
            neg_size = replace(size, aesthetic_score=2.5)   # the refiner's negative aesthetic score
            uncond = build_schedule(self.conditioner, [p.negative_prompt] * n, p.steps, clip_skip=p.clip_skip,
                                    size=neg_size, negative=True)
        match_lengths(cond, uncond)
        if self.spec.is_unclip:   # the image embedding as y; the uncond rows get zeros (as A1111, diffusers)
            from .unclip import unclip_vectors

            vectors = unclip_vectors(self.model, p, n)
            cond.set_vectors(vectors)
            uncond.set_vectors(torch.zeros_like(vectors))
        return cond, uncond
