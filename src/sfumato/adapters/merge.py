"""Checkpoint merging, as A1111's checkpoint merger does it for single files, one tensor at a time.

* ``weighted``: (1 − α)·A + α·B
* ``add-difference``: A + α·(B − C)

The output has A's keys. Every floating-point weight all inputs share is merged — UNet, VAE and
text encoders alike (``skip_vae`` keeps A's VAE); arithmetic is in float32 at least, the result is
stored in A's dtype or the one asked for. Non-float tensors and constant buffers (the DDPM
schedule, CLIP's position ids, prediction markers) are A's, as stored. A weight missing from B or C
is A's; a key A lacks is left out; both are reported. The inputs must be the same family, except
that an inpainting A takes a non-inpainting B (and C): the UNet's first convolution then merges its
leading input channels and keeps A's extra ones. Any other shape mismatch is an error.

safetensors inputs are read tensor by tensor (pickles are memory-mapped), so memory stays about
one model: the output. It is written atomically with the recipe in its metadata (``sfumato.merge``)
and A's metadata that loading depends on (a custom spec, prediction-type markers).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from ..checkpoint.detect import detect_spec, is_ignorable
from ..checkpoint.io import SAFETENSORS_DTYPES, check_finite, load_file, read_metadata, save_file, sha256_file, sniff_format
from ..checkpoint.specs import SPEC_METADATA_KEY, VAE_PREFIX
from ..errors import CheckpointError
from ..errors import MergeError as MergeError  # re-exported

MergeMode = Literal["weighted", "add-difference"]
MODES: tuple[str, ...] = ("weighted", "add-difference")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
MERGE_METADATA_KEY = "sfumato.merge"
# A's metadata that decides how the merged file loads (see checkpoint/detect.py)
LOAD_METADATA = (SPEC_METADATA_KEY, "sfumato.prediction", "modelspec.prediction_type", "modelspec.architecture",
                 "ss_v_parameterization")
LABELS = ("A", "B", "C")
HASH_LENGTH = 10  # A1111's short model hash

@dataclass
class MergePlan:
    """What happens to each key of A, decided from shapes alone.

    ``merged``: all inputs combined; ``partial``: an inpainting A's first convolution, whose leading
    input channels are combined and the extra ones kept; ``copied``: A's weight, with the reason;
    ``kept``: non-float tensors and constant buffers, A's as stored; ``dropped``: keys A lacks
    (left out), with the inputs that have them."""

    family: str
    merged: list[str] = field(default_factory=list)
    partial: list[str] = field(default_factory=list)
    copied: dict[str, str] = field(default_factory=dict)
    kept: list[str] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)


@dataclass
class MergeResult:
    output: Path
    plan: MergePlan
    recipe: dict


def plan_merge(
    inputs: Sequence[Mapping[str, Tensor]],
    metadata: Sequence[Mapping[str, str]] | None = None,
    *,
    skip_vae: bool = False,
) -> MergePlan:
    """Classify A's keys for a merge of ``inputs`` (A, B[, C]: tensors or meta tensors, only shapes
    and dtypes are read). MergeError if the families differ or shapes do not match."""
    metadata = metadata or [{}] * len(inputs)
    families = [_family(sd, md, label) for sd, md, label in zip(inputs, metadata, LABELS)]
    for label, family in zip(LABELS[1:], families[1:]):
        if family != families[0] and families[0] != f"{family}-inpaint":
            hint = " (an inpainting model must be A)" if family == f"{families[0]}-inpaint" else ""
            raise MergeError(f"{label} is a {family} model but A is {families[0]}; they cannot be merged{hint}")
    a, others = inputs[0], inputs[1:]
    inpaint_a = any(f != families[0] for f in families[1:])
    plan = MergePlan(families[0])
    mismatched = []
    for key, t in a.items():
        missing = [label for label, sd in zip(LABELS[1:], others) if key not in sd]
        if not t.is_floating_point() or (is_ignorable(key) and not key.startswith("model_ema.")):
            plan.kept.append(key)
        elif skip_vae and key.startswith(VAE_PREFIX):
            plan.copied[key] = "VAE (skip_vae)"
        elif missing:
            plan.copied[key] = f"missing from {' and '.join(missing)}"
        elif all(sd[key].shape == t.shape for sd in others):
            plan.merged.append(key)
        elif inpaint_a and _leading_channels(t.shape, [sd[key].shape for sd in others]):
            plan.partial.append(key)
        else:
            mismatched.append(key)
    if mismatched:
        examples = "; ".join(
            f"{k}: " + ", ".join(f"{label} {list(sd[k].shape)}" for label, sd in zip(LABELS, inputs))
            for k in mismatched[:5]
        )
        raise MergeError(f"{len(mismatched)} tensors differ in shape between the inputs, e.g. {examples}")
    for label, sd in zip(LABELS[1:], others):
        for key in sd:
            if key not in a:
                plan.dropped[key] = f"{plan.dropped[key]} and {label}" if key in plan.dropped else label
    return plan


def _family(sd: Mapping[str, Tensor], metadata: Mapping[str, str], label: str) -> str:
    try:
        return detect_spec(sd, metadata).family
    except CheckpointError as e:
        raise MergeError(f"{label}: {e}") from None


def _leading_channels(shape: torch.Size, others: list[torch.Size]) -> bool:
    """A has more input channels (dim 1) than B and C, which agree, and every other dim matches."""
    o = others[0]
    return (all(s == o for s in others) and len(shape) == len(o) >= 2 and shape[1] > o[1]
            and shape[:1] + shape[2:] == o[:1] + o[2:])


def merge_models(
    a: str | Path,
    b: str | Path,
    c: str | Path | None = None,
    *,
    output: str | Path,
    mode: MergeMode = "weighted",
    alpha: float,
    dtype: torch.dtype | None = None,
    skip_vae: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> MergeResult:
    """Merge checkpoint files A and B (and C for ``add-difference``) into ``output`` (.safetensors).

    ``dtype``: storage dtype of the merged weights (default: A's, tensor by tensor). ``progress``
    is called with (tensors done, total) as the merge proceeds."""
    paths = [Path(a), Path(b)] + ([Path(c)] if c is not None else [])
    output = Path(output)
    _check_settings(paths, output, mode, alpha, dtype)
    with ExitStack() as stack:
        readers = [_Reader(path, label, stack) for path, label in zip(paths, LABELS)]
        plan = plan_merge([r.shapes for r in readers], [r.metadata for r in readers], skip_vae=skip_vae)
        combined = set(plan.merged) | set(plan.partial)
        keep = set(plan.kept)
        tensors: dict[str, Tensor] = {}
        total = len(readers[0].shapes)
        for done, key in enumerate(readers[0].shapes, 1):
            value = readers[0].get(key)
            if key in combined:
                rest = [r.get(key) for r in readers[1:]]
                value = _combine(mode, alpha, value, rest)
            if key not in keep:
                value = value.to(dtype or readers[0].shapes[key].dtype)
            tensors[key] = value.contiguous()
            if progress is not None:
                progress(done, total)
        recipe = {
            "mode": mode,
            "alpha": alpha,
            "models": [{"role": label, "name": path.name, "sha256": sha256_file(path)[:HASH_LENGTH]}
                       for label, path in zip(LABELS, paths)],
            "skip_vae": skip_vae,
            "dtype": next((name for name, d in DTYPES.items() if d == dtype), None),  # None: A's
            "family": plan.family,
        }
        metadata = {k: v for k, v in readers[0].metadata.items() if k in LOAD_METADATA}
    metadata[MERGE_METADATA_KEY] = json.dumps(recipe)
    output.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, output, metadata)
    return MergeResult(output, plan, recipe)


def _check_settings(paths: list[Path], output: Path, mode: str, alpha: float, dtype: torch.dtype | None) -> None:
    if mode not in MODES:
        raise MergeError(f"mode: unknown {mode!r} (expected {' or '.join(MODES)})")
    wanted = 3 if mode == "add-difference" else 2
    if len(paths) != wanted:
        raise MergeError(f"mode: {mode} takes {wanted} models (A, B{', C' if wanted == 3 else ''}), got {len(paths)}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise MergeError(f"alpha: must be a finite number, got {alpha!r}")
    if dtype is not None and dtype not in DTYPES.values():
        raise MergeError(f"dtype: must be one of {', '.join(DTYPES)}, got {dtype}")
    if output.suffix.lower() != ".safetensors":
        raise MergeError(f"output: {output.name} must end in .safetensors (merges are written as safetensors)")
    for label, path in zip(LABELS, paths):
        if not path.is_file():
            raise MergeError(f"{label}: model file not found: {path}")
        if output.exists() and output.resolve() == path.resolve():
            raise MergeError(f"output: {output} is input {label}; write the merge to a new file")


def _combine(mode: str, alpha: float, a: Tensor, others: list[Tensor]) -> Tensor:
    """The merge formula in float32 (or wider); an inpainting A keeps its extra input channels."""
    wide = [t.to(torch.promote_types(t.dtype, torch.float32)) for t in (a, *others)]
    a32, b32 = wide[0], wide[1]
    if a32.shape != b32.shape:                     # plan.partial: merge the leading channels only
        head = _combine(mode, alpha, a32[:, : b32.shape[1]], wide[1:])
        return torch.cat([head, a32[:, b32.shape[1] :]], dim=1)
    if mode == "weighted":
        return (1 - alpha) * a32 + alpha * b32
    return a32 + alpha * (b32 - wide[2])


class _Reader:
    """One input: shapes/dtypes of its tensors up front (meta tensors for safetensors), tensors on demand."""

    def __init__(self, path: Path, label: str, stack: ExitStack):
        self.what = f"the weights of {label} ({path.name})"
        try:
            if sniff_format(path) == "safetensors":
                self.metadata = read_metadata(path)   # also checks the header against the file size
                self._file = stack.enter_context(safe_open(path, framework="pt", device="cpu"))
                self.shapes = {key: self._meta(key) for key in self._file.keys()}
            else:
                self._file = None
                self._tensors, self.metadata = load_file(path)
                self.shapes = self._tensors
        except CheckpointError as e:
            raise MergeError(f"{label}: {e}") from None
        except SafetensorError as e:
            raise MergeError(f"{label}: cannot read {path} as safetensors ({e})") from None

    def _meta(self, key: str) -> Tensor:
        view = self._file.get_slice(key)
        dtype = SAFETENSORS_DTYPES.get(view.get_dtype())
        if dtype is None:
            return self._file.get_tensor(key).to("meta")
        return torch.empty(view.get_shape(), dtype=dtype, device="meta")

    def get(self, key: str) -> Tensor:
        t = self._file.get_tensor(key) if self._file is not None else self._tensors[key]
        check_finite({key: t}, self.what)   # NaN/inf would spread through every merged weight
        return t
