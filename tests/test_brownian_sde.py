"""The SDE samplers' Brownian-tree noise against k-diffusion's BrownianTreeNoiseSampler, seeded as
AUTOMATIC1111 seeds it: one tree per image with entropy seed + i, spanning the whole schedule's σ range
(img2img and the hires pass: the schedule before it is cut), its normals from the request's RNG source."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import k_diffusion.sampling as KS
import sfumato
import torchsde._brownian.brownian_interval as torchsde_interval
from sfumato.diffusion.brownian import BrownianNoise, sigma_span
from sfumato.diffusion.denoiser import Denoiser
from sfumato.diffusion.noise import ImageNoise, PhiloxGenerator
from sfumato.diffusion.samplers import SAMPLERS, sampler_sigmas
from sfumato.diffusion.schedule import DiscreteSchedule, get_sigmas, scaled_linear_alphas_cumprod
from sfumato.pipeline.generate import guided_denoiser, img2img_sigmas
from sfumato.pipeline.images import to_tensor
from test_samplers import EpsNet  # the same small random ε-model as the sampler parity tests

SHAPE = (2, 4, 8, 8)
SEEDS = [1234, 1235]


def _denoiser():
    schedule = DiscreteSchedule(scaled_linear_alphas_cumprod())
    den = Denoiser(EpsNet().requires_grad_(False), schedule, "eps")
    return schedule, (lambda x, sigma: den(x, sigma, None))


def _queries(sigmas: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each step's (σ, σ_next), and (σ, midpoint) as DPM++ SDE asks, out of order."""
    pos = sigmas[sigmas > 0]
    steps = list(zip(pos[:-1], pos[1:]))
    mids = [(a, (a * b).sqrt()) for a, b in steps]
    return steps[::2] + mids + steps[1::2]


def _a1111_nv_randn(size, dtype, device, seed):
    """A1111's replacement of torchsde's draw under its "NV" source: devices.randn_local(seed, size)."""
    return PhiloxGenerator(int(seed)).randn(tuple(size)).to(device=device, dtype=dtype)


# -- (a) the noise itself --------------------------------------------------------------------------

@pytest.mark.parametrize("scheduler", ["karras", "exponential"])
def test_noise_equals_k_diffusion_brownian_tree(scheduler):
    schedule, _ = _denoiser()
    sigmas = get_sigmas(schedule, scheduler, 10)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    lo, hi = sigmas[sigmas > 0].min(), sigmas.max()
    ref = KS.BrownianTreeNoiseSampler(x, lo, hi, seed=SEEDS)
    ours = BrownianNoise(SHAPE[1:], SEEDS, sigma_span(sigmas))
    for a, b in _queries(sigmas):
        got, want = ours(a, b), ref(a, b)
        assert got.dtype == torch.float32 and got.shape == SHAPE
        assert torch.equal(got, want), float((got - want).abs().max())
    # one tree per image: image 1 of the batch is a lone tree with its seed, not the batch's first
    alone = BrownianNoise(SHAPE[1:], SEEDS[1:], sigma_span(sigmas))
    a, b = sigmas[2], sigmas[3]
    assert torch.equal(alone(a, b)[0], ours(a, b)[1])
    assert not torch.allclose(ours(a, b)[0], ours(a, b)[1])
    # a tree over another range is another path (A1111's range choice matters)
    other = BrownianNoise(SHAPE[1:], SEEDS, (float(lo), float(sigmas[1])))
    assert not torch.allclose(other(a, b), ours(a, b))


def test_nv_tree_equals_k_diffusion_under_a1111s_nv_draw(monkeypatch):
    """rng="nv": the nodes' normals from the Philox source, as A1111's patched torchsde draws them."""
    schedule, _ = _denoiser()
    sigmas = get_sigmas(schedule, "karras", 6)
    span = sigma_span(sigmas)
    x = torch.zeros(SHAPE)
    cpu = BrownianNoise(SHAPE[1:], SEEDS, span, rng="cpu")
    ours = BrownianNoise(SHAPE[1:], SEEDS, span, rng="nv")
    assert torchsde_interval._randn is not _a1111_nv_randn          # our swap is scoped
    monkeypatch.setattr(torchsde_interval, "_randn", _a1111_nv_randn)
    ref = KS.BrownianTreeNoiseSampler(x, *span, seed=SEEDS)
    for a, b in _queries(sigmas):
        assert torch.equal(ours(a, b), ref(a, b))
        assert not torch.allclose(cpu(a, b), ref(a, b))             # the source matters
    assert torchsde_interval._randn is _a1111_nv_randn              # and restored what it found


# -- (b) the samplers with it, against k-diffusion's ------------------------------------------------

SDE = [("dpmpp_sde", KS.sample_dpmpp_sde, {}), ("dpmpp_2m_sde", KS.sample_dpmpp_2m_sde, {}),
       ("dpmpp_2m_sde", KS.sample_dpmpp_2m_sde, {"solver_type": "heun"}),
       ("dpmpp_3m_sde", KS.sample_dpmpp_3m_sde, {})]


@pytest.mark.parametrize("name,k_fn,options", SDE)
@pytest.mark.parametrize("start", [0, 4])   # 4: an img2img tail, the tree over the whole schedule
def test_sde_samplers_with_brownian_tree_match_k_diffusion(name, k_fn, options, start):
    schedule, denoise = _denoiser()
    full = sampler_sigmas(name, None, schedule, 10)
    sigmas = full[start:]
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)) * sigmas[0]
    tree = KS.BrownianTreeNoiseSampler(x, full[full > 0].min(), full.max(), seed=SEEDS)
    ref = k_fn(denoise, x, sigmas, disable=True, noise_sampler=tree, **options)
    ours = SAMPLERS[name](denoise, x, sigmas, noise_sampler=BrownianNoise(SHAPE[1:], SEEDS, sigma_span(full)),
                          **options)
    diff = float((ours - ref).abs().max())
    assert diff <= 1e-6 * float(ref.abs().max()), diff
    # independent normals per call (the old noise) are far from it
    torch.manual_seed(0)
    plain = SAMPLERS[name](denoise, x, sigmas, **options)
    assert float((plain - ref).abs().max()) > 1e-2


# -- (c) the pipeline ------------------------------------------------------------------------------

STEPS = 6


@pytest.fixture(scope="module")
def pipe(tiny_model):
    return sfumato.load(tiny_model, dtype="fp32")


def _k_run(pipe, p, x, sigmas, full):
    """k-diffusion's DPM++ SDE sampler over ``sigmas`` with A1111's noise sampler: a tree per image
    seeded seed + i over the min positive / max σ of the whole schedule ``full``."""
    engine = pipe.generator.base
    cond, uncond = engine.conditioning(p, p.batch_size, p.width, p.height)
    denoise = guided_denoiser(engine, cond, uncond, p, sigmas)
    seeds = [p.seed + i for i in range(p.batch_size)]
    tree = KS.BrownianTreeNoiseSampler(x, full[full > 0].min(), full.max(), seed=seeds)
    fn = {"dpmpp_sde": KS.sample_dpmpp_sde, "dpmpp_2m_sde": KS.sample_dpmpp_2m_sde,
          "dpmpp_3m_sde": KS.sample_dpmpp_3m_sde}[p.sampler]
    with torch.no_grad():
        return fn(denoise, x, sigmas, disable=True, noise_sampler=tree)


def test_pipeline_2m_sde_equals_k_diffusion_seeded_as_a1111(pipe):
    p = pipe.params(prompt="a red circle", negative_prompt="blurry", steps=STEPS, sampler="DPM++ 2M SDE", seed=5,
                    width=64, height=64, batch_size=2)
    ours = pipe.generator.run(p).latents
    sigmas = sampler_sigmas(p.sampler, p.scheduler, pipe.generator.base.schedule, STEPS)
    x = ImageNoise((4, 8, 8), [5, 6]).initial() * sigmas[0]
    ref = _k_run(pipe, p, x, sigmas, sigmas)
    scale = float(ref.abs().max())
    assert scale > 0.1
    diff = float((ours - ref).abs().max())
    assert diff <= 1e-6 * scale, (diff, scale)
    # seed invariance: image 1 of the batch is a lone run with seed + 1
    lone = pipe.generator.run(pipe.params(prompt="a red circle", negative_prompt="blurry", steps=STEPS,
                                          sampler="DPM++ 2M SDE", seed=6, width=64, height=64)).latents
    torch.testing.assert_close(lone[0], ours[1], rtol=1e-5, atol=1e-5)


def test_pipeline_img2img_tree_spans_the_whole_schedule(pipe):
    rgb = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    init = Image.fromarray(rgb)
    p = pipe.params(prompt="a red circle", negative_prompt="blurry", steps=STEPS, sampler="DPM++ SDE", seed=9,
                    width=64, height=64, init_image=init, strength=0.5)
    ours = pipe.generator.run(p).latents
    engine = pipe.generator.base
    full = sampler_sigmas(p.sampler, p.scheduler, engine.schedule, STEPS)
    sigmas = img2img_sigmas(full, STEPS, 0.5)
    assert sigmas[0] < full[0]
    with torch.no_grad():
        latent = engine.encode(to_tensor([init.resize((64, 64), Image.LANCZOS)]))
    x = latent + ImageNoise((4, 8, 8), [9]).initial() * sigmas[0]
    ref = _k_run(pipe, p, x, sigmas, full)
    scale = float(ref.abs().max())
    diff = float((ours - ref).abs().max())
    assert diff <= 1e-6 * scale, (diff, scale)
    cut = _k_run(pipe, p, x, sigmas, sigmas)       # a tree over the cut schedule only: another image
    assert float((cut - ref).abs().max()) > 1e-3


def test_plan_spans_hires_and_img2img_trees_over_their_whole_schedules(pipe):
    gen = pipe.generator
    p = pipe.params(prompt="x", steps=STEPS, sampler="dpmpp_3m_sde", seed=1, width=64, height=64,
                    hires_scale=2.0, hires_steps=4, hires_denoise=0.5)
    base, hires = gen.plan(p).stages
    assert base.noise_span is None
    full = sampler_sigmas(p.sampler, p.scheduler, gen.base.schedule, p.hires_total_steps)
    assert hires.noise_span == sigma_span(full) and torch.equal(hires.sigmas, full[len(full) - 1 - 4:])
    assert hires.noise_span[1] > float(hires.sigmas[0])
