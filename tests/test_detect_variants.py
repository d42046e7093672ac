"""Detection of SD 2's depth model and the SD x4 upscaler at full size, without memory (meta
tensors): as diffusers folders (configs as the released folders have them, weights from the
reference modules), and the x4 upscaler's noise schedule when a single file does not carry one.
The single-file layouts are covered with the other families in test_detect.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from reference import CLIP_L_HF, SD_VAE_DIFFUSERS, hf_text_state
from sfumato.checkpoint import diffusers as diffusers_folder
from sfumato.checkpoint.info import describe_model
from sfumato.checkpoint.load import build_model
from test_detect import SD2_UNET_DIFFUSERS, X4_UNET_DIFFUSERS, X4_VAE_DIFFUSERS, synthetic

# stabilityai/stable-diffusion-2-* text_encoder/config.json: OpenCLIP-H in the transformers layout, 23 layers
OPENCLIP_H_HF = {**CLIP_L_HF, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
                 "num_attention_heads": 16, "hidden_act": "gelu", "projection_dim": 512}
SD_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
X4_SCHEDULE = dict(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear")

FOLDERS = {
    "sd2-depth": dict(unet={**SD2_UNET_DIFFUSERS, "in_channels": 5}, vae=SD_VAE_DIFFUSERS,
                      scheduler={**SD_SCHEDULE, "prediction_type": "epsilon"}, low_res=None),
    "sd-x4-upscaler": dict(unet=X4_UNET_DIFFUSERS, vae={**X4_VAE_DIFFUSERS, "scaling_factor": 0.08333},
                           scheduler={**X4_SCHEDULE, "prediction_type": "v_prediction"},
                           low_res={**X4_SCHEDULE, "_class_name": "DDPMScheduler"}),
}


def _meta_state(make) -> dict:
    with torch.device("meta"):
        return make()


def _write_folder(root: Path, family: str) -> dict[str, dict]:
    """Config files as in the released folder, empty weight files; returns each part's meta weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = FOLDERS[family]
    unet = _meta_state(lambda: UNet2DConditionModel(**cfg["unet"]))
    vae = _meta_state(lambda: AutoencoderKL(**cfg["vae"]))
    text = _meta_state(lambda: CLIPTextModel(CLIPTextConfig(**OPENCLIP_H_HF)))
    configs = {"unet": dict(unet.config), "vae": dict(vae.config), "text_encoder": text.config.to_dict(),
               "scheduler": cfg["scheduler"]}
    index = {"_class_name": "StableDiffusionPipeline"}
    if cfg["low_res"] is not None:
        configs["low_res_scheduler"] = cfg["low_res"]
        index = {"_class_name": "StableDiffusionUpscalePipeline", "max_noise_level": 350}
    (root / "model_index.json").write_text(json.dumps(index))
    for name, config in configs.items():
        (root / name).mkdir()
        config_name = "scheduler_config.json" if "scheduler" in name else "config.json"
        (root / name / config_name).write_text(json.dumps(config, default=list))
    for name in ("unet", "vae", "text_encoder"):
        (root / name / "diffusion_pytorch_model.safetensors").touch()
    return {"unet": unet.state_dict(), "vae": vae.state_dict(), "text_encoder": hf_text_state(text)}


@pytest.mark.parametrize("family", list(FOLDERS))
def test_full_size_diffusers_folder_is_named(family, tmp_path, monkeypatch):
    weights = _write_folder(tmp_path, family)
    monkeypatch.setattr(diffusers_folder, "load_file", lambda path: (weights[Path(path).parent.name], {}))
    sd, metadata = diffusers_folder.read_diffusers_folder(tmp_path)
    model = build_model(sd, metadata, path=tmp_path, device="meta")
    info = describe_model(model)
    assert info["family"] == family
    assert info["prediction"] == ("v" if family == "sd-x4-upscaler" else "eps")
    assert model.spec.is_depth == (family == "sd2-depth")
    assert model.spec.is_upscaler == (family == "sd-x4-upscaler")


def test_x4_single_file_without_schedule_buffers_gets_its_own_schedule():
    from diffusers import DDPMScheduler

    sd = {k: v for k, v in synthetic("sd-x4-upscaler").items() if "alphas_cumprod" not in k and "betas" not in k}
    model = build_model(sd, {}, path=Path("x4-upscaler-ema.safetensors"), device="meta")
    assert model.family == "sd-x4-upscaler" and model.spec.prediction == "v"
    assert model.spec.vae.scale_factor == 0.08333 and model.spec.low_res.max_noise_level == 350
    expected = DDPMScheduler(num_train_timesteps=1000, **X4_SCHEDULE).alphas_cumprod
    torch.testing.assert_close(model.alphas_cumprod, expected, rtol=1e-5, atol=1e-6)


def test_x4_key_shapes_of_the_original_layout():
    sd = synthetic("sd-x4-upscaler")
    assert sd["model.diffusion_model.label_emb.weight"].shape == (1000, 1024)
    assert sd["model.diffusion_model.input_blocks.0.0.weight"].shape == (256, 7, 3, 3)
    assert sd["model.diffusion_model.input_blocks.10.0.skip_connection.weight"].shape == (1024, 512, 1, 1)
    assert sd["first_stage_model.decoder.up.2.block.0.conv1.weight"].shape == (512, 512, 3, 3)
    assert "first_stage_model.decoder.up.3.block.0.conv1.weight" not in sd
    depth = synthetic("sd2-depth")
    assert depth["model.diffusion_model.input_blocks.0.0.weight"].shape == (320, 5, 3, 3)
