"""The shapes-world annotator recipe (``sfumato train annotator``): its truth (edges where the visible
label changes, depth near = 1 with the front object nearest and a floor behind), and a short run per
kind writes a file under the published name that the preprocessors load by its keys."""

from __future__ import annotations

import numpy as np
import pytest

from sfumato.checkpoint.annotators import load_annotator
from sfumato.cli import main
from sfumato.train.annotators import FILES, AnnotatorRecipe, train_annotator, truth
from sfumato.train.loop import LoopConfig
from sfumato.train.shapes import Obj, Scene


def test_truth_of_a_known_scene():
    back = Obj("square", "red", 0.35, 0.5, 0.4)
    front = Obj("square", "blue", 0.6, 0.5, 0.4)
    edges, depth = truth(Scene((back, front), "white"))
    # on row 32 the back square covers x 9…24 and the front one 25…50 (it hides the overlap)
    row = 32
    assert depth[row, 40] == pytest.approx(1.0) and depth[row, 15] == pytest.approx(0.7)
    assert depth[0, 0] == pytest.approx(0.1) and depth[63, 0] == pytest.approx(0.4)
    assert depth[row, 60] == pytest.approx(0.1 + 0.3 * 32 / 63)
    assert [x for x in range(64) if edges[row, x]] == [8, 9, 24, 25, 50, 51]   # two pixels across each change
    assert 0.05 < edges.mean() < 0.2


@pytest.mark.parametrize("kind", ["hed", "lineart"])
def test_a_short_run_writes_a_loadable_file(kind, tmp_path):
    recipe = AnnotatorRecipe(kind=kind, loop=LoopConfig(steps=2, batch_size=2, lr=1e-4, progress=False,
                                                        checkpoint_every=100))
    path = train_annotator(recipe, tmp_path)
    assert path.name == f"{FILES[kind]}.safetensors"
    net = load_annotator(path, kind)
    assert sum(p.numel() for p in net.parameters()) > 1_000_000


def test_eval_needs_a_file(capsys):
    assert main(["eval", "annotators"]) == 2
    assert "--hed" in capsys.readouterr().err
