"""MiDaS v3 DPT depth models, the ones ControlNet's depth annotator and SD 2's depth2img use:
DPT-Hybrid (``dpt_hybrid-midas-501f0c75.pt``: a ResNet-50 v2 stem and three stages with
weight-standardised convolutions and group norm, whose stride-16 features are the tokens of a
12-block ViT-B) and DPT-Large (``dpt_large-midas-2f21e586.pt``: a plain 24-block ViT-L/16).

Four feature maps (the ResNet's first two stages and two ViT blocks for the hybrid, four ViT blocks
for ViT-L; a block's tokens get the class token projected in, "readout = project") are brought to
strides 4, 8, 16, 32, reduced to 256 channels and fused coarse to fine by residual units with ×2
bilinear steps (corners aligned), then a head doubles the size again and predicts relative inverse
depth (ReLU: never negative) at the input size. Position embeddings (trained on a 24 × 24 grid) are
resized bilinearly to the input's grid, so any size divisible by 32 works.

Attribute names are the file's keys: ``pretrained.model.…`` (the timm ViT / ResNet names),
``pretrained.act_postprocessN.…`` and ``scratch.…``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class MidasConfig:
    hybrid: bool = True
    width: int = 768
    depth: int = 12
    heads: int = 12
    hooks: tuple[int, ...] = (0, 1, 8, 11)        # hybrid: ResNet stages 0, 1, then ViT blocks
    post_widths: tuple[int, ...] = (256, 512, 768, 768)
    features: int = 256
    grid: int = 24                                 # the position embedding's trained grid


HYBRID = MidasConfig()
LARGE = MidasConfig(hybrid=False, width=1024, depth=24, heads=16, hooks=(5, 11, 17, 23),
                    post_widths=(256, 512, 1024, 1024))


def _pad_same(x: Tensor, k: int, s: int, value: float = 0.0) -> Tensor:
    """TensorFlow's "SAME" padding for a strided window (the extra pixel goes right / down)."""
    ih, iw = x.shape[-2:]
    ph = max((math.ceil(ih / s) - 1) * s + k - ih, 0)
    pw = max((math.ceil(iw / s) - 1) * s + k - iw, 0)
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=value)


class StdConv(nn.Conv2d):
    """A bias-free convolution whose kernel is standardised per output channel (ε = 1e-8) at every call."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1):
        super().__init__(cin, cout, k, stride, padding=(k - 1) // 2 if stride == 1 else 0, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.stride[0] > 1:
            x = _pad_same(x, self.kernel_size[0], self.stride[0])
        w = self.weight.reshape(1, self.out_channels, -1)
        w = F.batch_norm(w, None, None, training=True, momentum=0.0, eps=1e-8).reshape_as(self.weight)
        return F.conv2d(x, w, None, self.stride, self.padding)


class _ConvNorm(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv = StdConv(cin, cout, 1, stride)
        self.norm = nn.GroupNorm(32, cout, eps=1e-5)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv(x))


class Bottleneck(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        mid = cout // 4
        self.downsample = _ConvNorm(cin, cout, stride) if stride != 1 or cin != cout else None
        self.conv1, self.norm1 = StdConv(cin, mid, 1), nn.GroupNorm(32, mid, eps=1e-5)
        self.conv2, self.norm2 = StdConv(mid, mid, 3, stride), nn.GroupNorm(32, mid, eps=1e-5)
        self.conv3, self.norm3 = StdConv(mid, cout, 1), nn.GroupNorm(32, cout, eps=1e-5)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = F.relu(self.norm1(self.conv1(x)))
        x = F.relu(self.norm2(self.conv2(x)))
        return F.relu(self.norm3(self.conv3(x)) + shortcut)


class _Stage(nn.Module):
    def __init__(self, cin: int, cout: int, blocks: int, stride: int):
        super().__init__()
        self.blocks = nn.Sequential(*[Bottleneck(cin if i == 0 else cout, cout, stride if i == 0 else 1)
                                      for i in range(blocks)])

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(x)


class _Stem(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = StdConv(3, 64, 7, 2)
        self.norm = nn.GroupNorm(32, 64, eps=1e-5)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.norm(self.conv(x)))
        return F.max_pool2d(_pad_same(x, 3, 2, value=-math.inf), 3, 2)


class ResNetStem(nn.Module):
    """The hybrid's ResNet-50 v2 (no pre-activation): stem, then stages of 3, 4, 9 bottlenecks."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _Stem()
        self.stages = nn.ModuleList([_Stage(64, 256, 3, 1), _Stage(256, 512, 4, 2), _Stage(512, 1024, 9, 2)])


class PatchEmbed(nn.Module):
    def __init__(self, cfg: MidasConfig):
        super().__init__()
        if cfg.hybrid:
            self.backbone = ResNetStem()
            self.proj = nn.Conv2d(1024, cfg.width, 1)
        else:
            self.proj = nn.Conv2d(3, cfg.width, 16, 16)


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(width, eps=1e-6), Attention(width, heads)
        self.norm2, self.mlp = nn.LayerNorm(width, eps=1e-6), Mlp(width)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, cfg: MidasConfig):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.grid * cfg.grid, cfg.width))
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList([Block(cfg.width, cfg.heads) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.width, eps=1e-6)   # after the last block: no hooked output reads it


class _Readout(nn.Module):
    """The class token, concatenated to every patch token and projected back (DPT's "project")."""

    def __init__(self, width: int):
        super().__init__()
        self.project = nn.Sequential(nn.Linear(2 * width, width), nn.GELU())

    def forward(self, x: Tensor) -> Tensor:
        return self.project(torch.cat([x[:, 1:], x[:, :1].expand_as(x[:, 1:])], -1))


def _post(width: int, out: int, up: int) -> nn.ModuleDict:
    """Readout, then a 1×1 to ``out`` channels and a resampling: ×4 / ×2 transposed, none, or ÷2."""
    parts = {"0": _Readout(width), "3": nn.Conv2d(width, out, 1)}
    if up in (2, 4):
        parts["4"] = nn.ConvTranspose2d(out, out, up, up)
    elif up == -2:
        parts["4"] = nn.Conv2d(out, out, 3, 2, 1)
    return nn.ModuleDict(parts)


class Encoder(nn.Module):
    def __init__(self, cfg: MidasConfig):
        super().__init__()
        self.model = ViT(cfg)
        ups = (4, 2, 1, -2)
        for i in range(4):
            if not (cfg.hybrid and i < 2):
                setattr(self, f"act_postprocess{i + 1}", _post(cfg.width, cfg.post_widths[i], ups[i]))


class ResidualUnit(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(c, c, 3, 1, 1), nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(F.relu(self.conv1(F.relu(x)))) + x


class Fusion(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.out_conv = nn.Conv2d(c, c, 1)
        self.resConfUnit1, self.resConfUnit2 = ResidualUnit(c), ResidualUnit(c)

    def forward(self, x: Tensor, skip: Tensor | None = None) -> Tensor:
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = F.interpolate(self.resConfUnit2(x), scale_factor=2, mode="bilinear", align_corners=True)
        return self.out_conv(x)


class _Upsample(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)


class Decoder(nn.Module):
    def __init__(self, cfg: MidasConfig):
        super().__init__()
        f = cfg.features
        for i, w in enumerate(cfg.post_widths, 1):
            setattr(self, f"layer{i}_rn", nn.Conv2d(w, f, 3, 1, 1, bias=False))
            setattr(self, f"refinenet{i}", Fusion(f))
        self.output_conv = nn.Sequential(nn.Conv2d(f, f // 2, 3, 1, 1), _Upsample(), nn.Conv2d(f // 2, 32, 3, 1, 1),
                                         nn.ReLU(), nn.Conv2d(32, 1, 1), nn.ReLU())


class MidasDPT(nn.Module):
    def __init__(self, cfg: MidasConfig = HYBRID):
        super().__init__()
        self.cfg = cfg
        self.pretrained = Encoder(cfg)
        self.scratch = Decoder(cfg)

    def _pos_embed(self, gh: int, gw: int) -> Tensor:
        pe = self.pretrained.model.pos_embed
        g = self.cfg.grid
        grid = pe[0, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(gh, gw), mode="bilinear").permute(0, 2, 3, 1).reshape(1, gh * gw, -1)
        return torch.cat([pe[:, :1], grid], 1)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, 3, H, W) RGB in [−1, 1], H and W divisible by 32 → (B, H, W) relative inverse depth."""
        b, _, h, w = x.shape
        vit, gh, gw = self.pretrained.model, h // 16, w // 16
        maps: list[Tensor] = []
        if self.cfg.hybrid:
            r = vit.patch_embed.backbone
            y = r.stem(x)
            for stage in r.stages:
                y = stage(y)
                maps.append(y)
            maps = maps[:2]
            tokens = vit.patch_embed.proj(y)
        else:
            tokens = vit.patch_embed.proj(x)
        t = torch.cat([vit.cls_token.expand(b, -1, -1), tokens.flatten(2).transpose(1, 2)], 1) + self._pos_embed(gh, gw)
        hooks = {k: i for i, k in enumerate(self.cfg.hooks)}
        for j, block in enumerate(vit.blocks):
            t = block(t)
            i = hooks.get(j)
            if i is not None and not (self.cfg.hybrid and i < 2):
                post = getattr(self.pretrained, f"act_postprocess{i + 1}")
                y = post["0"](t).transpose(1, 2).unflatten(2, (gh, gw))
                y = post["3"](y)
                maps.append(post["4"](y) if "4" in post else y)
        s = self.scratch
        rn = [getattr(s, f"layer{i}_rn")(m) for i, m in enumerate(maps, 1)]
        path = s.refinenet4(rn[3])
        path = s.refinenet3(path, rn[2])
        path = s.refinenet2(path, rn[1])
        path = s.refinenet1(path, rn[0])
        return s.output_conv(path).squeeze(1)


def midas_from_state(sd: dict[str, Tensor]) -> MidasDPT:
    """The configuration a MiDaS DPT state dict was saved from (hybrid or ViT-L, from its keys and widths)."""
    if "pretrained.model.patch_embed.backbone.stem.conv.weight" in sd:
        return MidasDPT(HYBRID)
    width = sd["pretrained.model.pos_embed"].shape[-1]
    depth = len({k.split(".")[3] for k in sd if k.startswith("pretrained.model.blocks.")})
    if (width, depth) == (1024, 24):
        return MidasDPT(LARGE)
    if (width, depth) == (768, 12):   # DPT-Base (vitb16_384)
        return MidasDPT(MidasConfig(hybrid=False, hooks=(2, 5, 8, 11), post_widths=(96, 192, 384, 768)))
    raise ValueError(f"a MiDaS DPT with a {depth}-block, {width}-wide ViT is not a published layout")
