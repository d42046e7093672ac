"""CLIP image encoders: OpenAI CLIP ViT-L/14, OpenCLIP ViT-H/14 and ViT-bigG/14 vision towers.

One pre-norm ViT serves unCLIP's image embedder, IP-Adapter's image encoder and the SD safety
checker. Attribute paths equal open_clip's ``VisionTransformer`` keys, which are also the original
OpenAI CLIP ``visual.`` keys and unCLIP's ``embedder.model.visual.`` keys ("the checkpoint is the
schema"); transformers' ``CLIPVisionModel[WithProjection]`` keys convert at the import boundary
(``checkpoint/convert_vision.py``).

Outputs follow transformers' conventions, checked against it index for index:
``last_hidden_state`` is the last block's output *before* ``ln_post``; ``pooled`` is
``ln_post`` of the class token (transformers' ``pooler_output``); ``image_embeds`` is
``pooled @ proj``; ``hidden_states`` is ``(after ln_pre, after block 1, ..., after block n)``, so
``hidden_states[-2]`` is IP-Adapter "plus"'s penultimate layer. open_clip's ``tokens`` output is
``ln_post(last_hidden_state)[:, 1:]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sfumato.models.clip import _OpenCLIPMLP

# OpenAI's normalisation constants; open_clip uses the same ones for its LAION ViT-H / bigG weights.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class VisionConfig:
    """Shape of a CLIP ViT image tower. ``projection_dim=None``: no ``proj`` (no image_embeds)."""

    image_size: int = 224
    patch_size: int = 14
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_dim: int = 4096
    projection_dim: int | None = 768
    act: Literal["quick_gelu", "gelu"] = "quick_gelu"
    eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.act not in ("quick_gelu", "gelu"):
            raise ValueError(f"act: unknown {self.act!r} (expected 'quick_gelu' or 'gelu')")
        if self.width % self.heads:
            raise ValueError(f"heads: {self.heads} does not divide width {self.width}")
        if self.image_size % self.patch_size:
            raise ValueError(f"patch_size: {self.patch_size} does not divide image_size {self.image_size}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens(self) -> int:
        """Sequence length: one class token plus one token per patch."""
        return self.grid**2 + 1


# open_clip model_configs/ViT-{L,H,bigG}-14.json: heads = width // head_width (64, 80, 104);
# bigG's mlp_ratio 4.9231 gives int(1664 * 4.9231) = 8192. OpenAI's weights use QuickGELU.
VIT_L14 = VisionConfig(224, 14, 1024, 24, 16, 4096, 768, "quick_gelu")
VIT_H14 = VisionConfig(224, 14, 1280, 32, 16, 5120, 1024, "gelu")
VIT_BIGG14 = VisionConfig(224, 14, 1664, 48, 16, 8192, 1280, "gelu")
VISION_PRESETS = {"vit_l14": VIT_L14, "vit_h14": VIT_H14, "vit_bigg14": VIT_BIGG14}


@dataclass
class VisionOutput:
    """One forward pass; see the module docstring for what each field holds."""

    last_hidden_state: Tensor
    pooled: Tensor
    image_embeds: Tensor | None
    hidden_states: tuple[Tensor, ...] | None = None


class _Attention(nn.Module):
    """open_clip's ``nn.MultiheadAttention`` keys (packed q/k/v), computed with SDPA, no mask."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.normal_(self.in_proj_weight, std=width**-0.5)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, c))


class _ResidualBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.attn = _Attention(cfg.width, cfg.heads)
        self.ln_2 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = _OpenCLIPMLP(cfg.width, cfg.mlp_dim, cfg.act)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class _Transformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.resblocks = nn.ModuleList(_ResidualBlock(cfg) for _ in range(cfg.layers))


class CLIPVisionTower(nn.Module):
    """CLIP ViT image encoder with open_clip's ``visual.`` keys; loads with ``strict=True``."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        scale = cfg.width**-0.5
        self.conv1 = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(cfg.width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(cfg.tokens, cfg.width))
        self.ln_pre = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.transformer = _Transformer(cfg)
        self.ln_post = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.proj = (
            None if cfg.projection_dim is None else nn.Parameter(scale * torch.randn(cfg.width, cfg.projection_dim))
        )

    def embed(self, pixel_values: Tensor) -> Tensor:
        """[B, 3, S, S] normalised pixels -> [B, 1 + grid², width] tokens after ``ln_pre``."""
        size = self.cfg.image_size
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3 or pixel_values.shape[-2:] != (size, size):
            raise ValueError(f"pixel_values: expected [B, 3, {size}, {size}], got {list(pixel_values.shape)}")
        x = self.conv1(pixel_values.to(self.conv1.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        return self.ln_pre(x)

    def forward(self, pixel_values: Tensor, output_hidden_states: bool = False) -> VisionOutput:
        x = self.embed(pixel_values)
        states = [x]
        for block in self.transformer.resblocks:
            x = block(x)
            if output_hidden_states:
                states.append(x)
        pooled = self.ln_post(x[:, 0])
        embeds = pooled @ self.proj if self.proj is not None else None
        return VisionOutput(x, pooled, embeds, tuple(states) if output_hidden_states else None)


def normalize_clip(
    pixels: Tensor,
    mean: tuple[float, ...] = CLIP_MEAN,
    std: tuple[float, ...] = CLIP_STD,
) -> Tensor:
    """[B, 3, H, W] float32 pixels in [0, 1] -> ``(x - mean) / std`` per channel, in float32.

    Same float32 operations, in the same order, as transformers' ``normalize`` and torchvision's
    ``Normalize``, so the result is bit-identical to both.
    """
    m = torch.tensor(mean, dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
    return (pixels - m) / s
