"""Segment Anything weights: the published ``sam_vit_{b,l,h}_*.pth`` files (a flat state dict in the
original layout; a pickle, read through the allow-list), their .safetensors conversions, and
transformers ``SamModel`` folders (``config.json`` + weights; keys renamed at this boundary).

The configuration comes from the tensor shapes: the encoder's width (patch embedding), depth
(blocks), head width (the relative-position tables' columns), window (a windowed block's table has
2·window − 1 rows, a global block's 2·grid − 1), and the decoder's sizes. Only the decoder's head
count is not in the shapes: SAM's 8, or ``config.json``'s for a transformers folder.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import Tensor

from ..errors import CheckpointError
from ..models.sam import SAM, SAMConfig
from .io import check_finite, load_file

_HF_TOP = {
    "shared_image_embedding.positional_embedding": "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
    "vision_encoder.pos_embed": "image_encoder.pos_embed",
    "vision_encoder.patch_embed.projection.weight": "image_encoder.patch_embed.proj.weight",
    "vision_encoder.patch_embed.projection.bias": "image_encoder.patch_embed.proj.bias",
}
_HF_MODULES = [   # (transformers module path, ours), applied to every key's prefix in order
    (r"vision_encoder\.layers\.(\d+)\.layer_norm([12])\.", r"image_encoder.blocks.\1.norm\2."),
    (r"vision_encoder\.layers\.(\d+)\.", r"image_encoder.blocks.\1."),
    (r"vision_encoder\.neck\.conv1\.", "image_encoder.neck.0."),
    (r"vision_encoder\.neck\.layer_norm1\.", "image_encoder.neck.1."),
    (r"vision_encoder\.neck\.conv2\.", "image_encoder.neck.2."),
    (r"vision_encoder\.neck\.layer_norm2\.", "image_encoder.neck.3."),
    (r"prompt_encoder\.mask_embed\.conv1\.", "prompt_encoder.mask_downscaling.0."),
    (r"prompt_encoder\.mask_embed\.layer_norm1\.", "prompt_encoder.mask_downscaling.1."),
    (r"prompt_encoder\.mask_embed\.conv2\.", "prompt_encoder.mask_downscaling.3."),
    (r"prompt_encoder\.mask_embed\.layer_norm2\.", "prompt_encoder.mask_downscaling.4."),
    (r"prompt_encoder\.mask_embed\.conv3\.", "prompt_encoder.mask_downscaling.6."),
    (r"prompt_encoder\.point_embed\.", "prompt_encoder.point_embeddings."),
    (r"mask_decoder\.transformer\.layers\.(\d+)\.layer_norm(\d)\.", r"mask_decoder.transformer.layers.\1.norm\2."),
    (r"mask_decoder\.transformer\.layer_norm_final_attn\.", "mask_decoder.transformer.norm_final_attn."),
    (r"mask_decoder\.upscale_conv1\.", "mask_decoder.output_upscaling.0."),
    (r"mask_decoder\.upscale_layer_norm\.", "mask_decoder.output_upscaling.1."),
    (r"mask_decoder\.upscale_conv2\.", "mask_decoder.output_upscaling.3."),
    (r"(mask_decoder\.(?:output_hypernetworks_mlps\.\d+|iou_prediction_head))\.layers\.(\d+)\.",
     lambda m: f"{m[1]}.layers.{int(m[2]) + 1}."),
    (r"(mask_decoder\.(?:output_hypernetworks_mlps\.\d+|iou_prediction_head))\.proj_in\.", r"\1.layers.0."),
]
_DROPPED = ("prompt_encoder.shared_embedding.positional_embedding",)   # a copy of the shared one


def hf_sam_to_ours(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """transformers ``SamModel`` keys → the original layout (``proj_out`` is the MLPs' last layer)."""
    depth = {}
    for key in sd:
        m = re.match(r"(mask_decoder\.(?:output_hypernetworks_mlps\.\d+|iou_prediction_head))\.layers\.(\d+)\.", key)
        if m:
            depth[m[1]] = max(depth.get(m[1], 0), int(m[2]) + 1)
    out = {}
    for key, value in sd.items():
        if key in _DROPPED:
            continue
        new = _HF_TOP.get(key)
        if new is None:
            new = key
            m = re.match(r"(mask_decoder\.(?:output_hypernetworks_mlps\.\d+|iou_prediction_head))\.proj_out\.", key)
            if m:
                new = f"{m[1]}.layers.{depth.get(m[1], 0) + 1}." + key[m.end():]
            else:
                for pattern, repl in _HF_MODULES:
                    new, n = re.subn("^" + pattern, repl, new)
                    if n:
                        break
        out[new] = value
    return out


def sam_config_from_state(sd: dict[str, Tensor], decoder_heads: int = 8) -> SAMConfig:
    """A SAM's configuration from its tensor shapes (see the module docstring)."""
    try:
        width, _, patch, _ = sd["image_encoder.patch_embed.proj.weight"].shape
        grid = sd["image_encoder.pos_embed"].shape[1]
        blocks = sorted({int(m[1]) for k in sd if (m := re.match(r"image_encoder\.blocks\.(\d+)\.", k))})
        rows = [sd[f"image_encoder.blocks.{i}.attn.rel_pos_h"].shape[0] for i in blocks]
        head_dim = sd["image_encoder.blocks.0.attn.rel_pos_h"].shape[1]
        windows = {r for r in rows if r != 2 * grid - 1}
        layers = {int(m[1]) for k in sd if (m := re.match(r"mask_decoder\.transformer\.layers\.(\d+)\.", k))}
        iou = [sd[f"mask_decoder.iou_prediction_head.layers.{i}.weight"] for i in range(3)]
        cfg = SAMConfig(
            width=width, depth=len(blocks), heads=width // head_dim,
            global_blocks=tuple(i for i, r in zip(blocks, rows) if r == 2 * grid - 1),
            image_size=grid * patch, patch_size=patch, window=(windows.pop() + 1) // 2 if windows else 14,
            mlp_ratio=sd["image_encoder.blocks.0.mlp.lin1.weight"].shape[0] / width,
            prompt_dim=sd["image_encoder.neck.0.weight"].shape[0],
            mask_in_chans=sd["prompt_encoder.mask_downscaling.3.weight"].shape[0],
            decoder_depth=len(layers), decoder_heads=decoder_heads,
            decoder_mlp=sd["mask_decoder.transformer.layers.0.mlp.lin1.weight"].shape[0],
            iou_hidden=iou[0].shape[0], multimask=sd["mask_decoder.mask_tokens.weight"].shape[0] - 1,
        )
    except (KeyError, ValueError, IndexError) as e:
        raise CheckpointError(f"not a Segment Anything model (missing or odd tensor: {e})",
                              "not a Segment Anything model") from None
    if windows:
        raise CheckpointError(f"Segment Anything model with several window sizes {sorted(windows)}",
                              "unsupported Segment Anything layout")
    return cfg


def load_sam(path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> SAM:
    """A SAM model from a published file or a transformers folder, ready on ``device``."""
    path = Path(path)
    heads = 8
    if path.is_dir():
        weights = next((path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()), None)
        if weights is None:
            raise CheckpointError(f"{path} holds no model.safetensors or pytorch_model.bin", "the folder holds no weights")
        config = path / "config.json"
        if config.is_file() and config.stat().st_size < 1 << 20:
            try:
                heads = json.loads(config.read_text()).get("mask_decoder_config", {}).get("num_attention_heads", 8)
            except ValueError:
                raise CheckpointError(f"{config} is not JSON", "config.json cannot be read") from None
        sd, _ = load_file(weights)
    elif path.is_file():
        sd, _ = load_file(path)
    else:
        raise CheckpointError(f"Segment Anything model not found: {path}", "not found")
    if any(k.startswith("vision_encoder.") for k in sd):
        sd = hf_sam_to_ours(sd)
    cfg = sam_config_from_state(sd, heads)
    check_finite(sd, f"the weights of {path.name}")
    with torch.device("meta"):
        model = SAM(cfg)
    result = model.load_state_dict(sd, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        some = (result.missing_keys or result.unexpected_keys)[:3]
        raise CheckpointError(f"{path.name}: the tensors do not fit a Segment Anything model (e.g. {', '.join(some)})",
                              "the weights do not fit a Segment Anything model")
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
