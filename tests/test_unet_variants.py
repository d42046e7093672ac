"""UNet variants, parity with diffusers' UNet2DConditionModel on shared random weights:
SD 2 depth2img (5 input channels: latent + depth) and the SD x4 upscaler (7 input channels: latent +
low-res RGB; a noise-level class embedding; cross-attention in place of self-attention on some levels).

The x4 upscaler uses two UNetConfig fields: ``num_classes`` (LDM's ``label_emb = nn.Embedding``) and
``disable_self_attentions`` (per level, attn1 attends to the context).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from diffusers import UNet2DConditionModel
from reference import materialize

from sfumato.checkpoint.convert_unet import diffusers_unet_to_ldm, unet_config_from_diffusers
from sfumato.models.unet import SD2_UNET, UNetConfig, UNetModel

TINY_SD2 = dict(
    block_out_channels=(32, 64, 64), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(4, 8, 8), cross_attention_dim=48, use_linear_projection=True, norm_num_groups=8,
)
TINY_SD2_CFG = UNetConfig(
    model_channels=32, channel_mult=(1, 2, 2), transformer_depth=(1, 1, 0), num_head_channels=8, context_dim=48,
    use_linear_in_transformer=True, norm_groups=8,
)
# stabilityai/stable-diffusion-2-depth unet/config.json (the SD 2 UNet with in_channels=5)
SD2_DEPTH_DIFFUSERS = dict(
    in_channels=5, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
)

# stabilityai/stable-diffusion-x4-upscaler unet/config.json, from ldm's x4-upscaling.yaml
# (num_classes 1000, disable_self_attentions [T, T, T, F], attention at ds 2/4/8, num_heads 8).
X4_DIFFUSERS = dict(
    in_channels=7, out_channels=4, block_out_channels=(256, 512, 512, 1024), layers_per_block=2,
    down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3,
    up_block_types=("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",),
    only_cross_attention=(True, True, True, False), num_class_embeds=1000, attention_head_dim=8,
    cross_attention_dim=1024, use_linear_projection=True,
)
TINY_X4 = dict(
    in_channels=7, block_out_channels=(32, 64, 64), layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    only_cross_attention=(True, True, False), num_class_embeds=10, attention_head_dim=2,
    cross_attention_dim=48, use_linear_projection=True, norm_num_groups=8,
)


def x4_config(**fields) -> UNetConfig:
    return UNetConfig(
        **{
            "in_channels": 7, "model_channels": 256, "channel_mult": (1, 2, 2, 4), "transformer_depth": (0, 1, 1, 1),
            "num_heads": 8, "context_dim": 1024, "use_linear_in_transformer": True, "num_classes": 1000,
            "disable_self_attentions": (True, True, True, False), **fields,
        }
    )


def tiny_x4_config() -> UNetConfig:
    return x4_config(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, transformer_depth=(0, 1, 1),
                     num_heads=2, context_dim=48, num_classes=10, disable_self_attentions=(True, True, False),
                     norm_groups=8)


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def pair(kwargs: dict, cfg: UNetConfig, seed: int) -> tuple[UNet2DConditionModel, UNetModel]:
    ref = materialize(lambda: UNet2DConditionModel(sample_size=16, **kwargs), seed)
    ours = UNetModel(cfg).eval()
    ours.load_state_dict(diffusers_unet_to_ldm(ref.state_dict(), cfg), strict=True)
    return ref, ours


def shapes_match(kwargs: dict, cfg: UNetConfig) -> dict[str, torch.Size]:
    """Our UNet's parameter shapes equal diffusers' converted ones; returns them."""
    with torch.device("meta"):
        ref = UNet2DConditionModel(**kwargs)
        ours = UNetModel(cfg)
    assert unet_config_from_diffusers(ref.config) == cfg
    converted = {k: v.shape for k, v in diffusers_unet_to_ldm(ref.state_dict(), cfg).items()}
    assert converted == {k: v.shape for k, v in ours.state_dict().items()}
    return converted


# -- SD 2 depth2img ------------------------------------------------------------------------------------


def test_depth2img_matches_diffusers() -> None:
    cfg = replace(TINY_SD2_CFG, in_channels=5)
    ref, ours = pair({**TINY_SD2, "in_channels": 5}, cfg, seed=0)
    torch.manual_seed(0)
    latent, depth = torch.randn(2, 4, 12, 16), torch.rand(2, 1, 12, 16) * 2 - 1  # depth scaled to [-1, 1]
    x = torch.cat([latent, depth], dim=1)
    t, ctx = torch.tensor([981.0, 3.0]), torch.randn(2, 6, 48)
    with torch.no_grad():
        expected = ref(x, t, ctx).sample
        got = ours(x, t, ctx)
        without_depth = ours(torch.cat([latent, torch.zeros_like(depth)], dim=1), t, ctx)
    assert got.shape == (2, 4, 12, 16)
    assert rel_err(got, expected) <= 1e-4
    assert rel_err(without_depth, expected) > 1e-3  # the fifth channel is used


def test_depth2img_full_size_keys() -> None:
    shapes = shapes_match(SD2_DEPTH_DIFFUSERS, replace(SD2_UNET, in_channels=5))
    assert shapes["input_blocks.0.0.weight"] == (320, 5, 3, 3)
    assert shapes["out.2.weight"] == (4, 320, 3, 3)


# -- SD x4 upscaler ------------------------------------------------------------------------------------


def test_x4_upscaler_matches_diffusers() -> None:
    ref, ours = pair(TINY_X4, tiny_x4_config(), seed=1)
    torch.manual_seed(0)
    x = torch.cat([torch.randn(2, 4, 16, 16), torch.rand(2, 3, 16, 16) * 2 - 1], dim=1)  # latent + low-res RGB
    t, ctx = torch.tensor([700.0, 20.0]), torch.randn(2, 5, 48)
    noise_level = torch.tensor([2, 7])
    with torch.no_grad():
        expected = ref(x, t, ctx, class_labels=noise_level).sample
        got = ours(x, t, ctx, noise_level)
        other_level = ours(x, t, ctx, torch.tensor([3, 7]))
    assert rel_err(got, expected) <= 1e-4
    assert rel_err(other_level[:1], expected[:1]) > 1e-3  # the noise level is used
    with pytest.raises(ValueError, match="needs"):
        ours(x, t, ctx)


def test_x4_upscaler_full_size_keys() -> None:
    shapes = shapes_match(X4_DIFFUSERS, x4_config())
    assert shapes["label_emb.weight"] == (1000, 1024)  # nn.Embedding(num_classes, 4 · model_channels)
    assert shapes["input_blocks.0.0.weight"] == (256, 7, 3, 3)
    # levels 1 and 2 (512 channels): attn1 attends to the 1024-wide context instead of itself
    assert shapes["input_blocks.4.1.transformer_blocks.0.attn1.to_k.weight"] == (512, 1024)
    assert shapes["output_blocks.6.1.transformer_blocks.0.attn1.to_v.weight"] == (512, 1024)
    assert not any(k.startswith(("input_blocks.1.1.", "input_blocks.2.1.")) for k in shapes)  # level 0: no attention
