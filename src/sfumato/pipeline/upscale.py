"""The SD x4 upscaler on the one generation loop: a stage of the plan (``plan.Stage`` kind "upscale").

The model denoises a latent at the low-res image's size; its VAE (downsampling by 4) decodes that to
four times the resolution. Every UNet call also sees the low-res image — in [−1, 1], noised to
``noise_level`` on its own DDPM schedule (``ModelSpec.low_res``) and concatenated to the latent as
the stage's extra input (for both CFG rows) — and the noise level as its class label
(``Engine.labelled``). Sampling itself is the txt2img path: full schedule, any sampler.

Noise: image i's latent noise is the usual stream of seed ``seeds[i]``; the low-res image's noise is
the first draw of a stream seeded ``seeds[i] + 2**32`` (outside the seed range, so it never repeats an
image's latent noise). With ``rng="cpu"`` that equals diffusers' StableDiffusionUpscalePipeline given
``generator=torch.Generator().manual_seed(seed + 2**32)`` and the latent noise as ``latents``.
"""

from __future__ import annotations

from PIL import Image
from torch import Tensor

from ..checkpoint.specs import ModelSpec
from ..diffusion.noise import ImageNoise
from ..diffusion.schedule import scaled_linear_alphas_cumprod
from ..errors import ParamError
from .images import to_tensor
from .params import GenerationParams

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
                   "control": bool(p.control), "ip_adapters": bool(p.ip_adapters),
                   "refiner": has_refiner or p.refiner is not None}
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
    pixels = to_tensor([image])
    alpha = scaled_linear_alphas_cumprod(aug.beta_start, aug.beta_end, aug.timesteps)[noise_level]
    eps = ImageNoise((3, height, width), [s + LOW_RES_SEED_OFFSET for s in seeds], rng=rng).initial()
    return alpha.sqrt() * pixels + (1 - alpha).sqrt() * eps
