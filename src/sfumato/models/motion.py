"""AnimateDiff motion modules: temporal transformers that let a still-image UNet see the frames of a
clip. Each sits after a spatial block of the UNet (after its attention, or its ResBlock where it has
none): the block's output, (B·F, C, H, W), is group-normed over channels across the F frames, each
pixel's F feature vectors run through transformer blocks whose two attentions are over frames (a
sinusoidal position encoding added before each) and a GEGLU feed-forward, and the result is added
back. Down blocks take ``num_res_blocks`` modules each, up blocks one more, the middle block (v2 and
the SDXL module) one.

Attribute names are the published files' keys (``down_blocks.0.motion_modules.0.temporal_transformer.
transformer_blocks.0.attention_blocks.0.to_q.weight``, ``….pos_encoder.pe``, ``….norms.0``,
``….ff.net.0.proj``, ``….ff_norm``, ``mid_block.motion_modules.0…``, ``up_blocks.…``). sfumato's
own modules may also carry ``text_kv.<attention path>.{k,v}_{down,up}.weight``: low-rank deltas on
the UNet's text keys and values, attached with the temporal blocks (see ``train/motion.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class MotionConfig:
    channels: tuple[int, ...] = (320, 640, 1280, 1280)   # each UNet level's width
    per_down: int = 2           # modules per down block (the UNet's num_res_blocks); up blocks take one more
    mid: bool = True
    max_frames: int = 32        # the position encoding's length (the clip length it was trained on)
    layers: int = 1             # transformer blocks per module
    heads: int = 8
    groups: int = 32
    # sfumato's own addition (no published module has one): low-rank deltas on the keys and values of
    # the UNet's text cross-attentions, so the clip's motion words can reach the frames. Per steered
    # attention: (its path with "." as "__", the text width, the attention's width); and the rank.
    text_kv: tuple[tuple[str, int, int], ...] = ()
    text_rank: int = 0

    @property
    def version(self) -> str:
        """AnimateDiff's name for the layout (v1: 24-frame encoding, no mid block; v2: a mid block;
        v3: 32 frames, no mid block); SDXL modules have three levels."""
        if len(self.channels) == 3:
            return "sdxl"
        return "v2" if self.mid else ("v1" if self.max_frames == 24 else "v3")


def sinusoid(length: int, dim: int) -> Tensor:
    position = torch.arange(length).unsqueeze(1)
    div = torch.exp(torch.arange(0, dim, 2) * (-math.log(10000.0) / dim))
    pe = torch.zeros(1, length, dim)
    pe[0, :, 0::2] = torch.sin(position * div)
    pe[0, :, 1::2] = torch.cos(position * div)
    return pe


class PositionalEncoding(nn.Module):
    def __init__(self, dim: int, length: int):
        super().__init__()
        self.register_buffer("pe", sinusoid(length, dim))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.pe[:, :x.shape[1]].to(x.dtype)


class TemporalAttention(nn.Module):
    def __init__(self, dim: int, heads: int, max_frames: int):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        self.pos_encoder = PositionalEncoding(dim, max_frames)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pos_encoder(x)
        b, n, c = x.shape
        q, k, v = (t(x).view(b, n, self.heads, c // self.heads).transpose(1, 2) for t in (self.to_q, self.to_k, self.to_v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out[0](out.transpose(1, 2).reshape(b, n, c))


class _GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x: Tensor) -> Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class _FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.ModuleList([_GEGLU(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim)])

    def forward(self, x: Tensor) -> Tensor:
        return self.net[2](self.net[0](x))


class TemporalBlock(nn.Module):
    def __init__(self, dim: int, heads: int, max_frames: int):
        super().__init__()
        self.attention_blocks = nn.ModuleList([TemporalAttention(dim, heads, max_frames) for _ in range(2)])
        self.norms = nn.ModuleList([nn.LayerNorm(dim) for _ in range(2)])
        self.ff = _FeedForward(dim)
        self.ff_norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        for attn, norm in zip(self.attention_blocks, self.norms):
            x = attn(norm(x)) + x
        return self.ff(self.ff_norm(x)) + x


class TemporalTransformer(nn.Module):
    def __init__(self, channels: int, cfg: MotionConfig):
        super().__init__()
        self.norm = nn.GroupNorm(cfg.groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList([TemporalBlock(channels, cfg.heads, cfg.max_frames)
                                                 for _ in range(cfg.layers)])
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: Tensor, frames: int) -> Tensor:
        bf, c, h, w = x.shape
        b = bf // frames
        y = x.reshape(b, frames, c, h, w).permute(0, 2, 1, 3, 4)                 # (B, C, F, H, W)
        y = self.norm(y).permute(0, 3, 4, 2, 1).reshape(b * h * w, frames, c)    # a sequence per pixel
        y = self.proj_in(y)
        for block in self.transformer_blocks:
            y = block(y)
        y = self.proj_out(y).reshape(b, h, w, frames, c).permute(0, 3, 4, 1, 2).reshape(bf, c, h, w)
        return x + y


class MotionModule(nn.Module):
    def __init__(self, channels: int, cfg: MotionConfig):
        super().__init__()
        self.temporal_transformer = TemporalTransformer(channels, cfg)

    def forward(self, x: Tensor, frames: int) -> Tensor:
        return self.temporal_transformer(x, frames)


class TextKV(nn.Module):
    """Low-rank deltas added to one cross-attention's key and value projections of the text."""

    def __init__(self, context_dim: int, width: int, rank: int):
        super().__init__()
        self.k_down, self.v_down = (nn.Linear(context_dim, rank, bias=False) for _ in range(2))
        self.k_up, self.v_up = (nn.Linear(rank, width, bias=False) for _ in range(2))

    def key(self, context: Tensor) -> Tensor:
        return self.k_up(self.k_down(context))

    def value(self, context: Tensor) -> Tensor:
        return self.v_up(self.v_down(context))


class _Level(nn.Module):
    def __init__(self, channels: int, count: int, cfg: MotionConfig):
        super().__init__()
        self.motion_modules = nn.ModuleList([MotionModule(channels, cfg) for _ in range(count)])


class MotionAdapter(nn.Module):
    """Every motion module of one file, in the file's layout."""

    def __init__(self, cfg: MotionConfig):
        super().__init__()
        self.cfg = cfg
        self.down_blocks = nn.ModuleList([_Level(c, cfg.per_down, cfg) for c in cfg.channels])
        self.mid_block = _Level(cfg.channels[-1], 1, cfg) if cfg.mid else None
        self.up_blocks = nn.ModuleList([_Level(c, cfg.per_down + 1, cfg) for c in reversed(cfg.channels)])
        self.text_kv = nn.ModuleDict({name: TextKV(ctx, width, cfg.text_rank) for name, ctx, width in cfg.text_kv}) \
            if cfg.text_kv else None


def motion_config_from_state(sd: dict[str, Tensor]) -> MotionConfig:
    """The configuration of a motion-module state dict in the original layout, from its keys and shapes."""
    levels = sorted({int(k.split(".")[1]) for k in sd if k.startswith("down_blocks.")})
    if not levels:
        raise ValueError("no down_blocks.N.motion_modules keys")
    channels = tuple(int(sd[f"down_blocks.{i}.motion_modules.0.temporal_transformer.proj_in.weight"].shape[0])
                     for i in levels)
    per_down = len({int(k.split(".")[3]) for k in sd if k.startswith("down_blocks.0.motion_modules.")})
    layers = len({int(k.split(".")[6]) for k in sd
                  if k.startswith("down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.")})
    pe = [v for k, v in sd.items() if k.endswith("pos_encoder.pe")]
    max_frames = int(pe[0].shape[1]) if pe else 32
    mid = any(k.startswith("mid_block.") for k in sd)
    # AnimateDiff's 32 groups; modules made for other widths (the bundled model's) use the largest of
    # 32, 16, 8, 4 that divides every level
    groups = next(g for g in (32, 16, 8, 4, 2, 1) if all(c % g == 0 for c in channels))
    names = sorted({k.split(".")[1] for k in sd if k.startswith("text_kv.")})
    text_kv = tuple((n, int(sd[f"text_kv.{n}.k_down.weight"].shape[1]), int(sd[f"text_kv.{n}.k_up.weight"].shape[0]))
                    for n in names)
    ranks = {int(sd[f"text_kv.{n}.{w}.weight"].shape[i]) for n in names
             for w, i in (("k_down", 0), ("v_down", 0), ("k_up", 1), ("v_up", 1))}
    if len(ranks) > 1:
        raise ValueError(f"its text deltas have different ranks {sorted(ranks)}")
    rank = ranks.pop() if names else 0
    return MotionConfig(channels=channels, per_down=per_down, mid=mid, max_frames=max_frames, layers=layers,
                        groups=groups, text_kv=text_kv, text_rank=rank)
