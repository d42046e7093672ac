"""The benchmarks' shared parts: seeded random weights at real shapes, diffusers / transformers
modules holding the very same tensors (converted key names, ``assign=True``), interleaved timing and
the relative error (``sfumato.bench``, ``sfumato.floor``, ``bench/memory.py``)."""

from __future__ import annotations

import importlib.util
import math
import statistics
import sys
import time
from typing import Callable

import torch
from torch import nn

from sfumato.checkpoint.convert_unet import ldm_unet_to_diffusers
from sfumato.checkpoint.convert_vae import ldm_vae_to_diffusers
from sfumato.models.unet import UNetConfig, UNetModel
from sfumato.models.vae import AutoencoderKL

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# -- models with shared random weights -----------------------------------------------------------


def random_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Seeded weights that keep activations O(1): matrices N(0, 1/fan_in), norm scales 1 + N(0, 0.1²),
    biases N(0, 0.02²); embeddings N(0, 1/16)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                fan_in = 16 if "embedding" in name else math.prod(p.shape[1:])
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
            elif name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    return module.eval().requires_grad_(False)


def build(make: Callable[[], nn.Module], seed: int) -> nn.Module:
    with torch.device("meta"):
        module = make()
    return random_(module.to_empty(device="cpu"), seed)


def diffusers_unet(ours: UNetModel, cfg: UNetConfig) -> nn.Module:
    """diffusers' UNet holding our tensors (no copy)."""
    from diffusers import UNet2DConditionModel

    kwargs = dict(
        sample_size=64, cross_attention_dim=cfg.context_dim, layers_per_block=cfg.num_res_blocks,
        block_out_channels=tuple(cfg.model_channels * m for m in cfg.channel_mult),
    )
    if cfg.adm_in_channels is None:
        kwargs.update(attention_head_dim=cfg.num_heads)
    else:
        kwargs.update(
            down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2,
            up_block_types=("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",), attention_head_dim=(5, 10, 20),
            transformer_layers_per_block=cfg.transformer_depth, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=cfg.adm_in_channels,
        )
    with torch.device("meta"):
        ref = UNet2DConditionModel(**kwargs)
    ref.load_state_dict(ldm_unet_to_diffusers(ours.state_dict(), cfg), strict=True, assign=True)
    return ref.eval()


def diffusers_vae(ours: AutoencoderKL) -> nn.Module:
    from diffusers import AutoencoderKL as RefVAE

    with torch.device("meta"):
        ref = RefVAE(
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        )
    ref.load_state_dict(ldm_vae_to_diffusers(ours.state_dict()), strict=True, assign=True)
    return ref.eval()


def transformers_clip(ours: nn.Module) -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")
    with torch.device("meta"):
        ref = CLIPTextModel(cfg)
    sd = ours.state_dict()
    if not any(k.startswith("text_model.") for k in ref.state_dict()):  # transformers >= 5
        sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    result = ref.load_state_dict(sd, strict=False, assign=True)
    assert not result.unexpected_keys and all("position_ids" in k for k in result.missing_keys), result
    for name in result.missing_keys:  # position ids: a buffer, not a weight
        owner, _, leaf = name.rpartition(".")
        ref.get_submodule(owner).register_buffer(leaf, torch.arange(77)[None], persistent=False)
    return ref.eval()


# -- timing --------------------------------------------------------------------------------------


def timed(fns: dict[str, Callable[[], object]], warmup: int, repeats: int) -> dict[str, dict]:
    """Median wall and CPU seconds of each function, the functions interleaved run by run."""
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    with torch.inference_mode():
        for i in range(warmup + repeats):
            for name, fn in fns.items():
                wall, cpu = time.perf_counter(), time.process_time()
                fn()
                if i >= warmup:
                    runs[name].append((time.perf_counter() - wall, time.process_time() - cpu))
                print(f"  {name}: {time.perf_counter() - wall:.2f} s", file=sys.stderr, flush=True)
    return {name: {"wall_s": statistics.median(r[0] for r in rs), "cpu_s": statistics.median(r[1] for r in rs),
                   "runs_wall_s": [round(r[0], 3) for r in rs]} for name, rs in runs.items()}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max()).item()
