"""The bundled motion module's training data and recipe: clips move as their captions say (by the
same judge the evaluation uses), held-out combinations never reach training, and a two-step run
exports a module that loads, fits the bundled model and animates with it."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from sfumato.checkpoint.motion import load_motion_module, motion_fits
from sfumato.train.judge import detect
from sfumato.train.motion import (BUNDLED_MOTION, MOTIONS, MotionRecipe, _moves, held_out_prompts, is_held_out,
                                  sample_clip, train_motion)


def test_clips_move_as_their_captions_say():
    seen = set()
    for k in range(60):
        images, caption, motion = sample_clip(np.random.default_rng([7, k]))
        seen.add(motion)
        words = caption.split()
        colour, shape, background = words[1], words[2], words[-2]
        track = []
        for image in images:
            d = detect(image)
            assert d.background == background and [(o.colour, o.shape) for o in d.objects] == [(colour, shape)]
            track.append(d.objects[0])
        assert _moves(track, motion), (caption, [(round(o.cx, 2), round(o.cy, 2), round(o.area, 3)) for o in track])
        others = [m for m in MOTIONS if m != motion and m not in ("growing", "shrinking")][:1]
        assert not any(_moves(track, m) for m in others if motion not in ("growing", "shrinking"))
    assert seen == set(MOTIONS)


def test_held_out_combinations_stay_out_of_training():
    prompts = held_out_prompts(32)
    assert len(prompts) == 32 and len(set(prompts)) == 32
    assert {" ".join(p.split()[3:-4]) for p in prompts} == set(MOTIONS)   # every motion is asked for
    for k in range(2000):
        _, caption, motion = sample_clip(np.random.default_rng([8, k]))
        words = caption.split()
        assert not is_held_out(words[1], words[2], motion, words[-2])
        assert caption not in prompts


def test_a_short_run_exports_a_module_for_the_bundled_model(tmp_path):
    import sfumato

    torch.set_num_threads(2)
    recipe = MotionRecipe()
    recipe = replace(recipe, loop=replace(recipe.loop, steps=2, batch_size=2, warmup=0, decay_start=None,
                                          ema_decay=None, progress=False))
    path = train_motion(recipe, tmp_path / "run")
    adapter = load_motion_module(path)
    assert adapter.cfg == BUNDLED_MOTION
    pipe = sfumato.load(None, dtype="fp32", device="cpu")
    assert motion_fits(adapter.cfg, pipe.model.spec.unet) is None
    assert path.stat().st_size < 4_000_000
    clip = pipe.animate("a red circle moving to the right on a blue background", motion_module=path, frames=3,
                        steps=2, seed=1, watermark=False)
    assert len(clip.frames) == 3 and clip.frames[0].size == (64, 64)


def test_the_bundled_module_is_the_default_for_the_bundled_model(tmp_path, capsys):
    """A fresh install animates: the bundled model's motion module ships, loads, fits and is what
    `sfumato animate` uses when none is named (another model must name one)."""
    from PIL import Image

    from sfumato.cli import main
    from sfumato.data import BUNDLED_MOTION_PATH

    assert BUNDLED_MOTION_PATH.is_file() and BUNDLED_MOTION_PATH.stat().st_size < 4_000_000
    assert load_motion_module(BUNDLED_MOTION_PATH).cfg == BUNDLED_MOTION
    out = tmp_path / "x.gif"
    assert main(["animate", "a red circle moving to the right on a blue background", "--frames", "3", "--steps", "2",
                 "--seed", "1", "-o", str(out)]) == 0
    gif = Image.open(out)
    assert gif.n_frames == 3 and b"model: bundled-motion" in gif.info["comment"]
