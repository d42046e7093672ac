"""CLIP text encoders: OpenAI CLIP ViT-L/14 (transformers key layout) and OpenCLIP ViT-H / ViT-bigG.

Both are the same pre-norm causal transformer; they differ only in key names, activation,
the packed q/k/v projection of open_clip and its text projection. Attribute paths equal the
checkpoint keys (after stripping ``cond_stage_model.transformer.`` / ``cond_stage_model.model.`` /
``conditioner.embedders.N.model.`` etc.), so real weights load with ``strict=True``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

EOS_ID = 49407


@dataclass(frozen=True)
class TextEncoderConfig:
    """Shape of a CLIP text tower and which checkpoint key layout it uses."""

    layout: Literal["hf", "openclip"]  # hf: OpenAI CLIP in transformers' layout; openclip: open_clip's
    width: int = 768
    layers: int = 12
    heads: int = 12
    vocab_size: int = 49408
    max_positions: int = 77
    mlp_ratio: float = 4.0
    activation: Literal["quick_gelu", "gelu"] = "quick_gelu"
    projection_dim: int | None = None  # openclip: text_projection [width, projection_dim]; hf: none
    pad_id: int = 49407  # 0 for OpenCLIP models

    def __post_init__(self) -> None:
        if self.layout not in ("hf", "openclip"):
            raise ValueError(f"layout: unknown {self.layout!r} (expected 'hf' or 'openclip')")
        if self.activation not in ("quick_gelu", "gelu"):
            raise ValueError(f"activation: unknown {self.activation!r} (expected 'quick_gelu' or 'gelu')")
        if self.width % self.heads:
            raise ValueError(f"heads: {self.heads} does not divide width {self.width}")


CLIP_L = TextEncoderConfig("hf", 768, 12, 12)
OPENCLIP_H = TextEncoderConfig("openclip", 1024, 24, 16, activation="gelu", projection_dim=1024, pad_id=0)
OPENCLIP_BIGG = TextEncoderConfig("openclip", 1280, 32, 20, activation="gelu", projection_dim=1280, pad_id=0)


@dataclass
class TextEncoderOutput:
    """Per-layer states of one forward pass.

    ``hidden_states`` is ``[embeddings, after layer 1, ..., after layer n]`` without the final norm;
    ``final`` is the final norm of the last computed state; ``pooled`` is ``final`` at the first EOS
    (projected for OpenCLIP), or None when the pass stopped early.
    """

    hidden_states: list[Tensor]
    final: Tensor | None
    pooled: Tensor | None


def _activation(name: str, x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x) if name == "quick_gelu" else F.gelu(x)


def _causal_attention(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    """[B, T, C] q/k/v -> [B, T, C] causal multi-head attention output (before out_proj)."""
    b, t, c = q.shape
    q, k, v = (z.view(b, t, heads, c // heads).transpose(1, 2) for z in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return out.transpose(1, 2).reshape(b, t, c)


def _check_depth(cfg: TextEncoderConfig, num_layers: int | None) -> int:
    n = cfg.layers if num_layers is None else num_layers
    if not 0 <= n <= cfg.layers:
        raise ValueError(f"num_layers: {num_layers} is outside 0..{cfg.layers}")
    return n


def _eos_index(tokens: Tensor) -> Tensor:
    """Position of the first EOS token in each row (HF pads with EOS, so argmax of ids is wrong)."""
    return (tokens == EOS_ID).int().argmax(dim=-1)


def _run(x: Tensor, blocks: nn.ModuleList, n: int) -> list[Tensor]:
    states = [x]
    for block in blocks[:n]:
        states.append(block(states[-1]))
    return states


# --- transformers layout (OpenAI CLIP ViT-L/14) ---------------------------------------------------


class _HFAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        out = _causal_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads)
        return self.out_proj(out)


class _HFMLP(nn.Module):
    def __init__(self, width: int, hidden: int, activation: str):
        super().__init__()
        self.activation = activation
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(_activation(self.activation, self.fc1(x)))


class _HFLayer(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.self_attn = _HFAttention(cfg.width, cfg.heads)
        self.layer_norm1 = nn.LayerNorm(cfg.width)
        self.mlp = _HFMLP(cfg.width, int(cfg.width * cfg.mlp_ratio), cfg.activation)
        self.layer_norm2 = nn.LayerNorm(cfg.width)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class _HFEmbeddings(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.width)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.token_embedding(tokens) + self.position_embedding.weight[: tokens.shape[1]]


class _HFEncoder(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.layers = nn.ModuleList(_HFLayer(cfg) for _ in range(cfg.layers))


class _HFTextTransformer(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.embeddings = _HFEmbeddings(cfg)
        self.encoder = _HFEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width)


class CLIPTextModel(nn.Module):
    """OpenAI CLIP text model with transformers' keys (``text_model.…``); SD1's text encoder."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.text_model = _HFTextTransformer(cfg)
        nn.init.normal_(self.text_model.embeddings.token_embedding.weight, std=0.02)
        nn.init.normal_(self.text_model.embeddings.position_embedding.weight, std=0.01)

    def forward(self, tokens: Tensor, num_layers: int | None = None) -> TextEncoderOutput:
        n = _check_depth(self.cfg, num_layers)
        tm = self.text_model
        states = _run(tm.embeddings(tokens), tm.encoder.layers, n)
        final = tm.final_layer_norm(states[-1])
        pooled = None
        if n == self.cfg.layers:
            pooled = final[torch.arange(final.shape[0], device=final.device), _eos_index(tokens)]
        return TextEncoderOutput(states, final, pooled)


# --- open_clip layout (OpenCLIP ViT-H/14, ViT-bigG/14) --------------------------------------------


class _OpenCLIPAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.normal_(self.in_proj_weight, std=width**-0.5)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        return self.out_proj(_causal_attention(q, k, v, self.heads))


class _OpenCLIPMLP(nn.Module):
    def __init__(self, width: int, hidden: int, activation: str):
        super().__init__()
        self.activation = activation
        self.c_fc = nn.Linear(width, hidden)
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(_activation(self.activation, self.c_fc(x)))


class _ResidualBlock(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width)
        self.attn = _OpenCLIPAttention(cfg.width, cfg.heads)
        self.ln_2 = nn.LayerNorm(cfg.width)
        self.mlp = _OpenCLIPMLP(cfg.width, int(cfg.width * cfg.mlp_ratio), cfg.activation)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class _OpenCLIPTransformer(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.resblocks = nn.ModuleList(_ResidualBlock(cfg) for _ in range(cfg.layers))


class OpenCLIPTextModel(nn.Module):
    """open_clip text tower with its keys; SD2's (ViT-H) and SDXL's second (ViT-bigG) encoder."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.max_positions, cfg.width))
        self.transformer = _OpenCLIPTransformer(cfg)
        self.ln_final = nn.LayerNorm(cfg.width)
        # diffusers' copy of SD 2.x's encoder has no projection (SD 2.x never uses the pooled output)
        self.text_projection = (
            nn.Parameter(torch.empty(cfg.width, cfg.projection_dim)) if cfg.projection_dim is not None else None
        )
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        if self.text_projection is not None:
            nn.init.normal_(self.text_projection, std=cfg.width**-0.5)

    def forward(self, tokens: Tensor, num_layers: int | None = None) -> TextEncoderOutput:
        n = _check_depth(self.cfg, num_layers)
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]
        states = _run(x, self.transformer.resblocks, n)
        final = self.ln_final(states[-1])
        pooled = None
        if n == self.cfg.layers:
            eos = final[torch.arange(final.shape[0], device=final.device), _eos_index(tokens)]
            pooled = eos @ self.text_projection if self.text_projection is not None else eos
        return TextEncoderOutput(states, final, pooled)


def build_text_encoder(cfg: TextEncoderConfig) -> nn.Module:
    """The text encoder class for ``cfg.layout``."""
    return CLIPTextModel(cfg) if cfg.layout == "hf" else OpenCLIPTextModel(cfg)
