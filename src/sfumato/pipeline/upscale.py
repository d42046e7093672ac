"""The SD x4 upscaler on the one generation loop.

The model denoises a latent at the low-res image's size; its VAE (downsampling by 4) decodes that to
four times the resolution. Every UNet call also sees the low-res image — in [−1, 1], noised to
``noise_level`` on its own DDPM schedule (``ModelSpec.low_res``) and concatenated to the latent as
the loop's image conditioning (for both CFG rows) — and the noise level as its class label, which a
view of the model runner adds in its denoiser. Sampling itself is the txt2img path: full schedule,
any sampler.

Noise: image i's latent noise is the usual stream of seed ``seeds[i]``; the low-res image's noise is
the first draw of a stream seeded ``seeds[i] + 2**32`` (outside the seed range, so it never repeats an
image's latent noise). With ``rng="cpu"`` that equals diffusers' StableDiffusionUpscalePipeline given
``generator=torch.Generator().manual_seed(seed + 2**32)`` and the latent noise as ``latents``.
"""

from __future__ import annotations

import copy

import torch
from PIL import Image
from torch import Tensor

from ..checkpoint.specs import ModelSpec
from ..diffusion.denoiser import Denoiser
from ..diffusion.noise import ImageNoise
from ..diffusion.samplers import sampler_sigmas
from ..diffusion.schedule import scaled_linear_alphas_cumprod
from ..text.conditioner import Cond
from .generate import Generated, Generator, ProgressCallback, _ModelRunner, _seeds, _to_tensor
from .params import GenerationParams, ParamError

LOW_RES_SEED_OFFSET = 2**32


def check_upscale_request(spec: ModelSpec, p: GenerationParams, factor: int, has_refiner: bool = False) -> None:
    """Upscaler models only upscale, and upscaling needs an upscaler model; the rest of the request fits."""
    if not spec.is_upscaler:
        raise ParamError("noise_level", f"the {spec.family} model is not an x4 upscaler (noise_level is for upscaling)")
    if p.noise_level is None or p.init_image is None:
        raise ParamError("noise_level", f"the {spec.family} model only upscales: give the low-res image and a "
                                        "noise level (sfumato upscale / Pipeline.upscale)")
    top = spec.low_res.max_noise_level
    if not 0 <= p.noise_level <= top:
        raise ParamError("noise_level", f"must be in [0, {top}] for {spec.family}, got {p.noise_level}")
    unsupported = {"mask": p.mask is not None, "hires_scale": p.hires_scale > 1, "depth_map": p.depth_map is not None,
                   "control": bool(p.control), "refiner": has_refiner or p.refiner is not None}
    for name, used in unsupported.items():
        if used:
            raise ParamError(name, f"not supported when upscaling with {spec.family}")
    step = factor * 2 ** (len(spec.unet.channel_mult) - 1)   # the UNet halves the latent at each level
    for name in ("width", "height"):
        value = getattr(p, name)
        if value % step:
            raise ParamError(name, f"the {factor}x output {name} must be a multiple of {step} (a low-res side a "
                                   f"multiple of {step // factor}), got {value}")


def noised_low_res(spec: ModelSpec, image: Image.Image, width: int, height: int, noise_level: int,
                   seeds: list[int], rng: str = "cpu") -> Tensor:
    """[n, 3, height, width]: the image (resized if needed) in [−1, 1], noised to ``noise_level``."""
    aug = spec.low_res
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    pixels = _to_tensor([image])
    alpha = scaled_linear_alphas_cumprod(aug.beta_start, aug.beta_end, aug.timesteps)[noise_level]
    eps = ImageNoise((3, height, width), [s + LOW_RES_SEED_OFFSET for s in seeds], rng=rng).initial()
    return alpha.sqrt() * pixels + (1 - alpha).sqrt() * eps


def _with_class_labels(runner: _ModelRunner, label: int) -> _ModelRunner:
    """A view of ``runner`` whose denoiser gives every UNet call ``label`` as its class label."""

    def unet_fn(x: Tensor, t: Tensor, cond: tuple[Cond, Tensor | None], *rest) -> Tensor:
        c, concat = cond
        labels = torch.full((x.shape[0],), label, dtype=torch.long)
        return runner._unet_fn(x, t, (Cond(c.context, labels), concat), *rest)

    view = copy.copy(runner)
    view.denoiser = Denoiser(unet_fn, runner.schedule, runner.spec.prediction)
    return view


def upscale(gen: Generator, p: GenerationParams, callback: ProgressCallback | None = None) -> Generated:
    """Upscale ``p.init_image`` to ``p.width`` × ``p.height`` (4x) under ``p.prompt``."""
    r = gen.base
    check_upscale_request(r.spec, p, r.factor, gen.refiner is not None)
    seeds, subseeds = _seeds(p)
    low_res = noised_low_res(r.spec, p.init_image, p.width // r.factor, p.height // r.factor, p.noise_level,
                             seeds, p.rng)
    noise = gen._noise(r, p, seeds, subseeds, p.width, p.height)
    sigmas = sampler_sigmas(p.sampler, p.scheduler, r.schedule, p.steps)
    x = noise.initial() * sigmas[0]
    latents = gen._sample(_with_class_labels(r, p.noise_level), p, p.batch_size, p.width, p.height, x, sigmas,
                          noise, callback, "base", low_res)
    images = [Image.fromarray(a.numpy()) for a in r.decode(latents)]
    return Generated(images, seeds, subseeds, latents)
