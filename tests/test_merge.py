"""Checkpoint merging: element-wise references computed here on tiny random models, the recipe in the
metadata (hashes by hashlib), loadability, and key-set plans on full-size SD1 / SD2 / SDXL shapes
(meta tensors: shapes only)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import write_tiny_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sfumato.adapters.merge import MergeError, merge_models, plan_merge
from sfumato.checkpoint.load import build_model, load_model
from sfumato.checkpoint.specs import PRESETS, UNET_PREFIX, VAE_PREFIX
from sfumato.cli import main
from sfumato.models.clip import build_text_encoder
from sfumato.models.unet import UNetModel
from sfumato.models.vae import AutoencoderKL

ALPHA = 0.3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("merge")
    return [write_tiny_model(folder / f"{name}.safetensors", seed=seed) for seed, name in enumerate("abc")]


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def short_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:10]


def test_weighted_sum_equals_reference(tiny, tmp_path):
    out = tmp_path / "merged.safetensors"
    result = merge_models(tiny[0], tiny[1], output=out, mode="weighted", alpha=ALPHA)
    a, meta_a = read(tiny[0])
    b, _ = read(tiny[1])
    merged, meta = read(out)
    assert merged.keys() == a.keys()
    for key, value in merged.items():
        assert value.dtype == a[key].dtype
        torch.testing.assert_close(value, (1 - ALPHA) * a[key] + ALPHA * b[key], rtol=1e-6, atol=0)
    assert not torch.equal(merged[UNET_PREFIX + "out.2.weight"], a[UNET_PREFIX + "out.2.weight"])

    recipe = json.loads(meta["sfumato.merge"])
    assert recipe["mode"] == "weighted" and recipe["alpha"] == ALPHA
    assert [(m["name"], m["sha256"]) for m in recipe["models"]] == [(p.name, short_hash(p)) for p in tiny[:2]]
    assert recipe == result.recipe
    assert meta["sfumato.spec"] == meta_a["sfumato.spec"]     # the custom family stays loadable
    model = load_model(out)
    assert model.family == "custom"
    torch.testing.assert_close(model.unet.out[2].weight, merged[UNET_PREFIX + "out.2.weight"])


def test_add_difference_fp16_and_skip_vae(tiny, tmp_path):
    out = tmp_path / "diff.safetensors"
    merge_models(*tiny, output=out, mode="add-difference", alpha=1.0, dtype=torch.float16, skip_vae=True)
    a, b, c = (read(p)[0] for p in tiny)
    merged, meta = read(out)
    for key, value in merged.items():
        assert value.dtype == torch.float16
        expected = a[key] if key.startswith(VAE_PREFIX) else a[key] + 1.0 * (b[key] - c[key])
        torch.testing.assert_close(value, expected.half(), rtol=0, atol=0)
    recipe = json.loads(meta["sfumato.merge"])
    assert recipe["mode"] == "add-difference" and recipe["dtype"] == "fp16" and recipe["skip_vae"]
    assert [m["sha256"] for m in recipe["models"]] == [short_hash(p) for p in tiny]
    assert load_model(out).family == "custom"


def test_buffers_missing_and_extra_keys(tiny, tmp_path):
    a, meta_a = read(tiny[0])
    b, meta_b = read(tiny[1])
    dropped_key = UNET_PREFIX + "out.2.bias"
    a.update(alphas_cumprod=torch.linspace(0.99, 0.01, 10), step_count=torch.tensor([7]))
    b.update(alphas_cumprod=torch.linspace(0.5, 0.1, 10), step_count=torch.tensor([9]), extra=torch.ones(3))
    del b[dropped_key]
    save_file(a, tmp_path / "a.safetensors", meta_a)
    save_file(b, tmp_path / "b.safetensors", meta_b)
    out = tmp_path / "out.safetensors"
    plan = merge_models(tmp_path / "a.safetensors", tmp_path / "b.safetensors", output=out, alpha=0.5).plan
    merged, _ = read(out)
    assert set(merged) == set(a)
    for key in ("alphas_cumprod", "step_count", dropped_key):   # constants, non-float, missing from B: A's
        assert torch.equal(merged[key], a[key])
    assert set(plan.kept) == {"alphas_cumprod", "step_count"}
    assert plan.copied == {dropped_key: "missing from B"}
    assert plan.dropped == {"extra": "B"}


def test_shape_mismatch_is_an_error(tiny, tmp_path):
    b, meta = read(tiny[1])
    key = UNET_PREFIX + "out.2.weight"
    b[key] = torch.zeros(b[key].shape[0] + 1, *b[key].shape[1:])
    save_file(b, tmp_path / "b.safetensors", meta)
    out = tmp_path / "out.safetensors"
    with pytest.raises(MergeError, match=r"differ in shape.*out\.2\.weight: A \[4, 32, 3, 3\], B \[5, 32, 3, 3\]"):
        merge_models(tiny[0], tmp_path / "b.safetensors", output=out, alpha=0.5)
    assert not out.exists()


@pytest.mark.parametrize("kwargs, match", [
    (dict(mode="weighted", alpha=float("nan")), "alpha"),
    (dict(mode="blend", alpha=0.5), "mode"),
    (dict(mode="add-difference", alpha=0.5), "mode: add-difference takes 3 models"),
])
def test_bad_settings(tiny, tmp_path, kwargs, match):
    with pytest.raises(MergeError, match=match):
        merge_models(tiny[0], tiny[1], output=tmp_path / "x.safetensors", **kwargs)


def test_cli(tiny, tmp_path, capsys):
    out = tmp_path / "cli.safetensors"
    assert main(["merge", str(tiny[0]), str(tiny[1]), str(tiny[2]), "--mode", "add-difference",
                 "--alpha", "0.5", "-o", str(out), "--no-progress"]) == 0
    assert "custom, add-difference alpha=0.5" in capsys.readouterr().out
    a, b, c = (load_file(p) for p in tiny)
    merged = load_file(out)
    key = UNET_PREFIX + "out.2.weight"
    torch.testing.assert_close(merged[key], a[key] + 0.5 * (b[key] - c[key]), rtol=1e-6, atol=0)
    assert main(["merge", str(tiny[0]), str(tiny[1]), "--alpha", "0.5", "-o", str(out), "--no-progress"]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["merge", str(tiny[0]), str(tiny[1]), str(tiny[2]), "--alpha", "0.5", "-o",
                 str(tmp_path / "y.safetensors")]) == 2
    assert "add-difference" in capsys.readouterr().err


# --- full-size key sets (shapes only) ---------------------------------------------------------------


def full_size(family: str) -> dict[str, torch.Tensor]:
    """A full-size original-layout state dict of meta tensors, with the buffers real files carry."""
    spec = PRESETS[family]
    with torch.device("meta"):
        parts = [(UNET_PREFIX, UNetModel(spec.unet)), (VAE_PREFIX, AutoencoderKL(spec.vae))]
        parts += [(slot.prefix, build_text_encoder(slot.config)) for slot in spec.text]
        sd = {prefix + k: v for prefix, module in parts for k, v in module.state_dict().items()}
        sd["alphas_cumprod"] = torch.empty(1000)
        for slot in spec.text:
            if slot.config.layout == "hf":
                sd[slot.prefix + "text_model.embeddings.position_ids"] = torch.empty(1, 77, dtype=torch.long)
    return sd


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_full_size_plan_merges_every_weight(family):
    sd = full_size(family)
    plan = plan_merge([sd, full_size(family)])
    assert plan.family == family and not plan.copied and not plan.dropped and not plan.partial
    assert set(plan.kept) == {k for k in sd if k == "alphas_cumprod" or k.endswith("position_ids")}
    assert len(plan.merged) == len(sd) - len(plan.kept)
    assert any(k.startswith(VAE_PREFIX) for k in plan.merged)
    assert build_model(sd, {}, path=Path("merged.safetensors"), device="meta").family == family

    vae_kept = plan_merge([sd, full_size(family)], skip_vae=True)
    assert set(vae_kept.copied) == {k for k in sd if k.startswith(VAE_PREFIX)}


def test_full_size_inpainting_and_family_checks():
    inpaint, base = full_size("sd1-inpaint"), full_size("sd1")
    plan = plan_merge([inpaint, base, full_size("sd1")])   # the usual "make an inpainting model" recipe
    assert plan.family == "sd1-inpaint"
    assert plan.partial == [UNET_PREFIX + "input_blocks.0.0.weight"]
    with pytest.raises(MergeError, match="B is a sd1-inpaint model but A is sd1.*must be A"):
        plan_merge([base, inpaint])
    with pytest.raises(MergeError, match="B is a sd2 model but A is sd1"):
        plan_merge([base, full_size("sd2")])


def test_inpainting_first_conv_keeps_extra_channels():
    from sfumato.adapters.merge import _combine

    a, b, c = torch.randn(8, 9, 3, 3), torch.randn(8, 4, 3, 3), torch.randn(8, 4, 3, 3)
    out = _combine("add-difference", 0.7, a, [b, c])
    torch.testing.assert_close(out[:, :4], a[:, :4] + 0.7 * (b - c))
    assert torch.equal(out[:, 4:], a[:, 4:])
