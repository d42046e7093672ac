"""Full-size synthetic state dicts (meta tensors, no memory) in the original single-file layout,
built from the reference implementations' modules: each family is named, every component loads
with strict key matching, and no two presets match the same weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sfumato.checkpoint.convert_unet import diffusers_unet_to_ldm
from sfumato.checkpoint.convert_vae import diffusers_vae_to_ldm
from sfumato.checkpoint.detect import (
    config_signature, detect_spec, is_ignorable, prediction_marker, text_signature,
)
from sfumato.checkpoint.info import describe_model
from sfumato.checkpoint.load import build_model
from sfumato.checkpoint.specs import PRESETS
from sfumato.errors import CheckpointError

from reference import CLIP_L_HF, SD1_UNET_DIFFUSERS, SD_VAE_DIFFUSERS, hf_text_state

SD2_UNET_DIFFUSERS = {**SD1_UNET_DIFFUSERS, "cross_attention_dim": 1024, "attention_head_dim": (5, 10, 20, 20),
                      "use_linear_projection": True}
SDXL_UNET_DIFFUSERS = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
REFINER_UNET_DIFFUSERS = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(384, 768, 1536, 1536),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=4, attention_head_dim=(6, 12, 24, 24), cross_attention_dim=1280,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2560,
)


def _meta(make):
    with torch.device("meta"):
        return make()


def _unet(cfg: dict, family: str) -> dict:
    from diffusers import UNet2DConditionModel

    m = _meta(lambda: UNet2DConditionModel(**cfg))
    return {"model.diffusion_model." + k: v for k, v in diffusers_unet_to_ldm(m.state_dict(), PRESETS[family].unet).items()}


def _vae(cfg: dict = SD_VAE_DIFFUSERS) -> dict:
    from diffusers import AutoencoderKL

    m = _meta(lambda: AutoencoderKL(**cfg))
    return {"first_stage_model." + k: v for k, v in diffusers_vae_to_ldm(m.state_dict()).items()}


def _clip_l(prefix: str) -> dict:
    from transformers import CLIPTextConfig, CLIPTextModel

    m = _meta(lambda: CLIPTextModel(CLIPTextConfig(**CLIP_L_HF)))
    sd = hf_text_state(m)
    sd["text_model.embeddings.position_ids"] = torch.empty(1, 77, dtype=torch.long, device="meta")
    return {prefix + k: v for k, v in sd.items()}


def _openclip(prefix: str, width: int, layers: int, heads: int) -> dict:
    from open_clip.transformer import TextTransformer

    m = _meta(lambda: TextTransformer(context_length=77, vocab_size=49408, width=width, heads=heads,
                                      layers=layers, output_dim=width, act_layer=torch.nn.GELU))
    sd = dict(m.state_dict())
    sd["logit_scale"] = torch.empty((), device="meta")
    return {prefix + k: v for k, v in sd.items()}


DDPM_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "posterior_variance")


X4_UNET_DIFFUSERS = dict(  # stabilityai/stable-diffusion-x4-upscaler unet/config.json
    sample_size=128, in_channels=7, out_channels=4, layers_per_block=2, block_out_channels=(256, 512, 512, 1024),
    down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3,
    up_block_types=("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",),
    only_cross_attention=(True, True, True, False), num_class_embeds=1000, attention_head_dim=8,
    cross_attention_dim=1024, use_linear_projection=True,
)
X4_VAE_DIFFUSERS = {**SD_VAE_DIFFUSERS, "block_out_channels": (128, 256, 512),
                    "down_block_types": ("DownEncoderBlock2D",) * 3, "up_block_types": ("UpDecoderBlock2D",) * 3}
# ldm's LatentUpscaleDiffusion also stores its low-res noise schedule
LOW_SCALE_BUFFERS = tuple("low_scale_model." + name for name in
                          ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                           "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
                           "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod"))
V_FAMILIES = ("sd2-v", "sd-x4-upscaler", "sd2-unclip-l", "sd2-unclip-h")
# ldm's noise augmentor (CLIPEmbeddingNoiseAugmentation) stores its DDPM schedule; its statistics are not persistent
AUGMENTOR_BUFFERS = tuple("noise_augmentor." + name for name in
                          ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                           "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
                           "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod"))


def _unclip_embedder(family: str) -> dict:
    """sd21-unclip-l: the whole OpenAI CLIP ViT-L/14 (ldm's ClipImageEmbedder keeps clip.load's model, text
    side included); -h: open_clip's ViT-H/14 with its text transformer deleted (FrozenOpenCLIPImageEmbedder)."""
    from open_clip.transformer import VisionTransformer

    width, layers, heads, out = (1024, 24, 16, 768) if family == "sd2-unclip-l" else (1280, 32, 16, 1024)
    visual = _meta(lambda: VisionTransformer(image_size=224, patch_size=14, width=width, layers=layers, heads=heads,
                                             mlp_ratio=4.0, output_dim=out))
    sd = {"embedder.model.visual." + k: v for k, v in visual.state_dict().items()}
    if family == "sd2-unclip-l":
        sd |= _openclip("embedder.model.", 768, 12, 12)
    else:
        text = _openclip("embedder.model.", 1024, 24, 16)
        sd |= {k: v for k, v in text.items() if not k.startswith("embedder.model.transformer.")}
    return sd | {name: torch.empty(1000, device="meta") for name in AUGMENTOR_BUFFERS}
UNET_PARAMETERS = {"sd-x4-upscaler": 450_000_000}   # at least; the others above 800M


def synthetic(family: str) -> dict:
    base = family.removesuffix("-inpaint").removesuffix("-v")
    in_ch = 9 if family.endswith("inpaint") else 4
    if family == "sd2-depth":
        sd = _unet({**SD2_UNET_DIFFUSERS, "in_channels": 5}, family) | _openclip("cond_stage_model.model.", 1024, 24, 16)
    elif family == "sd-x4-upscaler":
        sd = _unet(X4_UNET_DIFFUSERS, family) | _openclip("cond_stage_model.model.", 1024, 24, 16) | _vae(X4_VAE_DIFFUSERS)
        sd |= {name: torch.empty(1000, device="meta") for name in LOW_SCALE_BUFFERS}
    elif base == "sd1":
        sd = _unet({**SD1_UNET_DIFFUSERS, "in_channels": in_ch}, family) | _clip_l("cond_stage_model.transformer.")
    elif base == "sd2":
        sd = _unet({**SD2_UNET_DIFFUSERS, "in_channels": in_ch}, family) | _openclip("cond_stage_model.model.", 1024, 24, 16)
    elif base == "sdxl":
        sd = (_unet({**SDXL_UNET_DIFFUSERS, "in_channels": in_ch}, family)
              | _clip_l("conditioner.embedders.0.transformer.")
              | _openclip("conditioner.embedders.1.model.", 1280, 32, 20))
    elif family.startswith("sd2-unclip"):
        adm = PRESETS[family].unet.adm_in_channels
        sd = (_unet({**SD2_UNET_DIFFUSERS, "class_embed_type": "projection", "projection_class_embeddings_input_dim": adm},
                    family) | _openclip("cond_stage_model.model.", 1024, 24, 16) | _unclip_embedder(family))
    elif family == "sdxl-refiner":
        sd = _unet(REFINER_UNET_DIFFUSERS, family) | _openclip("conditioner.embedders.0.model.", 1280, 32, 20)
    else:
        raise AssertionError(family)
    if not any(k.startswith("first_stage_model.") for k in sd):
        sd |= _vae()
    sd |= {name: torch.empty(1000, device="meta") for name in DDPM_BUFFERS}
    return sd


MARKERS = {"sd2": {"modelspec.prediction_type": "epsilon"}, "sd2-v": {"modelspec.prediction_type": "v"}}


@pytest.mark.parametrize("family", list(PRESETS))
def test_full_size_synthetic_loads_strictly_and_is_named(family):
    sd = synthetic(family)
    model = build_model(sd, MARKERS.get(family, {}), path=Path(f"{family}.safetensors"), device="meta")
    info = describe_model(model)
    assert info["family"] == family
    assert info["prediction"] == ("v" if family in V_FAMILIES else "eps")
    assert info["parameters"]["unet"] > UNET_PARAMETERS.get(family, 800_000_000)


def test_known_key_shapes_of_the_original_layout():
    """A few keys and shapes as they stand in the released v1-5 / 2-1 / SDXL files."""
    sd1, sd2, xl = synthetic("sd1"), synthetic("sd2"), synthetic("sdxl")
    assert sd1["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape == (320, 768)
    assert sd1["model.diffusion_model.middle_block.1.proj_in.weight"].shape == (1280, 1280, 1, 1)
    assert sd1["model.diffusion_model.output_blocks.2.1.conv.weight"].shape == (1280, 1280, 3, 3)
    assert sd1["first_stage_model.decoder.up.0.block.0.conv1.weight"].shape == (128, 256, 3, 3)
    assert sd1["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert sd2["model.diffusion_model.middle_block.1.proj_in.weight"].shape == (1280, 1280)
    assert sd2["cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight"].shape == (3072, 1024)
    assert xl["model.diffusion_model.label_emb.0.0.weight"].shape == (1280, 2816)
    assert xl["model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn1.to_q.weight"].shape == (1280, 1280)
    assert xl["conditioner.embedders.1.model.text_projection"].shape == (1280, 1280)


def test_no_two_presets_match_the_same_weights():
    seen = {}
    for name, spec in PRESETS.items():
        key = (tuple(sorted(config_signature(spec).items())), tuple(sorted(s.prefix for s in spec.text)))
        seen.setdefault(key, []).append(name)
    shared = [names for names in seen.values() if len(names) > 1]
    # sd2 and sd2-v are the same network; only the prediction type (decided separately) differs
    assert shared == [["sd2", "sd2-v"]]
    for family in PRESETS:
        sd = synthetic(family)
        matches = [f for f, spec in PRESETS.items()
                   if config_signature(spec) == config_signature(detect_spec(sd))
                   and text_signature(sd) == tuple(sorted(s.prefix for s in spec.text))]
        assert sorted(matches) == sorted(seen[next(k for k, v in seen.items() if family in v)])


def test_unknown_layout_says_what_was_found():
    sd = synthetic("sd1")
    sd = {k: v for k, v in sd.items() if not k.startswith("cond_stage_model.")}
    with pytest.raises(CheckpointError, match=r"unknown model layout.*context_dim=768.*text encoders at none"):
        detect_spec(sd)
    with pytest.raises(CheckpointError, match="no UNet found"):
        detect_spec({"foo.weight": torch.empty(1, device="meta")})


def test_unexpected_leftover_keys_are_an_error():
    sd = synthetic("sd1")
    sd["some_extension.weight"] = torch.empty(3, device="meta")
    with pytest.raises(CheckpointError, match="belong to no component.*some_extension.weight"):
        build_model(sd, {}, path=Path("x.safetensors"), device="meta")


@pytest.mark.parametrize("key", ["alphas_cumprod", "model_ema.decay", "model_ema.diffusion_modelout2weight",
                                 "cond_stage_model.transformer.text_model.embeddings.position_ids",
                                 "conditioner.embedders.0.transformer.text_model.embeddings.position_ids", "v_pred"])
def test_documented_ignorables(key):
    assert is_ignorable(key)


@pytest.mark.parametrize("sd_keys, metadata, expected", [
    ({"v_pred"}, {}, "v"),
    (set(), {"modelspec.prediction_type": "v"}, "v"),
    (set(), {"modelspec.prediction_type": "epsilon"}, "eps"),
    (set(), {"ss_v_parameterization": "True"}, "v"),
    (set(), {"ss_v_parameterization": "False"}, "eps"),
    (set(), {"modelspec.architecture": "stable-diffusion-v2-768-v"}, "v"),
    (set(), {}, None),
])
def test_prediction_markers(sd_keys, metadata, expected):
    found = prediction_marker({k: torch.empty(0) for k in sd_keys}, metadata)
    assert (found[0] if found else None) == expected
