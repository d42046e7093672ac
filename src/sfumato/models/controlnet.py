"""ControlNet (Zhang et al. 2023): a trainable copy of the UNet's encoder that turns a control image
(edges, depth, scribbles …) into residuals added to the UNet's skip connections and middle block.

Attribute paths equal the keys of the original ControlNet files after stripping ``control_model.``:
``input_hint_block`` (the control image's small conv encoder), ``time_embed``, ``label_emb`` (SDXL),
``input_blocks`` and ``middle_block`` (the copied encoder), ``zero_convs`` and ``middle_block_out``
(the 1×1 convolutions, zero at initialisation, that read the residuals out).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .layers import Conv2d, Linear, resolve_compute_dtype
from .unet import Downsample, ResBlock, SpatialTransformer, TimestepEmbedSequential, UNetConfig, timestep_embedding


@dataclass(frozen=True)
class ControlNetConfig:
    """The UNet whose encoder is copied, and the control image's encoder.

    ``hint_widths`` are the widths of the hint encoder's levels; each level after the first halves
    the resolution, so the default (four levels) maps a pixel-space image onto the latent grid (÷8).
    """

    unet: UNetConfig
    hint_channels: int = 3
    hint_widths: tuple[int, ...] = (16, 32, 96, 256)

    def __post_init__(self) -> None:
        if self.hint_channels < 1 or not self.hint_widths:
            raise ValueError("hint_channels must be >= 1 and hint_widths non-empty")

    @property
    def hint_scale(self) -> int:
        """How many control-image pixels make one latent pixel, per side."""
        return 2 ** (len(self.hint_widths) - 1)


def hint_encoder(cfg: ControlNetConfig) -> nn.Sequential:
    """conv-SiLU, then per further level a conv and a stride-2 conv (each followed by SiLU), then a
    conv to the UNet's width: the layout of ``input_hint_block`` (SiLUs at the odd indices)."""
    w = cfg.hint_widths
    layers: list[nn.Module] = [Conv2d(cfg.hint_channels, w[0], 3, padding=1), nn.SiLU()]
    for a, b in zip(w, w[1:]):
        layers += [Conv2d(a, a, 3, padding=1), nn.SiLU(), Conv2d(a, b, 3, padding=1, stride=2), nn.SiLU()]
    layers.append(Conv2d(w[-1], cfg.unet.model_channels, 3, padding=1))
    return nn.Sequential(*layers)


def _zero_conv(channels: int) -> nn.Sequential:
    return nn.Sequential(Conv2d(channels, channels, 1))


class ControlNet(nn.Module):
    """forward(x, hint, t, context, y) → one residual per UNet input block, then the middle block's."""

    def __init__(self, cfg: ControlNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.dtype_override: torch.dtype | None = None
        u = cfg.unet
        mc, groups, emb_dim = u.model_channels, u.norm_groups, 4 * u.model_channels
        self.time_embed = nn.Sequential(Linear(mc, emb_dim), nn.SiLU(), Linear(emb_dim, emb_dim))
        if u.adm_in_channels is not None:
            self.label_emb = nn.Sequential(
                nn.Sequential(Linear(u.adm_in_channels, emb_dim), nn.SiLU(), Linear(emb_dim, emb_dim))
            )
        self.input_hint_block = hint_encoder(cfg)

        # The UNet's encoder, block for block (see UNetModel), each block read out by a zero conv.
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(Conv2d(u.in_channels, mc, 3, padding=1))])
        self.zero_convs = nn.ModuleList([_zero_conv(mc)])
        ch, last = mc, len(u.channel_mult) - 1
        for level, (mult, depth) in enumerate(zip(u.channel_mult, u.transformer_depth)):
            for _ in range(u.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb_dim, mult * mc, groups)]
                ch = mult * mc
                if depth:
                    layers.append(SpatialTransformer(ch, depth, u.context_dim, u))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                self.zero_convs.append(_zero_conv(ch))
            if level != last:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                self.zero_convs.append(_zero_conv(ch))
        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, emb_dim, ch, groups),
            SpatialTransformer(ch, u.transformer_depth_middle, u.context_dim, u),
            ResBlock(ch, emb_dim, ch, groups),
        )
        self.middle_block_out = _zero_conv(ch)

    @property
    def compute_dtype(self) -> torch.dtype:
        """As `UNetModel.compute_dtype`: the override, else the weights' dtype (half on a slow-bf16 CPU → fp32)."""
        w = self.time_embed[0].weight
        return resolve_compute_dtype(w.dtype, w.device, self.dtype_override)

    def embed(self, timesteps: Tensor, y: Tensor | None, batch: int, dtype: torch.dtype) -> Tensor:
        t = timesteps.reshape(-1).expand(batch) if timesteps.numel() == 1 else timesteps
        emb = self.time_embed(timestep_embedding(t, self.cfg.unet.model_channels).to(dtype))
        if self.cfg.unet.adm_in_channels is not None:
            if y is None:
                raise ValueError("this ControlNet needs the vector conditioning y")
            emb = emb + self.label_emb(y.to(dtype))
        elif y is not None:
            raise ValueError("this ControlNet takes no vector conditioning y")
        return emb

    def forward(
        self, x: Tensor, hint: Tensor, timesteps: Tensor, context: Tensor, y: Tensor | None = None,
        strength: float = 1.0,
    ) -> list[Tensor]:
        """x: (B, in_channels, h, w) latent; hint: (B or 1, hint_channels, h·s, w·s) control image in
        [0, 1] with s = ``cfg.hint_scale``; timesteps, context, y as for the UNet. Returns the residuals
        (scaled by `strength`) in the compute dtype, channels-last, in the UNet's skip order."""
        s = self.cfg.hint_scale
        if hint.ndim != 4 or hint.shape[1] != self.cfg.hint_channels or tuple(hint.shape[-2:]) != (
            x.shape[-2] * s, x.shape[-1] * s
        ):
            raise ValueError(
                f"hint must be (B, {self.cfg.hint_channels}, {x.shape[-2] * s}, {x.shape[-1] * s}) for a latent "
                f"of {tuple(x.shape[-2:])}, got {tuple(hint.shape)}"
            )
        dtype = self.compute_dtype
        emb = self.embed(timesteps, y, x.shape[0], dtype)
        context = context.to(dtype)
        guided = self.input_hint_block(hint.to(dtype).contiguous(memory_format=torch.channels_last))
        h = x.to(dtype).contiguous(memory_format=torch.channels_last)
        out: list[Tensor] = []
        for i, (block, zero_conv) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = block(h, emb, context)
            if i == 0:
                h = h + guided
            out.append(zero_conv(h))
        out.append(self.middle_block_out(self.middle_block(h, emb, context)))
        return out if strength == 1.0 else [r * strength for r in out]
