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

from torch import Tensor

from ..models.unet import UNetModel


class DeepCache:
    """The cache of one sampling run. ``full_passes`` / ``cached_passes`` count the UNet calls of
    each kind."""

    def __init__(self, unet: UNetModel, interval: int, branch: int | None = None,
                 evaluation: Callable[[], int] | None = None):
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
        self._source = evaluation     # the run's step clock: its evaluation count replaces ``wrap``

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
        if self._source is not None and self._source() != self.evaluation:   # a new evaluation began
            self.evaluation, self._slot = self._source(), 0
        if self.evaluation < 0:
            raise RuntimeError("DeepCache: the UNet was called outside an evaluation of the wrapped denoiser")
        slot, self._slot = self._slot, self._slot + 1
        unet = self.unet
        unet.check_control(control)
        full = self.evaluation % self.interval == 0
        if not full:
            cached = self._cache.get(slot)
            if cached is None or cached.shape[0] != x.shape[0]:
                raise RuntimeError(f"DeepCache: no cached features for UNet call {slot} of evaluation "
                                   f"{self.evaluation} (the calls per evaluation changed)")
        dtype = unet.compute_dtype
        emb = unet.embed(timesteps, y, x.shape[0], dtype)
        context = context.to(dtype)
        shallow = len(unet.output_blocks) - self.branch   # input blocks whose skips feed output_blocks[branch:]
        h, skips = unet.run_input(x.to(dtype), emb, context, len(unet.input_blocks) if full else shallow)
        if not full:
            self.cached_passes += 1
            return unet.run_output(cached, skips, emb, context, control, self.branch).to(x.dtype).contiguous()
        self.full_passes += 1
        h = unet.middle_block(h, emb, context)
        if control is not None:
            h = h + control[-1].to(dtype)

        def keep(j: int, entering: Tensor) -> None:
            if j == self.branch:
                self._cache[slot] = entering

        return unet.run_output(h, skips, emb, context, control, 0, keep).to(x.dtype).contiguous()


@contextmanager
def deep_cache(unet: UNetModel, interval: int, branch: int | None = None,
               evaluation: Callable[[], int] | None = None) -> Iterator[DeepCache]:
    """Within the ``with`` block, ``unet(...)`` runs through a new :class:`DeepCache` (yielded);
    the UNet's own forward is restored after. ``evaluation``: where the evaluation count comes from
    (the run loop's step clock); without it, mark evaluations with :meth:`DeepCache.wrap`."""
    cache = DeepCache(unet, interval, branch, evaluation)
    unet.forward = MethodType(lambda _self, *args, **kwargs: cache.forward(*args, **kwargs), unet)
    try:
        yield cache
    finally:
        del unet.forward
