"""LoRA-family adapters merged into a loaded model's weights.

Reads kohya / A1111 files (``lora_unet_…``, ``lora_te_…``, ``lora_te1_…``, ``lora_te2_…``: LoRA,
conv LoCon, LyCORIS LoHa and LoKr) and diffusers / PEFT files (``unet.…lora_A``, ``text_encoder.…``,
the older ``lora.down`` / ``processor.to_q_lora`` names) for SD 1.x, SD 2.x and SDXL.

Module names resolve through one table per component. Since our attribute paths are the original
checkpoint keys, a kohya name is our module path with '.' → '_'; diffusers UNet names go through
the diffusers ⇄ LDM key converter; transformers CLIP names map onto OpenCLIP towers, q/k/v landing
on row slices of the fused ``in_proj_weight``. Every update ΔW is computed in fp32 and added to the
weight in the model's dtype; the original tensors are kept, so ``remove_loras`` restores them exactly.
"""

from __future__ import annotations

import json
import logging
import math
import re
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..checkpoint.convert_unet import ldm_unet_to_diffusers
from ..checkpoint.io import check_finite, load_file
from ..checkpoint.load import LoadedModel
from ..checkpoint.specs import UNET_PREFIX
from ..errors import SfumatoError
from ..checkpoint.folders import ModelFolder

log = logging.getLogger(__name__)

LoraSource = str | Path | Mapping[str, Tensor]
LoraWeight = float | tuple[float, float]  # one multiplier, or (text encoders, UNet) as in <lora:name:te:unet>
LORA_EXTENSIONS = (".safetensors", ".pt", ".ckpt")

# Key endings -> the factor they hold (no ending is a suffix of another).
_SUFFIXES: dict[str, str] = {
    ".lora_down.weight": "down", ".lora_up.weight": "up", ".lora_mid.weight": "mid",
    ".lora_A.weight": "down", ".lora_B.weight": "up",
    ".lora_linear_layer.down.weight": "down", ".lora_linear_layer.up.weight": "up",
    ".lora.down.weight": "down", ".lora.up.weight": "up",
    ".alpha": "alpha",
    **{f".{n}": n for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")},
    **{f".{n}": n for n in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")},
}
# diffusers' attention-processor names: `attn1.processor.to_q_lora.down.weight`, `self_attn.to_q_lora.up.weight`
_PROCESSOR = re.compile(r"(.+?)(?:\.processor)?\.to_(q|k|v|out)_lora\.(down|up)\.weight")
_PROCESSOR_TARGET = {
    "unet": {"q": "to_q", "k": "to_k", "v": "to_v", "out": "to_out.0"},
    "text": {"q": "q_proj", "k": "k_proj", "v": "v_proj", "out": "out_proj"},
}
# Component prefixes: kohya (underscored names) first, then diffusers (dotted names).
_PREFIXES = (
    ("lora_unet_", "unet"), ("lora_te1_", "te1"), ("lora_te2_", "te2"), ("lora_te_", "te1"),
    ("unet.", "unet"), ("text_encoder_2.", "te2"), ("text_encoder.", "te1"),
)
_METADATA_COMPONENTS = {"unet": "unet", "text_encoder": "te1", "text_encoder_2": "te2"}
# transformers CLIP layer modules -> OpenCLIP resblock modules (q/k/v handled as in_proj slices)
_HF_TO_OPENCLIP = {"self_attn.out_proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}

# Original tensors of patched parameters, per component module (see remove_loras).
_ORIGINALS: weakref.WeakKeyDictionary[nn.Module, dict[str, Tensor]] = weakref.WeakKeyDictionary()


@dataclass
class LoraFileReport:
    """What one file did: ``matched`` maps each used LoRA module name to the weight it patched
    (a checkpoint key, with ``[q]``/``[k]``/``[v]`` for a slice of a fused projection);
    ``unmatched`` lists the file's keys that were not used."""

    name: str
    te_weight: float
    unet_weight: float
    matched: dict[str, str] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)


@dataclass
class LoraReport:
    files: list[LoraFileReport]

    @property
    def unmatched(self) -> dict[str, list[str]]:
        """Unused keys per file name, for files that have any."""
        return {f.name: f.unmatched for f in self.files if f.unmatched}


@dataclass(frozen=True)
class _Target:
    component: str  # "unet", "te1", "te2"
    param: str      # parameter name inside the component module
    rows: str = ""  # "q" / "k" / "v": a third of a fused in_proj_weight


@dataclass
class _Patch:
    target: _Target
    kind: str                  # "lora", "loha", "lokr"
    factors: dict[str, Tensor]
    scale: float               # multiplier · alpha / rank


# -- name tables --------------------------------------------------------------------------------


def _flat(name: str) -> str:
    return name.replace(".", "_")


def _layer_weights(module: nn.Module) -> dict[str, str]:
    """Flat module name -> weight parameter name, for every Linear / Conv2d."""
    return {_flat(n): f"{n}.weight" for n, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def _unet_table(unet: nn.Module) -> dict[str, str]:
    table = _layer_weights(unet)
    weights = set(table.values())
    keys = list(unet.state_dict())
    # renaming the keys to themselves gives the diffusers key -> LDM key map of this config
    for diffusers_key, ldm_key in ldm_unet_to_diffusers(dict(zip(keys, keys)), unet.cfg).items():
        if ldm_key in weights:
            table.setdefault(_flat(diffusers_key.removesuffix(".weight")), ldm_key)
    return table


def _text_table(encoder: nn.Module) -> dict[str, tuple[str, str]]:
    """Flat module name -> (parameter name, row slice) for a text encoder of either layout."""
    table = {k: (v, "") for k, v in _layer_weights(encoder).items()}
    if encoder.cfg.layout == "openclip":
        for i in range(encoder.cfg.layers):
            block = f"transformer.resblocks.{i}"
            hf = f"text_model.encoder.layers.{i}"
            table[_flat(f"{block}.attn.in_proj")] = (f"{block}.attn.in_proj_weight", "")
            for part in "qkv":
                table[_flat(f"{hf}.self_attn.{part}_proj")] = (f"{block}.attn.in_proj_weight", part)
            for hf_name, oc_name in _HF_TO_OPENCLIP.items():
                table[_flat(f"{hf}.{hf_name}")] = (f"{block}.{oc_name}.weight", "")
    # transformers >= 5 saves CLIPTextModel without the `text_model.` level; accept both spellings
    table.update({k.removeprefix("text_model_"): v for k, v in table.items() if k.startswith("text_model_")})
    return table


def _components(model: LoadedModel) -> dict[str, tuple[nn.Module, str]]:
    """Component name -> (module, checkpoint prefix)."""
    comps = {"unet": (model.unet, UNET_PREFIX)}
    for i, (encoder, slot) in enumerate(zip(model.text_encoders, model.spec.text)):
        comps[f"te{i + 1}"] = (encoder, slot.prefix)
    return comps


def _tables(comps: Mapping[str, tuple[nn.Module, str]]) -> dict[str, dict[str, _Target]]:
    tables = {"unet": {k: _Target("unet", v) for k, v in _unet_table(comps["unet"][0]).items()}}
    for name, (module, _) in comps.items():
        if name != "unet":
            tables[name] = {k: _Target(name, p, rows) for k, (p, rows) in _text_table(module).items()}
    return tables


# -- reading a file -----------------------------------------------------------------------------


@dataclass
class _Group:
    """The tensors of one LoRA module, as found in the file."""

    component: str
    name: str                   # module name without component prefix, as spelled in the file
    label: str                  # module name with prefix, for the report
    factors: dict[str, Tensor] = field(default_factory=dict)
    keys: list[str] = field(default_factory=list)


def _split_key(key: str) -> tuple[str, str, str, str] | None:
    """(component, module name, factor, module name with prefix) of a key, or None when it names
    no known factor."""
    processor = _PROCESSOR.fullmatch(key)
    if processor:
        module, part, factor = processor.groups()
    else:
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            return None
        module, factor = key[: -len(suffix)], _SUFFIXES[suffix]
    component, name = "unet", module  # diffusers' save_attn_procs files carry no prefix
    for prefix, comp in _PREFIXES:
        if module.startswith(prefix):
            component, name = comp, module[len(prefix):]
            break
    if processor:
        kind = "unet" if component == "unet" else "text"
        name = f"{name}.{_PROCESSOR_TARGET[kind][part]}"
        module = f"{module}.{_PROCESSOR_TARGET[kind][part]}"
    return component, name, factor, module


def _group(sd: Mapping[str, Tensor]) -> tuple[dict[tuple[str, str], _Group], list[str]]:
    groups: dict[tuple[str, str], _Group] = {}
    unknown = []
    for key, value in sd.items():
        parts = _split_key(key)
        if parts is None or not isinstance(value, Tensor):
            unknown.append(key)
            continue
        component, name, factor, label = parts
        group = groups.setdefault((component, _flat(name)), _Group(component, name, label))
        if factor in group.factors:  # one module in two spellings (e.g. `lora_down` and `lora.down`)
            unknown.append(key)
            continue
        group.factors[factor] = value
        group.keys.append(key)
    return groups, unknown


_LOHA = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}
_LOKR_W1 = ({"lokr_w1"}, {"lokr_w1_a", "lokr_w1_b"})
_LOKR_W2 = ({"lokr_w2"}, {"lokr_w2_a", "lokr_w2_b"}, {"lokr_w2_a", "lokr_w2_b", "lokr_t2"})


def _kind(factors: Mapping[str, Tensor]) -> str | None:
    """Which adapter a module's set of factors forms, or None when the set is incomplete or mixed."""
    names = set(factors) - {"alpha"}
    if names in ({"down", "up"}, {"down", "up", "mid"}):
        return "lora"
    if names in (_LOHA, _LOHA | {"hada_t1", "hada_t2"}):
        return "loha"
    if any(names == a | b for a in _LOKR_W1 for b in _LOKR_W2):
        return "lokr"
    return None


def _rank(kind: str, f: Mapping[str, Tensor]) -> int | None:
    if kind == "lora":
        return f["down"].shape[0]
    if kind == "loha":
        return f["hada_w1_b"].shape[0]
    for b in ("lokr_w1_b", "lokr_w2_b"):  # a LoKr of two full matrices has no rank: scale 1
        if b in f:
            return f[b].shape[0]
    return None


# -- the update ΔW ------------------------------------------------------------------------------


def _tucker(t: Tensor, wa: Tensor, wb: Tensor) -> Tensor:
    """LyCORIS' CP rebuild: core t (r, r, k, k), wa (r, out), wb (r, in) -> (out, in, k, k)."""
    return torch.einsum("i j k l, i p, j r -> p r k l", t, wa, wb)


def _delta(kind: str, f: Mapping[str, Tensor]) -> Tensor:
    """The unscaled update, (out, in·k·k) or (out, in, k, k)."""
    if kind == "lora":
        up, down = f["up"].flatten(1), f["down"].flatten(1)
        if "mid" in f:
            return torch.einsum("n m k l, i n, m j -> i j k l", f["mid"], up, down)
        return up @ down
    if kind == "loha":
        if "hada_t1" in f:
            return _tucker(f["hada_t1"], f["hada_w1_a"], f["hada_w1_b"]) * _tucker(
                f["hada_t2"], f["hada_w2_a"], f["hada_w2_b"])
        return (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"])
    w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
    if "lokr_w2" in f:
        w2 = f["lokr_w2"]
    elif "lokr_t2" in f:
        w2 = _tucker(f["lokr_t2"], f["lokr_w2_a"], f["lokr_w2_b"])
    else:
        w2 = f["lokr_w2_a"] @ f["lokr_w2_b"]
    if w2.ndim == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2.contiguous())  # kron fails on some non-contiguous (einsum) layouts


def _rows(param: Tensor, part: str) -> slice:
    if not part:
        return slice(None)
    n = param.shape[0] // 3
    i = "qkv".index(part)
    return slice(i * n, (i + 1) * n)


def _check_shape(kind: str, f: Mapping[str, Tensor], param: Tensor, part: str, where: str) -> None:
    """Compute ΔW's shape on the meta device (no memory) and compare it with the weight's."""
    target = param[_rows(param, part)].shape
    try:
        shape = _delta(kind, {k: v.to("meta", torch.float32) for k, v in f.items() if k != "alpha"}).shape
    except RuntimeError as e:
        raise SfumatoError(f"{where}: inconsistent {kind} factor shapes ({e})") from None
    if shape[0] != target[0] or shape.numel() != target.numel():
        raise SfumatoError(
            f"{where}: gives a {tuple(shape)} update for a {tuple(target)} weight "
            "(is the LoRA for another model family?)"
        )


# -- planning and patching ----------------------------------------------------------------------


def _read(source: LoraSource, index: int) -> tuple[str, Mapping[str, Tensor], dict[str, str]]:
    if isinstance(source, Mapping):
        return f"state dict {index}", source, {}
    path = Path(source)
    if not path.is_file():
        raise SfumatoError(f"LoRA file not found: {path}")
    sd, metadata = load_file(path)
    check_finite(sd, f"the weights of LoRA {path.name}")
    return path.stem, sd, metadata


def _multipliers(weight: LoraWeight, name: str) -> tuple[float, float]:
    pair = weight if isinstance(weight, tuple) else (weight, weight)
    if len(pair) != 2 or not all(isinstance(w, (int, float)) and math.isfinite(w) for w in pair):
        raise SfumatoError(f"LoRA {name}: weight must be a finite number or a (te, unet) pair, got {weight!r}")
    return float(pair[0]), float(pair[1])


def _peft_alphas(metadata: Mapping[str, str]) -> dict[str, dict]:
    """Per component: the LoraConfig diffusers stores under `lora_adapter_metadata` (lora_alpha, …)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError as e:
        raise SfumatoError(f"invalid lora_adapter_metadata: {e}") from None
    out: dict[str, dict] = {}
    for key, value in flat.items():
        prefix, _, field_name = key.rpartition(".")
        if prefix in _METADATA_COMPONENTS:
            out.setdefault(_METADATA_COMPONENTS[prefix], {})[field_name] = value
    return out


def _pattern_alpha(config: Mapping, module: str) -> float:
    """PEFT's rule: an ``alpha_pattern`` key (a regex) matches a module name ending in ``.key``."""
    patterns = config.get("alpha_pattern") or {}
    for pattern, alpha in patterns.items():
        try:
            if re.match(rf"(.*\.)?({pattern})$", module):
                return float(alpha)
        except re.error:
            raise SfumatoError(f"lora_adapter_metadata: invalid alpha_pattern key {pattern!r}") from None
    return float(config["lora_alpha"])


def _scale(kind: str, group: _Group, peft: Mapping[str, dict], multiplier: float) -> float:
    f = group.factors
    rank = _rank(kind, f)
    if rank is None:
        return multiplier
    if rank == 0:
        raise SfumatoError(f"{group.label}: rank 0")
    config = peft.get(group.component, {})
    if "alpha" in f:
        alpha = float(f["alpha"].item())
    elif "lora_alpha" in config:
        alpha = _pattern_alpha(config, group.name)
        if config.get("use_rslora"):
            return multiplier * alpha / math.sqrt(rank)
    else:
        alpha = float(rank)
    return multiplier * alpha / rank


def _plan(
    name: str, sd: Mapping[str, Tensor], metadata: Mapping[str, str], weights: tuple[float, float],
    tables: Mapping[str, Mapping[str, _Target]], comps: Mapping[str, tuple[nn.Module, str]],
) -> tuple[list[_Patch], LoraFileReport]:
    report = LoraFileReport(name, *weights)
    groups, unmatched = _group(sd)
    peft = _peft_alphas(metadata)
    patches = []
    for (component, flat), group in groups.items():
        target = tables.get(component, {}).get(flat)
        kind = _kind(group.factors)
        if target is None or kind is None:
            unmatched.extend(group.keys)
            continue
        module, prefix = comps[component]
        param = module.get_parameter(target.param)
        label = prefix + target.param + (f"[{target.rows}]" if target.rows else "")
        _check_shape(kind, group.factors, param, target.rows, f"LoRA {name}, {group.label} -> {label}")
        multiplier = weights[1] if component == "unet" else weights[0]
        patches.append(_Patch(target, kind, group.factors, _scale(kind, group, peft, multiplier)))
        report.matched[group.label] = label
    report.unmatched = sorted(unmatched)
    return patches, report


@torch.no_grad()
def _merge(comps: Mapping[str, tuple[nn.Module, str]], patches: Sequence[_Patch]) -> None:
    """Add the patches' updates to their weights: summed in fp32, rounded once to the weight's dtype."""
    by_param: dict[tuple[str, str], list[_Patch]] = {}
    for p in patches:
        by_param.setdefault((p.target.component, p.target.param), []).append(p)
    for (component, param_name), group in by_param.items():
        module = comps[component][0]
        param = module.get_parameter(param_name)
        total = torch.zeros(param.shape, dtype=torch.float32, device=param.device)
        for p in group:
            f = {k: v.to(param.device, torch.float32) for k, v in p.factors.items() if k != "alpha"}
            rows = total[_rows(total, p.target.rows)]
            rows += _delta(p.kind, f).reshape(rows.shape) * p.scale
        originals = _ORIGINALS.setdefault(module, {})
        originals.setdefault(param_name, param.data)
        param.data = (param.data.float() + total).to(param.dtype)


def apply_loras(model: LoadedModel, loras: Sequence[tuple[LoraSource, LoraWeight]]) -> LoraReport:
    """Merge LoRA files (paths or state dicts, each with a weight or a (te, unet) weight pair) into
    the model's weights. All files are read and checked before any weight changes; a file that
    matches nothing, or whose shapes do not fit the model, raises SfumatoError. Unused keys are
    listed in the report (and logged), never dropped silently. Merges add up across calls; undo
    them all with ``remove_loras``."""
    comps = _components(model)
    tables = _tables(comps)
    patches: list[_Patch] = []
    reports = []
    for i, (source, weight) in enumerate(loras):
        name, sd, metadata = _read(source, i)
        file_patches, report = _plan(name, sd, metadata, _multipliers(weight, name), tables, comps)
        if not file_patches:
            shown = ", ".join(report.unmatched[:5]) or "no tensors"
            raise SfumatoError(f"LoRA {name}: no key matches this {model.family} model (keys: {shown})")
        if report.unmatched:
            log.warning("LoRA %s: %d keys not used, e.g. %s", name, len(report.unmatched),
                        ", ".join(report.unmatched[:5]))
        patches += file_patches
        reports.append(report)
    _merge(comps, patches)
    return LoraReport(reports)


@torch.no_grad()
def remove_loras(model: LoadedModel) -> int:
    """Put back the original tensors of every weight a LoRA patched; returns how many were restored."""
    restored = 0
    for module, _ in _components(model).values():
        for param_name, original in _ORIGINALS.pop(module, {}).items():
            param = module.get_parameter(param_name)
            param.data = original.to(param.device, param.dtype)  # the same tensor unless the model moved
            restored += 1
    return restored


def bake_loras(model: LoadedModel) -> None:
    """Make the LoRAs applied so far part of the base weights: ``remove_loras`` no longer undoes them
    (and their originals are freed)."""
    for module, _ in _components(model).values():
        _ORIGINALS.pop(module, None)


# -- prompts and files --------------------------------------------------------------------------

_TAG = re.compile(r"<(lora|lyco):([^>]*)>")


def _number(text: str, tag: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise SfumatoError(f"prompt tag {tag}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise SfumatoError(f"prompt tag {tag}: weight must be finite")
    return value


def parse_lora_prompt(prompt: str) -> tuple[str, list[tuple[str, LoraWeight]]]:
    """Remove A1111's ``<lora:name>``, ``<lora:name:w>``, ``<lora:name:te:unet>`` (and ``te=``/``unet=``
    named forms; ``<lyco:…>`` alike) from a prompt. Weights default to 1.0 and the UNet weight to
    the text-encoder weight; a pair is returned only when the two differ."""
    loras: list[tuple[str, LoraWeight]] = []

    def take(match: re.Match[str]) -> str:
        tag = match[0]
        name, *args = [a.strip() for a in match[2].split(":")]
        if not name:
            raise SfumatoError(f"prompt tag {tag}: missing LoRA name")
        named = {k.strip(): v.strip() for k, v in (a.split("=", 1) for a in args if "=" in a)}
        positional = [a for a in args if "=" not in a]
        if len(positional) > 2 or set(named) - {"te", "unet"}:
            raise SfumatoError(f"prompt tag {tag}: expected <lora:name:weight> or <lora:name:te_weight:unet_weight>")
        te = _number(named.get("te", positional[0] if positional else "1"), tag)
        unet = _number(named.get("unet", positional[1] if len(positional) > 1 else str(te)), tag)
        loras.append((name, te if te == unet else (te, unet)))
        return ""

    return _TAG.sub(take, prompt), loras


def find_lora(name: str, directory: str | Path) -> Path:
    """The LoRA file ``name`` means inside ``directory`` (see ``checkpoint.folders``: with or without
    extension, optionally in a sub-folder, a bare name found in sub-folders); links leading out of the
    folder and names that leave it are refused, a missing or ambiguous name is an error."""
    return lora_folder(directory).path(name)


def lora_folder(directory: str | Path, label: str = "LoRA folder") -> ModelFolder:
    """The LoRA files in ``directory``, as prompt tags name them."""
    return ModelFolder("LoRA", directory, LORA_EXTENSIONS, label=label)