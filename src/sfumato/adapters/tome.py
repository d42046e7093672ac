"""Token merging for Stable Diffusion (ToMe for SD, Bolya & Hoffman 2023), training-free and opt-in.

Before a transformer block's self-attention (and optionally its feed-forward), a fraction of the
image tokens is merged into similar tokens; the block works on the shorter sequence and the result
is copied back to every merged position ("unmerge"). The matching is bipartite soft matching:

* destinations: the feature map is cut into 2×2 windows and one token per window, chosen at
  random, is a destination; every other token (and any row / column left over by odd sizes) is a
  source;
* each source is paired with its most similar destination (cosine similarity of the block's
  input tokens); the ``r`` sources with the best pairs are averaged into their destinations, the
  others pass through.

The random choice is seeded from ``seed`` (the pipeline passes a fixed 0), the timestep and the
block's position: a run is deterministic, and an image does not depend on the batch it is in
(image i of a batch equals a single run with seed + i, as without merging).

:func:`token_merging` patches the transformer blocks of the finest attention level (as ToMe's
``max_downsample=1``; set ``max_downsample`` to include coarser levels) for the duration of a
``with`` block and restores them after; nothing is changed at module level.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import MethodType
from typing import Callable

import torch
from torch import Tensor

from ..models.unet import BasicTransformerBlock, Downsample, SpatialTransformer, Upsample, UNetModel

Merge = Callable[[Tensor], Tensor]


def _identity(x: Tensor) -> Tensor:
    return x


def destination_mask(h: int, w: int, generator: torch.Generator | None) -> Tensor:
    """Bool [h·w]: True for the destination tokens, one per full 2×2 window (random within the
    window with a generator, the top-left token without)."""
    hw, ww = h // 2, w // 2
    if generator is None:
        pick = torch.zeros(hw, ww, dtype=torch.long)
    else:
        pick = torch.randint(4, (hw, ww), generator=generator)
    window = torch.zeros(hw, ww, 4, dtype=torch.bool)
    window.scatter_(2, pick[..., None], True)
    grid = window.view(hw, ww, 2, 2).permute(0, 2, 1, 3).reshape(hw * 2, ww * 2)
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[: hw * 2, : ww * 2] = grid
    return mask.flatten()


def bipartite_merge(metric: Tensor, h: int, w: int, r: int,
                    generator: torch.Generator | None = None) -> tuple[Merge, Merge]:
    """(merge, unmerge) for tokens [B, h·w, C] of an h×w map: ``merge`` removes ``r`` tokens
    (averaging each into its most similar destination, by ``metric`` [B, h·w, C']), ``unmerge``
    maps the shorter sequence back to h·w tokens (a merged token's value to each of its sources)."""
    n = metric.shape[1]
    if n != h * w:
        raise ValueError(f"metric: {n} tokens for a {h}x{w} map")
    is_dst = destination_mask(h, w, generator).to(metric.device)
    dst_pos = is_dst.nonzero().flatten()
    src_pos = (~is_dst).nonzero().flatten()
    r = min(r, src_pos.numel())
    if r <= 0:
        return _identity, _identity
    with torch.no_grad():
        m = metric / metric.norm(dim=-1, keepdim=True)
        scores = m[:, src_pos] @ m[:, dst_pos].transpose(1, 2)          # [B, S, D]
        best, best_dst = scores.max(dim=-1)                            # per source
        order = best.argsort(dim=-1, descending=True)
        merged_src, kept_src = order[:, :r], order[:, r:]              # indices into the sources
        target = best_dst.gather(1, merged_src)                        # their destinations
    kept_pos = src_pos[kept_src]                                       # [B, S − r] token positions
    merged_pos = src_pos[merged_src]                                   # [B, r]

    def take(x: Tensor, pos: Tensor) -> Tensor:
        return x.gather(1, pos[..., None].expand(-1, -1, x.shape[-1]))

    def merge(x: Tensor) -> Tensor:
        c = x.shape[-1]
        dst = x[:, dst_pos]
        index = target[..., None].expand(-1, -1, c)
        # the mean of a destination and its sources, as the destination plus the mean offset: exact
        # (no rounding) when the merged tokens are equal
        offsets = torch.zeros_like(dst).scatter_add_(1, index, take(x, merged_pos) - dst.gather(1, index))
        counts = torch.ones(dst.shape[:2], dtype=x.dtype, device=x.device)
        counts = counts.scatter_add(1, target, torch.ones(target.shape, dtype=x.dtype, device=x.device))
        return torch.cat([take(x, kept_pos), dst + offsets / counts[..., None]], dim=1)

    def unmerge(y: Tensor) -> Tensor:
        b, c = y.shape[0], y.shape[-1]
        kept, dst = y[:, : kept_pos.shape[1]], y[:, kept_pos.shape[1]:]
        out = y.new_empty(b, n, c)
        out[:, dst_pos] = dst
        out.scatter_(1, kept_pos[..., None].expand(-1, -1, c), kept)
        out.scatter_(1, merged_pos[..., None].expand(-1, -1, c), dst.gather(1, target[..., None].expand(-1, -1, c)))
        return out

    return merge, unmerge


@dataclass
class _RunState:
    """What the pre-hooks record for the patched blocks: the UNet call's timestep and the size of
    the feature map the current transformer works on."""

    timestep: float = 0.0
    size: tuple[int, int] = (0, 0)


def _block_seed(seed: int, timestep: float, index: int) -> int:
    return (seed * 1_000_003 + round(timestep * 1000) * 1_009 + index) % 2**63


def _tome_forward(block: BasicTransformerBlock, state: _RunState, ratio: float, merge_ff: bool,
                  seed: int, index: int):
    """A replacement for ``block.forward`` (same computation, merged tokens around attn1 / ff)."""

    def forward(self: BasicTransformerBlock, x: Tensor, context: Tensor) -> Tensor:
        h, w = state.size
        g = torch.Generator().manual_seed(_block_seed(seed, state.timestep, index))
        merge, unmerge = bipartite_merge(x, h, w, int(x.shape[1] * ratio), g)
        x = x + unmerge(self.attn1(merge(self.norm1(x)), context if self.cross_only else None))
        x = x + self.attn2(self.norm2(x), context)
        if merge_ff:
            return x + unmerge(self.ff(merge(self.norm3(x))))
        return x + self.ff(self.norm3(x))

    return MethodType(forward, block)


def transformer_levels(unet: UNetModel) -> list[tuple[SpatialTransformer, int]]:
    """Every spatial transformer of the UNet with its level (0 = the latent's resolution; each
    level halves it), in execution order."""
    found: list[tuple[SpatialTransformer, int]] = []
    level = 0
    for seq in unet.input_blocks:
        for layer in seq:
            if isinstance(layer, SpatialTransformer):
                found.append((layer, level))
            elif isinstance(layer, Downsample):
                level += 1
    found += [(layer, level) for layer in unet.middle_block if isinstance(layer, SpatialTransformer)]
    for seq in unet.output_blocks:
        for layer in seq:
            if isinstance(layer, SpatialTransformer):
                found.append((layer, level))
            elif isinstance(layer, Upsample):
                level -= 1
    return found


@contextmanager
def token_merging(unet: UNetModel, ratio: float, *, merge_ff: bool = False, max_downsample: int | None = None,
                  seed: int = 0) -> Iterator[list[BasicTransformerBlock]]:
    """Within the ``with`` block, the transformer blocks working on feature maps downsampled by at
    most ``max_downsample`` (default: the finest level that has attention; ToMe's default 1 on SD
    1.x / 2.x) merge ``ratio`` of their tokens around self-attention (and around the feed-forward
    with ``merge_ff``). Yields the patched blocks; ``ratio`` 0 patches nothing."""
    if not 0 <= ratio < 1:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")
    levels = transformer_levels(unet)
    if ratio == 0 or not levels:
        yield []
        return
    limit = 2 ** min(level for _, level in levels) if max_downsample is None else max_downsample
    state = _RunState()
    handles = []
    patched: list[BasicTransformerBlock] = []

    def on_unet(module, args, kwargs) -> None:
        t = args[1] if len(args) > 1 else kwargs["timesteps"]
        state.timestep = float(t.reshape(-1)[0])

    def on_transformer(module, args) -> None:
        state.size = (args[0].shape[-2], args[0].shape[-1])

    try:
        handles.append(unet.register_forward_pre_hook(on_unet, with_kwargs=True))
        for transformer, level in levels:
            if 2 ** level > limit:
                continue
            handles.append(transformer.register_forward_pre_hook(on_transformer))
            for block in transformer.transformer_blocks:
                block.forward = _tome_forward(block, state, ratio, merge_ff, seed, len(patched))
                patched.append(block)
        yield patched
    finally:
        for handle in handles:
            handle.remove()
        for block in patched:
            del block.forward
