"""CLIP text encoder key conversion: transformers (diffusers folders) ⇄ open_clip layout.

Pure functions over unprefixed state dicts; callers add or strip ``text_encoder/``,
``cond_stage_model.model.``, ``conditioner.embedders.1.model.`` and the like.
"""

from __future__ import annotations

import math
import re

import torch
from torch import Tensor

_POSITION_IDS = "text_model.embeddings.position_ids"

# Whole-key renames, transformers -> open_clip.
_TOP = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
# Per-layer module renames, transformers -> open_clip (q/k/v are packed separately).
_LAYER = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_HF_LAYER = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")
_OC_LAYER = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)")
_OC_IN_PROJ = re.compile(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)")


def _with_text_model_prefix(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """transformers ≥ 5 saves a bare ``CLIPTextModel`` without the ``text_model.`` prefix that older
    versions (and every released diffusers folder) use; bring both to the prefixed form."""
    bare = ("embeddings.", "encoder.", "final_layer_norm.")
    return {("text_model." + k if k.startswith(bare) else k): v for k, v in sd.items()}


def hf_to_openclip(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """transformers ``CLIPTextModel[WithProjection]`` keys -> open_clip text tower keys.

    Keeps however many layers the source has (diffusers' SD2 encoder has 23 of 24). Without a
    ``text_projection.weight`` in the source there is none in the result. Adds the default
    ``logit_scale`` (log 1/0.07) when the source has none, as SD checkpoints carry one.
    """
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, value in _with_text_model_prefix(sd).items():
        layer = _HF_LAYER.fullmatch(key)
        if key == _POSITION_IDS:
            continue
        if key in _TOP:
            out[_TOP[key]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.t().contiguous()
        elif key == "logit_scale":
            out[key] = value
        elif layer and layer[2] in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            qkv.setdefault((layer[1], layer[3]), {})[layer[2][10]] = value
        elif layer and layer[2] in _LAYER:
            out[f"transformer.resblocks.{layer[1]}.{_LAYER[layer[2]]}.{layer[3]}"] = value
        else:
            raise KeyError(f"hf_to_openclip: unexpected key {key!r}")
    for (index, kind), parts in qkv.items():
        missing = [p for p in "qkv" if p not in parts]
        if missing:
            raise KeyError(f"hf_to_openclip: layer {index} lacks {', '.join(p + '_proj.' + kind for p in missing)}")
        out[f"transformer.resblocks.{index}.attn.in_proj_{kind}"] = torch.cat([parts[p] for p in "qkv"])
    if "logit_scale" not in out:
        out["logit_scale"] = torch.tensor(math.log(1 / 0.07), dtype=next(iter(sd.values())).dtype)
    return out


def openclip_to_hf(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """open_clip text tower keys -> transformers ``CLIPTextModel[WithProjection]`` keys.

    The inverse of :func:`hf_to_openclip`; ``logit_scale`` has no transformers counterpart and is dropped.
    """
    top = {v: k for k, v in _TOP.items()}
    layer_names = {v: k for k, v in _LAYER.items()}
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        in_proj = _OC_IN_PROJ.fullmatch(key)
        layer = _OC_LAYER.fullmatch(key)
        if key == "logit_scale":
            continue
        if key in top:
            out[top[key]] = value
        elif key == "text_projection":
            out["text_projection.weight"] = value.t().contiguous()
        elif in_proj:
            prefix = f"text_model.encoder.layers.{in_proj[1]}.self_attn"
            for name, part in zip("qkv", value.chunk(3)):
                out[f"{prefix}.{name}_proj.{in_proj[2]}"] = part.clone()
        elif layer and layer[2] in layer_names:
            out[f"text_model.encoder.layers.{layer[1]}.{layer_names[layer[2]]}.{layer[3]}"] = value
        else:
            raise KeyError(f"openclip_to_hf: unexpected key {key!r}")
    return out


def hf_text_sd(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """A transformers-layout CLIP-L state dict (``text_model.…`` keys) without the ``position_ids``
    buffer some files carry."""
    return {k: v for k, v in _with_text_model_prefix(sd).items() if k != _POSITION_IDS}
