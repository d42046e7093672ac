"""The one generation loop: prompts → conditioning → seeded noise → sampler → VAE decode."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..checkpoint.load import LoadedModel
from ..diffusion.denoiser import Denoiser
from ..diffusion.samplers import StepCallback, get_sampler
from ..diffusion.schedule import DiscreteSchedule
from ..text.conditioner import Cond, Conditioner, SizeConditioning
from .params import GenerationParams

def seeded_noise(seeds: list[int], shape: tuple[int, ...]) -> Tensor:
    """Initial noise, one CPU generator per image: image i of a batch equals a lone run with its seed."""
    return torch.stack([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(s)) for s in seeds])


class CFGDenoiser:
    """Classifier-free guidance around a denoiser: uncond + s·(cond − uncond) on x̂0 estimates."""

    def __init__(self, denoiser: Denoiser, cond: Cond, uncond: Cond, scale: float):
        self.denoiser, self.cond, self.uncond, self.scale = denoiser, cond, uncond, scale
        self.both = Cond.cat([uncond, cond])

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        if self.scale == 1.0:
            return self.denoiser(x, sigma, self.cond)
        out = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), self.both)
        uncond, cond = out.chunk(2)
        return uncond + (cond - uncond) * self.scale


@dataclass
class Generated:
    images: Tensor        # uint8 [B, H, W, 3]
    seeds: list[int]
    latents: Tensor       # final latents (unscaled by the VAE factor), fp32


class Generator:
    """Runs requests against one loaded model."""

    def __init__(self, model: LoadedModel):
        self.model = model
        self.conditioner = Conditioner(model.spec, model.text_encoders)
        self.schedule = DiscreteSchedule(model.alphas_cumprod)
        self.denoiser = Denoiser(self._unet_fn, self.schedule, model.spec.prediction)
        self.latent_channels = model.spec.unet.out_channels
        self.latent_factor = 2 ** (len(model.spec.vae.ch_mult) - 1)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.unet.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.unet.parameters()).device

    def _unet_fn(self, x: Tensor, t: Tensor, cond: Cond) -> Tensor:
        y = cond.y.to(self.device, self.dtype) if cond.y is not None else None
        out = self.model.unet(x.to(self.device, self.dtype), t.to(self.device), cond.context.to(self.device, self.dtype), y)
        return out.float()

    @torch.no_grad()
    def txt2img(self, p: GenerationParams, callback: StepCallback | None = None) -> Generated:
        p.validated()
        n = p.batch_size
        size = SizeConditioning(original=(p.height, p.width), target=(p.height, p.width))
        cond = self.conditioner([p.prompt] * n, clip_skip=p.clip_skip, size=size)
        uncond = self.conditioner([p.negative_prompt] * n, clip_skip=p.clip_skip, size=_negative(size), zero_if_empty=True)
        sigmas = self.schedule.normal(p.steps)
        seeds = [p.seed + i for i in range(n)]
        f = self.latent_factor
        x = seeded_noise(seeds, (self.latent_channels, p.height // f, p.width // f)) * sigmas[0]
        x = x.to(self.device)
        guided = CFGDenoiser(self.denoiser, cond, uncond, float(p.cfg_scale))
        latents = get_sampler(p.sampler)(guided, x, sigmas.to(self.device), callback=callback)
        return Generated(self.decode(latents), seeds, latents.cpu())

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        vae = self.model.vae
        z = latents / self.model.spec.vae.scale_factor
        images = vae.decode(z.to(self.device, next(vae.parameters()).dtype)).float()
        images = ((images.clamp(-1, 1) + 1) / 2 * 255).round().to(torch.uint8)
        return images.permute(0, 2, 3, 1).cpu()


def _negative(size: SizeConditioning) -> SizeConditioning:
    """The refiner's negative branch uses a low aesthetic score (2.5), as the reference does."""
    return SizeConditioning(size.original, size.target, size.crop_top_left, aesthetic_score=2.5)
