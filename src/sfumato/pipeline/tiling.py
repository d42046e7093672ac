"""Tiled VAE decode and encode: peak memory set by the tile size, not by the image area.

GroupNorm layers and the mid-block attention look at the whole feature map, so tiles decoded on
their own disagree (seams, colour shifts between tiles). Here instead:

1. The global parts run once on the whole map at latent resolution, where it is 64× smaller than
   the image: the decoder's ``conv_in`` and mid block, the encoder's mid block and output head.
2. The GroupNorm statistics of the full-resolution path come from one ordinary pass over the input
   reduced to at most ``stats_size`` latent pixels a side: a mosaic of full-resolution crops from an
   even grid over it (local statistics intact). An input already that small is not tiled at all.
3. The full-resolution path runs tile by tile with those statistics. Each tile carries a halo as
   wide as the receptive field still ahead of it, trimmed after every level, and only its exact
   centre is kept. With exact statistics the result is the untiled one up to rounding, everywhere:
   there are no seams to blend. With shrunk statistics the (small) difference is spread evenly.

Memory: one tile's activations, the statistics pass over a ``stats_size``² input, the latent-
resolution maps of step 1 and the output. ``decode``/``encode`` tile automatically above
``AUTO_TILE_LATENT_PIXELS`` latent pixels (beyond 1024×1024 images), or when told to. The
generation loop follows that rule, and in low-memory mode always tiles with ``LOW_MEMORY_TILE`` and
``LOW_MEMORY_STATS_SIZE``: images up to 256×256 then equal the untiled decode up to rounding; larger
ones take their statistics from a mosaic and differ slightly, evenly (tests/test_memory.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..models.layers import GroupNorm, group_norm_override, silu
from ..models.vae import AutoencoderKL, DiagonalGaussian

AUTO_TILE_LATENT_PIXELS = 128 * 128
DEFAULT_TILE = 64          # latent pixels a side of a tile's kept centre (512 image pixels)
DEFAULT_STATS_SIZE = 64    # latent pixels a side of the statistics pass's input
LOW_MEMORY_TILE = 16       # low-memory mode: tiles of 128 image pixels a side (about 3× less than
LOW_MEMORY_STATS_SIZE = 32  # a whole 512² decode), statistics from a 256² pass

Stats = dict[GroupNorm, tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class _Stage:
    """One step of a tiled path: ``fn``, its receptive radius in input pixels, and its resampling."""

    fn: Callable[[Tensor], Tensor]
    radius: int
    up: int = 1      # 2: output is twice the input size
    down: int = 1    # 2: output is half the input size (pad right/bottom by one, stride-2 conv)

    def needed(self, a: int, b: int) -> tuple[int, int]:
        """Input pixels [start, end) that output pixels [a, b) depend on (conservatively)."""
        if self.up == 2:
            return a // 2 - self.radius, -(-b // 2) + self.radius
        if self.down == 2:
            return 2 * a - self.radius, 2 * b + self.radius
        return a - self.radius, b + self.radius

    def out_start(self, start: int) -> int:
        return start * self.up // self.down


def decode(vae: AutoencoderKL, z: Tensor, tiled: bool | None = None, *, tile: int = DEFAULT_TILE,
           stats_size: int = DEFAULT_STATS_SIZE) -> Tensor:
    """``vae.decode(z)``, tiled when asked or (``tiled=None``) when z is larger than the auto threshold;
    never when z fits the statistics size (the statistics pass would already be the whole decode)."""
    if tiled is None:
        tiled = z.shape[-2] * z.shape[-1] > AUTO_TILE_LATENT_PIXELS
    tiled = tiled and max(z.shape[-2:]) > stats_size
    return tiled_decode(vae, z, tile=tile, stats_size=stats_size) if tiled else vae.decode(z)


def encode(vae: AutoencoderKL, x: Tensor, tiled: bool | None = None, *, tile: int = DEFAULT_TILE,
           stats_size: int = DEFAULT_STATS_SIZE) -> DiagonalGaussian:
    """``vae.encode(x)``, tiled when asked or (``tiled=None``) when the latent would exceed the auto threshold;
    never when x fits the statistics size (the statistics pass would already be the whole encode)."""
    f = _factor(vae)
    if tiled is None:
        tiled = (x.shape[-2] // f) * (x.shape[-1] // f) > AUTO_TILE_LATENT_PIXELS
    tiled = tiled and max(x.shape[-2:]) > stats_size * f
    return tiled_encode(vae, x, tile=tile, stats_size=stats_size) if tiled else vae.encode(x)


@torch.no_grad()
def tiled_decode(vae: AutoencoderKL, z: Tensor, *, tile: int = DEFAULT_TILE,
                 stats_size: int = DEFAULT_STATS_SIZE) -> Tensor:
    """Unscaled latents [B, C, h, w] -> images [B, 3, h·f, w·f] in z's dtype, one tile at a time."""
    _check(tile, stats_size)
    dec, dtype = vae.decoder, vae.compute_dtype
    stages = [_Stage(level, 2 * len(level.block) + (level.upsample is not None), up=2 if level.upsample else 1)
              for level in reversed(dec.up)]
    stages.append(_Stage(lambda h: dec.conv_out(silu(dec.norm_out(h))), 1))
    norms = _norms([*dec.up, dec.norm_out])
    f = _factor(vae)
    out = z.new_empty(z.shape[0], vae.cfg.out_channels, z.shape[-2] * f, z.shape[-1] * f)
    for i in range(z.shape[0]):
        zi = vae.post_quant_conv(z[i:i + 1].to(dtype).contiguous(memory_format=torch.channels_last))
        stats = _record(dec, _mosaic(zi, stats_size), norms)
        mid = dec.mid(dec.conv_in(zi))
        out[i:i + 1] = _run_tiled(stages, mid, tile, stats, f, 1)
    return out


@torch.no_grad()
def tiled_encode(vae: AutoencoderKL, x: Tensor, *, tile: int = DEFAULT_TILE,
                 stats_size: int = DEFAULT_STATS_SIZE) -> DiagonalGaussian:
    """Images [B, 3, H, W] in [-1, 1] (H, W multiples of the VAE factor) -> posterior, one tile at a time."""
    _check(tile, stats_size)
    enc, dtype, f = vae.encoder, vae.compute_dtype, _factor(vae)
    if x.shape[-2] % f or x.shape[-1] % f:
        raise ValueError(f"x: height and width must be multiples of {f}, got {tuple(x.shape[-2:])}")
    stages = [_Stage(enc.conv_in, 1)]
    stages += [_Stage(level, 2 * len(level.block) + (2 if level.downsample else 0), down=2 if level.downsample else 1)
               for level in enc.down]
    norms = _norms(enc.down)
    moments = []
    for i in range(x.shape[0]):
        xi = x[i:i + 1].to(dtype).contiguous(memory_format=torch.channels_last)
        stats = _record(enc, _mosaic(xi, stats_size * f), norms)
        h = _run_tiled(stages, xi, tile * f, stats, 1, f)
        h = enc.conv_out(silu(enc.norm_out(enc.mid(h))))
        moments.append(vae.quant_conv(h))
    return DiagonalGaussian(torch.cat(moments).to(x.dtype).contiguous())


def _run_tiled(stages: list[_Stage], x: Tensor, tile: int, stats: Stats, up: int, down: int) -> Tensor:
    """Apply `stages` to x tile by tile (tiles of `tile` input pixels; output = input · up / down)."""
    h, w = x.shape[-2:]
    rows = list(_spans(h * up // down, tile * up // down))
    cols = list(_spans(w * up // down, tile * up // down))
    out = None
    with group_norm_override(_replay(stats)):
        for r0, r1 in rows:
            for c0, c1 in cols:
                y = _run_window(stages, x, (r0, r1), (c0, c1))
                if out is None:
                    out = y.new_empty(*y.shape[:2], h * up // down, w * up // down)
                out[..., r0:r1, c0:c1] = y
    return out


def _run_window(stages: list[_Stage], x: Tensor, rows: tuple[int, int], cols: tuple[int, int]) -> Tensor:
    """Output pixels rows × cols of the stages applied to the whole of x, computed from a window of x."""
    # walk back from the wanted output to the input window each stage needs, clipped to the map
    sizes = [x.shape[-2:]]
    for st in stages:
        sizes.append(tuple(n * st.up // st.down for n in sizes[-1]))
    windows = [(rows, cols)]
    align = 1  # a window feeding stride-2 stages starts on their grid: a multiple of 2^(stages left)
    for st, size in zip(reversed(stages), reversed(sizes[:-1])):
        align *= st.down
        (a, b), (c, d) = windows[0]
        (a, b), (c, d) = st.needed(a, b), st.needed(c, d)
        windows.insert(0, ((max(a // align * align, 0), min(b, size[0])),
                           (max(c // align * align, 0), min(d, size[1]))))
    (a, b), (c, d) = windows[0]
    y = x[..., a:b, c:d]
    for st, ((a, _), (c, _)), ((na, nb), (nc, nd)) in zip(stages, windows, windows[1:]):
        y = st.fn(y)
        oa, oc = st.out_start(a), st.out_start(c)
        y = y[..., na - oa:nb - oa, nc - oc:nd - oc]
    return y


def _record(run: Callable[[Tensor], Tensor], x: Tensor, norms: set[GroupNorm]) -> Stats:
    """Per-sample, per-group mean and variance (fp32) at each layer of `norms` during ``run(x)``."""
    stats: Stats = {}

    def hook(layer: GroupNorm, t: Tensor) -> None:
        if layer in norms:
            var, mean = torch.var_mean(t.float().reshape(t.shape[0], layer.num_groups, -1), dim=2, correction=0)
            stats[layer] = (mean, var)

    with group_norm_override(hook):
        run(x)
    return stats


def _replay(stats: Stats) -> Callable[[GroupNorm, Tensor], Tensor | None]:
    def hook(layer: GroupNorm, t: Tensor) -> Tensor | None:
        if layer not in stats:
            return None
        mean, var = stats[layer]
        per = t.shape[1] // layer.num_groups
        rstd = torch.rsqrt(var + layer.eps).repeat_interleave(per, dim=1)
        scale = rstd * layer.weight.float()
        shift = layer.bias.float() - mean.repeat_interleave(per, dim=1) * scale
        return torch.addcmul(shift[..., None, None].to(t.dtype), t, scale[..., None, None].to(t.dtype))

    return hook


def _mosaic(x: Tensor, size: int) -> Tensor:
    """x itself when neither side exceeds `size`; else a mosaic at most `size` a side of crops taken
    from the centres of an even grid over x, at full resolution (local statistics intact)."""
    h, w = x.shape[-2:]
    if max(h, w) <= size:
        return x
    pieces = []
    for r0, r1 in _spans(h, size) if h > size else [(0, h)]:
        row = []
        for c0, c1 in _spans(w, size) if w > size else [(0, w)]:
            row.append((r0, r1, c0, c1))
        pieces.append(row)
    ph, pw = min(size // len(pieces), h), min(size // len(pieces[0]), w)
    return torch.cat([
        torch.cat([x[..., (r0 + r1 - ph) // 2:(r0 + r1 - ph) // 2 + ph, (c0 + c1 - pw) // 2:(c0 + c1 - pw) // 2 + pw]
                   for r0, r1, c0, c1 in row], dim=-1)
        for row in pieces
    ], dim=-2)


def _spans(length: int, tile: int) -> Iterable[tuple[int, int]]:
    """[start, end) pieces of about equal size, none longer than `tile`."""
    n = math.ceil(length / tile)
    edges = [round(i * length / n) for i in range(n + 1)]
    return zip(edges, edges[1:])


def _norms(modules: Iterable[torch.nn.Module]) -> set[GroupNorm]:
    return {m for module in modules for m in module.modules() if isinstance(m, GroupNorm)}


def _factor(vae: AutoencoderKL) -> int:
    return 2 ** (len(vae.cfg.ch_mult) - 1)


def _check(tile: int, stats_size: int) -> None:
    if not isinstance(tile, int) or tile < 8:
        raise ValueError(f"tile: must be an integer >= 8 latent pixels, got {tile!r}")
    if not isinstance(stats_size, int) or stats_size < 8:
        raise ValueError(f"stats_size: must be an integer >= 8 latent pixels, got {stats_size!r}")
