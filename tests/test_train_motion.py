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
                                  start_adapter, text_layers,
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
    pipe = sfumato.load(None, dtype="fp32", device="cpu")
    assert adapter.cfg == replace(BUNDLED_MOTION, text_kv=text_layers(pipe.model.unet), text_rank=4)
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
    cfg = load_motion_module(BUNDLED_MOTION_PATH).cfg   # AnimateDiff's layout, with text key/value deltas
    assert replace(cfg, text_kv=(), text_rank=0) == BUNDLED_MOTION and cfg.text_rank == 4 and len(cfg.text_kv) == 7
    out = tmp_path / "x.gif"
    assert main(["animate", "a red circle moving to the right on a blue background", "--frames", "3", "--steps", "2",
                 "--seed", "1", "-o", str(out)]) == 0
    gif = Image.open(out)
    assert gif.n_frames == 3 and b"model: bundled-motion" in gif.info["comment"]


def test_text_deltas_act_as_merged_key_and_value_weights(tmp_path):
    """A module's text key/value deltas, attached with it, give what the UNet gives with each delta
    (up · down) merged into its to_k / to_v weights (the temporal blocks at their identity start);
    saved and loaded, the module keeps them; a UNet without the steered attention is a typed error."""
    import copy

    import pytest

    import sfumato
    from sfumato.errors import ParamError
    from sfumato.models.motion import MotionAdapter
    from sfumato.pipeline.animate import motion_attached
    from sfumato.train.motion import export_motion

    unet = sfumato.load(None, dtype="fp32", device="cpu").model.unet
    adapter = start_adapter(unet, MotionRecipe(text_rank=3))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for kv in adapter.text_kv.values():
            for p in kv.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    merged = copy.deepcopy(unet)
    with torch.no_grad():
        for name, kv in adapter.text_kv.items():
            attn = merged.get_submodule(name.replace("__", "."))
            attn.to_k.weight += kv.k_up.weight @ kv.k_down.weight
            attn.to_v.weight += kv.v_up.weight @ kv.v_down.weight
    x = torch.randn(4, 4, 8, 8, generator=g)
    t = torch.full((4,), 300.0)
    context = torch.randn(4, 77, text_layers(unet)[0][1], generator=g)
    with torch.no_grad():
        with motion_attached(unet, adapter, lambda: 2):
            got = unet(x, t, context)
        plain = unet(x, t, context)
        want = merged(x, t, context)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert (plain - want).abs().max() > 1e-3
    path = export_motion(adapter, tmp_path / "m.safetensors")
    loaded = load_motion_module(path)
    assert loaded.cfg.text_rank == 3 and loaded.cfg.text_kv == adapter.cfg.text_kv
    assert isinstance(loaded, MotionAdapter) and set(loaded.text_kv) == set(adapter.text_kv)
    from sfumato.checkpoint.io import load_file, save_file
    from sfumato.errors import CheckpointError

    sd, _ = load_file(path)
    name = next(iter(adapter.text_kv))
    bad = dict(sd, **{f"text_kv.{name}.k_down.weight": torch.zeros(5, sd[f"text_kv.{name}.k_down.weight"].shape[1])})
    save_file(bad, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match="different ranks"):
        load_motion_module(tmp_path / "bad.safetensors")
    other = copy.deepcopy(unet)
    other.get_submodule(name.replace("__", ".")).to_k = torch.nn.Linear(7, 3, bias=False)
    with pytest.raises(ParamError, match="does not fit"):
        with motion_attached(other, loaded, lambda: 2):
            pass
    other = copy.deepcopy(unet)
    del other.middle_block[1].transformer_blocks[0].attn2
    with pytest.raises(ParamError, match="text adapter steers middle_block") as e:
        with motion_attached(other, loaded, lambda: 2):
            pass
    assert e.value.field == "motion_module"
