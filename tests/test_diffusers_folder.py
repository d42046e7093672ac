"""A diffusers folder written by diffusers (tiny random SD1-style model) gives the same images as
its single-file equivalent, and both equal the reference chain run on the diffusers modules."""

from __future__ import annotations

import pytest
import torch

import sfumato
from reference import pixels_close, reference_txt2img, tiny_sd_folder
from sfumato.checkpoint.convert_text import hf_text_sd
from sfumato.checkpoint.convert_unet import diffusers_unet_to_ldm, unet_config_from_diffusers
from sfumato.checkpoint.convert_vae import diffusers_vae_to_ldm
from sfumato.checkpoint.io import save_file
from sfumato.checkpoint.specs import SPEC_METADATA_KEY, ModelSpec, TextSlot, spec_to_json
from sfumato.models.clip import TextEncoderConfig
from sfumato.models.unet import UNetConfig
from sfumato.models.vae import VAEConfig

TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=2, norm_num_groups=32,
)
TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, sample_size=64, norm_num_groups=32,
    block_out_channels=(32, 32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_sd_folder(tmp_path_factory.mktemp("tiny"), "tiny-sd", TINY_UNET, TINY_VAE, 11)


def _single_file_equivalent(pipe, path):
    """The same weights in the original layout, with the configuration written out by hand."""
    unet_cfg = UNetConfig(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                          transformer_depth=(1, 0), transformer_depth_middle=1, num_heads=2, context_dim=32)
    assert unet_config_from_diffusers(dict(pipe.unet.config)) == unet_cfg
    spec = ModelSpec(
        "custom", unet_cfg,
        VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1),
        (TextSlot("cond_stage_model.transformer.", TextEncoderConfig("hf", 32, 2, 2, mlp_ratio=2.0)),),
        resolution=64,
    )
    sd = {}
    sd |= {"model.diffusion_model." + k: v for k, v in diffusers_unet_to_ldm(pipe.unet.state_dict(), unet_cfg).items()}
    sd |= {"first_stage_model." + k: v for k, v in diffusers_vae_to_ldm(pipe.vae.state_dict()).items()}
    text = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in pipe.text_encoder.state_dict().items()}
    sd |= {"cond_stage_model.transformer." + k: v for k, v in hf_text_sd(text).items()}
    save_file({k: v.contiguous() for k, v in sd.items()}, path, {SPEC_METADATA_KEY: spec_to_json(spec)})
    return path


def _pixels(result):
    import numpy as np

    return torch.from_numpy(np.stack([np.asarray(im) for im in result.images]))


@pytest.mark.parametrize("scheduler", ["normal"])
def test_folder_equals_single_file_and_reference(tiny, tmp_path, scheduler):
    folder, pipe = tiny
    kw = dict(steps=5, cfg_scale=6.0, seed=7, width=64, height=64, batch_size=2, scheduler=scheduler)
    from_folder = sfumato.load(folder, dtype="fp32")   # the reference computes in fp32 (auto is bf16 on some CPUs)
    assert from_folder.family == "custom"
    a = _pixels(from_folder.txt2img("a green square", "a red circle", **kw))
    b = _pixels(sfumato.load(_single_file_equivalent(pipe, tmp_path / "tiny.safetensors"), dtype="fp32").txt2img(
        "a green square", "a red circle", **kw))
    ref = reference_txt2img(pipe.unet, pipe.vae, pipe.text_encoder, "a green square", "a red circle",
                            seed=7, steps=5, cfg=6.0, width=64, height=64, batch=2)
    assert torch.equal(a, b)
    assert ref.float().std() > 5
    assert pixels_close(a, ref, 2) >= 0.99
