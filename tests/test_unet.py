"""UNet parity with diffusers' UNet2DConditionModel on shared random weights, and the key/config conversion."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
import torch
from diffusers import UNet2DConditionModel

from sfumato.checkpoint.convert_unet import diffusers_unet_to_ldm, ldm_unet_to_diffusers, unet_config_from_diffusers
from sfumato.models.unet import (
    SD1_INPAINT_UNET, SD1_UNET, SD2_UNET, SDXL_REFINER_UNET, SDXL_UNET, UNetConfig, UNetModel, timestep_embedding,
)

TINY_SD1 = dict(
    block_out_channels=(32, 64), layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2, cross_attention_dim=32,
    norm_num_groups=8,
)
TINY_SD1_CFG = UNetConfig(
    model_channels=32, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(1, 0), num_heads=2,
    context_dim=32, norm_groups=8,
)
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
TIME_DIM, TEXT_DIM = 8, 16  # SDXL: 256 and 1280
TINY_SDXL = dict(
    block_out_channels=(32, 64), layers_per_block=2, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(4, 8), transformer_layers_per_block=(1, 2),
    cross_attention_dim=64, use_linear_projection=True, norm_num_groups=8, addition_embed_type="text_time",
    addition_time_embed_dim=TIME_DIM, projection_class_embeddings_input_dim=TEXT_DIM + 6 * TIME_DIM,
)
TINY_SDXL_CFG = UNetConfig(
    model_channels=32, channel_mult=(1, 2), transformer_depth=(0, 2), transformer_depth_middle=2,
    num_head_channels=8, context_dim=64, use_linear_in_transformer=True, adm_in_channels=TEXT_DIM + 6 * TIME_DIM,
    norm_groups=8,
)

# Full-size diffusers configs, as in the released unet/config.json files.
SD1_DIFFUSERS = dict(cross_attention_dim=768, attention_head_dim=8)
SD2_DIFFUSERS = dict(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)
SDXL_DIFFUSERS = dict(
    block_out_channels=(320, 640, 1280), down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2,
    up_block_types=("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",), attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
REFINER_DIFFUSERS = dict(
    block_out_channels=(384, 768, 1536, 1536),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(6, 12, 24, 24), transformer_layers_per_block=4, cross_attention_dim=1280,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2560,
)


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def fill_(model: torch.nn.Module) -> None:
    """Random weights that keep activations O(1): N(1, .05) norm scales, fan-in scaled matrices, small biases."""
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.normal_(0.0, 0.05)
            else:
                p.normal_(0.0, p[0].numel() ** -0.5)
        for m in model.modules():
            if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                m.weight.add_(1.0)


def tiny_pair(diffusers_kwargs: dict, cfg: UNetConfig, **extra) -> tuple[UNet2DConditionModel, UNetModel]:
    torch.manual_seed(0)
    ref = UNet2DConditionModel(sample_size=16, **diffusers_kwargs, **extra).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ours = UNetModel(cfg).eval()
    ours.load_state_dict(diffusers_unet_to_ldm(ref.state_dict(), cfg), strict=True)
    return ref, ours


@pytest.mark.parametrize(
    "kwargs, cfg, size",
    [
        (TINY_SD1, TINY_SD1_CFG, (16, 16)),
        (TINY_SD1, TINY_SD1_CFG, (15, 13)),  # odd latent: upsampling follows the skip sizes
        (TINY_SD2, TINY_SD2_CFG, (16, 16)),
        (TINY_SD2, TINY_SD2_CFG, (12, 20)),
    ],
    ids=["sd1", "sd1-odd", "sd2", "sd2-12x20"],
)
def test_matches_diffusers(kwargs: dict, cfg: UNetConfig, size: tuple[int, int]) -> None:
    ref, ours = tiny_pair(kwargs, cfg)
    x = torch.randn(2, 4, *size)
    t = torch.tensor([999.0, 17.5])
    ctx = torch.randn(2, 7, cfg.context_dim)
    with torch.no_grad():
        expected = ref(x, t, ctx).sample
        got = ours(x, t, ctx)
    assert expected.abs().max() > 0.1
    assert rel_err(got, expected) <= 1e-4


def test_inpaint_9_channels() -> None:
    cfg = replace(TINY_SD1_CFG, in_channels=9)
    ref, ours = tiny_pair(TINY_SD1, cfg, in_channels=9)
    x, ctx = torch.randn(1, 9, 16, 16), torch.randn(1, 5, 32)
    with torch.no_grad():
        expected = ref(x, torch.tensor([500]), ctx).sample
        got = ours(x, torch.tensor(500), ctx)  # a scalar timestep broadcasts over the batch
    assert got.shape == (1, 4, 16, 16)
    assert rel_err(got, expected) <= 1e-4


def test_sdxl_vector_conditioning() -> None:
    ref, ours = tiny_pair(TINY_SDXL, TINY_SDXL_CFG)
    b = 2
    x, ctx = torch.randn(b, 4, 16, 16), torch.randn(b, 9, 64)
    text_embeds = torch.randn(b, TEXT_DIM)
    time_ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [768, 1344, 64, 32, 1024, 1024]])
    # SDXL's vector y: pooled text embedding, then the sinusoidal embedding of each size/crop number.
    y = torch.cat([text_embeds, timestep_embedding(time_ids.flatten(), TIME_DIM).reshape(b, -1)], dim=-1)
    t = torch.tensor([10.0, 600.0])
    with torch.no_grad():
        expected = ref(x, t, ctx, added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}).sample
        got = ours(x, t, ctx, y)
    assert rel_err(got, expected) <= 1e-4
    with pytest.raises(ValueError, match="needs the vector"):
        ours(x, t, ctx)


def test_keeps_module_dtype() -> None:
    _, ours = tiny_pair(TINY_SDXL, TINY_SDXL_CFG)
    x, ctx, y = torch.randn(1, 4, 8, 8), torch.randn(1, 3, 64), torch.randn(1, TINY_SDXL_CFG.adm_in_channels)
    t = torch.tensor([250.0])
    with torch.no_grad():
        full = ours(x, t, ctx, y)
        half = ours.to(torch.bfloat16)(x.bfloat16(), t, ctx.bfloat16(), y)  # fp32 timesteps and y are cast
    assert half.dtype == torch.bfloat16
    assert rel_err(half.float(), full) < 0.05


@pytest.mark.parametrize(
    "kwargs, cfg",
    [
        (TINY_SD1, TINY_SD1_CFG), (TINY_SD2, TINY_SD2_CFG), (TINY_SDXL, TINY_SDXL_CFG),
        ({**TINY_SD1, "in_channels": 9}, replace(TINY_SD1_CFG, in_channels=9)),
        (SD1_DIFFUSERS, SD1_UNET), ({**SD1_DIFFUSERS, "in_channels": 9}, SD1_INPAINT_UNET),
        (SD2_DIFFUSERS, SD2_UNET), (SDXL_DIFFUSERS, SDXL_UNET), (REFINER_DIFFUSERS, SDXL_REFINER_UNET),
    ],
    ids=["tiny-sd1", "tiny-sd2", "tiny-sdxl", "tiny-inpaint", "sd1", "sd1-inpaint", "sd2", "sdxl", "refiner"],
)
def test_config_from_diffusers(kwargs: dict, cfg: UNetConfig) -> None:
    with torch.device("meta"):
        ref = UNet2DConditionModel(**kwargs)
    assert unet_config_from_diffusers(ref.config) == cfg
    ldm = diffusers_unet_to_ldm(ref.state_dict(), cfg)
    with torch.device("meta"):
        ours = UNetModel(cfg)
    assert {k: v.shape for k, v in ldm.items()} == {k: v.shape for k, v in ours.state_dict().items()}


@pytest.mark.parametrize("cfg", [TINY_SD1_CFG, TINY_SD2_CFG, TINY_SDXL_CFG, SDXL_REFINER_UNET])
def test_round_trip_is_exact(cfg: UNetConfig) -> None:
    with torch.device("meta"):
        sd = UNetModel(cfg).state_dict()
    back = diffusers_unet_to_ldm(ldm_unet_to_diffusers(sd, cfg), cfg)
    assert list(back) == list(sd)
    assert all(back[k] is sd[k] for k in sd)


def test_unknown_keys_are_named() -> None:
    sd = dict(UNetModel(TINY_SD1_CFG).state_dict())
    with pytest.raises(ValueError, match=r"down_blocks\.0\.attentions\.0\.norm\.bias"):  # SDXL: no attention there
        diffusers_unet_to_ldm(ldm_unet_to_diffusers(sd, TINY_SD1_CFG), replace(TINY_SDXL_CFG, adm_in_channels=None))
    sd["model_ema.decay"] = torch.tensor(0.9999)
    with pytest.raises(ValueError, match="model_ema.decay"):
        ldm_unet_to_diffusers(sd, TINY_SD1_CFG)


def test_unsupported_diffusers_config() -> None:
    with pytest.raises(ValueError, match="time_cond_proj_dim"):
        unet_config_from_diffusers({**SD1_DIFFUSERS, "time_cond_proj_dim": 256})
    with pytest.raises(ValueError, match="block types"):
        unet_config_from_diffusers({**SD1_DIFFUSERS, "up_block_types": ("UpBlock2D",) * 4})


@pytest.mark.slow
def test_full_size_sd1_matches_diffusers() -> None:
    start = time.perf_counter()
    torch.manual_seed(0)
    with torch.device("meta"):
        ref = UNet2DConditionModel(**SD1_DIFFUSERS)
        ours = UNetModel(SD1_UNET)
    ref = ref.to_empty(device="cpu").eval()
    fill_(ref)
    ours.load_state_dict(diffusers_unet_to_ldm(ref.state_dict(), SD1_UNET), strict=True, assign=True)
    ours.eval()
    assert sum(p.numel() for p in ours.parameters()) == 859_520_964
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 768)
    t = torch.tensor([321.0])
    with torch.no_grad():
        expected = ref(x, t, ctx).sample
        got = ours(x, t, ctx)
    assert torch.isfinite(expected).all() and expected.abs().max() > 0.1
    assert rel_err(got, expected) <= 1e-4
    assert time.perf_counter() - start < 60


@pytest.mark.slow
@pytest.mark.parametrize(
    "kwargs, cfg, count",
    [(SD2_DIFFUSERS, SD2_UNET, 865_910_724), (SDXL_DIFFUSERS, SDXL_UNET, 2_567_463_684),
     (REFINER_DIFFUSERS, SDXL_REFINER_UNET, 2_259_526_660)],
    ids=["sd2", "sdxl", "refiner"],
)
def test_full_size_param_counts(kwargs: dict, cfg: UNetConfig, count: int) -> None:
    with torch.device("meta"):
        ref = UNet2DConditionModel(**kwargs)
        ours = UNetModel(cfg)
    n_ours = sum(p.numel() for p in ours.parameters())
    assert n_ours == sum(p.numel() for p in ref.parameters())
    assert n_ours == count
