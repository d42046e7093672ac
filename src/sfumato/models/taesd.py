"""A tiny VAE decoder compatible with TAESD (madebyollin's "Tiny AutoEncoder for Stable Diffusion").

TAESD decodes the *scaled* latents (as the sampler sees them) with plain 3×3 convolutions, ReLUs
and nearest-neighbour ×2 upsampling; it is far cheaper than the full VAE decoder and good enough
for previews and drafts. The module's keys equal those of ``taesd_decoder.safetensors`` /
``taesd_decoder.pth`` (a flat sequence: ``1.weight``, ``3.conv.0.weight``, …); diffusers'
``AutoencoderTiny`` stores the same layers as ``decoder.layers.{i − 1}`` and converts at the
import boundary (``checkpoint.taesd.convert_diffusers_decoder``).

Layout (defaults = TAESD / TAESDXL): tanh clamp of the latents to ±3, conv to 64 channels + ReLU,
then groups of residual blocks (conv-ReLU-conv-ReLU-conv, added to the input, ReLU) separated by
×2 upsampling and a bias-free conv; a last conv to RGB in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class TinyDecoderConfig:
    latent_channels: int = 4
    channels: int = 64
    blocks: tuple[int, ...] = (3, 3, 3, 1)   # residual blocks per resolution; one ×2 upsampling between groups


class Clamp(nn.Module):
    """Soft clamp of the latents to ±3 (no parameters)."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
        )
        self.skip = nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


class TinyDecoder(nn.Sequential):
    """Scaled latents [B, C, h, w] → RGB in [0, 1] [B, 3, h·2^k, w·2^k] (k = len(blocks) − 1)."""

    def __init__(self, cfg: TinyDecoderConfig = TinyDecoderConfig()) -> None:
        c = cfg.channels
        layers: list[nn.Module] = [Clamp(), nn.Conv2d(cfg.latent_channels, c, 3, padding=1), nn.ReLU()]
        for i, n in enumerate(cfg.blocks):
            layers += [Block(c) for _ in range(n)]
            if i < len(cfg.blocks) - 1:
                layers += [nn.Upsample(scale_factor=2), nn.Conv2d(c, c, 3, padding=1, bias=False)]
        layers.append(nn.Conv2d(c, 3, 3, padding=1))
        super().__init__(*layers)
        self.cfg = cfg

    @property
    def factor(self) -> int:
        return 2 ** (len(self.cfg.blocks) - 1)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents → uint8 [B, H, W, 3] (the same contract as the full VAE's decode in the pipeline)."""
        w = next(self.parameters())
        rgb = self(latents.to(w.device, w.dtype)).float().clamp(0, 1)
        return (rgb * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
