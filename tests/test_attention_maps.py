"""Attention maps (DAAM): plumbing on a tiny random model, localisation on the bundled model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import sfumato
from sfumato.models.unet import BasicTransformerBlock
from sfumato.pipeline.attention_maps import (
    attention_probs, collect_attention, generate_with_maps, save_overlays, word_positions,
)
from sfumato.text.tokenizer import get_tokenizer
from sfumato.train.judge import detect
from sfumato.train.shapes import PALETTE


@pytest.fixture(scope="module")
def tiny(tiny_model):
    return sfumato.load(tiny_model)


def _hooks(module: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def test_probs_reproduce_the_modules_own_attention(tiny):
    """probs · v through to_out equals the module's SDPA forward."""
    torch.manual_seed(0)
    for block in (m for m in tiny.model.unet.modules() if isinstance(m, BasicTransformerBlock)):
        attn = block.attn2
        x = torch.randn(3, 20, attn.to_q.weight.shape[1])
        context = torch.randn(3, 77, attn.to_k.weight.shape[1])
        probs = attention_probs(attn, x, context)
        v = attn.to_v(context).view(3, 77, attn.heads, -1).transpose(1, 2)
        mixed = (probs @ v).transpose(1, 2).reshape(3, 20, -1)
        torch.testing.assert_close(attn.to_out(mixed), attn(x, context), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(probs.sum(-1), torch.ones(3, attn.heads, 20))


def test_word_positions_follow_the_tokenizer():
    tok = get_tokenizer()
    pos = word_positions("a (red:1.3) sfumatoesque circle, on blue")
    assert list(pos) == ["a", "red", "sfumatoesque", "circle", "on", "blue"]
    n = len(tok.encode("sfumatoesque"))
    assert n > 1
    assert pos["a"] == [1] and pos["red"] == [2] and pos["sfumatoesque"] == list(range(3, 3 + n))
    assert pos["circle"] == [3 + n] and pos["on"] == [5 + n]  # the comma at 4 + n is skipped
    assert word_positions("a cat BREAK dog")["dog"] == [78]  # BOS + 75 + EOS per chunk
    long = word_positions(" ".join(["cat"] * 80) + " dog")
    assert long["dog"] == [77 + 1 + 5] and len(long["cat"]) == 80


def test_collect_maps_plumbing(tiny, tmp_path):
    unet = tiny.model.unet
    settings = dict(steps=3, seed=5, width=64, height=64)
    plain = np.asarray(tiny.txt2img("a blue square, on red", **settings).images[0])
    assert _hooks(unet) == 0
    with collect_attention(tiny) as maps:
        assert _hooks(unet) > 0
        hooked = np.asarray(tiny.txt2img("a blue square, on red", **settings).images[0])
    assert _hooks(unet) == 0
    np.testing.assert_array_equal(hooked, plain)  # the hooks only observe

    heat = maps.token_heat((64, 64))
    assert heat.shape == (1, 77, 64, 64)
    torch.testing.assert_close(heat.sum(1), torch.ones(1, 64, 64))  # softmax rows, averaged
    words = maps.word_maps("a blue square, on red", (64, 64))
    assert list(words) == ["a", "blue", "square", "on", "red"]
    for m in words.values():
        assert m.shape == (64, 64) and m.dtype == np.float32 and np.isfinite(m).all()
        assert m.min() >= 0 and m.max() == pytest.approx(1.0)
    # each word's map is its positions' share of the attention, up to scale
    raw = heat[0, 3].numpy()
    np.testing.assert_allclose(words["square"], raw / raw.max(), rtol=1e-5)

    paths = save_overlays(Image.fromarray(hooked), words, tmp_path / "maps")
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == [
        "00-a.png", "01-blue.png", "02-square.png", "03-on.png", "04-red.png"]
    assert [p.name for p in paths][2] == "02-square.png"
    with Image.open(paths[2]) as im:
        assert im.size == (64, 64) and im.mode == "RGB"


def test_batch_maps_match_single_runs(tiny):
    """Image i of a batch gets the maps of a single run with seed + i (one UNet call per image)."""
    _, batch = generate_with_maps(tiny, "a red circle AND a cat", steps=2, seed=3, batch_size=2)
    _, single = generate_with_maps(tiny, "a red circle AND a cat", steps=2, seed=4)
    assert len(batch) == 2 and list(batch[1]) == ["a", "red", "circle", "cat"]
    for word in single[0]:
        np.testing.assert_allclose(batch[1][word], single[0][word], rtol=1e-4, atol=1e-5)


def test_non_square_images(tiny):
    with collect_attention(tiny) as maps:
        tiny.txt2img("a cat", steps=2, seed=1, width=96, height=64)
    torch.testing.assert_close(maps.token_heat((64, 96)).sum(1), torch.ones(1, 64, 96))
    assert maps.word_maps("a cat", (64, 96))["cat"].shape == (64, 96)


def test_unsupported_prompts_are_errors(tiny):
    with collect_attention(tiny) as maps:
        tiny.txt2img("a [cat:dog:0.5]", steps=2, seed=1)
    with pytest.raises(ValueError, match="prompt editing"):
        maps.word_maps("a [cat:dog:0.5]", (64, 64))
    with pytest.raises(ValueError, match="AND parts"):
        maps.word_maps("a cat AND a dog", (64, 64))
    with pytest.raises(ValueError, match="batch_size"):
        with collect_attention(tiny, batch_size=0):
            pass


# -- the bundled model: does the shape word look at the shape? ----------------------------------

PROMPTS = [
    "a red circle on a blue background", "a green square on a white background",
    "a yellow triangle on a purple background", "a blue circle on a orange background",
    "a white square on a black background", "a orange triangle on a green background",
]


def _mass_inside(heat: np.ndarray, mask: np.ndarray) -> float:
    return float((heat * mask).sum() / heat.sum())


@pytest.mark.xfail(strict=True, reason="the bundled model's cross-attention does not localise words "
                   "(measured: the shape word puts 0.26 of its mass on the object, the background word 0.32)")
def test_shape_word_looks_at_the_shape():
    pipe = sfumato.load()
    shape_fracs, background_fracs, areas = [], [], []
    for seed, prompt in enumerate(PROMPTS):
        words = prompt.split()
        result, (maps,) = generate_with_maps(pipe, prompt, steps=20, seed=seed)
        image = np.asarray(result.images[0], dtype=np.float32)
        det = detect(image)
        assert det.background == words[-2] and len(det.objects) >= 1, (prompt, det)
        mask = np.linalg.norm(image - np.array(PALETTE[det.background]), axis=-1) > 60
        areas.append(mask.mean())
        shape_fracs.append(_mass_inside(maps[words[2]], mask))
        background_fracs.append(_mass_inside(maps[words[-2]], mask))
    print("object area", np.round(areas, 3), "\nshape word", np.round(shape_fracs, 3),
          "\nbackground word", np.round(background_fracs, 3))
    assert np.mean(shape_fracs) >= 2 * np.mean(background_fracs)
    assert all(s > 1.5 * a for s, a in zip(shape_fracs, areas))


def test_cli_writes_one_overlay_per_word(tiny_model, tmp_path):
    from sfumato.cli import main

    assert main(["txt2img", "red circle", "--model", str(tiny_model), "--steps", "2", "--width", "64", "--height",
                 "64", "--no-watermark", "--attention-maps", str(tmp_path / "maps"), "-o", str(tmp_path / "x.png")]) == 0
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == ["00-red.png", "01-circle.png"]
