"""The Python API: ``sfumato.load(...)`` → :class:`Pipeline`."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

import torch
from PIL import Image

from .checkpoint.io import sha256_file
from .checkpoint.load import LoadedModel, load_model
from .diffusion.samplers import StepCallback
from .errors import SfumatoError
from .pipeline.generate import Generator
from .pipeline.images import infotext, to_pil
from .pipeline.params import GenerationParams

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_dtype(dtype: str | torch.dtype | None, device: str = "cpu") -> torch.dtype:
    """``auto``/None: fp32 on the CPU (safe precision), fp16 on CUDA."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float16 if device.startswith("cuda") else torch.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        raise SfumatoError(f"dtype: unknown dtype {dtype!r}; valid: auto, {', '.join(DTYPES)}") from None


@dataclass
class ImageResult:
    image: Image.Image
    seed: int
    infotext: str


@dataclass
class GenerationResult:
    images: list[Image.Image]
    params: GenerationParams                      # the request, seed resolved
    items: list[ImageResult] = field(default_factory=list)

    @property
    def seeds(self) -> list[int]:
        return [item.seed for item in self.items]


class Pipeline:
    def __init__(self, model: LoadedModel):
        self.model = model
        self.generator = Generator(model)

    @property
    def family(self) -> str:
        return self.model.family

    @property
    def prediction(self) -> str:
        return self.model.spec.prediction

    @property
    def model_name(self) -> str:
        return self.model.path.stem if self.model.path.is_file() else self.model.path.name

    @cached_property
    def model_hash(self) -> str | None:
        """A1111's "Model hash": the first 10 hex digits of the file's SHA-256 (None for folders)."""
        return sha256_file(self.model.path)[:10] if self.model.path.is_file() else None

    def txt2img(
        self,
        prompt: str,
        negative_prompt: str = "",
        *,
        steps: int = 20,
        cfg_scale: float = 7.0,
        sampler: str = "euler",
        scheduler: str = "normal",
        seed: int = -1,
        width: int | None = None,
        height: int | None = None,
        batch_size: int = 1,
        clip_skip: int = 1,
        callback: StepCallback | None = None,
    ) -> GenerationResult:
        size = self.model.spec.resolution
        p = GenerationParams(
            prompt, negative_prompt, steps, cfg_scale, sampler, scheduler, seed,
            width or size, height or size, batch_size, clip_skip,
        ).validated()
        return self.run(p, callback)

    def run(self, p: GenerationParams, callback: StepCallback | None = None) -> GenerationResult:
        out = self.generator.txt2img(p, callback)
        images = to_pil(out.images)
        items = [
            ImageResult(img, seed, infotext(replace(p, seed=seed), seed, self.model_name, self.model_hash))
            for img, seed in zip(images, out.seeds)
        ]
        return GenerationResult(images, p, items)


def load(
    path: str | Path | None = None,
    *,
    vae: str | Path | None = None,
    prediction: str | None = None,
    dtype: str | torch.dtype | None = None,
    device: str = "cpu",
) -> Pipeline:
    if path is None:
        raise SfumatoError("model: no model given (pass a checkpoint file or a diffusers folder)")
    model = load_model(path, vae=vae, prediction=prediction, dtype=resolve_dtype(dtype, device), device=device)
    return Pipeline(model)
