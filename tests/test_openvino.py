"""The OpenVINO backend (``backends.openvino``) on a tiny SD 1-style model: generations equal the torch
path (latents within 1e-4, images within ±2 on ≥ 99% of pixels); converted models are cached on disk
by weights, shape and precision; calls the compiled graph cannot serve (LoRA tags, ControlNet) run on
torch with the reason logged, and give torch's result; bad combinations are refused by name."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import sfumato
from sfumato.checkpoint.io import save_file
from sfumato.cli import main
from sfumato.errors import ParamError

pytest.importorskip("openvino")

KW = dict(steps=4, seed=5, width=64, height=64, watermark=False, sampler="euler")


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SFUMATO_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "openvino"


def _close_images(a, b) -> float:
    d = np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int))
    assert d.max() <= 255
    return float((d <= 2).mean())


def test_openvino_equals_torch_and_is_cached(tiny_model, cache, caplog):
    torch_pipe = sfumato.load(tiny_model, dtype="fp32")
    ov_pipe = sfumato.load(tiny_model, backend="openvino")
    want = torch_pipe.txt2img("a red circle", **KW)
    with caplog.at_level(logging.INFO, logger="sfumato.backends.openvino"):
        got = ov_pipe.txt2img("a red circle", **KW)
    assert "converting the unet" in caplog.text and "converting the vae-decoder" in caplog.text
    torch.testing.assert_close(got.latents, want.latents, rtol=1e-4, atol=1e-4 * float(want.latents.abs().max()))
    assert _close_images(got.images[0], want.images[0]) >= 0.99
    files = sorted(p.name for p in cache.glob("*.xml"))
    assert len(files) == 2 and files[0].startswith("unet-") and files[1].startswith("vae-decoder-")
    # a second pipeline of the same weights reads the converted models back
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sfumato.backends.openvino"):
        again = sfumato.load(tiny_model, backend="openvino").txt2img("a red circle", **KW)
    assert "read from the cache" in caplog.text and "converting" not in caplog.text
    assert torch.equal(again.latents, got.latents)
    # another size is another shape: converted once more; in memory only the most recent shapes stay
    import sfumato.backends.openvino as ovb

    ovb.MAX_COMPILED, kept = 1, ovb.MAX_COMPILED
    try:
        ov_pipe.txt2img("a red circle", **{**KW, "width": 48})
    finally:
        ovb.MAX_COMPILED = kept
    assert len(list(cache.glob("unet-*.xml"))) == 2
    assert len(ov_pipe.model.unet_backend.compiled.compiled) == 1


def test_what_it_cannot_serve_runs_on_torch(tiny_model, cache, tmp_path, caplog):
    unet = sfumato.load(tiny_model).model.unet
    target = "input_blocks.1.1.transformer_blocks.0.attn2.to_k"
    out_f, in_f = unet.get_parameter(target + ".weight").shape
    g = torch.Generator().manual_seed(0)
    name = "lora_unet_" + target.replace(".", "_")
    folder = tmp_path / "loras"
    folder.mkdir()
    save_file({f"{name}.lora_down.weight": torch.randn(4, in_f, generator=g),
               f"{name}.lora_up.weight": torch.randn(out_f, 4, generator=g), f"{name}.alpha": torch.tensor(2.0)},
              folder / "shiny.safetensors")
    ov_pipe = sfumato.load(tiny_model, backend="openvino", lora_dir=folder)
    torch_pipe = sfumato.load(tiny_model, dtype="fp32", lora_dir=folder)
    ov_pipe.txt2img("a red circle", **KW)                       # converted with the plain weights
    with caplog.at_level(logging.WARNING, logger="sfumato.backends.openvino"):
        tagged = ov_pipe.txt2img("a red circle <lora:shiny:0.8>", **KW)
    assert "runs on torch: its weights changed since they were converted" in caplog.text
    want = torch_pipe.txt2img("a red circle <lora:shiny:0.8>", **KW)
    torch.testing.assert_close(tagged.latents, want.latents, rtol=1e-5, atol=1e-5)
    plain = ov_pipe.txt2img("a red circle", **KW)               # the LoRA removed: the compiled graph again
    ref = torch_pipe.txt2img("a red circle", **KW).latents
    torch.testing.assert_close(plain.latents, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


@pytest.mark.parametrize("options, field", [
    (dict(backend="tensorrt"), "backend"), (dict(backend="openvino", by_stage=True), "backend"),
    (dict(backend="openvino", dtype="bf16"), "dtype"), (dict(backend="openvino", quant="int8"), "backend"),
    (dict(backend="openvino", backend_precision="int4"), "backend"),
])
def test_bad_backend_options_are_named(tiny_model, options, field):
    with pytest.raises(ParamError) as e:
        sfumato.load(tiny_model, **options)
    assert e.value.field == field


def test_precisions_and_the_cli(tiny_model, cache, tmp_path):
    pytest.importorskip("nncf")
    torch_pipe = sfumato.load(tiny_model, dtype="fp32")
    want = torch_pipe.txt2img("a red circle", **KW)
    for precision, bound in (("bf16", 0.1), ("int8", 0.1)):
        got = sfumato.load(tiny_model, backend="openvino", backend_precision=precision).txt2img("a red circle", **KW)
        err = float((got.latents - want.latents).norm() / want.latents.norm())
        print(f"OpenVINO {precision} vs torch fp32: latents relative error {err:.4f}")
        assert err < bound
    out = tmp_path / "ov.png"
    assert main(["txt2img", "a red circle", "--model", str(tiny_model), "--backend", "openvino", "--steps", "4",
                 "--seed", "5", "--width", "64", "--height", "64", "--sampler", "euler", "--no-watermark",
                 "-o", str(out)]) == 0
    from PIL import Image

    assert _close_images(Image.open(out).convert("RGB"), want.images[0].convert("RGB")) >= 0.99


def test_a_failed_conversion_runs_on_torch(tiny_model, cache, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("unsupported operation")

    monkeypatch.setattr(torch.export, "export", broken)
    ov_pipe = sfumato.load(tiny_model, backend="openvino")
    with caplog.at_level(logging.WARNING, logger="sfumato.backends.openvino"):
        got = ov_pipe.txt2img("a red circle", **KW)
    assert "its conversion failed" in caplog.text and "unsupported operation" in caplog.text
    want = sfumato.load(tiny_model, dtype="fp32").txt2img("a red circle", **KW)
    assert torch.equal(got.latents, want.latents)
    assert not list(cache.glob("*.xml"))


def test_a_decode_past_the_untiled_size_runs_on_torch_and_says_so(tiny_model, cache, monkeypatch, caplog):
    from sfumato.pipeline import tiling

    ov_pipe = sfumato.load(tiny_model, backend="openvino")
    monkeypatch.setattr(tiling, "AUTO_TILE_LATENT_PIXELS", 1)   # every decode is now a "large" one
    with caplog.at_level(logging.WARNING, logger="sfumato.pipeline.engine"):
        ov_pipe.txt2img("a red circle", **KW)
    assert "does not run tiled decodes" in caplog.text
    assert not list(cache.glob("vae-decoder-*.xml")), "the decoder was converted for a decode it does not serve"
