"""ControlNet in the generation loop.

A request's :class:`ControlSpec` list becomes :class:`ControlUnit` s — each ControlNet file loaded
once (for the model it steers, whose UNet config the loader checks it against), each image cropped
like the init image, fitted to the generation size and preprocessed — and :class:`ControlledDenoiser`
runs the base model's UNet with their summed residuals. Each unit's span is checked against the
step fraction i/N of σ's position in the sampling run, read from σ itself: samplers never learn
about it. Classifier-free guidance sends the cond and uncond rows through the same denoiser, so the
residuals steer both (A1111's and diffusers' default).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..adapters.controlnet import PREPROCESSORS, ControlUnit, controlled_unet, load_controlnet
from ..diffusion.denoiser import Denoiser
from ..errors import CheckpointError, ParamError
from ..models.controlnet import ControlNet
from .annotate import ANNOTATORS, annotator_network
from .infotext import format_value
from .params import ControlSpec

if TYPE_CHECKING:
    from .engine import Engine
    from .guidance import StepClock

# (left, top, right, bottom) in the init image's pixels, and the init image's (width, height)
Crop = tuple[tuple[int, int, int, int], tuple[int, int]]


class ControlNets:
    """The ControlNets of the latest request that used any, each file loaded once: a request reuses
    those the previous one loaded and lets the others go."""

    def __init__(self) -> None:
        self._loaded: dict[tuple, ControlNet] = {}

    def get(self, specs: Sequence[ControlSpec], runner: Engine) -> list[ControlNet]:
        if not specs:
            return []
        base = runner.spec.unet
        keep: dict[tuple, ControlNet] = {}
        models = []
        for i, spec in enumerate(specs):
            if isinstance(spec.model, ControlNet):
                _check_fits(spec.model, base, f"control[{i}].model")
                models.append(spec.model)
                continue
            path = Path(spec.model).resolve()
            try:
                key = (str(path), path.stat().st_mtime_ns, runner.dtype, str(runner.device))
                if key not in keep:
                    cn = self._loaded.get(key)
                    keep[key] = cn if cn is not None else load_controlnet(path, base, dtype=runner.dtype,
                                                                          device=runner.device)
            except (OSError, CheckpointError) as e:
                raise ParamError(f"control[{i}].model", str(e)) from None
            models.append(keep[key])
        self._loaded = keep
        return models


def _check_fits(cn: ControlNet, base, field: str) -> None:
    for name in ("model_channels", "channel_mult", "num_res_blocks", "context_dim", "adm_in_channels"):
        ours, theirs = getattr(cn.cfg.unet, name), getattr(base, name)
        if ours != theirs:
            raise ParamError(field, f"the ControlNet does not fit this model: {name} is {ours} in the ControlNet, "
                                    f"{theirs} in the model")


def control_image(spec: ControlSpec, width: int, height: int, crop: Crop | None = None,
                  device: str | torch.device = "cpu") -> Image.Image | np.ndarray:
    """The spec's image for a generation of `width`×`height`: cropped like the init image (the box
    scaled to the control image's size), then, for a preprocessor, resized to the generation size
    (Lanczos) and preprocessed there, so edges are one output pixel wide (an annotator network runs
    on ``device``). Without a preprocessor the image is left at its size: the unit resizes it in
    float (bilinear, antialiased)."""
    a = spec.image
    image = Image.fromarray(a[:, :, 0] if a.ndim == 3 and a.shape[2] == 1 else a) if isinstance(a, np.ndarray) else a
    if crop is not None:
        (left, top, right, bottom), (cw, ch) = crop
        sx, sy = image.width / cw, image.height / ch
        image = image.crop((round(left * sx), round(top * sy), round(right * sx), round(bottom * sy)))
    image = _fit_aspect(image, width / height, spec.resize)
    if spec.preprocessor == "none":
        return image
    if image.size != (width, height):
        image = image.convert("RGB").resize((width, height), Image.LANCZOS)
    if spec.preprocessor in ANNOTATORS:
        kind, fn = ANNOTATORS[spec.preprocessor]
        return fn(annotator_network(spec.annotator, kind, "annotator", device), image)
    return PREPROCESSORS[spec.preprocessor](image, **preprocessor_args(spec))


def _fit_aspect(image: Image.Image, aspect: float, resize: str) -> Image.Image:
    """The image brought to the generation's aspect at its own scale: as it is (stretched later), its
    centre cropped to the aspect, or fitted inside a black canvas of the aspect."""
    w, h = image.size
    if resize == "stretch" or abs(w / h - aspect) < 1e-6:
        return image
    if resize == "crop":
        cw, ch = (round(h * aspect), h) if w / h > aspect else (w, round(w / aspect))
        left, top = (w - cw) // 2, (h - ch) // 2
        return image.crop((left, top, left + cw, top + ch))
    cw, ch = (w, round(w / aspect)) if w / h > aspect else (round(h * aspect), h)
    canvas = Image.new(image.mode, (cw, ch))
    canvas.paste(image, ((cw - w) // 2, (ch - h) // 2))
    return canvas


def preprocessor_args(spec: ControlSpec) -> dict[str, float]:
    """The preprocessor's thresholds the spec sets (canny: low, high; threshold, scribble: level)."""
    if spec.preprocessor == "canny":
        names = ("low", "high")
    elif spec.preprocessor in ("threshold", "scribble"):
        names = ("level",)
    else:
        return {}
    values = (spec.threshold_a, spec.threshold_b)
    return {n: (int(v) if n == "level" else v) for n, v in zip(names, values) if v is not None}


def control_units(specs: Sequence[ControlSpec], models: Sequence[ControlNet], width: int, height: int,
                  crop: Crop | None = None) -> list[ControlUnit]:
    units = []
    for i, (spec, model) in enumerate(zip(specs, models, strict=True)):
        if isinstance(spec.image, (list, tuple)):
            raise ParamError(f"control[{i}].image", "a list of images (one per frame) is for animations; "
                                                    "give one image")
        try:
            device = next(model.parameters()).device
            units.append(ControlUnit(model, control_image(spec, width, height, crop, device), spec.strength,
                                     spec.start, spec.end, spec.mode))
        except ParamError as e:
            raise ParamError(f"control[{i}].{e.field}", e.message) from None
    return units


class ControlledDenoiser:
    """D(x, σ, cond) of ``engine`` with the units' residuals in its UNet. The step fraction comes from
    the pass's step clock (σ's position in the stage's schedule, i of N steps → i/N), so a unit with
    span [start, end] steers the steps A1111 would steer."""

    def __init__(self, engine: Engine, units: Sequence[ControlUnit], clock: StepClock, uncond_rows: int = 1):
        self.engine, self.clock, self.uncond_rows = engine, clock, uncond_rows
        self.unet = controlled_unet(engine.model.unet, units)

    def __call__(self, x: Tensor, sigma: Tensor, cond: object) -> Tensor:
        # Guidance calls the UNet once per image: its uncond row first, then its cond rows (an
        # animation's window: its frames' uncond rows, then their cond rows)
        unet = partial(self.unet, fraction=self.clock.fraction, uncond_rows=self.uncond_rows)
        e = self.engine
        return Denoiser(partial(e.unet_call, unet=unet), e.schedule, e.spec.prediction)(x, sigma, cond)


def control_infotext(specs: Sequence[ControlSpec]) -> dict[str, str]:
    """A1111's ``ControlNet N`` entries (module, model, weight, guidance span)."""
    return {
        f"ControlNet {i}": f"Module: {s.preprocessor}, Model: {s.model_name}, Weight: {format_value(float(s.strength))}, "
                           f"Guidance Start: {format_value(float(s.start))}, Guidance End: {format_value(float(s.end))}"
        for i, s in enumerate(specs)
    }
