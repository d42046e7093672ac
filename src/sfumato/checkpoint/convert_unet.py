"""Diffusers ``UNet2DConditionModel`` ⇄ LDM UNet: state-dict keys and config.

The key map is built from a ``UNetConfig`` and lists every parameter of that UNet, so a key
outside it (another architecture, a typo, a missed variant) is an error rather than a silent drop.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from sfumato.models.unet import UNetConfig

_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_TRANSFORMER_BLOCK = ("norm1", "norm2", "norm3", "attn1.to_out.0", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")


def _key_map(cfg: UNetConfig) -> dict[str, str]:
    """Every diffusers parameter key of a UNet with config `cfg`, mapped to its LDM key."""
    keys: dict[str, str] = {}

    def add(src: str, dst: str, params: tuple[str, ...] = ("weight", "bias")) -> None:
        for p in params:
            keys[f"{src}.{p}"] = f"{dst}.{p}"

    def resnet(src: str, dst: str, shortcut: bool) -> None:
        for s, d in _RESNET.items():
            if s != "conv_shortcut" or shortcut:
                add(f"{src}.{s}", f"{dst}.{d}")

    def transformer(src: str, dst: str, depth: int) -> None:
        for name in ("norm", "proj_in", "proj_out"):
            add(f"{src}.{name}", f"{dst}.{name}")
        for k in range(depth):
            for name in _TRANSFORMER_BLOCK:
                add(f"{src}.transformer_blocks.{k}.{name}", f"{dst}.transformer_blocks.{k}.{name}")
            for name in ("to_q", "to_k", "to_v"):
                for attn in ("attn1", "attn2"):
                    block = f"transformer_blocks.{k}.{attn}.{name}"
                    add(f"{src}.{block}", f"{dst}.{block}", ("weight",))

    add("conv_in", "input_blocks.0.0")
    add("time_embedding.linear_1", "time_embed.0")
    add("time_embedding.linear_2", "time_embed.2")
    if cfg.adm_in_channels is not None:
        # unCLIP's "projection" class embedding and SDXL's add_embedding are both ldm's label_emb; the
        # reverse map keeps the one added last (SDXL's)
        add("class_embedding.linear_1", "label_emb.0.0")
        add("class_embedding.linear_2", "label_emb.0.2")
        add("add_embedding.linear_1", "label_emb.0.0")
        add("add_embedding.linear_2", "label_emb.0.2")
    if cfg.num_classes is not None:
        add("class_embedding", "label_emb", ("weight",))

    n, levels, mult = cfg.num_res_blocks, len(cfg.channel_mult), cfg.channel_mult
    for i, depth in enumerate(cfg.transformer_depth):
        for j in range(n):
            block = f"input_blocks.{1 + i * (n + 1) + j}"
            resnet(f"down_blocks.{i}.resnets.{j}", f"{block}.0", j == 0 and mult[i] != (mult[i - 1] if i else 1))
            if depth:
                transformer(f"down_blocks.{i}.attentions.{j}", f"{block}.1", depth)
        if i < levels - 1:
            add(f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{(i + 1) * (n + 1)}.0.op")

    resnet("mid_block.resnets.0", "middle_block.0", False)
    transformer("mid_block.attentions.0", "middle_block.1", cfg.transformer_depth_middle)
    resnet("mid_block.resnets.1", "middle_block.2", False)

    for i in range(levels):
        depth = cfg.transformer_depth[levels - 1 - i]
        for j in range(n + 1):
            block = f"output_blocks.{i * (n + 1) + j}"
            resnet(f"up_blocks.{i}.resnets.{j}", f"{block}.0", True)
            if depth:
                transformer(f"up_blocks.{i}.attentions.{j}", f"{block}.1", depth)
        if i < levels - 1:
            add(f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{i * (n + 1) + n}.{2 if depth else 1}.conv")

    add("conv_norm_out", "out.0")
    add("conv_out", "out.2")
    return keys


def _rename(sd: Mapping[str, Tensor], keys: Mapping[str, str], source: str) -> dict[str, Tensor]:
    unknown = sorted(k for k in sd if k not in keys)
    if unknown:
        shown = ", ".join(unknown[:20]) + (f" … ({len(unknown)} in all)" if len(unknown) > 20 else "")
        raise ValueError(f"unexpected {source} UNet keys for this config: {shown}")
    return {keys[k]: v for k, v in sd.items()}


def diffusers_unet_to_ldm(sd: Mapping[str, Tensor], cfg: UNetConfig) -> dict[str, Tensor]:
    """Rename a diffusers UNet state dict to LDM keys (tensors are shared, not copied)."""
    return _rename(sd, _key_map(cfg), "diffusers")


def ldm_unet_to_diffusers(sd: Mapping[str, Tensor], cfg: UNetConfig) -> dict[str, Tensor]:
    """Rename an LDM UNet state dict (prefix already stripped) to diffusers keys."""
    return _rename(sd, {v: k for k, v in _key_map(cfg).items()}, "LDM")


# diffusers options this UNet does not implement, with the only value we accept (also their default).
_FIXED: dict[str, Any] = {
    "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu", "norm_eps": 1e-5,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "dual_cross_attention": False,
    "downsample_padding": 1, "mid_block_scale_factor": 1,
    "resnet_time_scale_shift": "default", "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional", "time_embedding_dim": None, "time_embedding_act_fn": None,
    "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "encoder_hid_dim": None, "attention_type": "default", "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None, "cross_attention_norm": None,
    "reverse_transformer_layers_per_block": None, "num_attention_heads": None,
}


def _differs(value: Any, wanted: Any) -> bool:
    """Whether a config value departs from the one supported value (None and False count as "off")."""
    if isinstance(value, (list, tuple)):
        return any(_differs(v, wanted) for v in value)
    return bool(value) if wanted is None or wanted is False else value != wanted


def _per_level(value: Any, levels: int, name: str) -> list[Any]:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * levels
    if len(values) != levels:
        raise ValueError(f"diffusers config {name} has {len(values)} entries for {levels} levels")
    return values


def _same(values: list[Any], name: str) -> Any:
    if len(set(values)) != 1:
        raise ValueError(f"diffusers config {name}={values}: per-level values are not supported")
    return values[0]


def unet_config_from_diffusers(config: Mapping[str, Any]) -> UNetConfig:
    """Build a UNetConfig from a diffusers ``unet/config.json`` dict; unsupported variants raise."""
    for key, value in _FIXED.items():
        if _differs(config.get(key, value), value):
            raise ValueError(f"diffusers config {key}={config[key]!r} is not supported (only {value!r})")

    channels = list(config.get("block_out_channels", (320, 640, 1280, 1280)))
    levels, mc = len(channels), channels[0]
    if any(c % mc for c in channels):
        raise ValueError(f"block_out_channels {channels} are not multiples of the first")

    down = list(config.get("down_block_types", ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)))
    up = list(config.get("up_block_types", ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3))
    attention = [t == "CrossAttnDownBlock2D" for t in down]
    expected_up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)]
    if any(t not in ("CrossAttnDownBlock2D", "DownBlock2D") for t in down) or up != expected_up:
        raise ValueError(f"unsupported block types: down {down}, up {up}")

    layers = _per_level(config.get("transformer_layers_per_block", 1), levels, "transformer_layers_per_block")
    if any(not isinstance(d, int) for d in layers):
        raise ValueError(f"asymmetric transformer_layers_per_block {layers} is not supported")

    # diffusers' `attention_head_dim` is, despite its name, the number of heads per level.
    heads = _per_level(config.get("attention_head_dim", 8), levels, "attention_head_dim")
    used = [i for i in range(levels) if attention[i]] + [levels - 1]  # the middle block uses the last level's
    if any(channels[i] % heads[i] for i in used):
        raise ValueError(f"attention heads {heads} do not divide block_out_channels {channels}")
    head_dims = {channels[i] // heads[i] for i in used}
    if isinstance(config.get("attention_head_dim", 8), int):
        head_cfg = {"num_heads": heads[0]}
    elif len(head_dims) == 1:
        head_cfg = {"num_head_channels": head_dims.pop()}
    else:
        head_cfg = {"num_heads": _same([heads[i] for i in used], "attention_head_dim")}

    only_cross = config.get("only_cross_attention", False)
    cross_levels = tuple(bool(v) for v in _per_level(only_cross, levels, "only_cross_attention"))
    middle_cross = config.get("mid_block_only_cross_attention")
    if middle_cross is None:
        middle_cross = only_cross if isinstance(only_cross, bool) else False
    if middle_cross:
        raise ValueError("diffusers config: a cross-attention-only middle block is not supported")

    addition = config.get("addition_embed_type")
    if addition not in (None, "text_time"):
        raise ValueError(f"diffusers config addition_embed_type={addition!r} is not supported")
    class_embed = config.get("class_embed_type")
    if class_embed not in (None, "projection"):
        raise ValueError(f"diffusers config class_embed_type={class_embed!r} is not supported (only 'projection')")

    return UNetConfig(
        in_channels=config.get("in_channels", 4),
        out_channels=config.get("out_channels", 4),
        model_channels=mc,
        channel_mult=tuple(c // mc for c in channels),
        num_res_blocks=_same(_per_level(config.get("layers_per_block", 2), levels, "layers_per_block"),
                             "layers_per_block"),
        transformer_depth=tuple(d if a else 0 for d, a in zip(layers, attention)),
        transformer_depth_middle=layers[-1],
        context_dim=_same(_per_level(config.get("cross_attention_dim", 1280), levels, "cross_attention_dim"),
                          "cross_attention_dim"),
        use_linear_in_transformer=bool(config.get("use_linear_projection", False)),
        adm_in_channels=config.get("projection_class_embeddings_input_dim") if addition or class_embed else None,
        norm_groups=config.get("norm_num_groups", 32),
        num_classes=config.get("num_class_embeds"),
        disable_self_attentions=cross_levels if any(cross_levels) else None,
        **head_cfg,
    )
