"""VAE state dicts: diffusers `AutoencoderKL` keys <-> LDM keys (the layout of `models.vae`).

One table of key templates serves both directions, so the two conversions are inverse by
construction. Placeholders: {c} encoder/decoder, {i} {j} indices, {u} a decoder level index
(diffusers counts up_blocks from the lowest resolution, LDM from the highest, so it is mirrored),
{r} a resnet layer, {a} an attention layer, {p} weight/bias.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import Tensor

_TEMPLATES: list[tuple[str, str]] = [  # (diffusers, LDM)
    ("quant_conv.{p}", "quant_conv.{p}"),
    ("post_quant_conv.{p}", "post_quant_conv.{p}"),
    ("{c}.conv_in.{p}", "{c}.conv_in.{p}"),
    ("{c}.conv_out.{p}", "{c}.conv_out.{p}"),
    ("{c}.conv_norm_out.{p}", "{c}.norm_out.{p}"),
    ("{c}.mid_block.resnets.0.{r}.{p}", "{c}.mid.block_1.{r}.{p}"),
    ("{c}.mid_block.resnets.1.{r}.{p}", "{c}.mid.block_2.{r}.{p}"),
    ("{c}.mid_block.attentions.0.{a}.{p}", "{c}.mid.attn_1.{a}.{p}"),
    ("encoder.down_blocks.{i}.resnets.{j}.{r}.{p}", "encoder.down.{i}.block.{j}.{r}.{p}"),
    ("encoder.down_blocks.{i}.downsamplers.0.conv.{p}", "encoder.down.{i}.downsample.conv.{p}"),
    ("decoder.up_blocks.{u}.resnets.{j}.{r}.{p}", "decoder.up.{u}.block.{j}.{r}.{p}"),
    ("decoder.up_blocks.{u}.upsamplers.0.conv.{p}", "decoder.up.{u}.upsample.conv.{p}"),
]

_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
# Attention names of diffusers folders saved before v0.14 (diffusers still loads them).
_LEGACY_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEGACY_RE = re.compile(r"^((?:encoder|decoder)\.mid_block\.attentions\.0)\.(query|key|value|proj_attn)\.")

_LDM_ATTN_WEIGHT = re.compile(r"(?:^|\.)mid\.attn_1\.(?:q|k|v|proj_out)\.weight$")


def _compile(template: str, names: dict[str, dict[str, str] | None]) -> re.Pattern[str]:
    """Template -> regex with one named group per placeholder; `names[f]` lists a field's spellings."""
    parts = re.split(r"\{(\w)\}", template)
    out = []
    for n, part in enumerate(parts):
        if n % 2 == 0:
            out.append(re.escape(part))
        else:
            choices = names[part]
            alt = r"\d+" if choices is None else "|".join(re.escape(k) for k in choices)
            out.append(f"(?P<{part}>{alt})")
    return re.compile("^" + "".join(out) + "$")


def _convert(
    sd: dict[str, Tensor], to_ldm: bool, num_up: int, reshape: Callable[[Tensor], Tensor]
) -> dict[str, Tensor]:
    resnet = _RESNET if to_ldm else {v: k for k, v in _RESNET.items()}
    attn = _ATTN if to_ldm else {v: k for k, v in _ATTN.items()}
    fields = {
        "c": {"encoder": "encoder", "decoder": "decoder"},
        "p": {"weight": "weight", "bias": "bias"},
        "r": resnet,
        "a": attn,
        "i": None,
        "j": None,
        "u": None,
    }
    pairs = _TEMPLATES if to_ldm else [(ldm, diff) for diff, ldm in _TEMPLATES]
    rules = [(_compile(src, fields), dst) for src, dst in pairs]
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, tensor in sd.items():
        for pattern, dst in rules:
            m = pattern.match(key)
            if m:
                break
        else:
            unknown.append(key)
            continue
        values = {}
        for name, value in m.groupdict().items():
            if name == "u":
                values[name] = str(num_up - 1 - int(value))
            elif fields[name] is None:
                values[name] = value
            else:
                values[name] = fields[name][value]
        new_key = dst.format(**values)
        if new_key in out:
            raise ValueError(f"two VAE keys map to {new_key!r} (the second is {key!r})")
        if _LDM_ATTN_WEIGHT.search(new_key if to_ldm else key):
            tensor = reshape(tensor)
        out[new_key] = tensor
    if unknown:
        unknown.sort()
        shown = ", ".join(unknown[:10]) + (f" ... and {len(unknown) - 10} more" if len(unknown) > 10 else "")
        raise ValueError(f"unknown VAE keys ({len(unknown)}): {shown}")
    return out


def _num_levels(sd: dict[str, Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = [int(m.group(1)) for m in map(pattern.match, sd) if m]
    return max(found) + 1 if found else 0


def _to_conv(w: Tensor) -> Tensor:
    return w.reshape(*w.shape, 1, 1) if w.ndim == 2 else w


def _to_linear(w: Tensor) -> Tensor:
    return w.reshape(w.shape[0], w.shape[1]) if w.ndim == 4 else w


def diffusers_vae_to_ldm(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename a diffusers AutoencoderKL state dict to LDM keys; linear attention weights become 1x1 convs."""
    modern = {}
    for key, tensor in sd.items():
        m = _LEGACY_RE.match(key)
        new_key = key if m is None else f"{m.group(1)}.{_LEGACY_ATTN[m.group(2)]}.{key[m.end():]}"
        if new_key in modern:
            raise ValueError(f"VAE key {key!r} duplicates {new_key!r}")
        modern[new_key] = tensor
    return _convert(modern, True, _num_levels(modern, "decoder.up_blocks."), _to_conv)


def ldm_vae_to_diffusers(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of `diffusers_vae_to_ldm`: LDM keys to diffusers keys, 1x1 conv attention weights to linear."""
    return _convert(sd, False, _num_levels(sd, "decoder.up."), _to_linear)


def normalize_vae_state_dict(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Reshape 2-D mid-attention q/k/v/proj_out weights [C, C] (some single files) to [C, C, 1, 1]."""
    return {k: _to_conv(v) if _LDM_ATTN_WEIGHT.search(k) else v for k, v in sd.items()}
