"""ControlNet: parity with diffusers' ControlNetModel (and the controlled UNet with diffusers'
UNet2DConditionModel residual inputs) on shared random weights, the file formats, detection from
shapes, and the weight-free preprocessors against OpenCV."""

from __future__ import annotations

import json
import time
from dataclasses import replace

import cv2
import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
from PIL import Image, ImageDraw
from reference import materialize, randomize_

from sfumato.adapters.controlnet import (
    ControlUnit, canny, controlled_unet, depth_map, gaussian_blur, hint_tensor, load_controlnet, scribble, threshold,
)
from sfumato.checkpoint.convert_controlnet import (
    FAMILIES, complete_config, controlnet_config_from_diffusers, diffusers_controlnet_to_ldm, shape_config,
)
from sfumato.checkpoint.io import save_file
from sfumato.errors import CheckpointError
from sfumato.models.controlnet import ControlNet, ControlNetConfig
from sfumato.models.unet import SD1_UNET, SD2_UNET, SDXL_UNET, UNetConfig, UNetModel, timestep_embedding
from sfumato.pipeline.params import ParamError

TINY_SD1 = dict(
    block_out_channels=(32, 64), layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    attention_head_dim=2, cross_attention_dim=32, norm_num_groups=8,
)
TINY_SD1_UNET = UNetConfig(
    model_channels=32, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(1, 0), num_heads=2,
    context_dim=32, norm_groups=8,
)
TIME_DIM, TEXT_DIM = 8, 16  # SDXL: 256 and 1280
TINY_SDXL = dict(
    block_out_channels=(32, 64), layers_per_block=2, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    attention_head_dim=(4, 8), transformer_layers_per_block=(1, 2), cross_attention_dim=64,
    use_linear_projection=True, norm_num_groups=8, addition_embed_type="text_time",
    addition_time_embed_dim=TIME_DIM, projection_class_embeddings_input_dim=TEXT_DIM + 6 * TIME_DIM,
)
TINY_SDXL_UNET = UNetConfig(
    model_channels=32, channel_mult=(1, 2), transformer_depth=(0, 2), transformer_depth_middle=2,
    num_head_channels=8, context_dim=64, use_linear_in_transformer=True, adm_in_channels=TEXT_DIM + 6 * TIME_DIM,
    norm_groups=8,
)
HINT_WIDTHS = (8, 16, 16, 32)  # a smaller hint encoder (still ÷8) for the SDXL-like pair

# Full-size diffusers ControlNet configs, as in the released config.json files.
SD1_CN = dict(cross_attention_dim=768, attention_head_dim=8)
SD2_CN = dict(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)
SDXL_CN = dict(
    block_out_channels=(320, 640, 1280), down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2,
    attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref).abs().max() / ref.abs().max()).item()


def up_blocks(down: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(t.replace("Down", "Up") for t in reversed(down))


def sdxl_cond(b: int) -> tuple[dict, torch.Tensor]:
    """diffusers' added_cond_kwargs and the equivalent vector y (pooled text, then size/crop embeddings)."""
    text_embeds = torch.randn(b, TEXT_DIM)
    time_ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [768, 1344, 64, 32, 1024, 1024]])[:b]
    y = torch.cat([text_embeds, timestep_embedding(time_ids.flatten(), TIME_DIM).reshape(b, -1)], dim=-1)
    return {"text_embeds": text_embeds, "time_ids": time_ids}, y


def make_pair(kwargs: dict, seed: int, **extra) -> tuple[ControlNetModel, ControlNet]:
    ref = materialize(lambda: ControlNetModel(**kwargs, **extra), seed)
    cfg = controlnet_config_from_diffusers(ref.config)
    ours = ControlNet(cfg).eval()
    ours.load_state_dict(diffusers_controlnet_to_ldm(ref.state_dict(), cfg), strict=True)
    return ref, ours


def make_unets(kwargs: dict, cfg: UNetConfig, seed: int) -> tuple[UNet2DConditionModel, UNetModel]:
    from sfumato.checkpoint.convert_unet import diffusers_unet_to_ldm

    ref = materialize(
        lambda: UNet2DConditionModel(**kwargs, up_block_types=up_blocks(kwargs["down_block_types"])), seed
    )
    ours = UNetModel(cfg).eval()
    ours.load_state_dict(diffusers_unet_to_ldm(ref.state_dict(), cfg), strict=True)
    return ref, ours


# -- parity ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(8, 8), (5, 7)], ids=["8x8", "odd-5x7"])
def test_sd1_residuals_and_controlled_unet_match_diffusers(size: tuple[int, int]) -> None:
    ref, ours = make_pair(TINY_SD1, seed=1)
    assert ours.cfg == ControlNetConfig(TINY_SD1_UNET)
    ref_unet, unet = make_unets(TINY_SD1, TINY_SD1_UNET, seed=2)
    torch.manual_seed(0)
    x = torch.randn(2, 4, *size)
    hint = torch.rand(1, 3, size[0] * 8, size[1] * 8)
    t, ctx = torch.tensor([999.0, 17.5]), torch.randn(2, 7, 32)
    with torch.no_grad():
        down, mid = ref(x, t, ctx, hint.expand(2, -1, -1, -1), conditioning_scale=0.7, return_dict=False)
        got = ours(x, hint, t, ctx, strength=0.7)
        assert len(got) == len(down) + 1 == len(unet.input_blocks) + 1
        for ours_r, ref_r in zip(got, [*down, mid]):
            assert ref_r.abs().max() > 0.05
            assert rel_err(ours_r, ref_r) <= 1e-4
        expected = ref_unet(x, t, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        plain = ref_unet(x, t, ctx).sample
        fn = controlled_unet(unet, [ControlUnit(ours, hint, strength=0.7)])
        out = fn(x, t, ctx, fraction=0.5)
    assert rel_err(out, expected) <= 1e-4
    assert rel_err(plain, expected) > 0.01  # the residuals matter


def test_sdxl_residuals_and_controlled_unet_match_diffusers() -> None:
    ref, ours = make_pair(TINY_SDXL, seed=3, conditioning_embedding_out_channels=HINT_WIDTHS)
    assert ours.cfg == ControlNetConfig(TINY_SDXL_UNET, hint_widths=HINT_WIDTHS)
    ref_unet, unet = make_unets(TINY_SDXL, TINY_SDXL_UNET, seed=4)
    torch.manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 9, 64)
    hint = torch.rand(2, 3, 64, 64)
    added, y = sdxl_cond(2)
    t = torch.tensor([10.0, 600.0])
    with torch.no_grad():
        down, mid = ref(x, t, ctx, hint, conditioning_scale=1.3, added_cond_kwargs=added, return_dict=False)
        got = ours(x, hint, t, ctx, y, strength=1.3)
        for ours_r, ref_r in zip(got, [*down, mid], strict=True):
            assert rel_err(ours_r, ref_r) <= 1e-4
        expected = ref_unet(x, t, ctx, added_cond_kwargs=added, down_block_additional_residuals=down,
                            mid_block_additional_residual=mid).sample
        out = controlled_unet(unet, [ControlUnit(ours, hint, strength=1.3)])(x, t, ctx, y, fraction=0.0)
    assert rel_err(out, expected) <= 1e-4
    with pytest.raises(ValueError, match="needs the vector"):
        ours(x, hint, t, ctx)


def test_units_sum_and_respect_their_span() -> None:
    """Two units at once equal diffusers' MultiControlNetModel; units outside their span are skipped."""
    ref_a, a = make_pair(TINY_SD1, seed=5)
    ref_b, b = make_pair(TINY_SD1, seed=6)
    ref_unet, unet = make_unets(TINY_SD1, TINY_SD1_UNET, seed=7)
    torch.manual_seed(1)
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([400.0]), torch.randn(1, 5, 32)
    ha, hb = torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64)
    units = [ControlUnit(a, ha, strength=0.8, start=0.0, end=0.5), ControlUnit(b, hb, strength=0.4, start=0.3, end=1.0)]
    fn = controlled_unet(unet, units)
    multi = MultiControlNetModel([ref_a, ref_b])
    with torch.no_grad():
        down, mid = multi(x, t, ctx, [ha, hb], [0.8, 0.4], return_dict=False)
        both = ref_unet(x, t, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        down_b, mid_b = ref_b(x, t, ctx, hb, conditioning_scale=0.4, return_dict=False)
        only_b = ref_unet(x, t, ctx, down_block_additional_residuals=down_b, mid_block_additional_residual=mid_b).sample
        assert rel_err(fn(x, t, ctx, fraction=0.4), both) <= 1e-4
        assert rel_err(fn(x, t, ctx, fraction=0.75), only_b) <= 1e-4
        assert torch.equal(controlled_unet(unet, units[:1])(x, t, ctx, fraction=0.6), unet(x, t, ctx))


def test_unit_resizes_and_batches_its_image() -> None:
    _, cn = make_pair(TINY_SD1, seed=8)
    _, unet = make_unets(TINY_SD1, TINY_SD1_UNET, seed=9)
    image = (np.random.default_rng(0).random((40, 48, 3)) * 255).astype(np.uint8)
    unit = ControlUnit(cn, Image.fromarray(image), strength=0.5)
    x, t, ctx = torch.randn(3, 4, 6, 8), torch.tensor([500.0]), torch.randn(3, 4, 32)
    hint = torch.nn.functional.interpolate(hint_tensor(image), size=(48, 64), mode="bilinear", antialias=True)
    with torch.no_grad():
        expected = controlled_unet(unet, [ControlUnit(cn, hint.clamp(0, 1), strength=0.5)])(x, t, ctx, fraction=1.0)
        got = controlled_unet(unet, [unit])(x, t, ctx, fraction=1.0)
    assert torch.equal(got, expected)
    with pytest.raises(ValueError, match=r"hint must be \(B, 3, 48, 64\)"):
        cn(x, torch.rand(1, 3, 40, 64), t, ctx)
    grey = ControlUnit(cn, Image.fromarray(image).convert("L"))
    assert grey.hint.shape == (1, 3, 40, 48) and torch.equal(grey.hint[:, 0], grey.hint[:, 2])
    with pytest.raises(ValueError, match="does not match the UNet"):
        controlled_unet(UNetModel(replace(TINY_SD1_UNET, model_channels=16)), [unit])


def test_inpainting_base_feeds_the_controlnet_the_latent_only() -> None:
    """A 9-channel inpainting UNet steered by a 4-channel ControlNet: the ControlNet sees x[:, :4]."""
    _, cn = make_pair(TINY_SD1, seed=10)
    unet = UNetModel(replace(TINY_SD1_UNET, in_channels=9)).eval()
    x, t, ctx, hint = torch.randn(1, 9, 8, 8), torch.tensor([10.0]), torch.randn(1, 3, 32), torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(ControlUnit(cn, hint).residuals(x, t, ctx, None)[0], cn(x[:, :4], hint, t, ctx)[0])
        assert controlled_unet(unet, [ControlUnit(cn, hint)])(x, t, ctx, fraction=0.5).shape == (1, 4, 8, 8)


@pytest.mark.parametrize("field, value", [("strength", float("nan")), ("start", -0.1), ("end", 1.5), ("start", 0.9)])
def test_bad_unit_is_named(field: str, value: float) -> None:
    _, cn = make_pair(TINY_SD1, seed=11)
    kwargs = {"start": 0.0, "end": 0.5, field: value}
    with pytest.raises(ParamError) as e:
        ControlUnit(cn, torch.rand(1, 3, 8, 8), **kwargs)
    assert e.value.field == field


@pytest.mark.slow
def test_full_size_sd1_controlnet_matches_diffusers() -> None:
    start = time.perf_counter()
    torch.manual_seed(0)
    with torch.device("meta"):
        ref = ControlNetModel(**SD1_CN)
    ref = randomize_(ref.to_empty(device="cpu"), seed=0).eval()
    cfg = controlnet_config_from_diffusers(ref.config)
    assert cfg == ControlNetConfig(SD1_UNET)
    with torch.device("meta"):
        ours = ControlNet(cfg)
    ours.load_state_dict(diffusers_controlnet_to_ldm(ref.state_dict(), cfg), strict=True, assign=True)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    x, hint, ctx, t = torch.randn(1, 4, 8, 8), torch.rand(1, 3, 64, 64), torch.randn(1, 77, 768), torch.tensor([321.0])
    with torch.no_grad():
        down, mid = ref(x, t, ctx, hint, return_dict=False)
        got = ours.eval()(x, hint, t, ctx)
    for ours_r, ref_r in zip(got, [*down, mid], strict=True):
        assert torch.isfinite(ref_r).all() and ref_r.abs().max() > 0.05
        assert rel_err(ours_r, ref_r) <= 1e-4
    assert time.perf_counter() - start < 30


# -- files and detection -----------------------------------------------------------------------------------


def _reference_output(ref: ControlNetModel, cn: ControlNet) -> tuple[torch.Tensor, torch.Tensor]:
    x, hint, ctx, t = torch.randn(1, 4, 8, 8), torch.rand(1, 3, 64, 64), torch.randn(1, 3, 32), torch.tensor([77.0])
    with torch.no_grad():
        _, mid = ref(x, t, ctx, hint, return_dict=False)
        return cn(x, hint, t, ctx)[-1], mid


@pytest.mark.parametrize("layout", ["control_model", "bare", "full-sd-file", "diffusers-file", "diffusers-folder",
                                    "diffusers-file+config"])
def test_loads_every_layout(tmp_path, layout: str) -> None:
    ref, ours = make_pair(TINY_SD1, seed=12)
    ldm = {k: v.contiguous() for k, v in ours.state_dict().items()}
    diff = {k: v.contiguous() for k, v in ref.state_dict().items()}
    path = tmp_path / "cn.safetensors"
    if layout == "control_model":
        save_file({"control_model." + k: v for k, v in ldm.items()}, path)
    elif layout == "bare":
        save_file(ldm, path)
    elif layout == "full-sd-file":  # ControlNet 1.0 files carry the SD model they were trained with
        extra = {"model.diffusion_model.out.2.bias": torch.zeros(4), "first_stage_model.decoder.conv_out.bias":
                 torch.zeros(3), "cond_stage_model.transformer.x": torch.zeros(1), "alphas_cumprod": torch.ones(10)}
        save_file({**{"control_model." + k: v for k, v in ldm.items()}, **extra}, path)
    elif layout == "diffusers-file":
        save_file(diff, path)
    else:
        folder = tmp_path / "cn"
        folder.mkdir()
        path = folder if layout == "diffusers-folder" else folder / "diffusion_pytorch_model.safetensors"
        save_file(diff, folder / "diffusion_pytorch_model.safetensors")
        config = {"_class_name": "ControlNetModel", **{k: v for k, v in ref.config.items() if not k.startswith("_")}}
        (folder / "config.json").write_text(json.dumps(config))
    base = None if layout in ("diffusers-folder", "diffusers-file+config") else TINY_SD1_UNET
    loaded = load_controlnet(path, base)
    assert loaded.cfg == ours.cfg
    got, expected = _reference_output(ref, loaded)
    assert rel_err(got, expected) <= 1e-4


def test_bad_files_are_explained(tmp_path) -> None:
    _, ours = make_pair(TINY_SD1, seed=13)
    ldm = {k: v.contiguous() for k, v in ours.state_dict().items()}
    cases = {
        "stray.safetensors": ({**{"control_model." + k: v for k, v in ldm.items()}, "foo.bar": torch.zeros(1)},
                              "outside 'control_model.'"),
        "lora.safetensors": ({"lora_controlnet": torch.zeros(1)}, "Control-LoRA"),
        "unet.safetensors": ({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, "not a ControlNet"),
        "truncated.safetensors": ({k: v for k, v in ldm.items() if "zero_convs.3" not in k}, "missing 2"),
    }
    for name, (sd, message) in cases.items():
        save_file(sd, tmp_path / name)
        with pytest.raises(CheckpointError, match=message):
            load_controlnet(tmp_path / name, TINY_SD1_UNET)
    with pytest.raises(CheckpointError, match="unknown ControlNet layout"):  # no base, no family: heads unknown
        load_controlnet(tmp_path / "truncated.safetensors")
    with pytest.raises(CheckpointError, match="model_channels is 32 in the ControlNet, 320 in the model"):
        load_controlnet(tmp_path / "truncated.safetensors", SD1_UNET)
    with pytest.raises(CheckpointError, match="not found"):
        load_controlnet(tmp_path / "missing.safetensors")


@pytest.mark.parametrize(
    "kwargs, family, unet",
    [(SD1_CN, "sd1", SD1_UNET), (SD2_CN, "sd2", SD2_UNET), (SDXL_CN, "sdxl", SDXL_UNET)],
    ids=["sd1", "sd2", "sdxl"],
)
def test_detects_family_from_shapes(kwargs: dict, family: str, unet: UNetConfig) -> None:
    """Full-size meta state dicts: the config and heads read from the original keys are the family's;
    the diffusers config and the diffusers keys give the same."""
    with torch.device("meta"):
        ref = ControlNetModel(**kwargs)
    from_config = controlnet_config_from_diffusers(ref.config)
    ldm = diffusers_controlnet_to_ldm(ref.state_dict(), from_config)
    cfg, found = complete_config(shape_config(ldm))
    assert found == family
    assert cfg == from_config == ControlNetConfig(unet)
    assert [name for name, (sig, _) in FAMILIES.items()
            if sig == (cfg.unet.model_channels, cfg.unet.context_dim, cfg.unet.adm_in_channels)] == [family]
    with torch.device("meta"):
        ours = ControlNet(cfg)
    assert {k: v.shape for k, v in ldm.items()} == {k: v.shape for k, v in ours.state_dict().items()}


# -- preprocessors -----------------------------------------------------------------------------------------


def _test_images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    shapes = Image.new("RGB", (96, 80), (30, 60, 90))
    d = ImageDraw.Draw(shapes)
    d.ellipse((10, 8, 50, 48), fill=(220, 40, 40))
    d.rectangle((55, 30, 90, 70), fill=(40, 200, 80))
    d.polygon([(20, 75), (45, 52), (70, 78)], fill=(240, 240, 60))
    d.line((0, 0, 95, 79), fill=(255, 255, 255), width=2)
    yy, xx = np.mgrid[0:64, 0:72]
    waves = (127 + 100 * np.sin(xx / 3.0) * np.cos(yy / 4.0)).astype(np.uint8)
    noisy = np.clip(np.asarray(shapes).astype(np.int16) + rng.integers(-25, 26, (80, 96, 3)), 0, 255).astype(np.uint8)
    return [np.asarray(shapes), np.stack([waves] * 3, axis=2), noisy, waves]


@pytest.mark.parametrize("index", range(4), ids=["shapes", "waves-rgb", "noisy", "gray"])
@pytest.mark.parametrize("low, high", [(100, 200), (50, 120)])
def test_canny_matches_opencv(index: int, low: int, high: int) -> None:
    image = _test_images()[index]
    ours = canny(image, low, high)
    expected = cv2.Canny(image, low, high)
    assert ours.shape == (*image.shape[:2], 3) and (ours[..., 0] == ours[..., 2]).all()
    edges = ours[..., 0] > 0
    assert 0.01 < (expected > 0).mean() < 0.5
    assert (edges == (expected > 0)).mean() >= 0.999
    # with a Gaussian blur first
    blurred = cv2.Canny(cv2.GaussianBlur(image, (0, 0), 1.4), low, high) > 0
    assert ((canny(image, low, high, blur_sigma=1.4)[..., 0] > 0) == blurred).mean() >= 0.999


@pytest.mark.parametrize("sigma", [0.5, 1.4, 3.0])
def test_gaussian_blur_matches_opencv(sigma: float) -> None:
    image = (np.random.default_rng(2).random((50, 61, 3)) * 255).astype(np.uint8)
    assert np.array_equal(gaussian_blur(image, sigma), cv2.GaussianBlur(image, (0, 0), sigma))


def test_threshold_scribble_and_depth() -> None:
    gray = np.array([[0, 100, 127], [128, 200, 255]], dtype=np.uint8)
    assert (threshold(gray, 127)[..., 1] == np.array([[0, 0, 0], [255, 255, 255]])).all()
    drawing = Image.new("RGB", (8, 8), "white")
    ImageDraw.Draw(drawing).line((0, 4, 7, 4), fill="black")
    lines = scribble(drawing)
    assert lines.shape == (8, 8, 3) and lines[4].min() == 255 and lines.sum() == 255 * 8 * 3
    depth = depth_map(Image.fromarray(np.array([[50, 100], [150, 150]], dtype=np.uint8)))
    assert depth.shape == (2, 2, 3) and (depth[..., 2] == np.array([[0, 128], [255, 255]])).all()
    assert depth_map(np.full((3, 3), 9, np.uint8)).max() == 0
    with pytest.raises(ValueError, match="thresholds"):
        canny(gray, 200, 100)
