"""SDXL refiner hand-off: the base model runs the head of the σ schedule, the refiner (its own
text encoder, aesthetic-score conditioning and VAE) the tail, with the same noise streams.
The oracle is k-diffusion's sampler run once over the whole schedule with a denoiser that switches
models at the hand-off step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sfumato
from conftest import write_tiny_model
from sfumato.checkpoint.specs import ModelSpec, TextSlot
from sfumato.diffusion.noise import ImageNoise
from sfumato.diffusion.samplers import sampler_sigmas
from sfumato.models.clip import TextEncoderConfig
from sfumato.models.unet import UNetConfig
from sfumato.models.vae import VAEConfig
from sfumato.pipeline.generate import _Guided
from sfumato.pipeline.params import GenerationParams

_OPENCLIP = TextEncoderConfig("openclip", 32, 2, 2, activation="gelu", projection_dim=32, pad_id=0)
_VAE = VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1)
_UNET = dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(1, 0), num_heads=2,
             use_linear_in_transformer=True)
BASE = ModelSpec(
    "custom", UNetConfig(context_dim=64, adm_in_channels=32 + 6 * 256, **_UNET), _VAE,
    (TextSlot("conditioner.embedders.0.transformer.", TextEncoderConfig("hf", 32, 2, 2), layer=-2, final_norm=False),
     TextSlot("conditioner.embedders.1.model.", _OPENCLIP, layer=-2, final_norm=False, pooled=True)),
    resolution=64, conditioning="sdxl",
)
REFINER = ModelSpec(
    "custom", UNetConfig(context_dim=32, adm_in_channels=32 + 5 * 256, **_UNET), _VAE,
    (TextSlot("conditioner.embedders.0.model.", _OPENCLIP, layer=-2, final_norm=False, pooled=True),),
    resolution=64, conditioning="sdxl-refiner",
)
STEPS, SWITCH = 6, 0.5


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("refiner")
    return write_tiny_model(d / "base.safetensors", BASE, seed=1), write_tiny_model(d / "refiner.safetensors", REFINER, seed=2)


@pytest.fixture(scope="module")
def pipe(models):
    return sfumato.load(models[0], refiner=models[1])


def _oracle(pipe, sampler: str, seed: int) -> torch.Tensor:
    """Scaled latents from k-diffusion's sampler over the full schedule, switching denoisers at
    step ⌊switch·steps⌉."""
    import k_diffusion.sampling as KS

    p = GenerationParams("a red circle", "blurry", steps=STEPS, sampler=sampler, seed=seed, width=64, height=64,
                         refiner_switch=SWITCH).validated()
    gen = pipe.generator
    sigmas = sampler_sigmas(sampler, None, gen.base.schedule, STEPS)
    guided = []
    for runner in (gen.base, gen.refiner):
        cond, uncond = runner.conditioning(p, 1, 64, 64)
        guided.append(_Guided(runner, cond, uncond, p, sigmas))
    switch_sigma = sigmas[round(SWITCH * STEPS)]

    def model(x, sigma):
        return guided[0 if sigma[0] > switch_sigma else 1](x, sigma)

    noise = ImageNoise((4, 8, 8), [seed])
    x = noise.initial() * sigmas[0]
    fn = {"euler": KS.sample_euler, "euler_a": KS.sample_euler_ancestral}[sampler]
    extra = {"noise_sampler": lambda s, t: noise.next()} if sampler == "euler_a" else {}
    with torch.no_grad():
        return fn(model, x, sigmas, disable=True, **extra)


@pytest.mark.parametrize("sampler", ["euler", "euler_a"])
def test_refiner_handoff_equals_switching_oracle(pipe, sampler):
    ours = pipe.generator.run(pipe.params(prompt="a red circle", negative_prompt="blurry", steps=STEPS, sampler=sampler,
                                          seed=5, width=64, height=64, refiner_switch=SWITCH))
    ref = _oracle(pipe, sampler, 5)
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(ours.latents, ref, rtol=1e-5, atol=1e-5)
    # the refiner's VAE decodes the result
    expected = pipe.generator.refiner.decode(ref)[0].numpy()
    assert np.abs(np.asarray(ours.images[0]).astype(int) - expected.astype(int)).max() <= 1


def test_refiner_changes_the_result_and_switch_one_skips_it(pipe, models):
    kw = dict(steps=STEPS, sampler="euler", seed=5, width=64, height=64, watermark=False)
    base_only = sfumato.load(models[0]).txt2img("a red circle", "blurry", **kw)
    refined = pipe.txt2img("a red circle", "blurry", refiner_switch=SWITCH, **kw)
    assert not np.array_equal(np.asarray(base_only.images[0]), np.asarray(refined.images[0]))
    assert "Refiner: refiner" in refined.items[0].infotext
    untouched = pipe.generator.run(pipe.params(prompt="a red circle", negative_prompt="blurry", steps=STEPS,
                                               sampler="euler", seed=5, width=64, height=64, refiner_switch=1.0))
    plain = sfumato.load(models[0]).generator.run(GenerationParams("a red circle", "blurry", steps=STEPS, sampler="euler",
                                                                   seed=5, width=64, height=64))
    assert torch.equal(untouched.latents, plain.latents)
