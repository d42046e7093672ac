"""Read shapes-world scenes back from (generated) images, and score images against their prompts.

``detect`` finds the background (the palette colour nearest the border's median), the objects
(connected regions far from that background, specks ignored), and per object its colour (majority
palette colour of its interior, so anti-aliased rims do not vote) and shape. The shape comes from a
soft coverage map α ∈ [0, 1] (each pixel's position between background and object colour), which
measures area and extents to sub-pixel precision even through blur and noise:

* fill = area / (width × height), with width and height the largest row and column sums of α:
  square ≈ 1, circle ≈ π/4, upward triangle ≈ 1/2;
* a triangle pointing up puts its mass low: the α-weighted skewness of y is ≈ −0.57 (0 for the
  symmetric shapes).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .shapes import COLOURS, PALETTE, is_held_out, parse_caption

_RGB = np.array([PALETTE[c] for c in COLOURS], dtype=np.float32)
MIN_SPECK = 12 / 4096  # components smaller than this (fraction of the image) are ignored
MIN_OBJECT = 40 / 4096  # judge: an object counts when its area is at least this (smallest true: ~98/4096)
TRIANGLE_SKEW = -0.3  # y-skewness below this: mass sits low, a triangle pointing up
TRIANGLE_FILL = 0.69  # fill below this: a triangle (true ones measure 0.55–0.68; circles 0.76+)
SQUARE_FILL = 0.89  # fill above this: a square (between π/4 and 1)


@dataclass(frozen=True)
class DetObj:
    """A detected object: centre ``cx, cy`` as fractions of the image side, ``area`` of the image."""

    shape: str
    colour: str
    cx: float
    cy: float
    area: float


@dataclass(frozen=True)
class Detected:
    background: str
    objects: list[DetObj]


def _blur(img: np.ndarray) -> np.ndarray:
    """Separable [1, 2, 1] / 4 blur with replicated edges, over the first two axes."""
    for axis in (0, 1):
        p = np.pad(img, [(1, 1) if a == axis else (0, 0) for a in range(img.ndim)], mode="edge")
        lo, mid, hi = (np.take(p, np.arange(k, k + img.shape[axis]), axis=axis) for k in range(3))
        img = (lo + 2 * mid + hi) / 4
    return img


def _shift(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``mask`` moved by (dy, dx), filled with False."""
    out = np.zeros_like(mask)
    h, w = mask.shape
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        mask[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


_NEIGHBOURS = ((1, 0), (-1, 0), (0, 1), (0, -1))


def _dilate(mask: np.ndarray) -> np.ndarray:
    return mask | np.logical_or.reduce([_shift(mask, dy, dx) for dy, dx in _NEIGHBOURS])


def _erode(mask: np.ndarray) -> np.ndarray:
    return mask & np.logical_and.reduce([_shift(mask, dy, dx) for dy, dx in _NEIGHBOURS])


def _components(mask: np.ndarray) -> np.ndarray:
    """4-connected components: each mask pixel gets the flat index of its component's first pixel,
    other pixels get ``mask.size``. Min-label propagation with pointer jumping."""
    h, w = mask.shape
    none = h * w
    lab = np.where(mask, np.arange(none).reshape(h, w), none)
    while True:
        p = np.pad(lab, 1, constant_values=none)
        new = np.minimum.reduce([lab, p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]])
        new = np.append(new.ravel(), none)[new]  # jump: a label's own label is no larger
        new = np.where(mask, new, none)
        if np.array_equal(new, lab):
            return lab
        lab = new


def _shape(alpha: np.ndarray) -> str:
    """Classify a soft coverage map (zero outside the object's neighbourhood)."""
    area = alpha.sum()
    width = np.sort(alpha.sum(1))[-2:].mean()
    height = np.sort(alpha.sum(0))[-2:].mean()
    fill = area / max(width * height, 1e-6)
    weight = np.clip(alpha, 0, None) + 1e-9
    y = np.arange(alpha.shape[0], dtype=np.float64)[:, None]
    mean = (weight * y).sum() / weight.sum()
    var = (weight * (y - mean) ** 2).sum() / weight.sum()
    skew = (weight * (y - mean) ** 3).sum() / weight.sum() / max(var, 1e-6) ** 1.5
    if skew < TRIANGLE_SKEW or fill < TRIANGLE_FILL:
        return "triangle"
    return "square" if fill > SQUARE_FILL else "circle"


def detect(image: np.ndarray, extra_colours: Mapping[str, tuple[int, int, int]] | None = None) -> Detected:
    """The background and objects of an RGB image (uint8 ``[H, W, 3]`` or anything ``np.asarray`` takes).

    ``extra_colours``: object colours beyond the palette (a personalization concept's new colour, by
    name and RGB); they join the palette in the object colour vote and in the threshold that separates
    objects from the background. Backgrounds are always palette colours."""
    extra = dict(extra_colours or {})
    if clash := set(extra) & set(COLOURS):
        raise ValueError(f"extra_colours: {sorted(clash)} are palette colours")
    names = COLOURS + tuple(extra)
    rgb = np.concatenate([_RGB, np.array(list(extra.values()), dtype=np.float32).reshape(-1, 3)])
    img = _blur(np.asarray(image, dtype=np.float32)[..., :3])
    h, w = img.shape[:2]
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    bg_rgb = np.median(border, axis=0)
    bg = int(np.argmin(np.linalg.norm(_RGB - bg_rgb, axis=1)))
    others = np.delete(np.arange(len(names)), bg)
    threshold = 0.45 * np.linalg.norm(rgb[others] - rgb[bg], axis=1).min()
    mask = np.linalg.norm(img - bg_rgb, axis=-1) > threshold
    labels = _components(mask)
    # nearest non-background colour per pixel, for the votes
    nearest = others[np.argmin(np.linalg.norm(img[..., None, :] - rgb[others], axis=-1), axis=-1)]
    core = _erode(mask)
    ids, counts = np.unique(labels[mask], return_counts=True)
    yy, xx = np.mgrid[:h, :w] + 0.5
    objects = []
    for label in ids[counts >= MIN_SPECK * h * w]:
        comp = labels == label
        voters = comp & core if (comp & core).any() else comp
        colour = Counter(nearest[voters].tolist()).most_common(1)[0][0]
        obj_rgb = np.median(img[voters & (nearest == colour)], axis=0)
        # soft coverage around the component, not reaching into other objects
        region = _dilate(_dilate(comp)) & ~(mask & ~comp)
        direction = obj_rgb - bg_rgb
        alpha = np.where(region, (img - bg_rgb) @ direction / max(direction @ direction, 1e-6), 0.0)
        alpha = np.clip(alpha, -0.5, 1.5)
        ys, xs = np.nonzero(region)
        crop = alpha[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
        weight = np.clip(alpha, 0, None) + 1e-9
        objects.append(DetObj(
            shape=_shape(crop), colour=names[colour],
            cx=float((weight * xx).sum() / weight.sum() / w),
            cy=float((weight * yy).sum() / weight.sum() / h),
            area=float(alpha.sum() / (h * w)),
        ))
    return Detected(COLOURS[bg], sorted(objects, key=lambda o: o.cx))


def judge(prompt: str, image: np.ndarray) -> dict[str, bool]:
    """Does ``image`` show ``prompt``? Booleans: ``background_ok``; ``count_ok`` (as many significant
    objects as the prompt names); ``colours_ok`` / ``shapes_ok`` (left to right, given the count);
    ``objects_ok`` (both); ``all_ok``."""
    spec = parse_caption(prompt)
    if spec is None:
        raise ValueError(f"not a caption of the shapes world: {prompt!r}")
    det = detect(image)
    found = [o for o in det.objects if o.area >= MIN_OBJECT]  # already left to right
    count_ok = len(found) == len(spec.objects)
    colours_ok = count_ok and all(o.colour == c for o, (c, _) in zip(found, spec.objects))
    shapes_ok = count_ok and all(o.shape == s for o, (_, s) in zip(found, spec.objects))
    background_ok = det.background == spec.background
    return {
        "background_ok": background_ok, "count_ok": count_ok, "colours_ok": colours_ok,
        "shapes_ok": shapes_ok, "objects_ok": colours_ok and shapes_ok,
        "all_ok": background_ok and colours_ok and shapes_ok,
    }


def evaluate(images_by_prompt: Mapping[str, np.ndarray | Sequence[np.ndarray]]) -> dict[str, dict]:
    """Judge every image (one array or a sequence of arrays per prompt) and report, per group, the
    number of images ``n`` and the fraction passing each of ``judge``'s checks (None when empty).

    Groups: ``all``, ``single``, ``two``, ``held_out`` and ``seen``, and their crossings
    ``single_held_out``, ``single_seen``, ``two_held_out``, ``two_seen``.
    """
    keys = ("background_ok", "count_ok", "colours_ok", "shapes_ok", "objects_ok", "all_ok")
    rows: list[tuple[set[str], dict[str, bool]]] = []
    for prompt, images in images_by_prompt.items():
        split = "held_out" if is_held_out(prompt) else "seen"  # raises on a prompt outside the world
        kind = "single" if len(parse_caption(prompt).objects) == 1 else "two"
        if not isinstance(images, (list, tuple)) and np.ndim(images) != 4:
            images = [images]
        for image in images:
            rows.append(({"all", kind, split, f"{kind}_{split}"}, judge(prompt, image)))
    groups = ("all", "single", "two", "held_out", "seen", "single_held_out", "single_seen",
              "two_held_out", "two_seen")
    report = {}
    for g in groups:
        results = [r for tags, r in rows if g in tags]
        report[g] = {"n": len(results),
                     **{k: float(np.mean([r[k] for r in results])) if results else None for k in keys}}
    return report
