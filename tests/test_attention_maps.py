"""Attention maps (DAAM): plumbing on a tiny random model, localisation on the bundled model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import sfumato
from sfumato.models.unet import BasicTransformerBlock
from sfumato.pipeline.attention_maps import (
    attention_probs, collect_attention, generate_with_maps, prompt_tokens, save_overlays, word_positions,
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
    # each word's map: its share of the attention on the prompt's tokens (1..6, the comma at 4
    # included; BOS, EOS, padding not), scaled between its minimum and maximum
    share = (heat[0, 3] / heat[0, 1:7].sum(0)).numpy()
    np.testing.assert_allclose(words["square"], (share - share.min()) / (share.max() - share.min()),
                               rtol=1e-4, atol=1e-5)
    assert [p for p, _ in prompt_tokens("a blue square, on red")] == [1, 2, 3, 4, 5, 6]

    paths = save_overlays(Image.fromarray(hooked), words, tmp_path / "maps")
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == [
        "00-a.png", "01-blue.png", "02-square.png", "03-on.png", "04-red.png"]
    assert [p.name for p in paths][2] == "02-square.png"
    with Image.open(paths[2]) as im:
        assert im.size == (64, 64) and im.mode == "RGB"


def test_the_coarsest_attention_resolution_is_left_out(tiny):
    """token_heat averages the cross-attention layers above the coarsest resolution (the tiny UNet:
    its 8×8 level-0 blocks; its 4×4 middle block is left out, as DAAM leaves out SD's 8×8 one)."""
    unet = tiny.model.unet
    seen: dict[str, list] = {}
    blocks = {n: m for n, m in unet.named_modules() if isinstance(m, BasicTransformerBlock)}

    def record(name):
        def hook(module, args, output):
            seen.setdefault(name, []).append(attention_probs(module, args[0][1:], args[1][1:])[0].mean(0))
        return hook

    handles = [b.attn2.register_forward_hook(record(n)) for n, b in blocks.items()]
    try:
        with collect_attention(tiny) as maps:
            tiny.txt2img("a blue square", steps=2, seed=2, width=64, height=64, sampler="euler")
    finally:
        for h in handles:
            h.remove()
    sizes = {n: v[0].shape[0] for n, v in seen.items()}
    assert sorted(sizes.values()) == [16, 64, 64, 64] and sizes["middle_block.1.transformer_blocks.0"] == 16
    fine = [torch.stack(v).mean(0) for n, v in seen.items() if sizes[n] == 64]  # [64 pixels, 77] per layer
    expected = torch.stack(fine).mean(0).T.reshape(77, 8, 8)
    torch.testing.assert_close(maps.token_heat((8, 8))[0], expected, rtol=1e-4, atol=1e-6)


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

# 16 scenes (the first eight are held-out triples, the rest seen in training), one seed each
PROMPTS = [
    "a red circle on a green background", "a green square on a blue background",
    "a blue triangle on a yellow background", "a yellow circle on a purple background",
    "a purple square on a orange background", "a orange triangle on a white background",
    "a white circle on a black background", "a black square on a red background",
    "a red triangle on a purple background", "a green circle on a orange background",
    "a blue square on a white background", "a yellow triangle on a black background",
    "a purple circle on a red background", "a orange square on a green background",
    "a white triangle on a blue background", "a black circle on a yellow background",
]


def _iou(heat: np.ndarray, mask: np.ndarray, threshold: float = 0.4) -> float:
    """DAAM's segmentation score: IoU of the map (already min-max scaled) above ``threshold`` with ``mask``."""
    above = heat > threshold
    return float((above & mask).sum() / (above | mask).sum())


def test_shape_word_looks_at_the_shape():
    """DAAM's score, IoU of the map above 0.4 with the object's pixels, averaged over 16 scenes.
    Measured (steps 20, CPU): shape word 0.364, the background's colour word 0.135, the word
    "background" 0.175 (the object's colour word 0.706); the shape word beats the background colour
    word on 12 of 16 images; mass on the object (area 0.25): shape word 0.336, background colour 0.180.
    Before the coarsest (4×4) maps were left out and the maps normalised over the prompt's tokens:
    IoU 0.385 against 0.527 (2 of 16), mass 0.291 against 0.336."""
    pipe = sfumato.load()
    iou = {"shape": [], "background colour": [], "background": []}
    mass = {"shape": [], "background colour": []}
    areas = []
    for seed, prompt in enumerate(PROMPTS):
        _, colour, shape, *_, bg_colour, _ = prompt.split()
        result, (maps,) = generate_with_maps(pipe, prompt, steps=20, seed=seed)
        image = np.asarray(result.images[0], dtype=np.float32)
        det = detect(image)
        assert det.background == bg_colour and len(det.objects) >= 1, (prompt, det)
        mask = np.linalg.norm(image - np.array(PALETTE[det.background]), axis=-1) > 60  # the object's pixels
        areas.append(mask.mean())
        for key, word in (("shape", shape), ("background colour", bg_colour), ("background", "background")):
            iou[key].append(_iou(maps[word], mask))
        for key, word in (("shape", shape), ("background colour", bg_colour)):
            mass[key].append(float((maps[word] * mask).sum() / maps[word].sum()))
    mean = {k: float(np.mean(v)) for k, v in iou.items()}
    print("object area", round(float(np.mean(areas)), 3), "IoU@0.4", {k: round(v, 3) for k, v in mean.items()},
          "mass on the object", {k: round(float(np.mean(v)), 3) for k, v in mass.items()})
    assert mean["shape"] >= 0.3
    assert mean["shape"] >= 2 * mean["background colour"]
    assert mean["shape"] >= 1.5 * mean["background"]
    assert sum(s > b for s, b in zip(iou["shape"], iou["background colour"])) >= 10
    assert np.mean(mass["shape"]) >= 1.5 * np.mean(mass["background colour"])  # also without a threshold


def test_cli_writes_one_overlay_per_word(tiny_model, tmp_path):
    from sfumato.cli import main

    assert main(["txt2img", "red circle", "--model", str(tiny_model), "--steps", "2", "--width", "64", "--height",
                 "64", "--no-watermark", "--attention-maps", str(tmp_path / "maps"), "-o", str(tmp_path / "x.png")]) == 0
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == ["00-red.png", "01-circle.png"]
