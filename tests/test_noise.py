"""Seeded per-image noise: torch's CPU generator as the oracle for ``cpu``, golden values from
AUTOMATIC1111's ``modules/rng_philox.py`` for ``nv``, and A1111's variation-seed semantics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sfumato.diffusion.noise import ImageNoise, PhiloxGenerator, philox4x32, slerp

SHAPE = (4, 8, 6)


def cpu_draws(seed: int, n: int, shape=SHAPE) -> list[torch.Tensor]:
    g = torch.Generator("cpu").manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


# -- cpu ----------------------------------------------------------------------------------------

def test_cpu_initial_is_per_image_torch_randn():
    seed = 1234
    noise = ImageNoise(SHAPE, [seed + i for i in range(3)]).initial()
    want = torch.stack([torch.randn(SHAPE, generator=torch.Generator("cpu").manual_seed(seed + i)) for i in range(3)])
    assert noise.dtype == torch.float32 and torch.equal(noise, want)


def test_cpu_next_continues_each_generator():
    noise = ImageNoise(SHAPE, [7, 8])
    draws = [noise.initial(), noise.next(), noise.next()]
    for i, seed in enumerate([7, 8]):
        for got, want in zip(draws, cpu_draws(seed, 3)):
            assert torch.equal(got[i], want)
    assert torch.equal(noise.initial(), draws[0])  # initial() is the cached first draw


def test_next_before_initial_is_the_first_draw():
    a, b = ImageNoise(SHAPE, [3]), ImageNoise(SHAPE, [3])
    assert torch.equal(a.next(), b.initial())
    assert torch.equal(a.next(), b.next())


@pytest.mark.parametrize("rng", ["cpu", "nv"])
@pytest.mark.parametrize("strength", [0.0, 0.3])
def test_batch_item_equals_lone_run(rng, strength):
    seeds, subseeds = [100, 101, 102], [500, 501, 502]
    kw = dict(subseed_strength=strength, rng=rng)
    batch = ImageNoise(SHAPE, seeds, subseeds=subseeds, **kw)
    draws = [batch.initial(), batch.next(), batch.next()]
    for i in range(3):
        lone = ImageNoise(SHAPE, [seeds[i]], subseeds=[subseeds[i]], **kw)
        for got, want in zip(draws, [lone.initial(), lone.next(), lone.next()]):
            assert torch.equal(got[i], want[0])


@pytest.mark.parametrize("rng", ["cpu", "nv"])
def test_repeatable(rng):
    kw = dict(subseeds=[9, 10], subseed_strength=0.4, seed_resize_from=(40, 56), rng=rng)
    a, b = ImageNoise(SHAPE, [1, 2], **kw), ImageNoise(SHAPE, [1, 2], **kw)
    for _ in range(3):
        assert torch.equal(a.next(), b.next())


# -- variation seeds (A1111 modules/rng.py: ImageRNG.first, slerp) ---------------------------------

def reference_slerp(t: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Slerp from its definition, per (channel, column) vector along H, in float64 loops."""
    lo, hi = low.double().numpy(), high.double().numpy()
    out = np.empty_like(lo)
    for c in range(lo.shape[0]):
        for x in range(lo.shape[2]):
            a, b = lo[c, :, x], hi[c, :, x]
            theta = math.acos(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))
            out[c, :, x] = (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)
    return torch.from_numpy(out).float()


def test_subseed_strength_zero_is_plain_noise():
    noise = ImageNoise(SHAPE, [11, 12], subseeds=[21, 22], subseed_strength=0.0)
    assert torch.equal(noise.initial(), ImageNoise(SHAPE, [11, 12]).initial())


def test_subseed_strength_one_is_the_subseed_noise():
    # A1111: slerp(1, noise(seed), noise(subseed)) weighs the seed by sin(0) = 0 and the subseed by 1.
    noise = ImageNoise(SHAPE, [11, 12], subseeds=[21, 22], subseed_strength=1.0)
    assert torch.allclose(noise.initial(), ImageNoise(SHAPE, [21, 22]).initial(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("rng", ["cpu", "nv"])
def test_subseed_half_is_slerp_and_seed_stream_continues(rng):
    noise = ImageNoise(SHAPE, [31], subseeds=[41], subseed_strength=0.5, rng=rng)
    seed_noise, sub_noise = ImageNoise(SHAPE, [31], rng=rng), ImageNoise(SHAPE, [41], rng=rng)
    want = reference_slerp(0.5, seed_noise.initial()[0], sub_noise.initial()[0])
    assert torch.allclose(noise.initial()[0], want, atol=1e-5, rtol=0)
    # later draws come from the seed's stream, not the subseed's
    assert torch.equal(noise.next(), seed_noise.next())


def test_slerp_near_parallel_falls_back_to_a1111_lerp():
    low = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    high = low + 1e-3 * torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    # A1111's fallback weighs low by val and high by (1 - val).
    assert torch.equal(slerp(0.3, low, high), low * 0.3 + high * (1 - 0.3))


def test_seed_equal_to_subseed_is_unchanged():
    noise = ImageNoise(SHAPE, [5], subseeds=[5], subseed_strength=0.7).initial()
    assert torch.allclose(noise, ImageNoise(SHAPE, [5]).initial(), atol=1e-6, rtol=0)


# -- seed resize (A1111 "Resize seed from width/height") -----------------------------------------

def test_seed_resize_from_smaller_centres_the_small_noise():
    c, h, w = SHAPE
    noise = ImageNoise(SHAPE, [77], seed_resize_from=(4 * 8, 2 * 8))  # latent 4x2 inside 8x6
    small = cpu_draws(77, 1, (c, 4, 2))[0]
    full = cpu_draws(77, 2)
    want = full[0].clone()
    want[:, 2:6, 2:4] = small
    assert torch.equal(noise.initial()[0], want)
    assert torch.equal(noise.next()[0], full[1])


def test_seed_resize_from_larger_crops_the_centre():
    c = SHAPE[0]
    noise = ImageNoise(SHAPE, [78], seed_resize_from=(12 * 8, 11 * 8))  # latent 12x11 over 8x6
    big = cpu_draws(78, 1, (c, 12, 11))[0]
    want = cpu_draws(78, 1)[0]
    want[:, 0:8, 0:5] = big[:, 2:10, 3:8]  # A1111's floor-division offsets: dy = -2, dx = -3
    assert torch.equal(noise.initial()[0], want)


def test_seed_resize_from_same_size_is_plain():
    noise = ImageNoise(SHAPE, [79], seed_resize_from=(SHAPE[1] * 8, SHAPE[2] * 8))
    assert torch.equal(noise.initial(), ImageNoise(SHAPE, [79]).initial())


# -- eta noise seed delta, sampler hook, validation ----------------------------------------------

def test_eta_noise_seed_delta_reseeds_later_draws():
    noise = ImageNoise(SHAPE, [10, 11], eta_noise_seed_delta=31337)
    assert torch.equal(noise.initial(), ImageNoise(SHAPE, [10, 11]).initial())
    assert torch.equal(noise.next(), ImageNoise(SHAPE, [10 + 31337, 11 + 31337]).initial())


def test_noise_sampler_draws_next():
    a, b = ImageNoise(SHAPE, [1]), ImageNoise(SHAPE, [1])
    a.initial(), b.initial()
    sampler = a.noise_sampler()
    assert torch.equal(sampler(torch.tensor(2.0), torch.tensor(1.0)), b.next())


def test_invalid_arguments():
    with pytest.raises(ValueError, match="subseeds"):
        ImageNoise(SHAPE, [1], subseed_strength=0.5)
    with pytest.raises(ValueError, match="rng"):
        ImageNoise(SHAPE, [1], rng="gpu")
    with pytest.raises(ValueError, match="seed"):
        PhiloxGenerator(-1)


# -- nv: Philox 4x32-10 + Box-Muller --------------------------------------------------------------

# A1111's modules/rng_philox.py documents, in its module docstring, the expected output of
# Generator(seed=0).randn(shape=(3, 4)) — the values CUDA's torch.randn gives. A1111's numpy code
# (float64 Box-Muller) reproduces them to ~3e-7, not bit for bit.
A1111_DOCSTRING_SEED0 = [
    [-0.92466259, -0.42534415, -2.6438457, 0.14518388],
    [-0.12086647, -0.57972564, -0.62285122, -0.32838709],
    [-1.07454231, -0.36314407, -1.67105067, 2.26550497],
]

# Bit-exact outputs of A1111's rng_philox.py itself (upstream sha256 d68247f7…c39c), recorded by
# qskousen/TensorPencil tools/gen_philox_fixtures.py in src/core/assets/philox_fixtures.json:
# raw philox4_32(counter, key) words, and Generator(seed).randn((16,)) first and second draws.
PHILOX_RAW = [  # (counter, key, out)
    ([0, 0, 0, 0], [0, 0], [1713891541, 3781805453, 3159862348, 2600524760]),
    ([0, 0, 1, 0], [0, 0], [2219120097, 4035800746, 253345875, 2214098416]),
    ([1, 0, 0, 0], [0, 0], [4175744164, 1555169499, 2980410603, 159317863]),
    ([0, 0, 12345, 0], [42, 0], [449781516, 2829767016, 289552672, 4147685951]),
    ([3, 0, 7, 0], [3735928559, 305419896], [1121449622, 1933514520, 647440249, 2941249528]),
    ([4294967295] * 4, [4294967295] * 2, [1083123565, 1103641358, 2718681030, 1834242557]),
]
A1111_RANDN16 = {  # seed: (first draw, first 8 of the second draw)
    0: ([-0.9246624112129211, -0.42534396052360535, -2.643845796585083, 0.14518387615680695,
         -0.12086650729179382, -0.5797256827354431, -0.6228513121604919, -0.32838714122772217,
         -1.0745420455932617, -0.3631440997123718, -1.6710504293441772, 2.265505075454712,
         0.3116850256919861, -0.1841890513896942, 1.2866425514221191, 1.1819525957107544],
        [0.18082588911056519, -0.5522627234458923, 0.9238134026527405, -0.7349703311920166,
         1.3799946308135986, 0.8676307201385498, 0.12965592741966248, -0.9406399726867676]),
    42: ([0.1940188705921173, 2.1613738536834717, -0.17205095291137695, 0.8490599989891052,
          -1.9243992567062378, 0.6529852747917175, -0.6494410634040833, -0.8175245523452759,
          0.5279646515846252, -1.2753496170043945, -1.6621264219284058, -0.3033137321472168,
          -0.09256982803344727, 0.19923707842826843, -1.1204326152801514, 1.857659101486206],
         [0.13913749158382416, -0.10821615904569626, -0.7174221873283386, 0.7566486597061157,
          0.3714882433414459, -1.0049413442611694, 0.008294666185975075, 0.3276578485965729]),
    4294967296: ([-0.01742493361234665, 0.4864571690559387, 0.7840468883514404, -0.1919434815645218,
                  0.007753937505185604, -0.9396846294403076, -0.7347022891044617, 0.2823483347892761,
                  -0.3350121080875397, 0.2612016797065735, 0.44371411204338074, 0.2142280787229538,
                  1.8759633302688599, -0.9929987788200378, 0.1619950234889984, 0.8788005113601685],
                 [0.43530023097991943, -0.11817242205142975, 0.19420288503170013, 0.38628408312797546,
                  1.1696794033050537, -0.1573399305343628, 0.8054284453392029, 0.8760191202163696]),
    1234567890123456789: ([-0.22432929277420044, 0.5532851815223694, 1.0874497890472412, 0.5042516589164734,
                           1.178208351135254, 1.1667070388793945, -0.9792654514312744, 0.28759610652923584,
                           -0.310972660779953, -1.0118757486343384, -1.811805248260498, -0.1945575773715973,
                           0.4909132719039917, 2.2655365467071533, 1.9105663299560547, -0.388933926820755],
                          [-0.2529478967189789, 1.854551076889038, -1.0653313398361206, 0.6165478825569153,
                           -0.4247041940689087, 0.19877679646015167, 0.7640400528907776, 0.824665367603302]),
}


@pytest.mark.parametrize("counter, key, out", PHILOX_RAW)
def test_philox_block_matches_a1111(counter, key, out):
    got = philox4x32(np.array(counter, dtype=np.uint32)[:, None], np.array(key, dtype=np.uint32)[:, None])
    assert got[:, 0].tolist() == out


def test_nv_matches_a1111_docstring():
    got = PhiloxGenerator(0).randn((3, 4))
    assert torch.allclose(got, torch.tensor(A1111_DOCSTRING_SEED0), atol=5e-7, rtol=0)


@pytest.mark.parametrize("seed", list(A1111_RANDN16))
def test_nv_bit_exact_with_a1111_including_offset(seed):
    first, second8 = A1111_RANDN16[seed]
    g = PhiloxGenerator(seed)
    assert g.randn((16,)).tolist() == torch.tensor(first).tolist()
    assert g.randn((16,))[:8].tolist() == torch.tensor(second8).tolist()


def test_image_noise_nv_uses_philox_streams():
    first, second8 = A1111_RANDN16[0]
    noise = ImageNoise((1, 4, 4), [0], rng="nv")
    assert noise.initial().flatten().tolist() == torch.tensor(first).tolist()
    assert noise.next().flatten()[:8].tolist() == torch.tensor(second8).tolist()
