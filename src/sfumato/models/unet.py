"""The Stable Diffusion UNet (LDM "openaimodel" layout) for SD 1.x, SD 2.x, SDXL and inpainting.

Attribute paths equal the keys of the original single-file checkpoints after stripping
``model.diffusion_model.``, so those load with ``load_state_dict(strict=True)``.

Speed on the CPU: attention is SDPA, the transformers' 1×1 projections are plain matrix products
on the token sequence, GEGLU takes its two halves as separate products, upsampling convolutions
run at the low resolution (`layers.upsample_conv`), SiLUs of temporaries run in place, and the
arithmetic runs in `UNetModel.compute_dtype` (see `layers.resolve_compute_dtype`).
Channels-last activations were measured slower here (each conv weight gets re-laid-out per call).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import (
    Conv2d, GroupNorm, LayerNorm, Linear, cast, cast_weight, resolve_compute_dtype, silu, upsample_conv,
)


@dataclass(frozen=True)
class UNetConfig:
    """Hyper-parameters of the UNet; the presets below cover the released families."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    transformer_depth: tuple[int, ...] = (1, 1, 1, 0)  # per level; 0 = no attention at that level
    transformer_depth_middle: int = 1
    num_heads: int = 8  # used when num_head_channels == -1 (SD 1.x)
    num_head_channels: int = -1  # SD 2.x / SDXL: 64
    context_dim: int = 768
    use_linear_in_transformer: bool = False  # proj_in / proj_out are Linear instead of 1x1 convs
    adm_in_channels: int | None = None  # size of the vector `y` (SDXL), None = no label_emb
    norm_groups: int = 32
    num_classes: int | None = None  # class-label embedding (x4 upscaler: noise level), None = none
    disable_self_attentions: tuple[bool, ...] | None = None  # per level: attn1 attends to the context

    def __post_init__(self) -> None:
        if len(self.transformer_depth) != len(self.channel_mult):
            raise ValueError("transformer_depth needs one entry per channel_mult level")
        if self.transformer_depth_middle < 1:
            raise ValueError("transformer_depth_middle must be >= 1")
        if self.disable_self_attentions is not None and len(self.disable_self_attentions) != len(self.channel_mult):
            raise ValueError("disable_self_attentions needs one entry per channel_mult level")
        if self.num_classes is not None and self.adm_in_channels is not None:
            raise ValueError("a UNet takes either class labels (num_classes) or a vector y (adm_in_channels)")

    def heads(self, channels: int) -> tuple[int, int]:
        """(number of heads, channels per head) of a transformer with `channels` channels."""
        if self.num_head_channels == -1:
            return self.num_heads, channels // self.num_heads
        return channels // self.num_head_channels, self.num_head_channels


SD1_UNET = UNetConfig()
SD1_INPAINT_UNET = replace(SD1_UNET, in_channels=9)
SD2_UNET = UNetConfig(num_head_channels=64, context_dim=1024, use_linear_in_transformer=True)
SDXL_UNET = UNetConfig(
    channel_mult=(1, 2, 4), transformer_depth=(0, 2, 10), transformer_depth_middle=10,
    num_head_channels=64, context_dim=2048, use_linear_in_transformer=True, adm_in_channels=2816,
)
SDXL_REFINER_UNET = UNetConfig(
    model_channels=384, channel_mult=(1, 2, 4, 4), transformer_depth=(0, 4, 4, 0),
    transformer_depth_middle=4, num_head_channels=64, context_dim=1280,
    use_linear_in_transformer=True, adm_in_channels=2560,
)


def timestep_embedding(t: Tensor, dim: int, max_period: int = 10000) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps `t` (shape (N,)): [cos, sin] halves, fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the time embedding added in between."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, groups: int) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(
            GroupNorm(groups, channels), nn.SiLU(), Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm(groups, out_channels), nn.SiLU(), nn.Dropout(0.0),
            Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = nn.Identity() if channels == out_channels else Conv2d(channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        norm1, _, conv1 = self.in_layers
        norm2, _, _, conv2 = self.out_layers
        h = conv1(silu(norm1(x))) + self.emb_layers(emb)[:, :, None, None]
        return conv2(silu(norm2(h))).add_(self.skip_connection(x))


class Attention(nn.Module):
    """Multi-head attention; self-attention when no context is given."""

    def __init__(self, dim: int, context_dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = Linear(dim, inner, bias=False)
        self.to_k = Linear(context_dim, inner, bias=False)
        self.to_v = Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(Linear(inner, dim), nn.Dropout(0.0))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        b = x.shape[0]
        q, k, v = (
            t.view(b, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2)
            for t in (self.to_q(x), self.to_k(context), self.to_v(context))
        )
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, -1, q.shape[1] * q.shape[3]))


class GEGLU(nn.Module):
    """Linear projection to twice the width, gated by GELU."""

    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.proj = Linear(dim, inner * 2)
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        n = self.inner
        if not isinstance(self.proj, Linear):   # a replaced projection (models.quant): one product, split
            h = self.proj(x)
            return h[..., :n] * F.gelu(h[..., n:])
        # two products on row slices of the weight: contiguous halves, no strided chunk of one output
        w, b = cast_weight(self.proj.weight, x), cast(self.proj.bias, x)
        return F.linear(x, w[:n], b[:n]) * F.gelu(F.linear(x, w[n:], b[n:]))


FF_CHUNK_TOKENS = 2048  # without autograd the feed-forward runs on this many tokens at a time


class FeedForward(nn.Module):
    """GEGLU to 4× the width and back. Without autograd, in chunks of FF_CHUNK_TOKENS tokens: its
    8× wide intermediates (168 MB at the 64×64 level of a 512² image with CFG) exist one chunk at a time."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), Linear(dim * mult, dim))

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if torch.is_grad_enabled() or rows.shape[0] <= FF_CHUNK_TOKENS:
            return self.net(x)
        out = torch.cat([self.net(chunk) for chunk in rows.split(FF_CHUNK_TOKENS)])
        return out.view(x.shape)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention and GEGLU feed-forward, each residual. With
    `cross_only` (the x4 upscaler's disable_self_attn) the first attention attends to the context too."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, cross_only: bool = False) -> None:
        super().__init__()
        self.cross_only = cross_only
        self.attn1 = Attention(dim, context_dim if cross_only else dim, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = Attention(dim, context_dim, heads, dim_head)
        self.norm1 = LayerNorm(dim)
        self.norm2 = LayerNorm(dim)
        self.norm3 = LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = x + self.attn1(self.norm1(x), context if self.cross_only else None)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Applies transformer blocks to the pixels of a feature map, conditioned on a context sequence."""

    def __init__(self, channels: int, depth: int, context_dim: int, cfg: UNetConfig, cross_only: bool = False) -> None:
        super().__init__()
        heads, dim_head = cfg.heads(channels)
        self.linear = cfg.use_linear_in_transformer
        self.norm = GroupNorm(cfg.norm_groups, channels, eps=1e-6)
        proj = (lambda: Linear(channels, channels)) if self.linear else (lambda: Conv2d(channels, channels, 1))
        self.proj_in = proj()
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, heads, dim_head, context_dim, cross_only) for _ in range(depth)
        )
        self.proj_out = proj()

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        b, c, h, w = x.shape
        y = self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c)
        y = self.proj_in(y) if self.linear else self.proj_in.as_linear(y)
        for block in self.transformer_blocks:
            y = block(y, context)
        y = self.proj_out(y) if self.linear else self.proj_out.as_linear(y)
        return x + y.view(b, h, w, c).permute(0, 3, 1, 2)


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling (to `size`, else ×2) followed by a 3×3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        if size is None or tuple(size) == (2 * x.shape[-2], 2 * x.shape[-1]):
            return upsample_conv(x, self.conv)
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    """A sequence of layers, each given the arguments it needs."""

    def forward(self, x: Tensor, emb: Tensor, context: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    """The denoising UNet: predicts eps (or v) from a noisy latent, timesteps and a context sequence."""

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.dtype_override: torch.dtype | None = None  # compute dtype; None = chosen by resolve_compute_dtype
        mc, groups = cfg.model_channels, cfg.norm_groups
        emb_dim = 4 * mc
        self.time_embed = nn.Sequential(Linear(mc, emb_dim), nn.SiLU(), Linear(emb_dim, emb_dim))
        if cfg.adm_in_channels is not None:
            self.label_emb = nn.Sequential(
                nn.Sequential(Linear(cfg.adm_in_channels, emb_dim), nn.SiLU(), Linear(emb_dim, emb_dim))
            )
        elif cfg.num_classes is not None:
            self.label_emb = nn.Embedding(cfg.num_classes, emb_dim)
        cross_only = cfg.disable_self_attentions or (False,) * len(cfg.channel_mult)

        def stage(ch: int, out: int, depth: int, level: int) -> list[nn.Module]:
            layers: list[nn.Module] = [ResBlock(ch, emb_dim, out, groups)]
            if depth:
                layers.append(SpatialTransformer(out, depth, cfg.context_dim, cfg, cross_only[level]))
            return layers

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(Conv2d(cfg.in_channels, mc, 3, padding=1))])
        skip_channels = [mc]
        ch = mc
        last = len(cfg.channel_mult) - 1
        for level, (mult, depth) in enumerate(zip(cfg.channel_mult, cfg.transformer_depth)):
            for _ in range(cfg.num_res_blocks):
                self.input_blocks.append(TimestepEmbedSequential(*stage(ch, mult * mc, depth, level)))
                ch = mult * mc
                skip_channels.append(ch)
            if level != last:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)

        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, emb_dim, ch, groups),
            SpatialTransformer(ch, cfg.transformer_depth_middle, cfg.context_dim, cfg),
            ResBlock(ch, emb_dim, ch, groups),
        )

        self.output_blocks = nn.ModuleList()
        for level in reversed(range(last + 1)):
            mult, depth = cfg.channel_mult[level], cfg.transformer_depth[level]
            for i in range(cfg.num_res_blocks + 1):
                layers = stage(ch + skip_channels.pop(), mult * mc, depth, level)
                ch = mult * mc
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(GroupNorm(groups, ch), nn.SiLU(), Conv2d(ch, cfg.out_channels, 3, padding=1))

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of the arithmetic: `dtype_override`, else the weights' dtype except half-precision
        weights on a CPU without fast bf16, which compute in fp32 (see `layers.resolve_compute_dtype`)."""
        w = self.time_embed[0].weight
        return resolve_compute_dtype(w.dtype, w.device, self.dtype_override)

    def embed(self, timesteps: Tensor, y: Tensor | None, batch: int, dtype: torch.dtype | None = None) -> Tensor:
        """The time (+ SDXL vector or class label) embedding given to every ResBlock, in `dtype` (default:
        compute dtype). `y` is the SDXL vector, or the integer class labels (N,) of a `num_classes` UNet."""
        dtype = dtype or self.compute_dtype
        t = timesteps.reshape(-1).expand(batch) if timesteps.numel() == 1 else timesteps
        emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels).to(dtype))
        if self.cfg.adm_in_channels is not None:
            if y is None:
                raise ValueError("this UNet needs the vector conditioning y")
            emb = emb + self.label_emb(y.to(dtype))
        elif self.cfg.num_classes is not None:
            if y is None:
                raise ValueError("this UNet needs class labels y (the x4 upscaler: the noise level)")
            emb = emb + self.label_emb(y.long().reshape(-1).expand(batch)).to(dtype)
        elif y is not None:
            raise ValueError("this UNet takes no vector conditioning y")
        return emb

    def forward(
        self, x: Tensor, timesteps: Tensor, context: Tensor, y: Tensor | None = None,
        control: Sequence[Tensor] | None = None,
    ) -> Tensor:
        """x: (B, in_channels, H, W) latent; timesteps: (B,) or scalar; context: (B, L, context_dim);
        y: (B, adm_in_channels) for SDXL, (B,) class labels for a `num_classes` UNet; control: ControlNet
        residuals, one per input block (added to its skip connection) and one for the middle block, last.
        Any latent size works: upsampling follows the skip sizes.
        Computes in `compute_dtype` and returns the prediction in x's dtype."""
        self.check_control(control)
        dtype = self.compute_dtype
        emb = self.embed(timesteps, y, x.shape[0], dtype)
        context = context.to(dtype)
        h, skips = self.run_input(x.to(dtype), emb, context, len(self.input_blocks))
        h = self.middle_block(h, emb, context)
        if control is not None:
            h = h + control[-1].to(dtype)
        return self.run_output(h, skips, emb, context, control, 0).to(x.dtype).contiguous()

    def check_control(self, control: Sequence[Tensor] | None) -> None:
        if control is not None and len(control) != len(self.input_blocks) + 1:
            raise ValueError(f"{len(control)} control residuals for a UNet with {len(self.input_blocks)} input "
                             "blocks (one per input block and one for the middle block expected)")

    def run_input(self, h: Tensor, emb: Tensor, context: Tensor, blocks: int) -> tuple[Tensor, list[Tensor]]:
        """The first `blocks` input blocks: the last output and every block's output (the skips)."""
        skips: list[Tensor] = []
        for block in self.input_blocks[:blocks]:
            h = block(h, emb, context)
            skips.append(h)
        return h, skips

    def run_output(self, h: Tensor, skips: list[Tensor], emb: Tensor, context: Tensor,
                   control: Sequence[Tensor] | None, start: int,
                   entering: Callable[[int, Tensor], None] | None = None) -> Tensor:
        """Output blocks `start`… on `h`, each joined with the next skip from the end (plus its control
        residual), then the head. `entering(j, h)` sees the map that enters output block j."""
        for j in range(start, len(self.output_blocks)):
            if entering is not None:
                entering(j, h)
            skip = skips.pop()
            if control is not None:
                skip = skip + control[len(skips)].to(h.dtype)
            h = torch.cat([h, skip], dim=1)
            h = self.output_blocks[j](h, emb, context, skips[-1].shape[-2:] if skips else None)
        return self.out(h)
