"""The shapes world (scenes, captions, held-out triples, dataset, eval prompts) and its judge."""

from __future__ import annotations

import itertools
import re
import time

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from sfumato.train.judge import _components, detect, evaluate, judge
from sfumato.train.shapes import (
    COLOURS, EVAL_PROMPTS, HELD_OUT, PALETTE, SHAPES, Obj, Scene, SceneSpec, ShapesDataset, caption,
    is_held_out, parse_caption, place, render, sample_scene,
)

C, S = "|".join(COLOURS), "|".join(SHAPES)
SINGLE = re.compile(rf"a ({C}) ({S}) on a ({C}) background")
TWO = re.compile(rf"a ({C}) ({S}) to the left of a ({C}) ({S}) on a ({C}) background")


def scenes(n: int, seed: int, **kw) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, **kw) for _ in range(n)]


def degrade(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A slight Gaussian blur and σ = 8 Gaussian noise."""
    blurred = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(0.7)), dtype=np.float32)
    return np.clip(blurred + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)


def test_captions_follow_the_grammars_and_scenes_their_rules():
    kinds = set()
    for scene in scenes(2000, 0):
        text = caption(scene)
        m = (SINGLE if len(scene.objects) == 1 else TWO).fullmatch(text)
        assert m, text
        assert parse_caption(text) == scene.spec()
        bg, objs = scene.background, scene.objects
        assert all(o.colour != bg for o in objs)
        for o in objs:
            assert 0 < o.cx - o.size / 2 and o.cx + o.size / 2 < 1
            assert 0 < o.cy - o.size / 2 and o.cy + o.size / 2 < 1
        if len(objs) == 1:
            assert 20 / 64 <= objs[0].size <= 40 / 64
        else:
            a, b = objs
            assert (a.colour, a.shape) != (b.colour, b.shape)
            assert a.cx + a.size / 2 < 0.5 < b.cx - b.size / 2  # left half, right half: no overlap
            assert all(14 / 64 <= o.size <= 24 / 64 for o in objs)
        kinds.add(len(objs))
    assert kinds == {1, 2}
    assert {len(s.objects) for s in scenes(200, 1, p_two=0.0)} == {1}
    assert {len(s.objects) for s in scenes(200, 1, p_two=1.0)} == {2}


def test_parse_caption_rejects_what_is_not_a_caption():
    spec = SceneSpec((("orange", "circle"),), "blue")
    assert parse_caption("An orange  circle on a BLUE background ") == spec
    for bad in ("a red circle", "a red circle on a red background", "a pink circle on a blue background",
                "a red circle to the left of a red circle on a blue background",
                "a red circle to the right of a blue square on a white background"):
        assert parse_caption(bad) is None, bad
    with pytest.raises(ValueError):
        is_held_out("a cat")


def test_held_out_triples():
    valid = [(c, s, bg) for c, s, bg in itertools.product(COLOURS, SHAPES, COLOURS) if c != bg]
    assert HELD_OUT <= set(valid) and 0.08 <= len(HELD_OUT) / len(valid) <= 0.12
    assert {c for c, _, _ in HELD_OUT} == set(COLOURS) and {s for _, s, _ in HELD_OUT} == set(SHAPES)
    seen = {t for scene in scenes(4000, 2) for t in scene.spec().triples()}
    assert not seen & HELD_OUT
    assert len(seen) == len(valid) - len(HELD_OUT)  # everything else does occur
    assert {t for scene in scenes(4000, 2, allow_held_out=True) for t in scene.spec().triples()} & HELD_OUT


def test_render():
    scene = Scene((Obj("square", "red", 0.5, 0.5, 0.5),), "blue")
    img = render(scene)
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    assert tuple(img[0, 0]) == PALETTE["blue"] and tuple(img[32, 32]) == PALETTE["red"]
    assert (np.all(img == PALETTE["red"], axis=-1)).sum() == 32 * 32  # exact edges on the pixel grid
    jittered = render(scene, 32, np.random.default_rng(0)).astype(int)
    assert jittered.shape == (32, 32, 3)
    assert np.abs(jittered[0, 0] - PALETTE["blue"]).max() <= 8
    assert np.abs(jittered[16, 16] - PALETTE["red"]).max() <= 8


def test_dataset_is_a_pure_function_of_seed_and_index():
    ds = ShapesDataset(100, seed=7)
    x, text = ds[3]
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
    assert parse_caption(text) is not None
    x2, text2 = ShapesDataset(100, seed=7)[3]
    assert torch.equal(x, x2) and text == text2
    assert not torch.equal(ShapesDataset(100, seed=8)[3][0], x)
    assert len(ds) == 100 and ShapesDataset(4, 0, size=32)[0][0].shape == (3, 32, 32)
    with pytest.raises(IndexError):
        ds[100]
    start = time.perf_counter()
    for i in range(300):
        ds[i % 100]
    assert 300 / (time.perf_counter() - start) > 500  # ~4000/s on one core; loose for a busy machine


def test_eval_prompts():
    specs = [parse_caption(p) for p in EVAL_PROMPTS]
    assert len(EVAL_PROMPTS) >= 120 and len(set(EVAL_PROMPTS)) == len(EVAL_PROMPTS)
    assert all(s is not None for s in specs)
    assert sum(len(s.objects) == 1 for s in specs) >= 60 and sum(len(s.objects) == 2 for s in specs) >= 60
    singles = {s.triples()[0] for s in specs if len(s.objects) == 1}
    assert HELD_OUT <= singles
    two_held = [p for p, s in zip(EVAL_PROMPTS, specs) if len(s.objects) == 2 and is_held_out(p)]
    assert 5 <= len(two_held) <= 30
    assert is_held_out(caption(SceneSpec(((next(iter(HELD_OUT))[:2]),), next(iter(HELD_OUT))[2])))


def test_judge_reads_rendered_scenes():
    rng = np.random.default_rng(3)
    clean = noisy = 0
    test_scenes = scenes(300, 4, allow_held_out=True)
    for scene in test_scenes:
        img = render(scene, rng=rng)
        clean += judge(caption(scene), img)["all_ok"]
        noisy += judge(caption(scene), degrade(img, rng))["all_ok"]
    assert clean / len(test_scenes) >= 0.99
    assert noisy / len(test_scenes) >= 0.95


def _wrong_prompts(spec: SceneSpec, rng: np.random.Generator) -> list[str]:
    """Swapped colour, swapped shape, swapped order (two objects) and wrong background."""
    objs, bg = list(spec.objects), spec.background
    k = int(rng.integers(len(objs)))
    c, s = objs[k]
    colour = [x for x in COLOURS if x not in (c, bg) and (x, s) not in objs]
    shape = [x for x in SHAPES if x != s and (c, x) not in objs]
    other_bg = [x for x in COLOURS if x != bg and all(x != o[0] for o in objs)]
    out = [SceneSpec(tuple((rng.choice(colour), s) if i == k else o for i, o in enumerate(objs)), bg),
           SceneSpec(tuple((c, rng.choice(shape)) if i == k else o for i, o in enumerate(objs)), bg),
           SceneSpec(spec.objects, rng.choice(other_bg))]
    if len(objs) == 2:
        out.append(SceneSpec(spec.objects[::-1], bg))
    return [caption(w) for w in out]


def test_judge_rejects_wrong_prompts():
    rng = np.random.default_rng(5)
    judged = wrong = 0
    for scene in scenes(150, 6, allow_held_out=True):
        img = render(scene, rng=rng)
        for prompt in _wrong_prompts(scene.spec(), rng):
            assert parse_caption(prompt) not in (None, scene.spec())
            judged += 1
            wrong += not judge(prompt, img)["all_ok"]
    assert wrong / judged >= 0.99


def test_detect_reports_positions_areas_and_ignores_specks():
    objs = Obj("circle", "green", 0.25, 0.6, 20 / 64), Obj("triangle", "white", 0.75, 0.3, 16 / 64)
    scene = Scene(objs, "black")
    img = render(scene)
    img[5:7, 30:32] = PALETTE["red"]  # a 4-pixel speck
    det = detect(img)
    assert det.background == "black" and [(o.colour, o.shape) for o in det.objects] == [("green", "circle"),
                                                                                        ("white", "triangle")]
    a, b = det.objects
    assert abs(a.cx - 0.25) < 0.01 and abs(a.cy - 0.6) < 0.01
    assert abs(a.area - np.pi / 4 * (20 / 64) ** 2) < 0.05 * a.area
    assert abs(b.area - (16 / 64) ** 2 / 2) < 0.1 * b.area
    assert judge(caption(scene), img)["all_ok"]
    assert judge("a green circle on a black background", img) == {
        "background_ok": True, "count_ok": False, "colours_ok": False, "shapes_ok": False,
        "objects_ok": False, "all_ok": False}


def test_components_match_scipy():
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(0)
    for density in (0.3, 0.5, 0.6):
        mask = rng.random((40, 50)) < density
        ours = _components(mask)
        ref, _ = ndimage.label(mask)  # 4-connectivity by default
        pairs = set(zip(ours[mask].tolist(), ref[mask].tolist()))
        assert len(pairs) == len({a for a, _ in pairs}) == len({b for _, b in pairs})  # same partition
        assert (ours[~mask] == mask.size).all()


def test_evaluate_groups():
    rng = np.random.default_rng(8)
    held = [p for p in EVAL_PROMPTS if is_held_out(p)]
    prompts = held[:3] + [p for p in EVAL_PROMPTS if p not in held][:3]
    images = {p: [render(place(parse_caption(p), rng), rng=rng) for _ in range(2)] for p in prompts}
    blank = np.full((64, 64, 3), PALETTE["white"], np.uint8)
    images[prompts[-1]] = [images[prompts[-1]][0], blank]  # one failure, in the seen split
    report = evaluate(images)
    assert report["all"]["n"] == 12 and report["all"]["all_ok"] == pytest.approx(11 / 12)
    assert report["held_out"]["all_ok"] == 1.0 and report["seen"]["all_ok"] == pytest.approx(5 / 6)
    kinds = [len(parse_caption(p).objects) for p in prompts]
    assert report["single"]["n"] == 2 * kinds.count(1) and report["two"]["n"] == 2 * kinds.count(2)
    assert sum(report[g]["n"] for g in ("single_held_out", "single_seen", "two_held_out", "two_seen")) == 12
    single_image = evaluate({prompts[0]: images[prompts[0]][0]})
    assert single_image["all"]["n"] == 1 and single_image["two"]["all_ok"] is None
