"""The demo concept of the shapes world: a *diamond* (a square turned 45°), a shape the bundled model
never saw. ``concept_images`` draws training scenes of it, ``concept_present`` finds it in generated
images, and ``demo`` trains one method on it (or on the ``concepts`` module's teal colour and
purple-triangle pair) with the bundled model and measures how often the trained model draws it
(``sfumato train demo METHOD``)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..api import Pipeline
from ..errors import SfumatoError
from .judge import MIN_OBJECT, _components
from .personalize import (TOKEN, TrainConfig, class_images, train_dreambooth, train_hypernetwork, train_lora,
                          train_ti)
from .shapes import COLOURS, JITTER, MARGIN, PALETTE, SINGLE_SIZE, SUPERSAMPLE

TEMPLATE = "a {colour} {token} on a {background} background"


def render_diamond(colour: str, background: str, cx: float, cy: float, size: float, px: int = 64,
                   rng: np.random.Generator | None = None) -> np.ndarray:
    """A ``colour`` diamond (corners up, down, left, right; ``size`` = its diagonal, a fraction of
    the side) on ``background``, drawn like ``shapes.render``: supersampled, ±8 colour jitter with ``rng``."""

    def rgb(name: str) -> tuple[int, ...]:
        c = np.array(PALETTE[name])
        if rng is not None:
            c = np.clip(c + rng.integers(-JITTER, JITTER + 1, 3), 0, 255)
        return tuple(int(v) for v in c)

    n = px * SUPERSAMPLE
    img = Image.new("RGB", (n, n), rgb(background))
    x, y, h = cx * n, cy * n, size * n / 2
    ImageDraw.Draw(img).polygon(((x, y - h), (x + h, y), (x, y + h), (x - h, y)), fill=rgb(colour))
    return np.array(img.reduce(SUPERSAMPLE))


def concept_images(n: int = 16, seed: int = 0, token: str = TOKEN, px: int = 64) -> list[tuple[np.ndarray, str]]:
    """``n`` diamonds of random palette colours on other random backgrounds, captioned with ``TEMPLATE``."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        colour, background = rng.choice(COLOURS, 2, replace=False)
        size = rng.uniform(*SINGLE_SIZE) * 1.15  # a diamond's diagonal; its area is half the square's
        lo, hi = MARGIN + size / 2, 1 - MARGIN - size / 2
        image = render_diamond(colour, background, rng.uniform(lo, hi), rng.uniform(lo, hi), size, px, rng)
        out.append((image, TEMPLATE.format(colour=colour, token=token, background=background)))
    return out


def write_images(directory: str | Path, items: Sequence[tuple[np.ndarray, str]]) -> Path:
    """Write ``items`` as ``NNN.png`` with ``NNN.txt`` captions (the layout ``read_images`` reads)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for i, (image, text) in enumerate(items):
        Image.fromarray(image).save(directory / f"{i:03d}.png")
        (directory / f"{i:03d}.txt").write_text(text + "\n")
    return directory


def _object_masks(image: np.ndarray) -> list[np.ndarray]:
    """Masks of the significant objects: 4-connected regions far from the border's median colour."""
    img = np.asarray(image, dtype=np.float32)[..., :3]
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    bg = np.median(border, axis=0)
    rgb = np.array(list(PALETTE.values()), dtype=np.float32)
    nearest = rgb[np.argmin(np.linalg.norm(rgb - bg, axis=1))]  # the background's palette colour
    gaps = np.linalg.norm(rgb - nearest, axis=1)
    threshold = 0.45 * gaps[gaps > 0].min()  # as the judge: halfway-ish to the closest other colour
    mask = np.linalg.norm(img - bg, axis=-1) > threshold
    labels = _components(mask)
    ids, counts = np.unique(labels[mask], return_counts=True)
    h, w = mask.shape
    return [labels == i for i in ids[counts >= MIN_OBJECT * h * w]]


def diamond_score(mask: np.ndarray) -> tuple[float, float, float]:
    """(fill, row peak, column peak) of an object mask: its area over its bounding box (diamond ½,
    circle π/4, square 1, triangle ½), and where its widest row / tallest column lies, as a fraction
    of its height / width (0.5 for a diamond or circle; 1 for an upward triangle's widest row)."""
    ys, xs = np.nonzero(mask)
    crop = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1].astype(np.float64)
    fill = crop.sum() / crop.size

    def peak(profile: np.ndarray) -> float:
        at = np.nonzero(profile >= 0.9 * profile.max())[0]
        return float((at.mean() + 0.5) / len(profile))

    return float(fill), peak(crop.sum(1)), peak(crop.sum(0))


def is_diamond(mask: np.ndarray) -> bool:
    """A diamond: about half its bounding box filled, widest in the middle both ways, about as tall as wide."""
    ys, xs = np.nonzero(mask)
    aspect = (np.ptp(ys) + 1) / (np.ptp(xs) + 1)
    fill, row, col = diamond_score(mask)
    return 0.35 <= fill <= 0.68 and abs(row - 0.5) <= 0.2 and abs(col - 0.5) <= 0.2 and 0.7 <= aspect <= 1.4


def concept_present(image: np.ndarray) -> bool:
    """Whether a generated image shows the demo concept: some significant object is a diamond."""
    return any(is_diamond(m) for m in _object_masks(image))


# --- measuring the demo concept -------------------------------------------------------------------


def eval_prompts(n: int = 20, seed: int = 1, token: str = TOKEN) -> list[str]:
    """``n`` prompts of ``TEMPLATE`` with random (colour, background) pairs (their own seed)."""
    rng = np.random.default_rng([seed, 7])
    return [TEMPLATE.format(colour=c, token=token, background=b)
            for c, b in (rng.choice(COLOURS, 2, replace=False) for _ in range(n))]


def concept_rate(pipe: Pipeline, prompts: Sequence[str], *, seed: int = 0, steps: int = 20,
                 cfg_scale: float = 7.0) -> float:
    """The fraction of images (prompt k with seed ``seed + k``) in which ``concept_present``."""
    hits = [concept_present(np.asarray(pipe.txt2img(p, steps=steps, cfg_scale=cfg_scale, seed=seed + k,
                                                    watermark=False).images[0].convert("RGB")))
            for k, p in enumerate(prompts)]
    return float(np.mean(hits))


def demo(method: str, out: str | Path, *, steps: int | None = None, lr: float | None = None, images: int = 16,
         eval_n: int = 20, control: bool = True, concept: str = "diamond") -> dict:
    """Train ``method`` on ``images`` scenes of ``concept`` (``diamond``: the new shape; ``teal``:
    the new colour; ``pair``: a token for a purple triangle; see ``concepts``) with the bundled model,
    then measure the concept rate over ``eval_n`` prompts for the trained model (and with
    ``control`` the base model)."""
    import sfumato

    from . import concepts

    out = Path(out)
    if concept == "diamond":
        items, prompts, rate_of = concept_images(images), eval_prompts(eval_n), concept_rate
    elif concept == "teal":
        items, prompts = concepts.colour_concept_images(images), concepts.colour_eval_prompts(eval_n)
        rate_of = concepts.colour_rate
    elif concept == "pair":
        items, prompts = concepts.pair_concept_images(images), concepts.pair_eval_prompts(eval_n)
        rate_of = concepts.pair_rate
    else:
        raise SfumatoError(f"concept: unknown {concept!r}; valid: diamond, teal, pair")
    write_images(out / "images", items)
    pipe = sfumato.load(dtype="fp32")
    base_rate = rate_of(pipe, prompts) if control else None
    defaults = {"lora": TrainConfig(steps=300, lr=2e-3), "ti": TrainConfig(steps=300, lr=5e-3),
                "dreambooth": TrainConfig(steps=200, lr=1e-4), "hypernetwork": TrainConfig(steps=200, lr=1e-3)}
    cfg = defaults[method]
    cfg = TrainConfig(steps=steps or cfg.steps, lr=lr or cfg.lr)
    if method == "lora":
        result = train_lora(pipe, items, out / "concept.safetensors", cfg=cfg)
        from ..adapters.lora import apply_loras

        trained = sfumato.load(dtype="fp32")
        unmatched = apply_loras(trained.model, [(result.path, 1.0)]).unmatched
        if unmatched:
            raise SfumatoError(f"the saved LoRA has unmatched keys: {unmatched}")
        rate = rate_of(trained, prompts)
    elif method == "ti":
        init_word = {"teal": "blue green", "pair": "square"}.get(concept, "square")
        result = train_ti(pipe, items, out / "embeddings" / f"{TOKEN}.safetensors", init_word=init_word, cfg=cfg)
        rate = rate_of(sfumato.load(dtype="fp32", embeddings_dir=out / "embeddings"), prompts)
    elif method == "dreambooth":
        prior_start = time.perf_counter()
        classes = class_images(pipe, [p.replace(TOKEN, "square") for p in eval_prompts(images, seed=2)])
        prior_seconds = time.perf_counter() - prior_start
        result = train_dreambooth(sfumato.load(dtype="fp32"), items, out / "dreambooth.safetensors",
                                  class_items=classes, cfg=cfg)
        result.seconds += prior_seconds
        rate = rate_of(sfumato.load(result.path), prompts)
    elif method == "hypernetwork":
        result = train_hypernetwork(pipe, items, out / "hypernetworks" / "concept.pt", cfg=cfg)
        hyper = sfumato.load(dtype="fp32", hypernet_dir=out / "hypernetworks")
        rate = rate_of(hyper, [f"{p} <hypernet:concept:1>" for p in prompts])
    else:
        raise SfumatoError(f"method: unknown {method!r}")
    report = {"method": method, "train_seconds": round(result.seconds, 1), "steps": cfg.steps, "lr": cfg.lr,
              "loss_first_50": float(np.mean(result.losses[:50])), "loss_last_50": float(np.mean(result.losses[-50:])),
              "concept_rate": rate, "base_concept_rate": base_rate, "prompts": len(prompts), "path": str(result.path)}
    return report
