"""The Python API: ``sfumato.load(...)`` → :class:`Pipeline`, whose methods build one request
object (:class:`GenerationParams`) and run the one generation loop."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

import torch
from PIL import Image

from .checkpoint.io import sha256_file
from .adapters.embeddings import EmbeddingSet, load_embeddings
from .adapters.lora import apply_loras, bake_loras, find_lora, parse_lora_prompt, remove_loras
from .checkpoint.load import LoadedModel, load_model
from .errors import SfumatoError
from .pipeline.generate import Generator, ProgressCallback
from .pipeline.infotext import generation_infotext
from .pipeline.masks import outpaint_canvas
from .pipeline.params import GenerationParams, ParamError
from .pipeline.watermark import add_watermark

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_FIELDS = {f.name for f in dataclasses.fields(GenerationParams)}


def resolve_dtype(dtype: str | torch.dtype | None, device: str = "cpu") -> torch.dtype:
    """``auto``/None: fp16 on CUDA; on the CPU bf16 where the CPU has fast native bf16 arithmetic
    (``models.layers.cpu_has_fast_bf16``), else fp32 (safe precision)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.startswith("cuda"):
            return torch.float16
        from .models.layers import cpu_has_fast_bf16

        return torch.bfloat16 if device.startswith("cpu") and cpu_has_fast_bf16() else torch.float32
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
    params: GenerationParams                      # the request, seeds resolved
    items: list[ImageResult] = field(default_factory=list)

    @property
    def seeds(self) -> list[int]:
        return [item.seed for item in self.items]


class Pipeline:
    """A loaded model (and optional refiner). ``lora_dir`` is where ``<lora:name:w>`` prompt tags
    are looked up; each run applies the prompt's LoRAs and removes them afterwards."""

    def __init__(self, model: LoadedModel, refiner: LoadedModel | None = None, lora_dir: str | Path | None = None,
                 embeddings: EmbeddingSet | None = None):
        self.model = model
        self.refiner = refiner
        self.lora_dir = Path(lora_dir) if lora_dir is not None else None
        self.generator = Generator(model, refiner, embeddings)

    @property
    def embeddings(self) -> EmbeddingSet | None:
        """The textual inversion embeddings usable with this model (misfits in ``.skipped``)."""
        return self.generator.base.conditioner.embeddings

    @property
    def family(self) -> str:
        return self.model.family

    @property
    def prediction(self) -> str:
        return self.model.spec.prediction

    @property
    def model_name(self) -> str:
        return _name(self.model.path)

    @cached_property
    def model_hash(self) -> str | None:
        """A1111's "Model hash": the first 10 hex digits of the file's SHA-256 (None for folders)."""
        return sha256_file(self.model.path)[:10] if self.model.path.is_file() else None

    # -- the workflows: thin builders of one request ----------------------------------------

    def txt2img(self, prompt: str, negative_prompt: str = "", *, watermark: bool = True,
                callback: ProgressCallback | None = None, **settings) -> GenerationResult:
        size = self.model.spec.resolution
        settings.setdefault("width", size)
        settings.setdefault("height", size)
        return self.run(self.params(prompt=prompt, negative_prompt=negative_prompt, **settings), callback, watermark)

    def img2img(self, prompt: str, init_image: Image.Image, negative_prompt: str = "", *, watermark: bool = True,
                callback: ProgressCallback | None = None, **settings) -> GenerationResult:
        settings.setdefault("width", init_image.width // 8 * 8)
        settings.setdefault("height", init_image.height // 8 * 8)
        p = self.params(prompt=prompt, negative_prompt=negative_prompt, init_image=init_image, **settings)
        return self.run(p, callback, watermark)

    def inpaint(self, prompt: str, init_image: Image.Image, mask: Image.Image, negative_prompt: str = "",
                **settings) -> GenerationResult:
        return self.img2img(prompt, init_image, negative_prompt, mask=mask, **settings)

    def outpaint(self, prompt: str, init_image: Image.Image, negative_prompt: str = "", *, left: int = 0,
                 right: int = 0, up: int = 0, down: int = 0, **settings) -> GenerationResult:
        """Grow the canvas by the given pixels and generate the new border, keeping the original."""
        for name, value in (("left", left), ("right", right), ("up", up), ("down", down)):
            if not isinstance(value, int) or value < 0 or value % 8:
                raise ParamError(name, f"must be a non-negative multiple of 8, got {value!r}")
        if not (left or right or up or down):
            raise ParamError("left", "outpainting needs at least one of left/right/up/down")
        canvas, mask = outpaint_canvas(init_image, left, right, up, down)
        settings.setdefault("strength", 1.0)
        settings.setdefault("mask_blur", 0)
        return self.inpaint(prompt, canvas, mask, negative_prompt, **settings)

    def params(self, **settings) -> GenerationParams:
        unknown = sorted(set(settings) - _FIELDS)
        if unknown:
            raise ParamError(unknown[0], f"unknown setting; valid: {', '.join(sorted(_FIELDS))}")
        if self.refiner is not None:
            settings.setdefault("refiner", _name(self.refiner.path))
        return GenerationParams(**settings).validated()

    def run(self, p: GenerationParams, callback: ProgressCallback | None = None,
            watermark: bool = True) -> GenerationResult:
        p.validated()
        if p.refiner is not None and self.refiner is None:
            raise ParamError("refiner", "a refiner was named but none is loaded")
        prompt, tags = parse_lora_prompt(p.prompt)
        lora_hashes = None
        if tags:
            if self.lora_dir is None:
                raise ParamError("prompt", "it names LoRAs but no LoRA folder is set (--lora-dir)")
            try:
                files = [(find_lora(name, self.lora_dir), weight) for name, weight in tags]
                apply_loras(self.model, files)
            except ParamError:
                raise
            except SfumatoError as e:   # a missing or unusable file named in the prompt
                raise ParamError("prompt", str(e)) from None
            lora_hashes = ", ".join(f"{name}: {sha256_file(path)[:12]}" for (name, _), (path, _) in zip(tags, files))
            try:
                out = self.generator.run(replace(p, prompt=prompt), callback)
            finally:
                remove_loras(self.model)
        else:
            out = self.generator.run(p, callback)
        extra = {"Lora hashes": lora_hashes, "TI hashes": self._ti_hashes(p)}
        items = []
        for i, (image, seed) in enumerate(zip(out.images, out.seeds)):
            if watermark:
                image = add_watermark(image)
            subseed = out.subseeds[i] if out.subseeds else None
            text = generation_infotext(replace(p, seed=seed), seed=seed, subseed=subseed,
                                       model_name=self.model_name, model_hash=self.model_hash,
                                       extra=extra)
            items.append(ImageResult(image, seed, text))
        return GenerationResult([item.image for item in items], p, items)


    def _ti_hashes(self, p: GenerationParams) -> str | None:
        """A1111's ``TI hashes``: the embeddings the prompts use, with 12 hex digits of their file's SHA-256."""
        if self.embeddings is None:
            return None
        names = dict.fromkeys(self.embeddings.names_in(p.prompt) + self.embeddings.names_in(p.negative_prompt))
        paths = {name: self.embeddings.embeddings[name].path for name in names}
        return ", ".join(f"{n}: {sha256_file(path)[:12]}" for n, path in paths.items() if path is not None) or None


def _name(path: Path) -> str:
    return path.stem if path.is_file() else path.name


def load(
    path: str | Path | None = None,
    *,
    vae: str | Path | None = None,
    prediction: str | None = None,
    dtype: str | torch.dtype | None = None,
    device: str = "cpu",
    refiner: str | Path | None = None,
    loras: list[tuple[str | Path, float]] | None = None,
    lora_dir: str | Path | None = None,
    embeddings_dir: str | Path | None = None,
) -> Pipeline:
    """Load a checkpoint (None: the bundled model). ``loras`` are merged into the weights for good
    (``(path, weight)`` pairs); ``lora_dir`` serves ``<lora:name:w>`` tags in prompts; the textual
    inversion embeddings in ``embeddings_dir`` are used by name in prompts and negative prompts."""
    if path is None:  # the bundled shapes-world model that ships with the package
        from .train.bundled import BUNDLED_PATH

        path = BUNDLED_PATH
    torch_dtype = resolve_dtype(dtype, device)
    model = load_model(path, vae=vae, prediction=prediction, dtype=torch_dtype, device=device)
    refiner_model = None
    if refiner is not None:
        refiner_model = load_model(refiner, dtype=torch_dtype, device=device)
    if loras:   # merged for good: a run's prompt-tag LoRAs are removed down to these weights
        apply_loras(model, loras)
        bake_loras(model)
    embeddings = load_embeddings(embeddings_dir, model.spec) if embeddings_dir is not None else None
    return Pipeline(model, refiner_model, lora_dir, embeddings)
