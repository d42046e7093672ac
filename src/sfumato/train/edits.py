"""Does guidance do what it should? Three checks on a shapes-world model, judged by the detector.

* **CFG**: the fixed prompt set at CFG 1 (no guidance) against the default CFG; adherence should
  drop clearly without guidance.
* **img2img**: a rendered one-object scene, re-generated at strength 0.6 with the object's colour
  changed in the prompt: right when the shape, the new colour and the background come out.
* **inpainting**: a plain background with a square hole (masked, "original" content, strength 1):
  right when exactly the prompted object appears on the background.

Cases are pure functions of ``(seed, i)``, so every run judges the same scenes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .judge import judge
from .shapes import COLOURS, SHAPES, Scene, SceneSpec, caption, place, render

IMG2IMG_STRENGTH = 0.6
INPAINT_HOLE = 36 / 64   # side of the masked square, as a fraction of the image


@dataclass(frozen=True)
class EditCase:
    prompt: str              # what the result should show
    init: np.ndarray         # uint8 [H, W, 3]
    mask: np.ndarray | None  # uint8 [H, W], 255 = repaint


def _other(rng: np.random.Generator, exclude: set[str]) -> str:
    return str(rng.choice([c for c in COLOURS if c not in exclude]))


def img2img_cases(n: int, seed: int = 0, size: int = 64) -> list[EditCase]:
    """One-object scenes with the object's colour changed in the prompt (never to the background's)."""
    cases = []
    for i in range(n):
        rng = np.random.default_rng([seed, 1, i])
        bg = str(rng.choice(COLOURS))
        old = _other(rng, {bg})
        shape = str(rng.choice(SHAPES))
        scene = place(SceneSpec(((old, shape),), bg), rng)
        new = _other(rng, {bg, old})
        cases.append(EditCase(caption(SceneSpec(((new, shape),), bg)), render(scene, size), None))
    return cases


def inpaint_cases(n: int, seed: int = 0, size: int = 64) -> list[EditCase]:
    """A plain background with a centred square hole; the prompt asks for an object in it."""
    cases = []
    side = round(INPAINT_HOLE * size)
    lo = (size - side) // 2
    mask = np.zeros((size, size), np.uint8)
    mask[lo:lo + side, lo:lo + side] = 255
    for i in range(n):
        rng = np.random.default_rng([seed, 2, i])
        bg = str(rng.choice(COLOURS))
        colour, shape = _other(rng, {bg}), str(rng.choice(SHAPES))
        cases.append(EditCase(caption(SceneSpec(((colour, shape),), bg)), render(Scene((), bg), size), mask))
    return cases


def run_edits(pipe, cases: list[EditCase], *, steps: int = 20, cfg_scale: float = 7.0, seed: int = 0) -> list[dict]:
    """Judge each case's result (case k uses seed + k)."""
    results = []
    for k, case in enumerate(cases):
        init = Image.fromarray(case.init)
        if case.mask is None:
            out = pipe.img2img(case.prompt, init, strength=IMG2IMG_STRENGTH, steps=steps, cfg_scale=cfg_scale,
                               seed=seed + k, watermark=False)
        else:
            out = pipe.inpaint(case.prompt, init, Image.fromarray(case.mask), strength=1.0, steps=steps,
                               cfg_scale=cfg_scale, seed=seed + k, watermark=False)
        results.append(judge(case.prompt, np.asarray(out.images[0].convert("RGB"))))
    return results


def summarize(results: list[dict]) -> dict:
    """A report row: ``n`` and the fraction passing each check."""
    keys = ("background_ok", "count_ok", "colours_ok", "shapes_ok", "objects_ok", "all_ok")
    return {"n": len(results), **{k: float(np.mean([r[k] for r in results])) if results else None for k in keys}}


def evaluate_edits(pipe, *, n: int = 50, steps: int = 20, cfg_scale: float = 7.0, seed: int = 0) -> dict[str, dict]:
    """``img2img`` and ``inpaint`` rows over ``n`` cases each."""
    return {
        "img2img": summarize(run_edits(pipe, img2img_cases(n, seed), steps=steps, cfg_scale=cfg_scale, seed=seed)),
        "inpaint": summarize(run_edits(pipe, inpaint_cases(n, seed), steps=steps, cfg_scale=cfg_scale, seed=seed)),
    }
