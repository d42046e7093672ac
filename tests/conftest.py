"""Shared fixtures: tiny random models in the original single-file layout (configuration carried in
the file's metadata), built from sfumato's own modules — for tests of plumbing, not of numerics."""

from __future__ import annotations

import pytest
import torch

from sfumato.checkpoint.io import save_file
from sfumato.checkpoint.specs import SPEC_METADATA_KEY, UNET_PREFIX, VAE_PREFIX, ModelSpec, TextSlot, spec_to_json
from sfumato.models.clip import TextEncoderConfig, build_text_encoder
from sfumato.models.unet import UNetConfig, UNetModel
from sfumato.models.vae import AutoencoderKL, VAEConfig

TINY_SPEC = ModelSpec(
    "custom",
    UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(1, 0),
               num_heads=2, context_dim=32),
    VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1),
    (TextSlot("cond_stage_model.transformer.", TextEncoderConfig("hf", 32, 2, 2)),),
    resolution=64,
)


def write_tiny_model(path, spec: ModelSpec = TINY_SPEC, seed: int = 0):
    torch.manual_seed(seed)
    sd = {}
    parts = [(UNET_PREFIX, UNetModel(spec.unet)), (VAE_PREFIX, AutoencoderKL(spec.vae))]
    parts += [(slot.prefix, build_text_encoder(slot.config)) for slot in spec.text]
    for prefix, module in parts:
        with torch.no_grad():
            for p in module.parameters():  # default inits leave some outputs at zero: shake them up
                p.add_(torch.randn_like(p) * 0.05)
        sd.update({prefix + k: v.contiguous() for k, v in module.state_dict().items()})
    save_file(sd, path, {SPEC_METADATA_KEY: spec_to_json(spec)})
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny.safetensors")
