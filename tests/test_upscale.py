"""The SD x4 upscaler: a tiny random StableDiffusionUpscalePipeline (diffusers, built offline) is
saved as a diffusers folder; sfumato loads that folder and must give the pipeline's own images for
the same weights and noise (Euler on both sides, v-prediction, CFG). Plus the request errors and
the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import sfumato
from reference import materialize, pixels_close, tiny_hf_text
from sfumato.cli import main
from sfumato.checkpoint.specs import PRESETS
from sfumato.pipeline.params import GenerationParams, ParamError
from sfumato.pipeline.upscale import LOW_RES_SEED_OFFSET, check_upscale_request

TINY_UNET = dict(
    sample_size=8, in_channels=7, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    only_cross_attention=(True, False), num_class_embeds=400, cross_attention_dim=32, attention_head_dim=2,
    use_linear_projection=True, norm_num_groups=16,
)
TINY_VAE = dict(  # three levels: downsamples by 4, as the x4 upscaler's VAE
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, sample_size=32, norm_num_groups=16,
    block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3, scaling_factor=0.08333,
)
SCHEDULE = dict(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear", num_train_timesteps=1000)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from diffusers import (
        AutoencoderKL, DDPMScheduler, EulerDiscreteScheduler, StableDiffusionUpscalePipeline, UNet2DConditionModel,
    )

    root = tmp_path_factory.mktemp("x4")
    pipe = StableDiffusionUpscalePipeline(
        vae=materialize(lambda: AutoencoderKL(**TINY_VAE), 21),
        **tiny_hf_text(root, 22),
        unet=materialize(lambda: UNet2DConditionModel(**TINY_UNET), 23),
        low_res_scheduler=DDPMScheduler(**SCHEDULE),
        scheduler=EulerDiscreteScheduler(**SCHEDULE, prediction_type="v_prediction"),
        max_noise_level=350,
    )
    pipe.set_progress_bar_config(disable=True)
    folder = root / "tiny-x4"
    pipe.save_pretrained(folder)
    return folder, pipe


@pytest.fixture(scope="module")
def loaded(tiny):
    return sfumato.load(tiny[0], dtype="fp32")


def _low_res(seed: int = 0, size: int = 8) -> Image.Image:
    rng = np.random.default_rng(seed)
    smooth = np.kron(rng.integers(0, 255, (size // 4, size // 4, 3)), np.ones((4, 4, 1)))
    return Image.fromarray(smooth.astype(np.uint8))


def _pixels(images) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(im) for im in images]))


@pytest.mark.parametrize("noise_level", [20, 300])
def test_upscale_equals_diffusers_pipeline(tiny, loaded, noise_level):
    _, pipe = tiny
    image, seed = _low_res(1), 5
    assert loaded.family == "custom" and loaded.model.spec.is_upscaler and loaded.prediction == "v"
    ours = loaded.upscale(image, "a green square", "a red circle", noise_level=noise_level, steps=4, cfg_scale=6.0,
                          seed=seed, sampler="euler", scheduler="normal", watermark=False)
    assert ours.images[0].size == (32, 32)
    latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = pipe("a green square", image=image, num_inference_steps=4, guidance_scale=6.0, noise_level=noise_level,
                   negative_prompt="a red circle", latents=latents, output_type="np",
                   generator=torch.Generator().manual_seed(seed + LOW_RES_SEED_OFFSET)).images
    ref = torch.from_numpy((ref * 255).round().astype(np.uint8))
    got = _pixels(ours.images)
    assert ref.float().std() > 5
    assert pixels_close(got, ref, 2) >= 0.99
    assert f"Noise level: {noise_level}" in ours.items[0].infotext


def test_batch_item_equals_single_seed(loaded):
    image = _low_res(2)
    kw = dict(noise_level=50, steps=3, cfg_scale=4.0, sampler="euler_a", watermark=False)
    batch = loaded.upscale(image, "x", seed=10, batch_size=2, **kw)
    single = loaded.upscale(image, "x", seed=11, **kw)
    assert torch.equal(_pixels(batch.images[1:]), _pixels(single.images))
    assert not torch.equal(_pixels(batch.images[:1]), _pixels(single.images))


def test_request_errors(loaded, tiny_model):
    image = _low_res(3)
    with pytest.raises(ParamError, match=r"noise_level: must be in \[0, 350\]") as e:
        loaded.upscale(image, noise_level=351, steps=1)
    with pytest.raises(ParamError, match="only upscales") as e:
        loaded.txt2img("x", steps=1, width=64, height=64)
    assert e.value.field == "noise_level"
    with pytest.raises(ParamError, match="multiple of 8") as e:   # the tiny UNet has two levels: even sides
        loaded.upscale(Image.new("RGB", (9, 8)), steps=1)
    assert e.value.field == "width"
    # SD's x4 upscaler halves its latent three times: a low-res side must be a multiple of 8
    p = GenerationParams("", init_image=Image.new("RGB", (10, 8)), noise_level=20, width=40, height=32).validated()
    with pytest.raises(ParamError, match="output width must be a multiple of 32") as e:
        check_upscale_request(PRESETS["sd-x4-upscaler"], p, 4)
    with pytest.raises(ParamError, match="not supported") as e:
        loaded.upscale(image, steps=1, mask=Image.new("L", image.size, 255))
    assert e.value.field == "mask"
    other = sfumato.load(tiny_model)
    with pytest.raises(ParamError, match="not an x4 upscaler") as e:
        other.upscale(_low_res(3), steps=1)
    assert e.value.field == "noise_level"


def test_cli_upscale(tiny, tmp_path, capsys):
    folder, _ = tiny
    _low_res(4).save(tmp_path / "low.png")
    out = tmp_path / "big.png"
    code = main(["upscale", "--model", str(folder), "--image", str(tmp_path / "low.png"), "-o", str(out),
                 "--noise-level", "30", "--steps", "2", "--cfg", "5", "--seed", "1", "--no-watermark"])
    assert code == 0
    assert Image.open(out).size == (32, 32)
    code = main(["upscale", "--model", str(folder), "--image", str(tmp_path / "low.png"), "-o", str(out),
                 "--noise-level", "400", "--steps", "2"])
    assert code == 2
    assert "noise_level" in capsys.readouterr().err
