"""``sfumato train motion``: a motion module for the bundled model, trained on shapes-world clips.

A clip is one object on a background, moving to the right / left / up / down by 30–50% of the side
or growing / shrinking (14 → 36 px of 64, or back), over 8 frames, captioned in the world's grammar
plus the motion: "a red circle moving to the right on a blue background", "a green square growing
on a white background". A fixed eighth of the (colour, shape, motion, background) combinations is
held out of training and is what ``evaluate_motion`` prompts with.

The bundled model stays frozen; only the motion module (AnimateDiff's architecture at the UNet's
widths, 16 groups, an 8-frame position encoding, its output projections zero at the start so it
begins as the identity) learns, with the model's own loss (``Denoiser.loss``), one noise level per
clip, 10% of captions dropped. Exported in fp16 (about 2.7 MB).

A motion module never sees the text, and the bundled text encoder never saw the motion words, so
"to the right" and "to the left" reach the UNet as nearly the same features (their contexts differ
by 7%). With ``text_rank`` > 0 the module also carries low-rank deltas on the keys and values of the
UNet's text cross-attentions (``MotionConfig.text_kv``, zero at the start, a few kB), trained with it,
so the motion words can steer the frames; ``init`` starts from an earlier module.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..checkpoint.io import save_file
from ..models.motion import MotionAdapter, MotionConfig
from ..text.conditioner import Cond
from .loop import Batch, LoopConfig, Task, mix, train
from .shapes import COLOURS, MARGIN, SHAPES, Obj, Scene, render

MOTIONS = ("moving to the right", "moving to the left", "moving up", "moving down", "growing", "shrinking")
FRAMES = 8
BUNDLED_MOTION = MotionConfig(channels=(48, 96, 96), per_down=1, mid=False, max_frames=FRAMES, groups=16)


@dataclass(frozen=True)
class MotionRecipe:
    seed: int = 0
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(steps=2000, batch_size=4, lr=1e-3, warmup=50,
                                                                decay_start=1200, ema_decay=0.995,
                                                                checkpoint_every=250))
    dataset_size: int = 100_000
    caption_drop: float = 0.1
    text_rank: int = 4            # the text key/value deltas' rank (0: a plain AnimateDiff module)
    init: str | None = None       # a motion module file to start from


def motion_caption(colour: str, shape: str, motion: str, background: str) -> str:
    return f"a {colour} {shape} {motion} on a {background} background"


def is_held_out(colour: str, shape: str, motion: str, background: str) -> bool:
    digest = hashlib.sha256(f"{colour}|{shape}|{motion}|{background}".encode()).digest()
    return digest[0] % 8 == 0


def held_out_prompts(n: int = 32) -> list[str]:
    """The first ``n`` held-out clip captions, in a fixed order (each motion in turn)."""
    combos = [(c, s, m, b) for m in MOTIONS for b in COLOURS for c in COLOURS for s in SHAPES
              if c != b and is_held_out(c, s, m, b)]
    by_motion = [[x for x in combos if x[2] == m] for m in MOTIONS]
    out = []
    while len(out) < n and any(by_motion):
        for group in by_motion:
            if group and len(out) < n:
                out.append(motion_caption(*group.pop(0)))
    return out


def sample_clip(rng: np.random.Generator, frames: int = FRAMES, allow_held_out: bool = False
                ) -> tuple[np.ndarray, str, str]:
    """(uint8 [frames, 64, 64, 3], caption, motion)."""
    while True:
        bg, colour = (COLOURS[i] for i in rng.choice(len(COLOURS), 2, replace=False))
        shape, motion = SHAPES[rng.integers(len(SHAPES))], MOTIONS[rng.integers(len(MOTIONS))]
        if allow_held_out or not is_held_out(colour, shape, motion, bg):
            break
    t = np.linspace(0.0, 1.0, frames)
    if motion in ("growing", "shrinking"):
        small, big = 14 / 64, 36 / 64
        sizes = small + (big - small) * (t if motion == "growing" else 1 - t)
        lo, hi = MARGIN + big / 2, 1 - MARGIN - big / 2
        cx = np.full(frames, rng.uniform(lo, hi))
        cy = np.full(frames, rng.uniform(lo, hi))
    else:
        size = rng.uniform(20 / 64, 28 / 64)
        sizes = np.full(frames, size)
        lo, hi = MARGIN + size / 2, 1 - MARGIN - size / 2
        travel = rng.uniform(0.3, min(0.5, hi - lo))
        start = rng.uniform(lo, hi - travel)
        along = start + travel * t
        across = np.full(frames, rng.uniform(lo, hi))
        if motion == "moving to the left" or motion == "moving up":
            along = along[::-1]
        cx, cy = (along, across) if "right" in motion or "left" in motion else (across, along)
    jitter = int(rng.integers(1 << 30))
    images = np.stack([render(Scene((Obj(shape, colour, float(x), float(y), float(s)),), bg), 64,
                              np.random.default_rng(jitter)) for x, y, s in zip(cx, cy, sizes)])
    return images, motion_caption(colour, shape, motion, bg), motion


def zero_outputs(adapter: MotionAdapter) -> MotionAdapter:
    """AnimateDiff's start: every temporal transformer's output projection zero (the identity)."""
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            if ".proj_out." in name:
                p.zero_()
    return adapter


def text_layers(unet) -> tuple[tuple[str, int, int], ...]:
    """Every text cross-attention of the UNet as MotionConfig.text_kv entries."""
    return tuple((name.replace(".", "__"), m.to_k.in_features, m.to_k.out_features)
                 for name, m in unet.named_modules() if name.endswith("attn2"))


def start_adapter(unet, recipe: MotionRecipe) -> MotionAdapter:
    """The module training starts from: AnimateDiff's identity start, or ``recipe.init``'s weights
    (its text deltas too when they have this recipe's rank); new text deltas' up projections are zero
    (they too start as the identity)."""
    cfg = BUNDLED_MOTION if recipe.text_rank == 0 else \
        replace(BUNDLED_MOTION, text_kv=text_layers(unet), text_rank=recipe.text_rank)
    adapter = zero_outputs(MotionAdapter(cfg))
    if recipe.init is not None:
        from ..checkpoint.motion import read_motion

        sd = {k: v.float() for k, v in read_motion(recipe.init).items()}
        own = adapter.state_dict()
        kept = any(k.startswith("text_kv.") for k in sd) and all(
            k in own and own[k].shape == v.shape for k, v in sd.items() if k.startswith("text_kv."))
        sd = {k: v for k, v in sd.items() if kept or not k.startswith("text_kv.")}
        missing, unexpected = adapter.load_state_dict(sd, strict=False)
        if unexpected or any(not k.startswith("text_kv.") for k in missing):
            raise ValueError(f"{recipe.init} is not a module of the bundled model's layout")
        if kept:
            return adapter
    if adapter.text_kv is not None:
        with torch.no_grad():
            for kv in adapter.text_kv.values():
                kv.k_up.weight.zero_()
                kv.v_up.weight.zero_()
    return adapter


class MotionTask(Task):
    def __init__(self, engine, recipe: MotionRecipe):
        super().__init__()
        self.adapter = start_adapter(engine.model.unet, recipe)
        self.frozen = {"engine": engine}
        for p in engine.model.unet.parameters():
            p.requires_grad_(False)
        self.recipe, self.dataset_size = recipe, recipe.dataset_size
        self._context: dict[str, Tensor] = {}

    def context(self, text: str) -> Tensor:
        if text not in self._context:
            with torch.no_grad():
                self._context[text] = self.frozen["engine"].conditioner([text]).context[0]
        return self._context[text]

    def forward(self, batch: Batch) -> Tensor:
        from ..pipeline.animate import motion_attached
        from ..pipeline.images import to_tensor
        from PIL import Image

        engine = self.frozen["engine"]
        z0, noise, sigma, contexts = [], [], [], []
        for i, idx in enumerate(batch.indices):
            images, text, _ = sample_clip(np.random.default_rng([self.recipe.seed, 41, idx]))
            z = engine.encode(to_tensor([Image.fromarray(im) for im in images]))
            g = batch.generator(i)
            z0.append(z)
            noise.append(torch.randn(z.shape, generator=g))
            t = int(torch.randint(0, len(engine.schedule.sigmas), (1,), generator=g))
            sigma.append(engine.schedule.sigmas[t].repeat(FRAMES))
            dropped = float(torch.rand(1, generator=g)) < self.recipe.caption_drop
            contexts += [self.context("" if dropped else text)] * FRAMES
        cond = Cond(torch.stack(contexts))
        with motion_attached(engine.model.unet, self.adapter, lambda: FRAMES):
            return engine.denoiser.loss(torch.cat(z0), torch.cat(noise), torch.cat(sigma), (cond, None)).mean()


def export_motion(adapter: MotionAdapter, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to(torch.float16).contiguous() for k, v in adapter.state_dict().items()}, path)
    return path


def train_motion(recipe: MotionRecipe, out: str | Path, export_path: str | Path | None = None) -> Path:
    from ..api import load

    out = Path(out)
    pipe = load(None, dtype="fp32", device="cpu")
    torch.manual_seed(mix(recipe.seed, 40))
    task, ema = train(MotionTask(pipe.engine, recipe), recipe.loop, out / "motion", "motion")
    adapter = ema.copy_to(task).adapter if ema is not None else task.adapter
    return export_motion(adapter, export_path or out / "bundled-motion.safetensors")


@torch.no_grad()
def evaluate_motion(path: str | Path, n: int = 32, frames: int = FRAMES, steps: int = 20, seed: int = 0,
                    save: str | Path | None = None) -> dict:
    """Clips for ``n`` held-out captions, judged frame by frame: the object right (colour, shape,
    background) in each frame; its centre track monotonic in the stated direction and moved by at
    least a quarter of the side (growing / shrinking: its area monotonic and changed by ≥ 50%)."""
    from ..api import load
    from .judge import detect

    pipe = load(None, dtype="fp32", device="cpu")
    right_frames, moved, rows = 0, 0, []
    prompts = held_out_prompts(n)
    for k, prompt in enumerate(prompts):
        clip = pipe.animate(prompt, motion_module=path, frames=frames, steps=steps, seed=seed + k, watermark=False)
        words = prompt.split()
        colour, shape, background = words[1], words[2], words[-2]
        motion = " ".join(words[3:-4])
        track = []
        for image in clip.frames:
            d = detect(np.asarray(image))
            ok = d.background == background and len(d.objects) == 1 and \
                (d.objects[0].colour, d.objects[0].shape) == (colour, shape)
            right_frames += ok
            track.append(d.objects[0] if len(d.objects) == 1 else None)
        moved += _moves(track, motion)
        rows.append(clip.frames)
    if save is not None:
        _sheet(rows[:8], save)
    return {"n": len(prompts), "frames": frames, "object_right": right_frames / (len(prompts) * frames),
            "moves_as_stated": moved / len(prompts)}


def _moves(track: list, motion: str) -> bool:
    if any(o is None for o in track):
        return False
    if motion in ("growing", "shrinking"):
        areas = np.array([o.area for o in track])
        d = np.diff(areas) if motion == "growing" else -np.diff(areas)
        change = areas[-1] / areas[0] if motion == "growing" else areas[0] / areas[-1]
        return bool((d >= -1e-3).all() and change >= 1.5)
    axis = "cx" if "right" in motion or "left" in motion else "cy"
    sign = 1 if motion in ("moving to the right", "moving down") else -1
    pos = np.array([getattr(o, axis) for o in track]) * sign
    return bool((np.diff(pos) >= -0.01).all() and pos[-1] - pos[0] >= 0.25)


def _sheet(rows: list, path: str | Path) -> None:
    from PIL import Image

    cell, gap = 64, 4
    cols = max(len(r) for r in rows)
    sheet = Image.new("RGB", (cols * (cell + gap) - gap, len(rows) * (cell + gap) - gap), (255, 255, 255))
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            sheet.paste(im, (c * (cell + gap), r * (cell + gap)))
    path = Path(path)
    tmp = path.with_suffix(".tmp.png")
    sheet.save(tmp)
    tmp.replace(path)
