"""Few-step models: the trailing and turbo σ schedules against diffusers' schedulers and ComfyUI's
definition; Euler, Euler a and DDIM on trailing timesteps stepped as diffusers steps them; whole
generations of a tiny model under the turbo / lightning / hyper presets equal diffusers'
StableDiffusionPipeline with the scheduler and guidance the model cards give; CFG 1 skips the
unconditional rows; presets are guessed from names, fill only what a request leaves out, and are
refused by name when unknown."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import sfumato
from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler
from reference import tiny_sd_folder
from sfumato.cli import main
from sfumato.diffusion.samplers import SAMPLERS, sampler_sigmas
from sfumato.diffusion.schedule import DiscreteSchedule, get_sigmas, scaled_linear_alphas_cumprod, trailing_sigmas
from sfumato.errors import ParamError
from sfumato.pipeline.fewstep import PRESETS, guess
from test_controlnet_pipeline import TINY_UNET, TINY_VAE
from test_samplers import SD_SCHEDULER_CONFIG, make_denoiser, rel_err, seeded_noise, start

AC = scaled_linear_alphas_cumprod()


@pytest.mark.parametrize("n", range(1, 11))
def test_trailing_and_turbo_sigmas(n):
    schedule = DiscreteSchedule(AC)
    ours = trailing_sigmas(schedule, n)
    for cls in (EulerDiscreteScheduler, EulerAncestralDiscreteScheduler):
        ref = cls.from_config(SD_SCHEDULER_CONFIG, timestep_spacing="trailing")
        ref.set_timesteps(n)
        torch.testing.assert_close(ours, ref.sigmas.float(), rtol=1e-5, atol=0)   # float32 rounding
        torch.testing.assert_close(schedule.sigma_to_t(ours[:-1]), ref.timesteps.float(), rtol=0, atol=1e-3)
    ddim = DDIMScheduler.from_config(SD_SCHEDULER_CONFIG, timestep_spacing="trailing")
    ddim.set_timesteps(n)
    torch.testing.assert_close(schedule.sigma_to_t(ours[:-1]), ddim.timesteps.float(), rtol=0, atol=1e-3)
    # ComfyUI's SDTurboScheduler: timesteps 999, 899, … (the first n), then 0
    ac = AC.double()
    want = [float(((1 - ac[t]) / ac[t]) ** 0.5) for t in range(999, 999 - 100 * n, -100)] + [0.0]
    torch.testing.assert_close(get_sigmas(schedule, "turbo", n), torch.tensor(want, dtype=torch.float32))
    if n == 1:   # one step starts at the top of the schedule
        assert float(ours[0]) == pytest.approx(float(schedule.sigmas[-1]))


def test_trailing_gives_n_steps_for_every_n():
    """diffusers' own arange gives n + 1 timesteps for some n (61, 103, …): ours gives n, the same values."""
    schedule = DiscreteSchedule(AC)
    for n in (61, 103, 121, 201, 999, 1000):
        sigmas = trailing_sigmas(schedule, n)
        assert len(sigmas) == n + 1 and bool((sigmas[:-1] > sigmas[1:]).all()), n
    ref = EulerDiscreteScheduler.from_config(SD_SCHEDULER_CONFIG, timestep_spacing="trailing")
    ref.set_timesteps(60)
    torch.testing.assert_close(trailing_sigmas(schedule, 60), ref.sigmas.float(), rtol=1e-5, atol=0)


def test_turbo_schedule_limit():
    with pytest.raises(ValueError, match="1 to 10 steps"):
        get_sigmas(DiscreteSchedule(AC), "turbo", 11)
    from sfumato.pipeline.params import GenerationParams

    with pytest.raises(ParamError) as e:
        GenerationParams(prompt="x", scheduler="turbo", steps=12).validated()
    assert e.value.field == "steps"
    with pytest.raises(ParamError) as e:   # the hires pass runs steps / denoise on the same schedule
        GenerationParams(prompt="x", scheduler="turbo", steps=8, hires_scale=2, hires_denoise=0.5).validated()
    assert e.value.field == "hires_steps"


def _euler_reference(scheduler, net, x, steps, generator=None):
    """diffusers' loop: scale_model_input, ε, step (x starts at init_noise_sigma)."""
    scheduler.set_timesteps(steps)
    x = x * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        eps = net(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(eps, t, x, generator=generator).prev_sample
    return x


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_samplers_on_trailing_timesteps_match_diffusers(steps):
    net, schedule, denoise = make_denoiser(EulerDiscreteScheduler.from_config(SD_SCHEDULER_CONFIG).alphas_cumprod)
    x_t = start()
    sigmas = sampler_sigmas("euler", "trailing", schedule, steps)
    ref = _euler_reference(EulerDiscreteScheduler.from_config(SD_SCHEDULER_CONFIG, timestep_spacing="trailing"),
                           net, x_t, steps)
    assert rel_err(SAMPLERS["euler"](denoise, x_t * sigmas[0], sigmas), ref) <= 1e-4
    g = torch.Generator().manual_seed(9)
    ref = _euler_reference(EulerAncestralDiscreteScheduler.from_config(SD_SCHEDULER_CONFIG, timestep_spacing="trailing"),
                           net, x_t, steps, generator=g)
    ours = SAMPLERS["euler_a"](denoise, x_t * sigmas[0], sigmas, noise_sampler=seeded_noise(9))
    assert rel_err(ours, ref) <= 1e-4
    # DDIM with trailing timesteps (Hyper-SD): the last step lands on ᾱ_0, as diffusers' does
    ddim = DDIMScheduler.from_config(SD_SCHEDULER_CONFIG, timestep_spacing="trailing")
    ddim.set_timesteps(steps)
    x = x_t
    for t in ddim.timesteps:
        x = ddim.step(net(x, t), t, x).prev_sample
    sigmas = sampler_sigmas("ddim", "trailing", schedule, steps)
    ours = SAMPLERS["ddim"](denoise, x_t * (1 + sigmas[0] ** 2) ** 0.5, sigmas) / (1 + sigmas[-1] ** 2) ** 0.5
    assert rel_err(ours, x) <= 1e-4


# -- whole generations ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def turbo(tmp_path_factory):
    """A tiny diffusers folder whose name says Turbo, and the diffusers pipeline it was saved from."""
    return tiny_sd_folder(tmp_path_factory.mktemp("few"), "tiny-sd-turbo", TINY_UNET, TINY_VAE, 70)


@pytest.mark.parametrize("preset, scheduler_cls", [("turbo", EulerAncestralDiscreteScheduler),
                                                   ("lightning", EulerDiscreteScheduler), ("hyper", DDIMScheduler)])
def test_presets_equal_diffusers_with_the_model_cards_settings(turbo, preset, scheduler_cls):
    """Each preset's defaults (no steps, CFG, sampler given) against diffusers' pipeline with the model
    card's scheduler (trailing spacing) and guidance_scale 0 (no CFG)."""
    folder, ref_pipe = turbo
    pipe = sfumato.load(folder, dtype="fp32", few_step=None if preset == "turbo" else preset)
    assert pipe.few_step.name == preset                       # "turbo" guessed from the folder's name
    seed, steps = 11, PRESETS[preset].steps
    result = pipe.txt2img("a red circle", seed=seed, width=64, height=64, watermark=False)
    p = result.params
    assert (p.steps, p.cfg_scale, p.scheduler) == (steps, 1.0, PRESETS[preset].scheduler)
    ref_pipe.scheduler = scheduler_cls.from_config(SD_SCHEDULER_CONFIG, timestep_spacing="trailing")
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((1, 4, 8, 8), generator=g)             # the image's stream: ancestral noise follows
    if scheduler_cls is DDIMScheduler:   # diffusers starts DDIM at x_t = noise; A1111 at σ_max·noise in σ-space
        top = float(DiscreteSchedule(AC).sigmas[-1])
        noise = noise * top / (1 + top ** 2) ** 0.5
    with torch.no_grad():
        ref = ref_pipe("a red circle", num_inference_steps=steps, guidance_scale=0.0, latents=noise, generator=g,
                       height=64, width=64, output_type="latent").images
    ours = result.latents
    if scheduler_cls is DDIMScheduler:   # DDIM ends at σ(t=0): diffusers' x_t there is ours / √(1 + σ²)
        ours = ours / (1 + float(DiscreteSchedule(AC).sigmas[0]) ** 2) ** 0.5
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_cfg_1_skips_the_unconditional_rows(turbo, monkeypatch):
    folder, _ = turbo
    pipe = sfumato.load(folder, dtype="fp32", few_step="none")
    assert pipe.few_step is None
    rows = []
    unet = pipe.model.unet
    original = unet.forward
    monkeypatch.setattr(unet, "forward", lambda x, *a, **k: rows.append(x.shape[0]) or original(x, *a, **k))
    one = pipe.txt2img("a red circle", steps=2, cfg_scale=1.0, seed=3, width=64, height=64, watermark=False)
    assert rows == [1, 1]                                       # cond rows only
    rows.clear()
    pipe.txt2img("a red circle", steps=2, cfg_scale=1.5, seed=3, width=64, height=64, watermark=False)
    assert rows == [2, 2]
    # CFG 1 is the conditional prediction: the same as evaluating both and combining (up to rounding);
    # hooks that read row 0 as the uncond row (attention maps here) keep it evaluated
    rows.clear()
    unet.reads_uncond_row = True
    both = pipe.txt2img("a red circle", steps=2, cfg_scale=1.0, seed=3, width=64, height=64, watermark=False)
    del unet.reads_uncond_row
    assert rows == [2, 2]
    torch.testing.assert_close(one.latents, both.latents, rtol=1e-5, atol=1e-5)
    rows.clear()   # AND parts whose weights sum to 1: their rows only; otherwise the uncond row too
    pipe.txt2img("a red circle AND a blue square :0", steps=1, cfg_scale=1.0, seed=3, width=64, height=64)
    pipe.txt2img("a red circle AND a blue square", steps=1, cfg_scale=1.0, seed=3, width=64, height=64)
    assert rows == [2, 3]


def test_guesses_from_names():
    cases = {"sd_xl_turbo_1.0_fp16.safetensors": ("turbo", 1, 1.0), "sd-turbo": ("turbo", 1, 1.0),
             "sdxl_lightning_4step_lora.safetensors": ("lightning", 4, 1.0),
             "sdxl_lightning_8step.safetensors": ("lightning", 8, 1.0),
             "Hyper-SD15-8steps-lora.safetensors": ("hyper", 8, 1.0),
             "Hyper-SDXL-2steps-lora": ("hyper", 2, 1.0), "Hyper-SD15-8steps-CFG-lora": ("hyper", 8, 5.0),
             "lcm-lora-sdv1-5.safetensors": ("lcm", 4, 1.0), "LCM_Dreamshaper_v7": ("lcm", 4, 1.0)}
    for name, (preset, steps, cfg) in cases.items():
        found, by = guess([name])
        assert (found.name, found.steps, found.cfg_scale, by) == (preset, steps, cfg, name), name
        if "lora" in name.lower() and "lightning_8" not in name:   # a LoRA's name must name a few-step LoRA
            assert guess([name], lora=True)[0].name == preset, name
    for plain in ("v1-5-pruned-emaonly.safetensors", "dreamshaper_8", "clcmx", "sd_xl_base_1.0"):
        assert guess([plain]) is None, plain
    for style in ("lightning_bolts", "turbo_style_v2", "lcm_portrait", "blcm-lora"):   # style LoRAs stay plain
        assert guess([style], lora=True) is None, style


def test_presets_fill_only_what_is_left_out(turbo, tmp_path, capsys):
    folder, _ = turbo
    pipe = sfumato.load(folder, dtype="fp32")
    p = pipe.params(prompt="x", steps=3, cfg_scale=2.0)
    assert (p.steps, p.cfg_scale, p.sampler, p.scheduler) == (3, 2.0, "euler_a", "trailing")
    plain = sfumato.load(folder, dtype="fp32", few_step="none")
    assert plain.params(prompt="x").steps == 20
    # a LoRA tag naming an LCM LoRA selects LCM's defaults for that request
    p = plain.params(prompt="x <lora:lcm-lora-sdv1-5:1>")
    assert p.steps == 20   # "none": never guessed
    auto = sfumato.load(folder, dtype="fp32", few_step="auto")
    auto.few_step = None   # as a plain model's: the prompt decides
    p = auto.params(prompt="x <lora:lcm-lora-sdv1-5:1>")
    assert (p.sampler, p.steps, p.cfg_scale) == ("lcm", 4, 1.0)
    with pytest.raises(ParamError) as e:
        sfumato.load(folder, few_step="fast")
    assert e.value.field == "few_step"
    # the CLI says which preset filled what, in one line
    out = tmp_path / "x.png"
    assert main(["txt2img", "a red circle", "--model", str(folder), "--width", "64", "--height", "64",
                 "--dtype", "fp32", "--seed", "2", "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "few-step preset turbo: sampler euler_a, scheduler trailing, steps 1, cfg_scale 1.0" in err
    assert np.asarray(Image.open(out)).shape == (64, 64, 3)
    with pytest.raises(SystemExit) as e:
        main(["txt2img", "a", "--model", str(folder), "--few-step", "fast", "-o", str(out)])
    assert e.value.code == 2 and "--few-step" in capsys.readouterr().err
