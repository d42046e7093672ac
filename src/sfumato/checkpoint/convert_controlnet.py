"""ControlNet checkpoints: the original layout, diffusers ``ControlNetModel`` keys, and the configuration.

Original files hold the ``ControlNet`` module's keys under ``control_model.`` (some also carry the
whole SD model they were trained with, which is not needed) or bare. Diffusers files are renamed
with the UNet's key map (the encoder part) plus the ControlNet-only layers. The configuration is
read from tensor shapes; the attention heads, which shapes cannot tell, come from the base model's
UNet when given, else from the family the shapes name (SD 1.x, SD 2.x, SDXL).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from ..errors import CheckpointError
from ..models.controlnet import ControlNetConfig
from ..models.unet import UNetConfig
from .convert_unet import _key_map, unet_config_from_diffusers
from .detect import is_ignorable, unet_signature

ORIGINAL_PREFIX = "control_model."
# Keys of the SD model some original ControlNet files were saved with: not part of the ControlNet.
_BASE_MODEL_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "model_ema.")
_ENCODER = ("conv_in.", "time_embedding.", "add_embedding.", "down_blocks.", "mid_block.")
_DIFFUSERS_MARKER = "controlnet_cond_embedding.conv_in.weight"

# family: (model_channels, context_dim, adm_in_channels) and the heads of its UNet
FAMILIES: dict[str, tuple[tuple[int, int, int | None], dict[str, int]]] = {
    "sd1": ((320, 768, None), {"num_heads": 8, "num_head_channels": -1}),
    "sd2": ((320, 1024, None), {"num_heads": 8, "num_head_channels": 64}),
    "sdxl": ((320, 2048, 2816), {"num_heads": 8, "num_head_channels": 64}),
}


def is_diffusers_controlnet(sd: Mapping[str, Tensor]) -> bool:
    return _DIFFUSERS_MARKER in sd


def original_state_dict(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The ControlNet's own keys from an original-layout file (``control_model.`` prefix or bare)."""
    if "lora_controlnet" in sd:
        raise CheckpointError("this is a Control-LoRA file (key 'lora_controlnet'); Control-LoRAs are not supported")
    if not any(k.startswith(ORIGINAL_PREFIX) for k in sd):
        if "input_hint_block.0.weight" not in sd:
            raise CheckpointError(
                "not a ControlNet file: no 'control_model.' keys, no bare 'input_hint_block.' keys and no "
                f"diffusers '{_DIFFUSERS_MARKER}'"
            )
        return dict(sd)
    out, stray = {}, []
    for key, value in sd.items():
        if key.startswith(ORIGINAL_PREFIX):
            out[key[len(ORIGINAL_PREFIX):]] = value
        elif not key.startswith(_BASE_MODEL_PREFIXES) and not is_ignorable(key):
            stray.append(key)
    if stray:
        raise CheckpointError(
            f"ControlNet file has {len(stray)} keys outside 'control_model.', e.g. {', '.join(stray[:5])}"
        )
    return out


# -- diffusers → original keys ---------------------------------------------------------------------


def _key_map_controlnet(cfg: ControlNetConfig) -> dict[str, str]:
    """Every diffusers ControlNetModel parameter key mapped to its original key."""
    keys = {k: v for k, v in _key_map(cfg.unet).items() if k.startswith(_ENCODER)}
    hint = ["controlnet_cond_embedding.conv_in"]
    hint += [f"controlnet_cond_embedding.blocks.{i}" for i in range(2 * (len(cfg.hint_widths) - 1))]
    hint.append("controlnet_cond_embedding.conv_out")
    convs = [(name, f"input_hint_block.{2 * i}") for i, name in enumerate(hint)]
    n_blocks = len(cfg.unet.channel_mult) * (cfg.unet.num_res_blocks + 1)  # conv_in + res blocks + downsamplers
    convs += [(f"controlnet_down_blocks.{i}", f"zero_convs.{i}.0") for i in range(n_blocks)]
    convs.append(("controlnet_mid_block", "middle_block_out.0"))
    for src, dst in convs:
        for p in ("weight", "bias"):
            keys[f"{src}.{p}"] = f"{dst}.{p}"
    return keys


def diffusers_controlnet_to_ldm(sd: Mapping[str, Tensor], cfg: ControlNetConfig) -> dict[str, Tensor]:
    """Rename a diffusers ControlNetModel state dict to original keys (tensors shared, not copied)."""
    keys = _key_map_controlnet(cfg)
    unknown = sorted(k for k in sd if k not in keys)
    if unknown:
        shown = ", ".join(unknown[:10]) + (f" … ({len(unknown)} in all)" if len(unknown) > 10 else "")
        raise CheckpointError(f"unexpected diffusers ControlNet keys for this configuration: {shown}")
    return {keys[k]: v for k, v in sd.items()}


def controlnet_config_from_diffusers(config: Mapping[str, Any]) -> ControlNetConfig:
    """A ControlNetConfig from a diffusers ControlNetModel ``config.json`` dict; unsupported options raise."""
    if config.get("global_pool_conditions", False):
        raise CheckpointError("diffusers ControlNet config global_pool_conditions=true (shuffle) is not supported")
    if config.get("controlnet_conditioning_channel_order", "rgb") != "rgb":
        raise CheckpointError("diffusers ControlNet config controlnet_conditioning_channel_order must be 'rgb'")
    down = list(config.get("down_block_types", ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)))
    up = [t.replace("Down", "Up") for t in reversed(down)]  # a ControlNet has no decoder: mirror the encoder
    try:
        unet = unet_config_from_diffusers({**config, "down_block_types": down, "up_block_types": up})
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    return ControlNetConfig(
        unet,
        hint_channels=config.get("conditioning_channels", 3),
        hint_widths=tuple(config.get("conditioning_embedding_out_channels") or (16, 32, 96, 256)),
    )


def _unet_config(**fields: Any) -> UNetConfig:
    try:
        return UNetConfig(**fields)
    except ValueError as e:
        raise CheckpointError(f"unsupported ControlNet layout: {e}") from None


def _indices(sd: Mapping[str, Tensor], pattern: str) -> list[int]:
    return sorted({int(m.group(1)) for k in sd if (m := re.match(pattern, k))})


def diffusers_shape_config(sd: Mapping[str, Tensor]) -> ControlNetConfig:
    """The configuration of a diffusers ControlNet file without its config.json, read from shapes
    (heads left at their defaults: `complete_config` settles them)."""
    mc, in_channels = sd["conv_in.weight"].shape[:2]
    levels = _indices(sd, r"down_blocks\.(\d+)\.")
    depth = [len(_indices(sd, rf"down_blocks\.{i}\.attentions\.0\.transformer_blocks\.(\d+)\.")) for i in levels]
    attn2 = next((v for k, v in sd.items() if k.endswith("attn2.to_k.weight")), None)
    proj_in = next((v for k, v in sd.items() if k.endswith(".proj_in.weight")), None)
    adm = sd.get("add_embedding.linear_1.weight")
    unet = _unet_config(
        in_channels=in_channels,
        model_channels=mc,
        channel_mult=tuple(sd[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0] // mc for i in levels),
        num_res_blocks=len(_indices(sd, r"down_blocks\.0\.resnets\.(\d+)\.")),
        transformer_depth=tuple(depth),
        transformer_depth_middle=len(_indices(sd, r"mid_block\.attentions\.0\.transformer_blocks\.(\d+)\.")),
        context_dim=attn2.shape[1] if attn2 is not None else 768,
        use_linear_in_transformer=proj_in is not None and proj_in.ndim == 2,
        adm_in_channels=adm.shape[1] if adm is not None else None,
    )
    blocks = _indices(sd, r"controlnet_cond_embedding\.blocks\.(\d+)\.")
    w0 = sd["controlnet_cond_embedding.conv_in.weight"]
    widths = (w0.shape[0], *(sd[f"controlnet_cond_embedding.blocks.{i}.weight"].shape[0] for i in blocks[1::2]))
    return ControlNetConfig(unet, hint_channels=w0.shape[1], hint_widths=widths)


# -- configuration from original keys ----------------------------------------------------------------


def shape_config(sd: Mapping[str, Tensor]) -> ControlNetConfig:
    """What the shapes of an original-layout (prefix-stripped) state dict say; heads at their defaults."""
    if "input_hint_block.0.weight" not in sd or "input_blocks.0.0.weight" not in sd:
        raise CheckpointError("not a ControlNet state dict: no 'input_hint_block.0.weight' / 'input_blocks.0.0.weight'")
    # unet_signature reads out_channels from the UNet's output conv, which a ControlNet lacks:
    # give it a placeholder (a ControlNet's "output" is its residuals, out_channels is unused).
    probe = {**sd, "out.2.weight": torch.empty(sd["input_blocks.0.0.weight"].shape[1], 1, device="meta")}
    sig = unet_signature(probe, prefix="")
    if sig["context_dim"] is None:
        raise CheckpointError("ControlNet without cross-attention layers is not supported")
    unet = _unet_config(**sig)
    convs = _indices(sd, r"input_hint_block\.(\d+)\.weight")
    w0 = sd["input_hint_block.0.weight"]
    widths = (w0.shape[0], *(sd[f"input_hint_block.{i}.weight"].shape[0] for i in convs[1:-1][1::2]))
    return ControlNetConfig(unet, hint_channels=w0.shape[1], hint_widths=widths)


def detect_family(cfg: ControlNetConfig) -> str | None:
    u = cfg.unet
    key = (u.model_channels, u.context_dim, u.adm_in_channels)
    return next((name for name, (sig, _) in FAMILIES.items() if sig == key), None)


def complete_config(cfg: ControlNetConfig, base: UNetConfig | None = None) -> tuple[ControlNetConfig, str]:
    """Fill in what shapes cannot tell (attention heads, norm groups): from `base` (the UNet the
    ControlNet will steer, whose encoder it must match), else from the family the shapes name.
    Returns the config and the family (or "custom")."""
    family = detect_family(cfg)
    u = cfg.unet
    if base is not None:
        for field in ("model_channels", "channel_mult", "num_res_blocks", "context_dim", "adm_in_channels"):
            if getattr(u, field) != getattr(base, field):
                raise CheckpointError(
                    f"ControlNet ({family or 'custom'}) does not fit this model: {field} is "
                    f"{getattr(u, field)} in the ControlNet, {getattr(base, field)} in the model"
                )
        heads = {"num_heads": base.num_heads, "num_head_channels": base.num_head_channels,
                 "norm_groups": base.norm_groups}
    elif family is not None:
        heads = FAMILIES[family][1]
    else:
        raise CheckpointError(
            f"unknown ControlNet layout (model_channels={u.model_channels}, context_dim={u.context_dim}, "
            f"adm_in_channels={u.adm_in_channels}); known: {', '.join(FAMILIES)} — pass the base model's UNet config"
        )
    return replace(cfg, unet=replace(u, **heads)), family or "custom"
