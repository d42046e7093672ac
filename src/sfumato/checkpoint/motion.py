"""AnimateDiff motion-module files: ``mm_sd_v15.ckpt``, ``mm_sd_v15_v2.ckpt``, ``v3_sd15_mm.ckpt``,
``mm_sdxl_v10_beta.ckpt`` (pickles, read through the allow-list), their .safetensors conversions, and
diffusers ``MotionAdapter`` folders (``config.json`` + weights; keys renamed at this boundary, the
position encodings, which diffusers does not store, computed). The version comes from the tensors:
the mid block's presence, the position encoding's length, the number of levels."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import Tensor

from ..errors import CheckpointError
from ..models.motion import MotionAdapter, MotionConfig, motion_config_from_state, sinusoid
from .io import check_finite, load_file

_DIFFUSERS = [(r"\.attn1\.", ".attention_blocks.0."), (r"\.attn2\.", ".attention_blocks.1."),
              (r"\.norm1\.", ".norms.0."), (r"\.norm2\.", ".norms.1."), (r"\.norm3\.", ".ff_norm.")]


def diffusers_motion_to_ours(sd: dict[str, Tensor], max_frames: int) -> dict[str, Tensor]:
    """A diffusers MotionAdapter state dict → the original layout, position encodings included."""
    out = {}
    for key, value in sd.items():
        m = re.match(r"((?:down_blocks|up_blocks)\.\d+|mid_block)\.motion_modules\.(\d+)\.(.*)", key)
        if not m:
            if key.startswith("conv_in."):
                raise CheckpointError("a motion adapter with its own conv_in (SparseCtrl-style) is not supported")
            raise CheckpointError(f"unexpected key in a MotionAdapter: {key}")
        rest = "." + m[3]
        if rest.endswith(".pos_embed.pe"):   # one encoding per block in diffusers, one per attention here
            block = rest[:-len(".pos_embed.pe")]
            for a in (0, 1):
                out[f"{m[1]}.motion_modules.{m[2]}.temporal_transformer{block}.attention_blocks.{a}.pos_encoder.pe"] = \
                    value.clone()
            continue
        for pattern, repl in _DIFFUSERS:
            rest = re.sub(pattern, repl, rest)
        out[f"{m[1]}.motion_modules.{m[2]}.temporal_transformer{rest}"] = value
    for key in [k for k in out if k.endswith(("attention_blocks.0.to_q.weight", "attention_blocks.1.to_q.weight"))]:
        pe = key.replace("to_q.weight", "pos_encoder.pe")
        if pe not in out:   # not stored: the sinusoid both layouts use
            out[pe] = sinusoid(max_frames, out[key].shape[1])
    return out


def read_motion(path: str | Path) -> dict[str, Tensor]:
    """The original-layout state dict of a motion-module file or diffusers MotionAdapter folder."""
    path = Path(path)
    if path.is_dir():
        config = path / "config.json"
        weights = [path / n for n in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
                   if (path / n).is_file()]
        if not config.is_file() or not weights:
            raise CheckpointError(f"{path.name}: a MotionAdapter folder holds config.json and "
                                  "diffusion_pytorch_model.safetensors")
        try:
            cfg = json.loads(config.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path.name}/config.json does not parse ({e})") from None
        sd, _ = load_file(weights[0])
        return diffusers_motion_to_ours(sd, int(cfg.get("motion_max_seq_length", 32)))
    if not path.is_file():
        raise CheckpointError(f"motion module not found: {path}")
    sd, _ = load_file(path)
    for prefix in ("state_dict.", "module."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    if any(".motion_modules." in k and ".temporal_transformer." not in k for k in sd):   # diffusers' keys
        pe = next((v for k, v in sd.items() if k.endswith("pos_embed.pe")), None)
        return diffusers_motion_to_ours(sd, int(pe.shape[1]) if pe is not None else 32)
    return sd


def load_motion_module(path: str | Path, *, dtype: torch.dtype = torch.float32,
                       device: str | torch.device = "cpu") -> MotionAdapter:
    sd = read_motion(path)
    name = Path(path).name
    if not any(".motion_modules." in k for k in sd):
        raise CheckpointError(f"{name} is not an AnimateDiff motion module (no *.motion_modules.* keys)")
    try:
        cfg = motion_config_from_state(sd)
    except (KeyError, ValueError, IndexError) as e:
        raise CheckpointError(f"{name}: not a motion-module layout this version reads ({e})") from None
    check_finite(sd, name)
    with torch.device("meta"):
        adapter = MotionAdapter(cfg)
    try:
        result = adapter.load_state_dict(sd, strict=False, assign=True)
    except RuntimeError as e:   # a tensor of another shape than its siblings say
        raise CheckpointError(f"{name} does not match an AnimateDiff {cfg.version} layout: {e}") from None
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(f"{name} does not match an AnimateDiff {cfg.version} layout: missing "
                              f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}")
    return adapter.to(device=device, dtype=dtype).eval().requires_grad_(False)


def motion_fits(cfg: MotionConfig, unet_cfg) -> str | None:
    """Why a motion module does not fit a UNet (None: it fits)."""
    widths = tuple(unet_cfg.model_channels * m for m in unet_cfg.channel_mult)
    if widths != cfg.channels:
        return f"it is made for a UNet whose levels are {list(cfg.channels)} wide, this model's are {list(widths)}"
    if cfg.per_down != unet_cfg.num_res_blocks:
        return (f"it has {cfg.per_down} modules per down block, this UNet {unet_cfg.num_res_blocks} ResBlocks per "
                "level")
    if any(ctx != unet_cfg.context_dim for _, ctx, _ in cfg.text_kv):
        return f"its text adapter reads {cfg.text_kv[0][1]}-wide text, this model's is {unet_cfg.context_dim}"
    return None
