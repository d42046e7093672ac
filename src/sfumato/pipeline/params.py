"""The one request object every front-end builds, and its validation.

Validation happens before any model work, and every error names the offending field.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from PIL import Image

from ..errors import SfumatoError

MAX_SEED = 2**32 - 1
MASKED_CONTENT = ("fill", "original", "latent noise", "latent nothing")
UPSCALERS = ("latent", "lanczos")
RNGS = ("cpu", "nv")


class ParamError(SfumatoError, ValueError):
    """A request field is invalid; ``field`` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass
class GenerationParams:
    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    cfg_scale: float = 7.0
    sampler: str = "euler"
    scheduler: str | None = None          # None: the sampler's default ("normal" for most)
    seed: int = -1
    width: int = 512
    height: int = 512
    batch_size: int = 1
    clip_skip: int = 1
    subseed: int = -1
    subseed_strength: float = 0.0
    rng: str = "cpu"
    guidance_rescale: float = 0.0
    # img2img / inpainting (init_image set); outpainting is inpainting on a padded canvas
    init_image: Image.Image | None = field(default=None, repr=False)
    strength: float = 0.75
    mask: Image.Image | None = field(default=None, repr=False)
    mask_blur: int = 4
    only_masked: bool = False
    only_masked_padding: int = 32
    masked_content: str = "original"
    # hires fix (txt2img): enabled when hires_scale > 1
    hires_scale: float = 1.0
    hires_steps: int = 0                  # 0: same as steps
    hires_denoise: float = 0.7
    hires_upscaler: str = "latent"
    # SDXL refiner hand-off (the refiner model is given to the pipeline, its name recorded here)
    refiner: str | None = None
    refiner_switch: float = 0.8

    @property
    def is_img2img(self) -> bool:
        return self.init_image is not None

    def validated(self) -> "GenerationParams":
        """Checks every field; resolves seeds −1 to concrete random seeds and the sampler's
        display names to internal names. Returns self."""
        from ..diffusion.samplers import resolve_sampler
        from ..diffusion.schedule import SCHEDULERS

        for name in ("prompt", "negative_prompt"):
            if not isinstance(getattr(self, name), str):
                raise ParamError(name, "must be a string")
        _int_range("steps", self.steps, 1, 1000)
        _int_range("batch_size", self.batch_size, 1, 64)
        _int_range("clip_skip", self.clip_skip, 1, 12)
        for name in ("width", "height"):
            value = getattr(self, name)
            _int_range(name, value, 8, 8192)
            if value % 8:
                raise ParamError(name, f"must be a multiple of 8, got {value}")
        _float_range("cfg_scale", self.cfg_scale, 0, 100)
        _float_range("guidance_rescale", self.guidance_rescale, 0, 1)
        try:
            sampler, default_scheduler = resolve_sampler(self.sampler)
        except ValueError as e:
            raise ParamError("sampler", str(e)) from None
        self.sampler = sampler
        self.scheduler = self.scheduler or default_scheduler or "normal"
        if self.scheduler not in SCHEDULERS:
            raise ParamError("scheduler", f"unknown scheduler {self.scheduler!r}; valid: {', '.join(SCHEDULERS)}")
        if self.rng not in RNGS:
            raise ParamError("rng", f"must be one of {', '.join(RNGS)}, got {self.rng!r}")
        _int_range("seed", self.seed, -1, MAX_SEED)
        _int_range("subseed", self.subseed, -1, MAX_SEED)
        _float_range("subseed_strength", self.subseed_strength, 0, 1)
        _float_range("strength", self.strength, 0, 1)
        _int_range("mask_blur", self.mask_blur, 0, 256)
        _int_range("only_masked_padding", self.only_masked_padding, 0, 4096)
        if self.masked_content not in MASKED_CONTENT:
            raise ParamError("masked_content", f"must be one of {', '.join(MASKED_CONTENT)}, got {self.masked_content!r}")
        if self.mask is not None and self.init_image is None:
            raise ParamError("mask", "a mask needs an init image")
        if self.mask is not None and self.mask.size != self.init_image.size:
            raise ParamError("mask", f"size {self.mask.size[0]}x{self.mask.size[1]} differs from the init image's "
                             f"{self.init_image.size[0]}x{self.init_image.size[1]}")
        _float_range("hires_scale", self.hires_scale, 1, 8)
        _int_range("hires_steps", self.hires_steps, 0, 1000)
        _float_range("hires_denoise", self.hires_denoise, 0, 1)
        if self.hires_upscaler not in UPSCALERS:
            raise ParamError("hires_upscaler", f"must be one of {', '.join(UPSCALERS)}, got {self.hires_upscaler!r}")
        if self.hires_scale > 1:
            if self.init_image is not None:
                raise ParamError("hires_scale", "hires fix applies to txt2img only")
            for name, value in (("width", self.hires_width), ("height", self.hires_height)):
                if value % 8:
                    raise ParamError("hires_scale", f"hires {name} {value} is not a multiple of 8")
        _float_range("refiner_switch", self.refiner_switch, 0, 1)
        if self.seed == -1:
            self.seed = random.randint(0, MAX_SEED - 64)
        if self.subseed == -1:
            self.subseed = random.randint(0, MAX_SEED - 64) if self.subseed_strength > 0 else -1
        return self

    @property
    def hires_width(self) -> int:
        return int(self.width * self.hires_scale)

    @property
    def hires_height(self) -> int:
        return int(self.height * self.hires_scale)


def _int_range(name: str, value: object, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParamError(name, f"must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ParamError(name, f"must be in [{lo}, {hi}], got {value}")


def _float_range(name: str, value: object, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ParamError(name, f"must be a number, got {value!r}")
    if not lo <= value <= hi:
        raise ParamError(name, f"must be in [{lo}, {hi}], got {value}")
