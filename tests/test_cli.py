"""The command line: outputs, batches, and bad input → one-line error, exit status 2, nothing written."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from sfumato.cli import main


def run(args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def txt2img(model, out, *extra):
    return ["txt2img", "a blue square", "--model", model, "--steps", "3", "--seed", "5",
            "--width", "64", "--height", "64", "-o", out, *extra]


def test_batch_writes_numbered_files_with_infotext(tiny_model, tmp_path, capsys):
    code, out, _ = run(txt2img(tiny_model, tmp_path / "out.png", "--batch-size", "2"), capsys)
    assert code == 0
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["out-0.png", "out-1.png"]
    info = Image.open(tmp_path / "out-1.png").info["parameters"]
    assert info.startswith("a blue square\n")
    assert "Steps: 3, Sampler: Euler, Schedule type: Automatic, CFG scale: 7, Seed: 6, Size: 64x64" in info
    assert "seed=5" in out and "seed=6" in out


def test_batch_item_equals_single_run_with_its_seed(tiny_model, tmp_path, capsys):
    assert run(txt2img(tiny_model, tmp_path / "b.png", "--batch-size", "2"), capsys)[0] == 0
    assert run(txt2img(tiny_model, tmp_path / "s.png", "--seed", "6"), capsys)[0] == 0
    a = np.asarray(Image.open(tmp_path / "b-1.png"))
    b = np.asarray(Image.open(tmp_path / "s.png"))
    assert np.array_equal(a, b)
    assert a.std() > 0


def test_random_seed_is_reported(tiny_model, tmp_path, capsys):
    code, out, _ = run(txt2img(tiny_model, tmp_path / "r.png", "--seed", "-1"), capsys)
    assert code == 0
    seed = int(out.split("seed=")[1])
    assert f"Seed: {seed}," in Image.open(tmp_path / "r.png").info["parameters"]


@pytest.mark.parametrize("extra, field", [
    (["--width", "65"], "width"),
    (["--steps", "0"], "steps"),
    (["--sampler", "nope"], "sampler"),
    (["--scheduler", "nope"], "scheduler"),
    (["--batch-size", "0"], "batch_size"),
])
def test_bad_parameters(tiny_model, tmp_path, capsys, extra, field):
    code, _, err = run(txt2img(tiny_model, tmp_path / "x.png", *extra), capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("sfumato: error: ") and field in err
    assert "Traceback" not in err
    assert not any(tmp_path.iterdir())


def test_unknown_sampler_lists_valid_ones(tiny_model, tmp_path, capsys):
    _, _, err = run(txt2img(tiny_model, tmp_path / "x.png", "--sampler", "nope"), capsys)
    assert "euler" in err


def test_missing_model_file(tmp_path, capsys):
    code, _, err = run(txt2img(tmp_path / "nope.safetensors", tmp_path / "x.png"), capsys)
    assert code == 2 and "not found" in err and err.count("\n") == 1
    assert not (tmp_path / "x.png").exists()


def test_truncated_safetensors(tiny_model, tmp_path, capsys):
    cut = tmp_path / "cut.safetensors"
    data = tiny_model.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    code, _, err = run(txt2img(cut, tmp_path / "x.png"), capsys)
    assert code == 2 and "truncated" in err and err.count("\n") == 1
    code, _, err = run(["info", cut], capsys)
    assert code == 2 and "truncated" in err


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("name, how", [("evil.ckpt", "zip"), ("evil.pt", "pickle"), ("evil.safetensors", "pickle")])
def test_malicious_checkpoint_via_cli(tmp_path, capsys, name, how):
    marker = str(tmp_path / "payload-ran")
    path = tmp_path / name
    obj = {"state_dict": {"w": torch.zeros(1)}, "x": _Evil(marker)}
    if how == "zip":
        torch.save(obj, path)
    else:
        path.write_bytes(pickle.dumps(obj))
    code, _, err = run(txt2img(path, tmp_path / "x.png"), capsys)
    assert code == 2 and "mkdir" in err
    assert not os.path.exists(marker)
    assert not (tmp_path / "x.png").exists()


def test_info_on_tiny_model(tiny_model, capsys):
    code, out, _ = run(["info", tiny_model], capsys)
    assert code == 0 and "custom" in out and "model_hash" in out


def test_bench_is_a_subcommand_with_its_own_options(capsys):
    """`sfumato bench` reaches the benchmark's parser (its options, not the generation ones)."""
    with pytest.raises(SystemExit) as e:
        main(["bench", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: sfumato bench") and "--quick" in out and "--sdxl" in out
    with pytest.raises(SystemExit) as e:
        main(["bench", "--only", "nonsense"])
    assert e.value.code == 2 and "unknown part" in capsys.readouterr().err
