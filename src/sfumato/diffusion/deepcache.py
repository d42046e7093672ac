"""DeepCache (Ma et al. 2024): reuse the UNet's deep features across steps, training-free and opt-in.

Neighbouring denoising steps change the UNet's deep, low-resolution features little. Every
``interval``-th denoiser evaluation runs the full UNet and keeps ``h``, the feature map that enters
``output_blocks[branch]`` from below (before it is joined with its skip connection); the
evaluations in between run only the shallow branch: the input blocks whose skips feed
``output_blocks[branch:]``, then those output blocks on the cached ``h``.

The default branch is the second-to-last output block: a cached evaluation runs the input
convolution, the first input block, the last two output blocks and the output head.

The cache is kept per UNet call position within an evaluation: classifier-free guidance here calls
the UNet once per image (its uncond and cond rows together), and each of those calls keeps its own
cached features. :func:`deep_cache` patches ``unet.forward`` for a ``with`` block (hooks on the UNet
still run) and yields the :class:`DeepCache`, whose :meth:`DeepCache.wrap` marks the evaluations:
the sampler is given ``cache.wrap(denoise)`` and never learns about the cache.

ControlNet residuals (``control=``) apply as usual on full passes; on cached ones only those of the
shallow skips do (the deep ones are part of the cached features).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import MethodType
from typing import Callable

import torch
from torch import Tensor

from ..models.unet import UNetModel


class DeepCache:
    """The cache of one sampling run. ``full_passes`` / ``cached_passes`` count the UNet calls of
    each kind."""

    def __init__(self, unet: UNetModel, interval: int, branch: int | None = None):
        n = len(unet.output_blocks)
        branch = n - 2 if branch is None else branch
        if interval < 1:
            raise ValueError(f"interval must be >= 1, got {interval}")
        if not 1 <= branch < n:
            raise ValueError(f"branch must be an output block index in [1, {n - 1}], got {branch}")
        self.unet, self.interval, self.branch = unet, interval, branch
        self.evaluation = -1          # index of the current denoiser evaluation (−1: none yet)
        self._slot = 0                # UNet call position within the evaluation
        self._cache: dict[int, Tensor] = {}
        self.full_passes = self.cached_passes = 0

    def wrap(self, denoise: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
        """``denoise(x, σ)`` that marks each call as one evaluation (the cache's step counter)."""

        def evaluate(x: Tensor, sigma: Tensor) -> Tensor:
            self.evaluation += 1
            self._slot = 0
            return denoise(x, sigma)

        return evaluate

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor, y: Tensor | None = None,
                control: Sequence[Tensor] | None = None) -> Tensor:
        """``UNetModel.forward`` with the cache: a full pass on every ``interval``-th evaluation."""
        if self.evaluation < 0:
            raise RuntimeError("DeepCache: the UNet was called outside an evaluation of the wrapped denoiser")
        slot, self._slot = self._slot, self._slot + 1
        unet = self.unet
        if control is not None and len(control) != len(unet.input_blocks) + 1:
            raise ValueError(f"{len(control)} control residuals for a UNet with {len(unet.input_blocks)} input "
                             "blocks (one per input block and one for the middle block expected)")
        full = self.evaluation % self.interval == 0
        if not full:
            cached = self._cache.get(slot)
            if cached is None or cached.shape[0] != x.shape[0]:
                raise RuntimeError(f"DeepCache: no cached features for UNet call {slot} of evaluation "
                                   f"{self.evaluation} (the calls per evaluation changed)")
        dtype = unet.compute_dtype
        emb = unet.embed(timesteps, y, x.shape[0], dtype)
        context = context.to(dtype)
        h = x.to(dtype)
        n = len(unet.output_blocks)
        shallow = n - self.branch            # input blocks whose skips feed output_blocks[branch:]
        skips: list[Tensor] = []
        for block in unet.input_blocks[: len(unet.input_blocks) if full else shallow]:
            h = block(h, emb, context)
            skips.append(h)
        if full:
            h = unet.middle_block(h, emb, context)
            if control is not None:
                h = h + control[-1].to(dtype)
            self.full_passes += 1
        else:
            h = cached
            self.cached_passes += 1
        for j in range(0 if full else self.branch, n):
            if full and j == self.branch:
                self._cache[slot] = h
            skip = skips.pop()
            if control is not None:
                skip = skip + control[len(skips)].to(dtype)
            h = torch.cat([h, skip], dim=1)
            h = unet.output_blocks[j](h, emb, context, skips[-1].shape[-2:] if skips else None)
        return unet.out(h).to(x.dtype).contiguous()


@contextmanager
def deep_cache(unet: UNetModel, interval: int, branch: int | None = None) -> Iterator[DeepCache]:
    """Within the ``with`` block, ``unet(...)`` runs through a new :class:`DeepCache` (yielded);
    the UNet's own forward is restored after."""
    cache = DeepCache(unet, interval, branch)
    unet.forward = MethodType(lambda _self, *args, **kwargs: cache.forward(*args, **kwargs), unet)
    try:
        yield cache
    finally:
        del unet.forward
