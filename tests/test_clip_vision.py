"""CLIP image encoders and preprocessing against transformers and open_clip (fp32, random weights)."""

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from open_clip.transform import image_transform
from open_clip.transformer import QuickGELU, VisionTransformer
from PIL import Image
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from sfumato.checkpoint.convert_vision import (
    hf_vision_to_ours,
    openclip_vision_to_ours,
    vision_config_from_hf,
    vision_config_from_state,
)
from sfumato.models.clip_vision import (
    VISION_PRESETS,
    VIT_BIGG14,
    VIT_H14,
    VIT_L14,
    CLIPVisionTower,
    VisionConfig,
)
from sfumato.pipeline.clip_image import preprocess_clip

OPEN_CLIP_CONFIGS = Path(open_clip.__file__).parent / "model_configs"


def assert_close(ours: torch.Tensor, ref: torch.Tensor, tol: float = 1e-4) -> None:
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= tol * max(1.0, ref.abs().max().item())


@torch.no_grad()
def perturb(model: torch.nn.Module) -> None:
    """Random init leaves biases at 0 and norms at 1; make every parameter matter."""
    for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.02)


def hf_config(act: str, **kw) -> CLIPVisionConfig:
    base = {
        "hidden_size": 64,
        "intermediate_size": 160,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "image_size": 56,
        "patch_size": 14,
        "projection_dim": 48,
        "hidden_act": act,
    }
    return CLIPVisionConfig(**{**base, **kw})


def tiny(act: str, projection: int | None = 48) -> VisionConfig:
    return VisionConfig(56, 14, 64, 3, 4, 160, projection, act)


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_matches_transformers_with_projection(act):
    torch.manual_seed(0)
    ref = CLIPVisionModelWithProjection(hf_config(act)).eval()
    perturb(ref)
    sd = hf_vision_to_ours(ref.state_dict())
    cfg = vision_config_from_hf(ref.config.to_dict())
    assert cfg == tiny(act)
    assert vision_config_from_state(sd, act=act, heads=4) == cfg
    ours = CLIPVisionTower(cfg).eval()
    ours.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        expected = ref(pixel_values=x, output_hidden_states=True)
        pooled = ref.vision_model(pixel_values=x).pooler_output
        got = ours(x, output_hidden_states=True)
    assert len(got.hidden_states) == len(expected.hidden_states) == cfg.layers + 1
    for g, e in zip(got.hidden_states, expected.hidden_states):
        assert_close(g, e)
    assert_close(got.last_hidden_state, expected.last_hidden_state)
    assert_close(got.pooled, pooled)
    assert_close(got.image_embeds, expected.image_embeds)


def test_matches_transformers_without_projection_bare_keys():
    torch.manual_seed(1)
    ref = CLIPVisionModel(hf_config("quick_gelu", image_size=32, patch_size=16)).eval()
    perturb(ref)
    raw = ref.state_dict()
    assert not any(k.startswith("vision_model.") for k in raw)  # transformers 5 saves it bare
    sd = hf_vision_to_ours(raw)
    cfg = vision_config_from_hf(ref.config.to_dict(), with_projection=False)
    assert cfg.projection_dim is None and vision_config_from_state(sd, act="quick_gelu", heads=4) == cfg
    ours = CLIPVisionTower(cfg).eval()
    ours.load_state_dict(sd, strict=True)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = ref(pixel_values=x, output_hidden_states=True)
        got = ours(x, output_hidden_states=False)
    assert got.hidden_states is None and got.image_embeds is None
    assert_close(got.last_hidden_state, expected.last_hidden_state)
    assert_close(got.pooled, expected.pooler_output)


@pytest.mark.parametrize(("act", "layer"), [("quick_gelu", QuickGELU), ("gelu", torch.nn.GELU)])
@pytest.mark.parametrize("prefix", ["visual.", "embedder.model.visual."])
def test_matches_open_clip(act, layer, prefix):
    torch.manual_seed(2)
    ref = VisionTransformer(
        image_size=56,
        patch_size=14,
        width=64,
        layers=3,
        heads=4,
        mlp_ratio=2.5,
        output_dim=48,
        act_layer=layer,
        output_tokens=True,
    ).eval()
    perturb(ref)
    full = {prefix + k: v for k, v in ref.state_dict().items()}
    full["embedder.model.token_embedding.weight" if prefix != "visual." else "token_embedding.weight"] = torch.zeros(1)
    sd = openclip_vision_to_ours(full)
    assert sd.keys() == ref.state_dict().keys()
    cfg = vision_config_from_state(sd, act=act, heads=4)
    assert cfg == tiny(act)
    ours = CLIPVisionTower(cfg).eval()
    ours.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        pooled, tokens = ref(x)
        blocks = ref.forward_intermediates(x, output_fmt="NLC", output_extra_tokens=True, intermediates_only=True)
        got = ours(x, output_hidden_states=True)
    assert_close(got.image_embeds, pooled)
    assert_close(ours.ln_post(got.last_hidden_state)[:, 1:], tokens)
    per_block = [
        torch.cat([c, t], 1) for c, t in zip(blocks["image_intermediates_prefix"], blocks["image_intermediates"])
    ]
    assert len(per_block) == cfg.layers
    for g, e in zip(got.hidden_states[1:], per_block):
        assert_close(g, e)


def test_open_clip_keys_pass_through_and_errors():
    sd = CLIPVisionTower(tiny("gelu")).state_dict()
    assert openclip_vision_to_ours(sd).keys() == sd.keys()
    with pytest.raises(KeyError, match="no vision tower"):
        openclip_vision_to_ours({"text.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match="unexpected key"):
        hf_vision_to_ours({"text_model.embeddings.token_embedding.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="no preset matches"):
        vision_config_from_state(sd)
    with pytest.raises(ValueError, match="pixel_values"):
        CLIPVisionTower(tiny("gelu"))(torch.zeros(1, 3, 32, 32))


# --- full size, on the meta device (no weights allocated) -----------------------------------------


def hf_full(width: int, mlp: int, layers: int, proj: int, act: str) -> CLIPVisionConfig:
    """The vision_config of openai/clip-vit-large-patch14 and the LAION ViT-H-14 / ViT-bigG-14 folders."""
    return CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=16,
        patch_size=14,
        image_size=224,
        projection_dim=proj,
        hidden_act=act,
    )


HF_FULL = {
    "vit_l14": (1024, 4096, 24, 768, "quick_gelu"),
    "vit_h14": (1280, 5120, 32, 1024, "gelu"),
    "vit_bigg14": (1664, 8192, 48, 1280, "gelu"),
}
OPEN_CLIP_NAMES = {
    "vit_l14": "ViT-L-14",
    "vit_h14": "ViT-H-14",
    "vit_bigg14": "ViT-bigG-14",
}


def shapes(sd: dict) -> dict:
    return {k: tuple(v.shape) for k, v in sd.items()}


@pytest.mark.parametrize("name", list(VISION_PRESETS))
def test_presets_match_open_clip_configs(name):
    preset = VISION_PRESETS[name]
    spec = json.loads((OPEN_CLIP_CONFIGS / f"{OPEN_CLIP_NAMES[name]}.json").read_text())
    v = spec["vision_cfg"]
    heads = v["width"] // v.get("head_width", 64)  # open_clip's default head_width is 64
    with torch.device("meta"):
        ref = VisionTransformer(
            image_size=v["image_size"],
            patch_size=v["patch_size"],
            width=v["width"],
            layers=v["layers"],
            heads=heads,
            mlp_ratio=v.get("mlp_ratio", 4.0),
            output_dim=spec["embed_dim"],
        )
        ours = CLIPVisionTower(preset)
    assert heads == preset.heads
    assert shapes(ours.state_dict()) == shapes(ref.state_dict())
    sd = openclip_vision_to_ours({"embedder.model.visual." + k: t for k, t in ref.state_dict().items()})
    assert vision_config_from_state(sd) == preset


@pytest.mark.parametrize("name", list(VISION_PRESETS))
def test_presets_match_transformers_configs(name):
    preset = VISION_PRESETS[name]
    config = hf_full(*HF_FULL[name])
    assert vision_config_from_hf(config.to_dict()) == preset
    with torch.device("meta"):
        ref = CLIPVisionModelWithProjection(config)
        ours = CLIPVisionTower(preset)
    sd = hf_vision_to_ours(ref.state_dict())
    assert shapes(sd) == shapes(ours.state_dict())
    assert vision_config_from_state(sd) == preset


def test_no_two_presets_match_and_overrides_win():
    for name, preset in VISION_PRESETS.items():
        with torch.device("meta"):
            sd = CLIPVisionTower(preset).state_dict()
        assert vision_config_from_state(sd) == preset, name
        assert vision_config_from_state(sd, act="gelu").act == "gelu"
        del sd["proj"]
        assert vision_config_from_state(sd).projection_dim is None
    assert len({(p.image_size, p.patch_size, p.width, p.layers, p.mlp_dim) for p in VISION_PRESETS.values()}) == 3
    assert (VIT_L14.act, VIT_H14.act, VIT_BIGG14.act) == ("quick_gelu", "gelu", "gelu")


# --- preprocessing ------------------------------------------------------------------------------


def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)

    def rgb(w, h):
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))

    rgba = Image.fromarray(rng.integers(0, 256, (250, 333, 4), dtype=np.uint8), "RGBA")
    gray = Image.fromarray(rng.integers(0, 256, (301, 97), dtype=np.uint8), "L")
    palette = rgb(260, 230).convert("P")
    palette.info["transparency"] = 3
    # 300x200 -> 336x224 (offset 56); 225x337 -> 224x335 (55.5: floor 55, round-half-even 56);
    # 97x301 -> 224x695; 224x224 untouched; tiny 5x3 upscaled
    return [
        rgb(300, 200),
        rgb(225, 337),
        rgb(97, 301),
        rgb(224, 224),
        rgb(5, 3),
        rgba,
        gray,
        palette,
    ]


@pytest.mark.parametrize("index", range(8))
def test_preprocess_matches_transformers_pil_processor(index):
    image = images()[index]
    expected = CLIPImageProcessorPil()(images=[image], return_tensors="pt")["pixel_values"]
    got = preprocess_clip([image], kind="openai")
    assert got.dtype == torch.float32 and got.shape == expected.shape == (
        1,
        3,
        224,
        224,
    )
    assert (got - expected).abs().max().item() == 0


@pytest.mark.parametrize("index", range(8))
def test_preprocess_matches_open_clip_transform(index):
    image = images()[index]
    expected = image_transform(224, is_train=False)(image)[None]
    got = preprocess_clip([image], kind="open_clip")
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert (got - expected).abs().max().item() == 0


def test_preprocess_batch_and_the_two_kinds_differ_where_documented():
    batch = images()
    got = preprocess_clip(batch, kind="openai")
    assert got.shape == (len(batch), 3, 224, 224)
    assert torch.equal(got[0], preprocess_clip([batch[0]], kind="open_clip")[0])  # no crop rounding, no alpha
    assert not torch.equal(got[1], preprocess_clip([batch[1]], kind="open_clip")[0])  # crop offset 55 vs 56
    assert not torch.equal(got[5], preprocess_clip([batch[5]], kind="open_clip")[0])  # alpha: white vs dropped
    with pytest.raises(ValueError, match="kind"):
        preprocess_clip(batch, kind="timm")


def test_transformers_torchvision_backend_is_close_but_not_pil_exact():
    """transformers 5's default CLIPImageProcessor (torchvision backend) is not the PIL reference."""
    image = images()[0]
    fast = CLIPImageProcessor()(images=[image], return_tensors="pt")["pixel_values"]
    ours = preprocess_clip([image], kind="openai")
    assert fast.shape == ours.shape
    diff = (fast - ours).abs()
    assert 0 < diff.max().item() < 0.1 and diff.mean().item() < 1e-3  # ~1-2 byte levels at some pixels


def test_byte_scaling_is_the_same_float32_both_ways():
    u8 = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(
        (u8.to(torch.float64) * (1 / 255)).to(torch.float32),
        u8.to(torch.float32).div(255),
    )


def test_computes_in_the_module_dtype():
    torch.manual_seed(3)
    ours = CLIPVisionTower(tiny("gelu")).eval()
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        ref = ours(x).image_embeds
        got = ours.to(torch.bfloat16)(x, output_hidden_states=True)  # float32 input is cast
    assert got.image_embeds.dtype == got.hidden_states[0].dtype == torch.bfloat16
    assert_close(got.image_embeds.float(), ref, tol=5e-2)
