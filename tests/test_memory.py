"""Memory: loading from the memory map without duplicate copies, low-memory mode (weights streamed
block by block, tiled VAE), and the generation loop's automatic tiling. Tiny random models; the peak
memory of full-size models is measured by bench/memory.py, not asserted here."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

import sfumato
from sfumato.checkpoint.load import build_model, load_model
from sfumato.checkpoint.specs import UNET_PREFIX, VAE_PREFIX
from sfumato.checkpoint.stream import MappedFile, read_mapped, unet_units
from sfumato.errors import CheckpointError
from sfumato.pipeline import tiling
from sfumato.pipeline.params import ParamError

from conftest import write_tiny_model

TEXT_PREFIX = "cond_stage_model.transformer."
# uint8 levels a low-memory image may differ by: with exact statistics (the latent fits the statistics
# pass) rounding alone, at most one level. Statistics from a mosaic of crops shift values evenly; on
# these tiny random VAEs by a mean of 4-10 levels (a trained VAE's features are smoother), and rows
# and columns at tile borders differ no more than the rest.
EXACT_LEVELS = 1
MOSAIC_MEAN_LEVELS = 16


@pytest.fixture(scope="module")
def fp16_model(tmp_path_factory) -> Path:
    """The tiny model stored in fp16, as released checkpoints are."""
    src = write_tiny_model(tmp_path_factory.mktemp("mem") / "tiny32.safetensors")
    sd = safetensors.torch.load_file(src)
    with safetensors.safe_open(src, "pt") as f:
        metadata = f.metadata()
    path = src.with_name("tiny16.safetensors")
    safetensors.torch.save_file({k: v.half() if v.is_floating_point() else v for k, v in sd.items()}, path, metadata)
    return path


def _components(model):
    yield UNET_PREFIX, model.unet
    yield VAE_PREFIX, model.vae
    yield TEXT_PREFIX, model.text_encoders[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loading_gives_the_files_tensors(tiny_model, fp16_model, dtype) -> None:
    """Every weight equals the file's tensor (read by the safetensors library) cast to the load dtype."""
    for path in (tiny_model, fp16_model):
        want = safetensors.torch.load_file(path)
        model = load_model(path, dtype=dtype)
        for prefix, module in _components(model):
            for name, t in module.state_dict().items():
                ref = want[prefix + name]
                ref = ref.to(dtype) if ref.is_floating_point() else ref
                assert t.dtype == ref.dtype and torch.equal(t, ref.reshape(t.shape)), (path.name, name)


def test_no_copy_when_the_file_holds_the_load_dtype(tiny_model, fp16_model) -> None:
    """fp32 file loaded as fp32: the weights are the memory map itself. fp16 file loaded as bf16:
    converted copies, none left pointing into the map."""
    for path, dtype, mapped_weights in ((tiny_model, torch.float32, True), (fp16_model, torch.bfloat16, False)):
        sd, metadata, mapped = read_mapped(path)
        model = build_model(sd, metadata, path=path, dtype=dtype, files=[mapped])
        weights = [p for _, m in _components(model) for p in m.parameters()]
        assert all(mapped.owns(p) == mapped_weights for p in weights)


def test_released_pages_leave_the_resident_set_and_keep_their_values(tmp_path) -> None:
    path = tmp_path / "big.safetensors"
    safetensors.torch.save_file({"w": torch.arange(16 << 20, dtype=torch.float32)}, path)  # 64 MiB
    mapped = MappedFile(path)
    w = mapped.tensors["w"]
    before = _rss_file_kib()
    total = w.sum().item()  # touches every page
    touched = _rss_file_kib()
    mapped.release(w)
    released = _rss_file_kib()
    assert touched - before >= 48 << 10
    assert touched - released >= 48 << 10
    assert w.sum().item() == total  # read again from the page cache


def _rss_file_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    pytest.skip("no RssFile in /proc/self/status")


def _images(result) -> np.ndarray:
    return np.asarray(result.images[0]).astype(int)


@pytest.fixture(scope="module")
def pipes(fp16_model):
    return sfumato.load(fp16_model, dtype="bf16"), sfumato.load(fp16_model, dtype="bf16", low_memory=True)


def test_low_memory_generation_equals_normal(pipes) -> None:
    normal, low = pipes
    settings = dict(width=64, height=64, steps=3, seed=7, watermark=False)
    a, b = normal.txt2img("a red circle", **settings), low.txt2img("a red circle", **settings)
    assert np.abs(_images(a) - _images(b)).max() <= EXACT_LEVELS
    init = a.images[0]
    a = normal.img2img("a blue square", init, strength=0.6, **settings)
    b = low.img2img("a blue square", init, strength=0.6, **settings)
    assert np.abs(_images(a) - _images(b)).max() <= EXACT_LEVELS
    model = low.model  # nothing stays loaded between runs
    modules = [model.unet, model.vae, *model.text_encoders]
    assert all(t.is_meta for m in modules for t in [*m.parameters(), *m.buffers()])


def test_low_memory_large_image_within_tiled_tolerance(pipes, monkeypatch) -> None:
    """A latent larger than the low-memory tile and statistics pass (16² against 8² here, 64² against
    16² and 32² for 512² images in use): statistics from a mosaic; an even difference, no seams."""
    normal, low = pipes
    monkeypatch.setattr(tiling, "LOW_MEMORY_TILE", 8)
    monkeypatch.setattr(tiling, "LOW_MEMORY_STATS_SIZE", 8)
    settings = dict(width=128, height=128, steps=2, seed=3, watermark=False)
    diff = np.abs(_images(normal.txt2img("a cat", **settings)) - _images(low.txt2img("a cat", **settings)))
    assert 0 < diff.mean() <= MOSAIC_MEAN_LEVELS
    rows = diff.mean(axis=(1, 2))  # a seam would be the rows (and columns) around the tile border at 64 px
    cols = diff.mean(axis=(0, 2))
    for profile in (rows, cols):
        assert profile[60:68].mean() <= 1.5 * diff.mean()


def test_low_memory_unet_holds_one_block_at_a_time(pipes) -> None:
    unet = pipes[1].model.unet
    units = unet_units(unet)
    loaded = []

    def count(module, args) -> None:
        loaded.append(sum(p.numel() for p in unet.parameters() if not p.is_meta))

    hooks = [u.register_forward_pre_hook(count) for u in units]  # runs after the unit has loaded
    try:
        with torch.no_grad():
            unet(torch.randn(1, 4, 8, 8), torch.tensor([500.0]), torch.randn(1, 77, 32))
    finally:
        for h in hooks:
            h.remove()
    largest = max(sum(p.numel() for p in u.parameters()) for u in units)
    assert len(loaded) == len(units) and max(loaded) <= largest
    assert max(loaded) < sum(p.numel() for p in unet.parameters()) / 3


def test_generation_loop_tiles_large_images_and_matches_untiled(pipes, monkeypatch) -> None:
    """Above the threshold the loop decodes tiled, unless the latent fits the statistics size (the
    statistics pass would be the whole decode): then it decodes whole, the very same image. Tiled
    with mosaic statistics, the image stays close to the untiled one."""
    normal = pipes[0]
    settings = dict(width=128, height=128, steps=2, seed=5, watermark=False)
    want = _images(normal.txt2img("a cat", **settings))
    calls = []
    real = tiling.tiled_decode
    monkeypatch.setattr(tiling, "tiled_decode", lambda vae, z, **kw: calls.append(kw) or real(vae, z, **kw))
    monkeypatch.setattr(tiling, "AUTO_TILE_LATENT_PIXELS", 8 * 8)
    monkeypatch.setattr(tiling, "DEFAULT_TILE", 8)  # 16² latent: 2×2 tiles
    assert np.array_equal(_images(normal.txt2img("a cat", **settings)), want) and not calls
    monkeypatch.setattr(tiling, "DEFAULT_STATS_SIZE", 8)   # now the statistics come from a mosaic
    got = _images(normal.txt2img("a cat", **settings))
    assert calls and calls[0]["tile"] == 8 and calls[0]["stats_size"] == 8
    assert 0 < np.abs(got - want).mean() <= MOSAIC_MEAN_LEVELS


def _loaded(module: torch.nn.Module) -> bool:
    return not next(module.parameters()).is_meta


def test_by_stage_generation_equals_normal_one_component_at_a_time(pipes, fp16_model) -> None:
    """By-stage loading gives the very same images; the UNet is read in once per sampling pass (not per
    step) while the text encoders and the VAE are out, the VAE decodes without the UNet, and nothing
    stays loaded between runs."""
    normal, staged = pipes[0], sfumato.load(fp16_model, dtype="bf16", by_stage=True)
    model = staged.model
    seen: dict[str, list] = {"unet": [], "decode": [], "text": []}
    weights: list[torch.Tensor] = []   # the UNet's first weight at each call: a new tensor for each read

    def at_unet(m, a) -> None:
        seen["unet"].append((_loaded(model.vae), _loaded(model.text_encoders[0])))
        weights.append(next(m.parameters()))

    hooks = [
        model.unet.register_forward_pre_hook(at_unet),
        model.vae.decoder.register_forward_pre_hook(
            lambda m, a: seen["decode"].append((_loaded(model.unet), _loaded(model.text_encoders[0])))),
        model.text_encoders[0].register_forward_pre_hook(
            lambda m, a: seen["text"].append((_loaded(model.unet), _loaded(model.vae)))),
    ]
    try:
        settings = dict(width=64, height=64, steps=3, seed=7, watermark=False)
        a, b = normal.txt2img("a red circle", **settings), staged.txt2img("a red circle", **settings)
        assert np.array_equal(_images(a), _images(b))
        init = a.images[0]
        a = normal.img2img("a blue square", init, strength=0.6, **settings)
        b = staged.img2img("a blue square", init, strength=0.6, **settings)
        assert np.array_equal(_images(a), _images(b))
    finally:
        for h in hooks:
            h.remove()
    assert len(seen["unet"]) >= 5 and set(seen["unet"]) == {(False, False)}
    assert seen["decode"] and set(seen["decode"]) == {(False, False)}
    assert seen["text"] and set(seen["text"]) == {(False, False)}
    reads = [w for i, w in enumerate(weights) if all(w is not v for v in weights[:i])]
    assert len(reads) == 2   # one read per sampling pass: txt2img, img2img
    modules = [model.unet, model.vae, *model.text_encoders]
    assert all(t.is_meta for m in modules for t in [*m.parameters(), *m.buffers()])
    with pytest.raises(ParamError, match="by-stage"):
        staged.txt2img("<lora:x:1> a cat", width=64, height=64, steps=1)
    with pytest.raises(ParamError, match="by_stage"):
        sfumato.load(fp16_model, by_stage=True, loras=[(fp16_model, 1.0)])
    with pytest.raises(ValueError, match="one of"):
        load_model(fp16_model, by_stage=True, low_memory=True)


def test_cli_memory_modes(tiny_model, tmp_path, monkeypatch) -> None:
    """auto is by-stage for a .safetensors file without LoRAs, keep otherwise; contradictions exit 2."""
    from sfumato import api, cli
    from sfumato.commands import generate

    chosen = []
    real = api.load
    monkeypatch.setattr(api, "load", lambda *a, **kw: chosen.append((kw["low_memory"], kw["by_stage"])) or real(*a, **kw))
    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": safetensors.torch.load_file(tiny_model)}, ckpt)
    common = ["--steps", "1", "--width", "64", "--height", "64", "-o", str(tmp_path / "x.png"), "--no-watermark"]
    runs = [(["a cat", "--model", str(tiny_model)], (False, True)),
            (["a cat", "--model", str(ckpt)], (False, False)),
            (["a cat", "--model", str(tiny_model), "--memory", "keep"], (False, False)),
            (["a cat", "--model", str(tiny_model), "--memory", "low"], (True, False)),
            (["a cat <lora:x:1>", "--model", str(tiny_model), "--lora-dir", str(tmp_path)], (False, False))]
    for argv, want in runs:
        chosen.clear()
        cli.main(["txt2img", *argv, *common])   # the LoRA run fails later (no such file): the mode is chosen first
        assert chosen == [want], argv
    assert cli.main(["txt2img", "a cat", "--model", str(tiny_model), "--low-memory", "--memory", "keep", *common]) == 2
    args = SimpleNamespace(low_memory=False, memory="auto", compile=True, refiner=None)
    assert generate._memory_mode(args, tiny_model, "a cat", []) == "keep"   # a compiled UNet stays in memory


def test_low_memory_refusals(tmp_path, tiny_model, pipes) -> None:
    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": safetensors.torch.load_file(tiny_model)}, ckpt)
    with pytest.raises(CheckpointError, match="low_memory"):
        load_model(ckpt, low_memory=True)
    with pytest.raises(ParamError, match="loras"):
        sfumato.load(tiny_model, low_memory=True, loras=[(tmp_path / "x.safetensors", 1.0)])
    with pytest.raises(ParamError, match="low-memory"):
        pipes[1].txt2img("<lora:x:1> a cat", width=64, height=64, steps=1)


def test_cli_flag(tiny_model, tmp_path) -> None:
    from sfumato.cli import main

    out = tmp_path / "low.png"
    assert main(["txt2img", "a cat", "--model", str(tiny_model), "--low-memory", "--steps", "1",
                 "--width", "64", "--height", "64", "-o", str(out), "--no-watermark"]) == 0
    assert Image.open(out).size == (64, 64)
