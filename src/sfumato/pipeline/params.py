"""The one request object every front-end builds, and its validation.

Validation happens before any model work, and every error names the offending field.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..diffusion.samplers import SAMPLERS
from ..errors import SfumatoError

SCHEDULERS: tuple[str, ...] = ("normal",)
MAX_SEED = 2**32 - 1


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
    scheduler: str = "normal"
    seed: int = -1
    width: int = 512
    height: int = 512
    batch_size: int = 1
    clip_skip: int = 1

    def validated(self) -> "GenerationParams":
        """Checks every field; resolves seed −1 to a concrete random seed. Returns self."""
        if not isinstance(self.prompt, str):
            raise ParamError("prompt", "must be a string")
        if not isinstance(self.negative_prompt, str):
            raise ParamError("negative_prompt", "must be a string")
        _int_range("steps", self.steps, 1, 1000)
        _int_range("batch_size", self.batch_size, 1, 64)
        _int_range("clip_skip", self.clip_skip, 1, 12)
        for name in ("width", "height"):
            value = getattr(self, name)
            _int_range(name, value, 8, 8192)
            if value % 8:
                raise ParamError(name, f"must be a multiple of 8, got {value}")
        if not isinstance(self.cfg_scale, (int, float)) or not 0 <= self.cfg_scale <= 100:
            raise ParamError("cfg_scale", f"must be a number in [0, 100], got {self.cfg_scale!r}")
        if self.sampler not in SAMPLERS:
            raise ParamError("sampler", f"unknown sampler {self.sampler!r}; valid: {', '.join(sorted(SAMPLERS))}")
        if self.scheduler not in SCHEDULERS:
            raise ParamError("scheduler", f"unknown scheduler {self.scheduler!r}; valid: {', '.join(SCHEDULERS)}")
        _int_range("seed", self.seed, -1, MAX_SEED)
        if self.seed == -1:
            self.seed = random.randint(0, MAX_SEED - 64)
        return self


def _int_range(name: str, value: object, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParamError(name, f"must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ParamError(name, f"must be in [{lo}, {hi}], got {value}")
