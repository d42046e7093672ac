"""Brownian-tree noise for the SDE samplers, seeded per image as AUTOMATIC1111 seeds it.

DPM++ SDE, DPM++ 2M SDE and DPM++ 3M SDE (A1111's samplers with the ``brownian_noise`` option; its
"DPM++ 2M SDE Heun" is 2M SDE with ``solver_type="heun"``) do not take fresh normals per call: they
ask for the increment of one Brownian motion W over [σ_next, σ], scaled to unit variance,
``noise(σ, σ_next) = (W(σ) − W(σ_next)) / √(σ − σ_next)``. The path is torchsde's Brownian tree: a
dyadic ``BrownianInterval`` (``halfway_tree=True``, ``tol=1e-6``, ``pool_size=24`` — the defaults of
``torchsde.BrownianTree``) whose nodes draw their normals from seeds that numpy's ``SeedSequence``
derives from the tree's entropy, so the path depends only on the entropy and the tree's [t0, t1],
not on the order of the queries. We build that interval exactly as k-diffusion's
``BrownianTreeNoiseSampler`` does (``BatchedBrownianTree``: one tree per image over a latent of one
image, t0 < t1, the result negated when σ > σ_next, divided by ``|σ_next − σ|^½``), so the same
seed gives the same noise. Re-implementing the tree bit for bit would copy torchsde's algorithm, so
torchsde is a runtime dependency.

How A1111 (1.6 and later) seeds it, from ``modules/sd_samplers_common.py``
(``Sampler.create_noise_sampler``) and ``modules/sd_samplers_kdiffusion.py`` (``sample`` /
``sample_img2img``):

* one tree per image: ``BrownianTreeNoiseSampler(x, sigma_min, sigma_max,
  seed=p.all_seeds[p.iteration * p.batch_size:(p.iteration + 1) * p.batch_size])`` — a list, so image
  i's tree has entropy ``seed + i`` (and a lone run with that seed gives the same image). The
  variation seed, "Eta noise seed delta" and the sampler noise of the other samplers play no part;
  the option "no_dpmpp_sde_batch_determinism" (off by default) would drop the tree;
* ``sigma_min, sigma_max = sigmas[sigmas > 0].min(), sigmas.max()`` of the *whole* schedule the
  sampler was built for: txt2img's; img2img's ``get_sigmas(p, steps)`` before it is cut to the last
  t_enc + 1 σ's (so the tree spans the full range although sampling starts lower); the hires pass's
  own stretched schedule (A1111 makes a new sampler for the pass and calls ``sample_img2img`` on
  it). With "discard penultimate sigma" (3M SDE) it is the schedule after the discard;
* the tree's normals: A1111 replaces ``torchsde._brownian.brownian_interval._randn`` with its
  ``devices.randn_local(seed, size)``, so they follow the "Random number generator source" setting:
  "CPU" is ``torch.Generator("cpu").manual_seed(seed)`` — our ``rng="cpu"``, which is also torchsde's
  own draw on a float32 CPU tree; "NV" is the Philox generator of ``noise.PhiloxGenerator`` — our
  ``rng="nv"``, which also imitates "GPU", A1111's default, on an NVIDIA card (to ~1e-6, see
  noise.py). Our trees live on the CPU in float32 whatever the model's device (A1111's latents are
  float32 too); the noise moves to σ's device.

For ``rng="nv"`` we swap torchsde's ``_randn`` only while our trees are built or queried, under a
lock that every tree operation here takes, rather than patching torchsde for the whole process.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torchsde
from torch import Tensor
from torchsde._brownian import brownian_interval as _interval

from .noise import RNG, PhiloxGenerator

# The samplers A1111 gives a Brownian tree ("brownian_noise": True in sd_samplers_kdiffusion.py).
BROWNIAN_SAMPLERS: frozenset[str] = frozenset({"dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde"})

TOL = 1e-6        # torchsde.BrownianTree's defaults, which k-diffusion keeps
POOL_SIZE = 24

_LOCK = threading.RLock()


def sigma_span(sigmas: Tensor) -> tuple[float, float]:
    """The interval A1111 spans a schedule's tree over: (smallest positive σ, largest σ)."""
    return float(sigmas[sigmas > 0].min()), float(sigmas.max())


def _philox_randn(size, dtype, device, seed) -> Tensor:
    """torchsde's node draw from A1111's "NV" source: a fresh Philox stream keyed by the node's seed."""
    return PhiloxGenerator(int(seed)).randn(tuple(size)).to(device=device, dtype=dtype)


@contextmanager
def _tree_source(rng: RNG) -> Iterator[None]:
    """While held: torchsde's node normals come from ``rng`` ("cpu": torchsde's own draw)."""
    if rng not in ("cpu", "nv"):
        raise ValueError(f"rng must be 'cpu' or 'nv', got {rng!r}")
    with _LOCK, warnings.catch_warnings():
        # torchsde rounds the tree's ends to ``tol`` and warns when a query at the schedule's own
        # σ_min / σ_max falls outside by less than that; it clamps the query, as in k-diffusion.
        warnings.filterwarnings("ignore", message="Should have t[ab]", category=UserWarning)
        if rng == "cpu":
            yield
            return
        if not callable(getattr(_interval, "_randn", None)):
            raise RuntimeError("this torchsde has no brownian_interval._randn to draw the 'nv' tree's normals from")
        original = _interval._randn
        _interval._randn = _philox_randn
        try:
            yield
        finally:
            _interval._randn = original


class BrownianNoise:
    """``noise_sampler(σ, σ_next)`` for the SDE samplers: [B, *shape] float32 on σ's device.

    Image i's noise is the increment of a Brownian tree with entropy ``seeds[i]`` over
    ``sigma_range`` = (σ_min, σ_max) (see ``sigma_span``), normalised to unit variance: the same
    values as k-diffusion's ``BrownianTreeNoiseSampler(x, σ_min, σ_max, seed=seeds)`` for an ``x``
    of shape [B, *shape] in float32 on the CPU.
    """

    def __init__(self, shape: Sequence[int], seeds: Sequence[int], sigma_range: tuple[float, float],
                 rng: RNG = "cpu"):
        lo, hi = (torch.as_tensor(s) for s in sigma_range)
        t0, t1, self.sign = (lo, hi, 1) if lo < hi else (hi, lo, -1)   # k-diffusion's ordering
        self.shape, self.seeds, self.rng = tuple(shape), [int(s) for s in seeds], rng
        with _tree_source(rng):
            self.trees = [torchsde.BrownianInterval(t0=float(t0), t1=float(t1), size=self.shape, dtype=torch.float32,
                                                    device="cpu", entropy=seed, tol=TOL, pool_size=POOL_SIZE,
                                                    halfway_tree=True)
                          for seed in self.seeds]

    def __call__(self, sigma: Tensor, sigma_next: Tensor) -> Tensor:
        a, b = torch.as_tensor(sigma).cpu(), torch.as_tensor(sigma_next).cpu()
        lo, hi, sign = (a, b, 1) if a < b else (b, a, -1)
        with _tree_source(self.rng):
            w = torch.stack([tree(float(lo), float(hi)) for tree in self.trees]) * (self.sign * sign)
        noise = w / (b - a).abs().sqrt()
        return noise.to(sigma.device) if isinstance(sigma, Tensor) else noise
