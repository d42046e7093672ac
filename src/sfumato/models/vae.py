"""The KL autoencoder of Stable Diffusion (LDM layout, so `first_stage_model.*` loads strictly).

Images live in [-1, 1]; latents returned by `encode` and taken by `decode` are *unscaled*:
the pipeline multiplies by `VAEConfig.scale_factor` on the way into the diffusion model.
The arithmetic runs in `AutoencoderKL.compute_dtype` (fp32 for half-precision weights on a CPU
without fast bf16, see `layers.resolve_compute_dtype`); `sfumato.pipeline.tiling` decodes and
encodes large images tile by tile.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import Conv2d, GroupNorm, resolve_compute_dtype, silu, upsample_conv


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    z_channels: int = 4
    embed_dim: int = 4
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    norm_groups: int = 32
    scale_factor: float = 0.18215  # used by the pipeline, not inside the module


SD_VAE = VAEConfig()
SDXL_VAE = VAEConfig(scale_factor=0.13025)


def _norm(channels: int, groups: int) -> GroupNorm:
    return GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with a 1x1 `nin_shortcut` when the width changes."""

    def __init__(self, in_ch: int, out_ch: int, groups: int):
        super().__init__()
        self.norm1 = _norm(in_ch, groups)
        self.conv1 = Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _norm(out_ch, groups)
        self.conv2 = Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(silu(self.norm1(x)))
        h = self.conv2(silu(self.norm2(h)))
        return h.add_(x if self.nin_shortcut is None else self.nin_shortcut(x))


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions, with 1x1 conv projections (run as
    matrix products on the pixels' token sequence)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = Conv2d(channels, channels, 1)
        self.k = Conv2d(channels, channels, 1)
        self.v = Conv2d(channels, channels, 1)
        self.proj_out = Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        y = self.norm(x).flatten(2).transpose(1, 2)[:, None]  # [B, 1, HW, C]
        out = F.scaled_dot_product_attention(self.q.as_linear(y), self.k.as_linear(y), self.v.as_linear(y))
        out = self.proj_out.as_linear(out[:, 0])
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class Downsample(nn.Module):
    """Pad right/bottom by one, then a stride-2 3x3 conv without padding (as LDM does)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv (computed at the input resolution, see `upsample_conv`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return upsample_conv(x, self.conv)


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class DownLevel(nn.Module):
    """One encoder resolution: `block` resnets, then `downsample` except at the last level."""

    def __init__(self, blocks: list[ResnetBlock], downsample: Downsample | None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class UpLevel(nn.Module):
    """One decoder resolution: `block` resnets, then `upsample` except at full resolution."""

    def __init__(self, blocks: list[ResnetBlock], upsample: Upsample | None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.upsample = upsample

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return x if self.upsample is None else self.upsample(x)


class Encoder(nn.Module):
    """Image [B, in, H, W] -> Gaussian moments [B, 2*z, H/f, W/f] with f = 2**(levels-1)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        g = cfg.norm_groups
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = cfg.ch
        for i, width in enumerate(widths):
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(block_in, width, g))
                block_in = width
            last = i == len(widths) - 1
            self.down.append(DownLevel(blocks, None if last else Downsample(width)))
        self.mid = MidBlock(block_in, g)
        self.norm_out = _norm(block_in, g)
        self.conv_out = Conv2d(block_in, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent [B, z, h, w] -> image [B, out, h*f, w*f]. `up[i]` mirrors `down[i]`, so it runs last-first."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        g = cfg.norm_groups
        widths = [cfg.ch * m for m in cfg.ch_mult]
        block_in = widths[-1]
        self.conv_in = Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = MidBlock(block_in, g)
        levels: list[UpLevel] = []
        for i in reversed(range(len(widths))):
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, widths[i], g))
                block_in = widths[i]
            levels.insert(0, UpLevel(blocks, Upsample(block_in) if i != 0 else None))
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(block_in, g)
        self.conv_out = Conv2d(block_in, cfg.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(silu(self.norm_out(h)))


class DiagonalGaussian:
    """The encoder's posterior: `mean` and `logvar` (clamped to [-30, 20]) split along channels."""

    def __init__(self, moments: Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def mode(self) -> Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """mean + std * noise, the noise drawn in fp32 on the CPU (reproducible on any device)."""
        noise = torch.randn(self.mean.shape, generator=generator, device="cpu", dtype=torch.float32)
        return self.mean + self.std * noise.to(self.mean.device, self.mean.dtype)


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        self.dtype_override: torch.dtype | None = None  # compute dtype; None = chosen by resolve_compute_dtype

    @property
    def compute_dtype(self) -> torch.dtype:
        w = self.post_quant_conv.weight
        return resolve_compute_dtype(w.dtype, w.device, self.dtype_override)

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """Image in [-1, 1], [B, 3, H, W] -> posterior over unscaled latents (in x's dtype)."""
        moments = self.quant_conv(self.encoder(_channels_last(x, self.compute_dtype)))
        return DiagonalGaussian(moments.to(x.dtype).contiguous())

    def decode(self, z: Tensor) -> Tensor:
        """Unscaled latents -> image, roughly in [-1, 1] (not clamped), in z's dtype."""
        return self.decoder(self.post_quant_conv(_channels_last(z, self.compute_dtype))).to(z.dtype).contiguous()


def _channels_last(x: Tensor, dtype: torch.dtype) -> Tensor:
    """Channels-last activations: the large full-resolution convolutions run without layout reorders."""
    return x.to(dtype).contiguous(memory_format=torch.channels_last)
