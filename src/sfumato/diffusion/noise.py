"""Seeded per-image noise, with AUTOMATIC1111's semantics.

Every image of a batch owns a random stream seeded with its own seed, so image i of a batch equals
a lone run with seed ``seeds[i]``. The first draw is the initial latent noise, optionally blended
with a variation seed ("subseed") and/or generated at another resolution ("seed resize from");
later draws (ancestral samplers, LCM, churn) continue the same per-image streams. The SDE samplers
draw from per-image Brownian trees instead (``brownian.py``), as in A1111.

Two sources:

* ``cpu``: ``torch.Generator("cpu").manual_seed(seed)``, identical on every machine.
* ``nv``: a numpy Philox 4x32-10 + Box-Muller that imitates ``torch.randn`` on an NVIDIA GPU, so
  seeds from A1111 running on CUDA (its default) reproduce here. It follows A1111's ``NV`` option
  (modules/rng_philox.py): one Philox counter per element (``counter = (offset, 0, i, 0)``, key =
  the 64-bit seed), the sine half of Box-Muller in float64 from float32 constants, and an offset
  that advances by one per draw. CUDA itself evaluates Box-Muller in float32, so values agree with
  a GPU to about 1e-6, not bit for bit.
"""

from __future__ import annotations

from typing import Callable, Literal

import numpy as np
import torch
from torch import Tensor

Shape = tuple[int, int, int]
RNG = Literal["cpu", "nv"]
LATENT_FACTOR = 8  # A1111 converts "seed resize from" pixels to latents with a fixed // 8

# -- Philox 4x32-10 ------------------------------------------------------------------------------

_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)   # round multipliers
_W0, _W1 = np.uint32(0x9E3779B9), np.uint32(0xBB67AE85)   # key schedule (Weyl) increments
_LO32 = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)
# Box-Muller scales: 2^-32 and 2^-32·2π, as float32 constants (the latter rounded once, from a
# float64 product), used in float64 arithmetic.
_INV32 = float(np.float32(2.3283064e-10))
_INV32_2PI = float(np.float32(2.3283064e-10 * 6.2831855))


def philox4x32(counter: np.ndarray, key: np.ndarray, rounds: int = 10) -> np.ndarray:
    """Philox 4x32 (Salmon et al. 2011) on uint32 ``counter`` [4, N] with uint32 ``key`` [2, N]."""
    c = [w.astype(np.uint64) for w in counter]
    k0, k1 = key[0].astype(np.uint32), key[1].astype(np.uint32)
    for r in range(rounds):
        if r:
            k0, k1 = k0 + _W0, k1 + _W1  # uint32 wrap-around
        p0, p1 = c[0] * _M0, c[2] * _M1  # exact 64-bit products of 32-bit words
        c = [(p1 >> _SHIFT32) ^ c[1] ^ k0, p1 & _LO32, (p0 >> _SHIFT32) ^ c[3] ^ k1, p0 & _LO32]
    return np.stack(c).astype(np.uint32)


def _box_muller_sin(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The first normal of Box-Muller from two uint32 words (uniforms centred in their bins)."""
    u = x.astype(np.float64) * _INV32 + _INV32 / 2
    v = y.astype(np.float64) * _INV32_2PI + _INV32_2PI / 2
    return (np.sqrt(-2.0 * np.log(u)) * np.sin(v)).astype(np.float32)


class PhiloxGenerator:
    """A CPU imitation of a CUDA ``torch.Generator``'s ``randn`` (A1111's "NV" source)."""

    def __init__(self, seed: int):
        if not 0 <= seed < 2**64:
            raise ValueError(f"nv seed must be in [0, 2**64), got {seed}")
        self.key = np.array([seed & 0xFFFFFFFF, seed >> 32], dtype=np.uint32)
        self.offset = 0

    def randn(self, shape: tuple[int, ...]) -> Tensor:
        """Standard normals of ``shape`` (float32); each call advances the offset by one."""
        n = int(np.prod(shape))
        counter = np.zeros((4, n), dtype=np.uint32)
        counter[0] = self.offset
        counter[2] = np.arange(n, dtype=np.uint32)
        self.offset += 1
        words = philox4x32(counter, np.repeat(self.key[:, None], n, axis=1))
        return torch.from_numpy(_box_muller_sin(words[0], words[1]).reshape(shape))


# -- streams -------------------------------------------------------------------------------------

class _TorchCPUGenerator:
    def __init__(self, seed: int):
        self.generator = torch.Generator("cpu").manual_seed(seed)

    def randn(self, shape: tuple[int, ...]) -> Tensor:
        return torch.randn(shape, generator=self.generator)


def _generator(rng: RNG, seed: int) -> _TorchCPUGenerator | PhiloxGenerator:
    if rng == "cpu":
        return _TorchCPUGenerator(seed)
    if rng == "nv":
        return PhiloxGenerator(seed)
    raise ValueError(f"rng must be 'cpu' or 'nv', got {rng!r}")


def slerp(val: float, low: Tensor, high: Tensor) -> Tensor:
    """A1111's spherical interpolation of one image's noise [C, H, W]: ``low`` at 0, ``high`` at 1.

    As in A1111, vectors run along dim 1 (H), so each (channel, column) pair is interpolated on
    its own; when the mean cosine exceeds 0.9995 it falls back to ``low·val + high·(1 − val)``
    (weights reversed relative to the spherical branch, as A1111 has them).
    """
    low_unit = low / low.norm(dim=1, keepdim=True)
    high_unit = high / high.norm(dim=1, keepdim=True)
    dot = (low_unit * high_unit).sum(1)
    if dot.mean() > 0.9995:
        return low * val + high * (1 - val)
    omega = torch.acos(dot)
    sin_omega = torch.sin(omega)
    w_low = (torch.sin((1.0 - val) * omega) / sin_omega).unsqueeze(1)
    w_high = (torch.sin(val * omega) / sin_omega).unsqueeze(1)
    return w_low * low + w_high * high


def _paste_centred(dst: Tensor, src: Tensor) -> Tensor:
    """Put ``src`` [C, h, w] into the centre of ``dst`` [C, H, W], cropping centrally if larger."""
    (_, big_h, big_w), (_, small_h, small_w) = dst.shape, src.shape
    dy, dx = (big_h - small_h) // 2, (big_w - small_w) // 2  # floor division, as A1111
    h, w = small_h + 2 * min(dy, 0), small_w + 2 * min(dx, 0)
    ty, tx, sy, sx = max(dy, 0), max(dx, 0), max(-dy, 0), max(-dx, 0)
    dst[:, ty:ty + h, tx:tx + w] = src[:, sy:sy + h, sx:sx + w]
    return dst


class ImageNoise:
    """Per-image random streams for a batch. Image i uses seed ``seeds[i]`` (and ``subseeds[i]``).

    ``initial()`` is the first draw (cached: it returns the same tensor on every call);
    ``next()`` draws the following ones. ``eta_noise_seed_delta`` is A1111's "Eta noise seed
    delta": when non-zero, draws after the first come from fresh streams seeded ``seed + delta``.
    """

    def __init__(self, shape: Shape, seeds: list[int], *, subseeds: list[int] | None = None,
                 subseed_strength: float = 0.0, seed_resize_from: tuple[int, int] | None = None,
                 rng: RNG = "cpu", eta_noise_seed_delta: int = 0):
        if subseed_strength != 0 and (subseeds is None or len(subseeds) != len(seeds)):
            raise ValueError("subseeds must give one variation seed per image when subseed_strength != 0")
        self.shape, self.seeds, self.rng = tuple(shape), list(seeds), rng
        self.subseeds, self.subseed_strength = subseeds, subseed_strength
        self.seed_resize_from = seed_resize_from
        self.eta_noise_seed_delta = eta_noise_seed_delta
        self._streams = [_generator(rng, s) for s in self.seeds]
        self._initial: Tensor | None = None

    def _first_shape(self) -> Shape:
        if self.seed_resize_from is None or min(self.seed_resize_from) <= 0:
            return self.shape
        h, w = self.seed_resize_from
        return (self.shape[0], h // LATENT_FACTOR, w // LATENT_FACTOR)

    def _first(self, i: int) -> Tensor:
        """Image i's initial noise, in A1111's order of draws."""
        shape = self._first_shape()
        variation = None
        if self.subseed_strength != 0:
            variation = _generator(self.rng, self.subseeds[i]).randn(shape)
        if shape == self.shape:
            noise = self._streams[i].randn(shape)
        else:  # the seed's noise at the other size, from a fresh stream of the same seed
            noise = _generator(self.rng, self.seeds[i]).randn(shape)
        if variation is not None:
            noise = slerp(self.subseed_strength, noise, variation)
        if shape != self.shape:  # centred in full-size noise, the stream's own first draw
            noise = _paste_centred(self._streams[i].randn(self.shape), noise)
        return noise

    def initial(self) -> Tensor:
        """[B, *shape] float32 CPU: the initial latent noise (variation seed applied)."""
        if self._initial is None:
            self._initial = torch.stack([self._first(i) for i in range(len(self.seeds))])
            if self.eta_noise_seed_delta:
                self._streams = [_generator(self.rng, s + self.eta_noise_seed_delta) for s in self.seeds]
        return self._initial

    def next(self) -> Tensor:
        """[B, *shape] float32 CPU: the next draw of each image's stream (the first is ``initial()``)."""
        if self._initial is None:
            return self.initial()
        return torch.stack([g.randn(self.shape) for g in self._streams])

    def noise_sampler(self) -> Callable[[Tensor, Tensor], Tensor]:
        """``(σ, σ_next) → next()`` on σ's device, for the ancestral samplers (the pipeline gives the
        SDE samplers ``brownian.BrownianNoise``)."""
        def sample(sigma: Tensor, sigma_next: Tensor) -> Tensor:
            noise = self.next()
            return noise.to(sigma.device) if isinstance(sigma, Tensor) else noise

        return sample
