"""End to end: a full-size random-weight SD1 checkpoint in the original single-file layout, run
through the ``sfumato txt2img`` command, equals an independent reference chain (diffusers UNet and
VAE, transformers CLIP, open_clip's tokenizer, k-diffusion's denoiser and Euler sampler)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from reference import (
    CLIP_L_HF, SD1_UNET_DIFFUSERS, SD_VAE_DIFFUSERS, hf_text_state, materialize, pixels_close,
    reference_txt2img, round_to,
)
from sfumato.checkpoint.convert_unet import diffusers_unet_to_ldm
from sfumato.checkpoint.convert_vae import diffusers_vae_to_ldm
from sfumato.checkpoint.io import save_file
from sfumato.cli import main
from sfumato.models.unet import SD1_UNET

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sd1_checkpoint(tmp_path_factory):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = round_to(materialize(lambda: UNet2DConditionModel(**SD1_UNET_DIFFUSERS), seed=1), torch.float16)
    vae = round_to(materialize(lambda: AutoencoderKL(**SD_VAE_DIFFUSERS), seed=2), torch.float16)
    text = round_to(materialize(lambda: CLIPTextModel(CLIPTextConfig(**CLIP_L_HF)), seed=3), torch.float16)
    sd = {}
    sd.update({"model.diffusion_model." + k: v for k, v in diffusers_unet_to_ldm(unet.state_dict(), SD1_UNET).items()})
    sd.update({"first_stage_model." + k: v for k, v in diffusers_vae_to_ldm(vae.state_dict()).items()})
    sd.update({"cond_stage_model.transformer." + k: v for k, v in hf_text_state(text).items() if "position_ids" not in k})
    sd = {k: v.to(torch.float16).contiguous() for k, v in sd.items()}
    path = tmp_path_factory.mktemp("ckpt") / "random-sd1.safetensors"
    save_file(sd, path)
    return path, (unet, vae, text)


def _run_cli(path, out, sampler="euler", scheduler="normal", **kw):
    args = ["txt2img", kw.get("prompt", "a red circle on a blue background"), "--model", str(path),
            "--negative-prompt", kw.get("negative", "blurry"), "--sampler", sampler, "--scheduler", scheduler,
            "--steps", str(kw.get("steps", 6)), "--cfg-scale", "7", "--seed", str(kw.get("seed", 1234)),
            "--width", "64", "--height", "64", "--dtype", "fp32", "--no-watermark", "-o", str(out)]
    assert main(args) == 0
    return torch.from_numpy(np.asarray(Image.open(out).convert("RGB")))


@pytest.mark.parametrize("sampler", ["euler", "heun", "lms", "dpm2", "dpmpp_2m"])
@pytest.mark.parametrize("scheduler", ["normal", "karras"])
def test_samplers_equal_reference_chain(sd1_checkpoint, tmp_path, sampler, scheduler):
    path, (unet, vae, text) = sd1_checkpoint
    ours = _run_cli(path, tmp_path / "ours.png", sampler=sampler, scheduler=scheduler, steps=4)
    ref = reference_txt2img(unet, vae, text, "a red circle on a blue background", "blurry", seed=1234, steps=4,
                            cfg=7.0, width=64, height=64, sampler=sampler, scheduler=scheduler,
                            discard_penultimate=(sampler == "dpm2"))[0]
    assert ours.shape == ref.shape == (64, 64, 3)
    assert ref.float().std() > 5, "reference image is flat: the comparison would be meaningless"
    assert pixels_close(ours, ref, 2) >= 0.99


def test_info_names_the_family(sd1_checkpoint, capsys):
    path, _ = sd1_checkpoint
    assert main(["info", str(path), "--json"]) == 0
    import json

    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "sd1"
    assert info["prediction"] == "eps"
    assert info["storage_dtype"]["unet"] == "float16"
    assert 859_000_000 < info["parameters"]["unet"] < 860_000_000
    import hashlib

    assert info["model_hash"] == hashlib.sha256(path.read_bytes()).hexdigest()[:10]
