"""CLIP image encoder keys at the import boundary: transformers / open_clip / unCLIP -> ours.

Ours are open_clip's ``VisionTransformer`` keys (``models/clip_vision.py``), so open_clip's
``visual.`` and unCLIP's ``embedder.model.visual.`` weights only lose a prefix; transformers'
``CLIPVisionModel[WithProjection]`` keys are renamed and its q/k/v packed. Pure functions over
state dicts; nothing here reads files.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

import torch
from torch import Tensor

from ..models.clip_vision import VISION_PRESETS, VisionConfig

# Whole-key renames, transformers -> ours (after dropping ``vision_model.``).
_TOP = {
    "embeddings.class_embedding": "class_embedding",
    "embeddings.patch_embedding.weight": "conv1.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "pre_layrnorm.weight": "ln_pre.weight",
    "pre_layrnorm.bias": "ln_pre.bias",
    "post_layernorm.weight": "ln_post.weight",
    "post_layernorm.bias": "ln_post.bias",
}
# Per-layer module renames, transformers -> ours (q/k/v are packed separately).
_LAYER = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_HF_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")
_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
log = logging.getLogger(__name__)
_BLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.")
# Where open_clip-layout vision towers sit in the files we meet, longest first.
VISUAL_PREFIXES = ("embedder.model.visual.", "model.visual.", "visual.")


def hf_vision_to_ours(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """transformers ``CLIPVisionModel`` / ``CLIPVisionModelWithProjection`` keys -> ours.

    Accepts keys with or without the ``vision_model.`` prefix (transformers 5 saves a bare
    ``CLIPVisionModel`` without it). ``visual_projection.weight`` [proj, width] becomes ``proj``
    [width, proj]; ``position_ids`` is dropped; any other key is an error.
    """
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    for full, value in sd.items():
        key = full.removeprefix("vision_model.")
        layer = _HF_LAYER.fullmatch(key)
        if key == "embeddings.position_ids":
            continue
        if key in _TOP:
            out[_TOP[key]] = value[0] if key == "embeddings.class_embedding" and value.ndim == 2 else value
        elif key == "visual_projection.weight":
            out["proj"] = value.t().contiguous()
        elif layer and layer[2] in _QKV:
            qkv.setdefault((layer[1], layer[3]), {})[layer[2][10]] = value
        elif layer and layer[2] in _LAYER:
            out[f"transformer.resblocks.{layer[1]}.{_LAYER[layer[2]]}.{layer[3]}"] = value
        else:
            raise KeyError(f"hf_vision_to_ours: unexpected key {full!r}")
    for (index, kind), parts in qkv.items():
        missing = [p for p in "qkv" if p not in parts]
        if missing:
            raise KeyError(f"hf_vision_to_ours: layer {index} lacks {', '.join(p + '_proj.' + kind for p in missing)}")
        out[f"transformer.resblocks.{index}.attn.in_proj_{kind}"] = torch.cat([parts[p] for p in "qkv"])
    return out


def openclip_vision_to_ours(sd: dict[str, Tensor], prefix: str | None = None) -> dict[str, Tensor]:
    """open_clip / OpenAI CLIP / unCLIP weights -> ours: keep the keys under the vision prefix, strip it.

    ``prefix=None`` finds the first of ``VISUAL_PREFIXES`` present; a state dict that already has
    a bare ``conv1.weight`` is returned as is. Other keys (text tower, UNet, ...) are left out.
    """
    if prefix is None:
        if "conv1.weight" in sd:
            return dict(sd)
        prefix = next((p for p in VISUAL_PREFIXES if p + "conv1.weight" in sd), None)
        if prefix is None:
            raise KeyError(f"openclip_vision_to_ours: no vision tower under any of {VISUAL_PREFIXES}")
    out = {k.removeprefix(prefix): v for k, v in sd.items() if k.startswith(prefix)}
    if "conv1.weight" not in out:
        raise KeyError(f"openclip_vision_to_ours: no {prefix}conv1.weight")
    return out


def _shape(sd: dict[str, Tensor]) -> dict[str, Any]:
    """Everything tensor shapes tell about a tower in our keys (all but heads and activation)."""
    for key in (
        "conv1.weight",
        "positional_embedding",
        "transformer.resblocks.0.mlp.c_fc.weight",
    ):
        if key not in sd:
            raise KeyError(f"vision_config_from_state: missing {key!r}")
    width, _, patch, _ = sd["conv1.weight"].shape
    grid = math.isqrt(sd["positional_embedding"].shape[0] - 1)
    if grid * grid + 1 != sd["positional_embedding"].shape[0]:
        raise ValueError(f"positional_embedding: {sd['positional_embedding'].shape[0]} is not 1 + a square")
    proj = sd.get("proj")
    return {
        "image_size": grid * patch,
        "patch_size": patch,
        "width": width,
        "layers": 1 + max(int(m[1]) for k in sd if (m := _BLOCK.match(k))),
        "mlp_dim": sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        "projection_dim": None if proj is None else proj.shape[1],
    }


def vision_config_from_state(
    sd: dict[str, Tensor],
    act: str | None = None,
    heads: int | None = None,
    eps: float = 1e-5,
) -> VisionConfig:
    """Rebuild the VisionConfig of a tower in our keys from its tensor shapes.

    Shapes cannot tell the head count (ViT-L/14 has 16 heads of 64, ViT-H/14 16 of 80, bigG 16 of
    104) nor the activation (QuickGELU for OpenAI's weights, GELU for OpenCLIP's, same shapes).
    Both come from the preset whose (image_size, patch, width, layers, mlp_dim) match, unless given
    (an activation taken from a preset is logged at INFO); with no matching preset they must be
    given, or this raises. Pass ``act="gelu"`` for LAION's OpenCLIP ViT-L/14, which has OpenAI
    ViT-L/14's shapes but GELU. The projection is whatever the weights carry (``proj`` absent: none).
    """
    shape = _shape(sd)
    keys = ("image_size", "patch_size", "width", "layers", "mlp_dim")
    matches = [p for p in VISION_PRESETS.values() if all(getattr(p, k) == shape[k] for k in keys)]
    if len(matches) > 1:
        raise ValueError(f"vision_config_from_state: {len(matches)} presets match {shape}")
    if not matches and (act is None or heads is None):
        raise ValueError(f"vision_config_from_state: no preset matches {shape}; pass act= and heads= explicitly")
    preset = matches[0] if matches else None
    if act is None:
        log.info("vision tower: activation %r from the preset with its shapes (pass act= to override)", preset.act)
    return VisionConfig(
        heads=heads if heads is not None else preset.heads,
        act=act if act is not None else preset.act,
        eps=eps,
        **shape,
    )


def vision_config_from_hf(config: dict[str, Any], with_projection: bool = True) -> VisionConfig:
    """A transformers ``CLIPVisionConfig`` (``config.json``'s dict, or its ``vision_config``) -> ours.

    Missing fields take transformers' defaults. ``with_projection=False`` for a ``CLIPVisionModel``,
    whose config still names a ``projection_dim`` it has no weights for.
    """
    c = config.get("vision_config", config)
    act = c.get("hidden_act", "quick_gelu")
    if act not in ("quick_gelu", "gelu"):
        raise ValueError(f"hidden_act: unsupported {act!r} (expected 'quick_gelu' or 'gelu')")
    proj = config.get("projection_dim", c.get("projection_dim", 512)) if with_projection else None
    return VisionConfig(
        image_size=c.get("image_size", 224),
        patch_size=c.get("patch_size", 32),
        width=c.get("hidden_size", 768),
        layers=c.get("num_hidden_layers", 12),
        heads=c.get("num_attention_heads", 12),
        mlp_dim=c.get("intermediate_size", 3072),
        projection_dim=proj,
        act=act,
        eps=c.get("layer_norm_eps", 1e-5),
    )
