"""The shapes world: captioned synthetic scenes that the bundled model is trained on.

A scene is one or two flat-coloured shapes (circle, axis-aligned square, upward triangle) on a
flat background of another colour, captioned by one of two fixed grammars::

    a {colour} {shape} on a {colour} background
    a {c1} {s1} to the left of a {c2} {s2} on a {c3} background

Positions and sizes are fractions of the image side, so a scene renders at any resolution. A fixed
set of (object colour, shape, background) triples, ``HELD_OUT``, never appears in training scenes;
``EVAL_PROMPTS`` includes them to measure compositional generalisation.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 180),
    "orange": (245, 130, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

JITTER = 8  # ± per channel at render time, when an rng is given
SUPERSAMPLE = 4  # draw at 4× and box-downsample: exact area anti-aliasing
MARGIN = 3 / 64  # free border around every object
GAP = 2 / 64  # two-object scenes: each object keeps this far from the vertical midline
SINGLE_SIZE = (20 / 64, 40 / 64)
PAIR_SIZE = (14 / 64, 24 / 64)

Triple = tuple[str, str, str]  # (object colour, shape, background)


def _held_out() -> frozenset[Triple]:
    # Two triples per colour: every colour appears twice as object and twice as background, every
    # shape 5–6 times, and every (colour, shape) pair stays in training on other backgrounds.
    return frozenset(
        (c, SHAPES[(i + j) % 3], COLOURS[(i + 1 + 3 * j) % len(COLOURS)])
        for i, c in enumerate(COLOURS) for j in (0, 1)
    )


HELD_OUT: frozenset[Triple] = _held_out()


@dataclass(frozen=True)
class Obj:
    """One shape. ``cx, cy`` (centre) and ``size`` (bounding-box side) are fractions of the image side."""

    shape: str
    colour: str
    cx: float
    cy: float
    size: float


@dataclass(frozen=True)
class SceneSpec:
    """What a caption says: ``(colour, shape)`` per object, left to right, and the background."""

    objects: tuple[tuple[str, str], ...]
    background: str

    def triples(self) -> list[Triple]:
        return [(c, s, self.background) for c, s in self.objects]


@dataclass(frozen=True)
class Scene:
    """A renderable scene: objects (left to right in two-object scenes) on a background colour."""

    objects: tuple[Obj, ...]
    background: str

    def spec(self) -> SceneSpec:
        return SceneSpec(tuple((o.colour, o.shape) for o in self.objects), self.background)


def caption(scene: Scene | SceneSpec) -> str:
    """The scene's caption in the world's grammar."""
    spec = scene.spec() if isinstance(scene, Scene) else scene
    things = [f"a {c} {s}" for c, s in spec.objects]
    if len(things) not in (1, 2):
        raise ValueError(f"a scene has one or two objects, got {len(things)}")
    return f"{' to the left of '.join(things)} on a {spec.background} background"


_WORD = r"an? ({c}) ({s})".format(c="|".join(COLOURS), s="|".join(SHAPES))
_CAPTION = re.compile(rf"{_WORD}(?: to the left of {_WORD})? on an? ({'|'.join(COLOURS)}) background")


def parse_caption(text: str) -> SceneSpec | None:
    """The spec a caption describes, or None if ``text`` is not a caption of this world.

    Accepts the caption grammar (case and surrounding space ignored, "an" for "a"); rejects scenes the
    world cannot contain (an object coloured like the background, two identical objects).
    """
    m = _CAPTION.fullmatch(" ".join(text.lower().split()))
    if m is None:
        return None
    c1, s1, c2, s2, bg = m.groups()
    objects = ((c1, s1),) if c2 is None else ((c1, s1), (c2, s2))
    if any(c == bg for c, _ in objects) or (len(objects) == 2 and objects[0] == objects[1]):
        return None
    return SceneSpec(objects, bg)


def is_held_out(prompt: str) -> bool:
    """Whether a caption contains a held-out (colour, shape, background) triple."""
    spec = parse_caption(prompt)
    if spec is None:
        raise ValueError(f"not a caption of the shapes world: {prompt!r}")
    return any(t in HELD_OUT for t in spec.triples())


def _colour(name: str, rng: np.random.Generator | None) -> tuple[int, ...]:
    rgb = np.array(PALETTE[name])
    if rng is not None:
        rgb = np.clip(rgb + rng.integers(-JITTER, JITTER + 1, 3), 0, 255)
    return tuple(int(v) for v in rgb)


def render(scene: Scene, size: int = 64, rng: np.random.Generator | None = None) -> np.ndarray:
    """Draw ``scene`` as a uint8 ``[size, size, 3]`` array; with ``rng``, colours get a ±8 jitter."""
    n = size * SUPERSAMPLE
    img = Image.new("RGB", (n, n), _colour(scene.background, rng))
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        x, y, h = o.cx * n, o.cy * n, o.size * n / 2
        fill = _colour(o.colour, rng)
        if o.shape == "circle":
            draw.ellipse((x - h, y - h, x + h - 1, y + h - 1), fill=fill)
        elif o.shape == "square":
            draw.rectangle((x - h, y - h, x + h - 1, y + h - 1), fill=fill)
        elif o.shape == "triangle":
            draw.polygon(((x, y - h), (x + h - 1, y + h - 1), (x - h, y + h - 1)), fill=fill)
        else:
            raise ValueError(f"unknown shape {o.shape!r}")
    return np.array(img.reduce(SUPERSAMPLE))


def place(spec: SceneSpec, rng: np.random.Generator) -> Scene:
    """Random sizes and positions for a spec's objects: a single object is 20–40 px (at 64 px)
    anywhere inside the margin; of two (14–24 px), the first lies in the left half, the second in
    the right half, each at its own height."""
    if len(spec.objects) == 1:
        (c, s), size = spec.objects[0], rng.uniform(*SINGLE_SIZE)
        lo, hi = MARGIN + size / 2, 1 - MARGIN - size / 2
        return Scene((Obj(s, c, rng.uniform(lo, hi), rng.uniform(lo, hi), size),), spec.background)
    objects = []
    for (c, s), (x_lo, x_hi) in zip(spec.objects, ((MARGIN, 0.5 - GAP), (0.5 + GAP, 1 - MARGIN))):
        size = rng.uniform(*PAIR_SIZE)
        cx = rng.uniform(x_lo + size / 2, x_hi - size / 2)
        cy = rng.uniform(MARGIN + size / 2, 1 - MARGIN - size / 2)
        objects.append(Obj(s, c, cx, cy, size))
    return Scene(tuple(objects), spec.background)


def _pick(rng: np.random.Generator, background: str, allow_held_out: bool) -> tuple[str, str]:
    while True:
        colour, shape = COLOURS[rng.integers(len(COLOURS))], SHAPES[rng.integers(len(SHAPES))]
        if colour != background and (allow_held_out or (colour, shape, background) not in HELD_OUT):
            return colour, shape


def sample_scene(rng: np.random.Generator, *, p_two: float = 0.5, allow_held_out: bool = False) -> Scene:
    """A random scene with two objects with probability ``p_two``, else one; held-out triples only
    with ``allow_held_out``."""
    bg = COLOURS[rng.integers(len(COLOURS))]
    objects = [_pick(rng, bg, allow_held_out)]
    if rng.random() < p_two:
        second = _pick(rng, bg, allow_held_out)
        while second == objects[0]:
            second = _pick(rng, bg, allow_held_out)
        objects.append(second)
    return place(SceneSpec(tuple(objects), bg), rng)


class ShapesDataset(torch.utils.data.Dataset):
    """``length`` random scenes; item ``i`` is a pure function of ``(seed, i)``.

    Returns ``(image, caption)``: a float32 ``[3, size, size]`` tensor in [-1, 1] and its caption.
    """

    def __init__(self, length: int, seed: int, size: int = 64, p_two: float = 0.5):
        self.length, self.seed, self.size, self.p_two = length, seed, size, p_two

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} out of range for a dataset of {self.length}")
        rng = np.random.default_rng([self.seed, i])
        scene = sample_scene(rng, p_two=self.p_two)
        image = torch.from_numpy(render(scene, self.size, rng)).permute(2, 0, 1)
        return image.float() / 127.5 - 1, caption(scene)


def _stable_order(specs: list[SceneSpec]) -> list[SceneSpec]:
    """A fixed pseudo-random order (sha256 of the caption): independent of numpy versions."""
    return sorted(specs, key=lambda s: hashlib.sha256(caption(s).encode()).hexdigest())


def _eval_prompts() -> list[str]:
    objects = list(itertools.product(COLOURS, SHAPES))
    singles = [SceneSpec(((c, s),), bg) for bg in COLOURS for c, s in objects if c != bg]
    pairs = [SceneSpec((a, b), bg) for bg in COLOURS for a in objects for b in objects
             if a != b and a[0] != bg and b[0] != bg]

    def held(spec: SceneSpec) -> bool:
        return any(t in HELD_OUT for t in spec.triples())

    single_held = [s for s in singles if held(s)]  # all of them
    single_seen = [s for s in _stable_order(singles) if not held(s)][:48]
    pair_held = [s for s in _stable_order(pairs) if held(s)][:16]
    pair_seen = [s for s in _stable_order(pairs) if not held(s)][:48]
    return [caption(s) for s in single_held + single_seen + pair_held + pair_seen]


EVAL_PROMPTS: list[str] = _eval_prompts()
