"""Personalization concepts for textual inversion and hypernetworks, judged by the shapes detector.

A frozen bundled model bounds what textual inversion (new token vectors only) can teach it:

* a new *shape* (``personalize``'s diamond) is out of reach: the frozen UNet cannot draw corners it
  never learned (0% of generations after training);
* a new *colour* is reachable only as far as the VAE reproduces it. *Teal* (20, 128, 128) is 89
  RGB units from the nearest palette colour, and the frozen UNet draws blue-greens from contexts
  between "blue" and "green"; but the bundled VAE, trained on the palette alone, encodes and
  decodes teal shapes back to teal in only half of the training images (to blue or green in the
  rest, depending on the background), and other colours off the palette fare worse. So trained
  latents can give teal about half the time, which is what textual inversion reaches;
* a *composite* concept the model can render, one token standing for a colour-and-shape pair
  (``PAIR``, a purple triangle: captions ``a <token> on a <colour> background``), is within reach
  and is what the ≥ 80% acceptance test binds.

``teal_present`` / ``pair_present`` find the concepts with the shapes detector (teal added to the
colours it can name; the pair through ``judge`` on the caption with the token spelled out).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from .judge import MIN_OBJECT, detect, judge
from .shapes import COLOURS, JITTER, MARGIN, PALETTE, SHAPES, SINGLE_SIZE, Obj, Scene, SceneSpec, place, render

TEAL: tuple[int, int, int] = (20, 128, 128)
EXTRA = {"teal": TEAL}
COLOUR_TEMPLATE = "a {token} {shape} on a {background} background"
PAIR: tuple[str, str] = ("purple", "triangle")
PAIR_TEMPLATE = "a {token} on a {background} background"


# --- a new colour: teal --------------------------------------------------------------------------


def render_teal(shape: str, background: str, cx: float, cy: float, size: float, px: int = 64,
                rng: np.random.Generator | None = None) -> np.ndarray:
    """A teal ``shape`` on ``background``: ``shapes.render``'s geometry and anti-aliasing (a white
    shape on black gives the coverage), teal and the background with its ±8 jitter when ``rng``."""
    alpha = render(Scene((Obj(shape, "white", cx, cy, size),), "black"), px)[..., :1].astype(np.float64)
    alpha = (alpha - PALETTE["black"][0]) / (PALETTE["white"][0] - PALETTE["black"][0])

    def rgb(c: tuple[int, ...]) -> np.ndarray:
        c = np.array(c, dtype=np.float64)
        return np.clip(c + rng.integers(-JITTER, JITTER + 1, 3), 0, 255) if rng is not None else c

    fg, bg = rgb(TEAL), rgb(PALETTE[background])
    return np.clip(np.rint(bg + alpha * (fg - bg)), 0, 255).astype(np.uint8)


def colour_concept_images(n: int = 16, seed: int = 0, token: str = "sks", px: int = 64
                          ) -> list[tuple[np.ndarray, str]]:
    """``n`` teal circles, squares and triangles (in turn) on random palette backgrounds, sized and
    placed like the world's single objects, captioned with ``COLOUR_TEMPLATE``."""
    rng = np.random.default_rng([seed, 11])
    out = []
    for k in range(n):
        shape, background = SHAPES[k % len(SHAPES)], str(rng.choice(COLOURS))
        size = rng.uniform(*SINGLE_SIZE)
        lo, hi = MARGIN + size / 2, 1 - MARGIN - size / 2
        image = render_teal(shape, background, rng.uniform(lo, hi), rng.uniform(lo, hi), size, px, rng)
        out.append((image, COLOUR_TEMPLATE.format(token=token, shape=shape, background=background)))
    return out


def colour_eval_prompts(n: int = 20, seed: int = 1, token: str = "sks") -> list[str]:
    """``n`` prompts of ``COLOUR_TEMPLATE`` with random (shape, background) pairs (their own seed)."""
    rng = np.random.default_rng([seed, 13])
    return [COLOUR_TEMPLATE.format(token=token, shape=rng.choice(SHAPES), background=rng.choice(COLOURS))
            for _ in range(n)]


def teal_present(image: np.ndarray) -> bool:
    """Whether a generated image shows the colour concept: exactly one significant object, and it is
    teal (the detector's colour vote over the palette and teal)."""
    found = [o for o in detect(image, EXTRA).objects if o.area >= MIN_OBJECT]
    return len(found) == 1 and found[0].colour == "teal"


# --- a composite concept: one token for a colour-and-shape pair ----------------------------------


def pair_concept_images(n: int = 16, seed: int = 0, token: str = "sks", pair: tuple[str, str] = PAIR,
                        px: int = 64) -> list[tuple[np.ndarray, str]]:
    """``n`` scenes of the ``pair`` object on each other palette colour in turn (placed and drawn as
    the world's single objects), captioned with ``PAIR_TEMPLATE``: the token names colour and shape."""
    rng = np.random.default_rng([seed, 17])
    backgrounds = [c for c in COLOURS if c != pair[0]]
    out = []
    for k in range(n):
        background = backgrounds[k % len(backgrounds)]
        scene = place(SceneSpec((pair,), background), rng)
        out.append((render(scene, px, rng), PAIR_TEMPLATE.format(token=token, background=background)))
    return out


def pair_eval_prompts(n: int = 20, seed: int = 1, token: str = "sks", pair: tuple[str, str] = PAIR) -> list[str]:
    """``n`` prompts of ``PAIR_TEMPLATE`` on random backgrounds other than the pair's colour."""
    rng = np.random.default_rng([seed, 19])
    backgrounds = [c for c in COLOURS if c != pair[0]]
    return [PAIR_TEMPLATE.format(token=token, background=rng.choice(backgrounds)) for _ in range(n)]


def pair_present(prompt: str, image: np.ndarray, token: str = "sks", pair: tuple[str, str] = PAIR) -> bool:
    """Whether ``image`` shows what ``prompt`` asks with the token spelled out as the pair: one
    significant object, of the pair's colour and shape (``judge``'s ``objects_ok``)."""
    return judge(prompt.replace(token, " ".join(pair)), image)["objects_ok"]


# --- measuring -----------------------------------------------------------------------------------


def concept_rate(pipe, prompts: Sequence[str], present: Callable[[str, np.ndarray], bool], *, seed: int = 0,
                 steps: int = 20, cfg_scale: float = 7.0, suffix: str = "") -> float:
    """The fraction of images (prompt k + ``suffix``, seed ``seed + k``) for which ``present(prompt k,
    image)``."""
    hits = [present(p, np.asarray(pipe.txt2img(p + suffix, steps=steps, cfg_scale=cfg_scale, seed=seed + k,
                                               watermark=False).images[0].convert("RGB")))
            for k, p in enumerate(prompts)]
    return float(np.mean(hits))


def colour_rate(pipe, prompts: Sequence[str], **kwargs) -> float:
    return concept_rate(pipe, prompts, lambda _, image: teal_present(image), **kwargs)


def pair_rate(pipe, prompts: Sequence[str], **kwargs) -> float:
    return concept_rate(pipe, prompts, pair_present, **kwargs)
