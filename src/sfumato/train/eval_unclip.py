"""``sfumato eval variations``: the bundled unCLIP variant judged on the shapes world.

* **variations** — ``n`` input scenes (rendered, half with one object, half with two; scene k drawn
  from ``default_rng([seed, 7, k])``), one variation each (seed ``seed + k``, no prompt). It *keeps*
  the scene when the judge finds the input's background and the input's set of (colour, shape)
  objects (issue 16's definition: a set, so a repeated object still counts); ``keeps_exact`` also
  asks for the same number of objects. Its *layout changes* when some object's centre moved by at
  least ``MOVED`` of the side (or the objects' left-to-right order changed).
* **mixing** — ``n`` pairs of one-object scenes on the same background, mixed at weights 0.5 / 0.5
  (pair k from ``default_rng([seed, 8, k])``, seed ``seed + k``): *both* when both objects are found.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .judge import MIN_OBJECT, detect
from .shapes import COLOURS, SHAPES, SceneSpec, place, render, sample_scene

MOVED = 0.1   # a centre displacement (fraction of the side) that counts as a new layout


def _objects(image: np.ndarray):
    det = detect(image)
    return det.background, [o for o in det.objects if o.area >= MIN_OBJECT]


def variation_cases(n: int, seed: int = 0) -> list:
    out = []
    for k in range(n):
        rng = np.random.default_rng([seed, 7, k])
        out.append(sample_scene(rng, p_two=1.0 if k % 2 else 0.0, allow_held_out=True))
    return out


def mixing_cases(n: int, seed: int = 0) -> list:
    out = []
    for k in range(n):
        rng = np.random.default_rng([seed, 8, k])
        bg = COLOURS[rng.integers(len(COLOURS))]
        picks = [(c, s) for c in COLOURS for s in SHAPES if c != bg]
        a, b = rng.choice(len(picks), 2, replace=False)
        out.append(tuple(place(SceneSpec((picks[i],), bg), rng) for i in (a, b)))
    return out


def evaluate_variations(path: str | Path, *, n: int = 32, steps: int = 20, cfg_scale: float = 7.0, seed: int = 0,
                        noise_level: int = 0, device: str = "cpu", save: str | Path | None = None) -> dict:
    """The report: per check, the fraction of cases that pass (see the module docstring)."""
    from ..api import load

    pipe = load(path, dtype="fp32", device=device)
    kw = dict(steps=steps, cfg_scale=cfg_scale, noise_level=noise_level, watermark=False)
    keeps = exact = moves = both = kept_and_moved = 0
    rows, cases = [], []
    for k, scene in enumerate(variation_cases(n, seed)):
        source = Image.fromarray(render(scene, 64))
        out = np.asarray(pipe.variations([source], seed=seed + k, **kw).images[0].convert("RGB"))
        bg, found = _objects(out)
        wanted = sorted((o.colour, o.shape) for o in scene.objects)
        got = sorted((o.colour, o.shape) for o in found)
        keep = bg == scene.background and set(got) == set(wanted)
        exact += keep and got == wanted
        moved = keep and (_order(found) != [(o.colour, o.shape) for o in scene.objects] or any(
            max(abs(f.cx - o.cx), abs(f.cy - o.cy)) >= MOVED
            for o in scene.objects for f in found if (f.colour, f.shape) == (o.colour, o.shape)))
        keeps += keep
        moves += moved
        kept_and_moved += keep and moved
        rows.append((source, out))
        cases.append({"objects": len(scene.objects), "keep": bool(keep), "moved": bool(moved)})
    pairs = []
    for k, (a, b) in enumerate(mixing_cases(n, seed)):
        ia, ib = (Image.fromarray(render(s, 64)) for s in (a, b))
        out = np.asarray(pipe.variations([(ia, 0.5), (ib, 0.5)], seed=seed + k, **kw).images[0].convert("RGB"))
        _, found = _objects(out)
        names = {(o.colour, o.shape) for o in found}
        both += all((s.objects[0].colour, s.objects[0].shape) in names for s in (a, b))
        pairs.append((ia, ib, out))
    if save is not None:
        _sheet(rows, pairs, Path(save))
    return {"variations": {"n": n, "keeps": keeps / n, "keeps_exact": exact / n, "layout_changes": moves / n,
                           "layout_changes_when_kept": kept_and_moved / max(keeps, 1), "cases": cases},
            "mixing": {"n": n, "both_objects": both / n}}


def _order(found) -> list:
    return [(o.colour, o.shape) for o in sorted(found, key=lambda o: o.cx)]


def _sheet(rows, pairs, path: Path, count: int = 8) -> None:
    """A contact sheet: input → variation for the first ``count`` scenes, then A + B → mix."""
    cell = 64
    sheet = Image.new("RGB", (cell * 6 + 16, cell * count + 8 * (count - 1)), (255, 255, 255))
    for i in range(count):
        y = i * (cell + 8)
        src, out = rows[i]
        sheet.paste(src, (0, y))
        sheet.paste(Image.fromarray(out), (cell, y))
        a, b, mixed = pairs[i]
        for j, im in enumerate((a, b, Image.fromarray(mixed))):
            sheet.paste(im, (cell * (3 + j) + 16, y))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    sheet.save(tmp)
    tmp.replace(path)


def format_variations(report: dict) -> str:
    v, m = report["variations"], report["mixing"]
    return (f"variations ({v['n']} scenes): keep objects and background {100 * v['keeps']:.1f}% "
            f"({100 * v['keeps_exact']:.1f}% with the same count), "
            f"layout changes {100 * v['layout_changes']:.1f}% "
            f"({100 * v['layout_changes_when_kept']:.1f}% of those kept)\n"
            f"mixing ({m['n']} pairs): both objects {100 * m['both_objects']:.1f}%")
