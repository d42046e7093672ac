"""``sfumato batch``: job files, per-line settings, up-front validation, resuming after a kill, and
the Ray Data path giving the same images as one process. Bundled model, 64x64, a few steps."""

from __future__ import annotations

import csv
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sfumato.cli import main
from sfumato.pipeline.infotext import parse_infotext

FAST = ["--steps", "3", "--width", "64", "--height", "64", "--threads", "1", "--no-progress"]


def run(args, capsys):
    code = main(["batch", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def pixels(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


def manifest(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]


def infotext(path: Path) -> dict[str, str]:
    return parse_infotext(Image.open(path).info["parameters"])


# -- file formats and per-line settings --------------------------------------------------------

ROWS = [
    {"prompt": "a red circle on a blue background"},
    {"prompt": "a green square, on a black background", "steps": 4, "sampler": "DPM++ 2M", "cfg_scale": 5,
     "negative_prompt": "blurry", "seed": 123},
    {"prompt": "a yellow triangle", "batch_size": 2, "width": 48, "scheduler": "karras"},
]


def check_overrides(out: Path) -> None:
    assert sorted(p.name for p in out.glob("*.png")) == ["00000-0.png", "00001-0.png", "00002-0.png", "00002-1.png"]
    first = infotext(out / "00000-0.png")
    assert first["Prompt"] == "a red circle on a blue background"
    assert (first["Steps"], first["Sampler"], first["CFG scale"], first["Seed"]) == ("3", "Euler", "7", "10")
    assert (first["Size-1"], first["Size-2"]) == ("64", "64")
    second = infotext(out / "00001-0.png")
    assert second["Prompt"] == "a green square, on a black background"
    assert second["Negative prompt"] == "blurry"
    assert (second["Steps"], second["Sampler"], second["CFG scale"], second["Seed"]) == ("4", "DPM++ 2M", "5", "123")
    third = [infotext(out / f"00002-{k}.png") for k in range(2)]
    assert [t["Seed"] for t in third] == ["12", "13"]          # base seed 10 + job index 2, then + k
    assert third[0]["Schedule type"] == "Karras"
    assert Image.open(out / "00002-1.png").size == (48, 64)


def test_jsonl_and_csv_honour_per_line_settings(tmp_path, capsys):
    jsonl = write_jsonl(tmp_path / "jobs.jsonl", ROWS)
    header = ["prompt", "negative_prompt", "steps", "sampler", "cfg_scale", "seed", "batch_size", "width", "scheduler"]
    table = write_csv(tmp_path / "jobs.csv", header, [[row.get(name, "") for name in header] for row in ROWS])
    for jobs, out in ((jsonl, tmp_path / "a"), (table, tmp_path / "b")):
        code, stdout, err = run([jobs, "--out", out, "--seed", 10, *FAST], capsys)
        assert code == 0, err
        check_overrides(out)
    a, b = pixels(tmp_path / "a"), pixels(tmp_path / "b")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["00002-0.png"], a["00002-1.png"])
    entries = manifest(tmp_path / "a")
    assert [e["index"] for e in entries] == [0, 1, 2]
    assert entries[1]["line"] == 2 and entries[2]["seeds"] == [12, 13]
    assert entries[2]["files"] == ["00002-0.png", "00002-1.png"]


# -- validation: one line naming the line and the field, nothing written ------------------------

GOOD = '{"prompt": "a red circle"}\n'


@pytest.mark.parametrize("name, text, message", [
    ("sampler.jsonl", GOOD + '{"prompt": "a blue square", "sampler": "nope"}\n',
     "line 2: sampler: unknown sampler 'nope'"),
    ("width.jsonl", GOOD + GOOD + '{"prompt": "x", "width": 100}\n', "line 3: width: must be a multiple of 8, got 100"),
    ("prompt.jsonl", GOOD + '{"steps": 4}\n', "line 2: prompt: missing"),
    ("json.jsonl", GOOD + '{"prompt": "a red circle"\n', "line 2: invalid JSON"),
    ("field.jsonl", GOOD + '{"prompt": "x", "stpes": 4}\n', "line 2: stpes: unknown field"),
    ("blank.jsonl", GOOD + "\n" + '{"prompt": "x", "steps": 0}\n', "line 3: steps: must be in [1, 1000], got 0"),
    ("steps.csv", "prompt,steps\na red circle,3\na blue square,abc\n", "line 3: steps: must be an integer, got 'abc'"),
    ("column.csv", "prompt,sampler,colour\nx,euler,red\n", "line 1: colour: unknown column"),
    ("noprompt.csv", "steps\n3\n", "line 1: prompt: missing column"),
])
def test_bad_line_is_one_line_error_and_nothing_is_written(tmp_path, capsys, name, text, message):
    jobs = tmp_path / name
    jobs.write_text(text)
    code, _, err = run([jobs, "--out", tmp_path / "out", *FAST], capsys)
    assert code == 2
    assert err.startswith(f"sfumato: error: {message}")
    assert err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_every_line_is_checked_before_any_work(tmp_path, capsys):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(GOOD + '{"prompt": "x", "sampler": "nope"}\n' + GOOD + '{"prompt": "x", "height": 100}\n')
    code, _, err = run([jobs, "--out", tmp_path / "out", *FAST], capsys)
    assert code == 2
    assert "line 2: sampler:" in err and "(and 1 more bad line)" in err
    assert not (tmp_path / "out").exists()


def test_missing_model_is_reported_before_any_work(tmp_path, capsys):
    jobs = write_jsonl(tmp_path / "jobs.jsonl", ROWS[:1])
    code, _, err = run([jobs, "--out", tmp_path / "out", "--model", tmp_path / "none.safetensors", *FAST], capsys)
    assert code == 2 and "--model:" in err and "none.safetensors not found" in err
    assert not (tmp_path / "out").exists()


def test_rerun_with_other_settings_is_refused(tmp_path, capsys):
    jobs = write_jsonl(tmp_path / "jobs.jsonl", ROWS[:1])
    assert run([jobs, "--out", tmp_path / "out", *FAST], capsys)[0] == 0
    code, _, err = run([jobs, "--out", tmp_path / "out", *FAST, "--cfg-scale", "3"], capsys)
    assert code == 2
    assert "item 0 (line 1) was made with other settings (cfg_scale)" in err


# -- resuming ----------------------------------------------------------------------------------

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow")


def shape_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        row: dict = {"prompt": f"a {COLOURS[i % 4]} {SHAPES[i % 3]} on a {COLOURS[(i + 1) % 4]} background"}
        if i % 5 == 1:
            row["sampler"] = "euler_a"
        if i % 7 == 3:
            row.update(batch_size=2, cfg_scale=4)
        if i % 6 == 4:
            row["steps"] = 2
        rows.append(row)
    return rows


def complete_lines(path: Path) -> list[dict]:
    text = path.read_text() if path.exists() else ""
    return [json.loads(line) for line in text.split("\n")[:-1]]


def test_killed_run_resumes_without_redoing_finished_items(tmp_path, capsys):
    n = 30
    jobs = write_jsonl(tmp_path / "jobs.jsonl", shape_rows(n))
    out = tmp_path / "out"
    args = [str(jobs), "--out", str(out), *FAST]
    proc = subprocess.Popen([sys.executable, "-m", "sfumato.cli", "batch", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while len(complete_lines(out / "manifest.jsonl")) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, "the batch did not start"
            time.sleep(0.005)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finished = complete_lines(out / "manifest.jsonl")
    assert 3 <= len(finished) < n
    kept = {name: (out / name).stat() for e in finished for name in e["files"]}
    # the output of an unfinished job, cut short, and a torn manifest line: both must be redone
    pending = next(i for i in range(n) if i not in {e["index"] for e in finished})
    (out / f"{pending:05d}-0.png").write_bytes(b"\x89PNG partial")
    with (out / "manifest.jsonl").open("a") as f:
        f.write('{"index": 29, "files": ["000')

    code, stdout, err = run(args, capsys)
    assert code == 0, err
    assert f"{n - len(finished)} generated now, {len(finished)} already there" in stdout
    for name, before in kept.items():
        after = (out / name).stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), name
    entries = manifest(out)
    assert sorted(e["index"] for e in entries) == list(range(n))
    assert entries[:len(finished)] == finished

    fresh = tmp_path / "fresh"
    assert run([jobs, "--out", fresh, *FAST], capsys)[0] == 0
    a, b = pixels(out), pixels(fresh)
    assert a.keys() == b.keys() and len(a) == n + sum(r.get("batch_size", 1) - 1 for r in shape_rows(n))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    by_index = {e["index"]: e for e in manifest(fresh)}
    assert all(by_index[e["index"]]["sha256"] == e["sha256"] for e in entries)
    assert not list(out.glob(".*.tmp"))


def test_missing_file_is_regenerated(tmp_path, capsys):
    jobs = write_jsonl(tmp_path / "jobs.jsonl", ROWS[:2])
    out = tmp_path / "out"
    assert run([jobs, "--out", out, *FAST], capsys)[0] == 0
    original = np.asarray(Image.open(out / "00001-0.png"))
    untouched = (out / "00000-0.png").stat().st_ino
    (out / "00001-0.png").unlink()
    code, stdout, _ = run([jobs, "--out", out, *FAST], capsys)
    assert code == 0 and "1 generated now, 1 already there" in stdout
    assert np.array_equal(np.asarray(Image.open(out / "00001-0.png")), original)
    assert (out / "00000-0.png").stat().st_ino == untouched
    assert sorted(e["index"] for e in manifest(out)) == [0, 1]


# -- Ray Data ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING,
             object_store_memory=100 * 1024**2)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_ray_run_equals_single_process_run(tmp_path, capsys, ray_cluster):
    rows = shape_rows(20)
    rows[0].update(negative_prompt="green", seed=77)
    rows[2].update(scheduler="karras", sampler="dpmpp_2m", steps=4)
    jobs = write_jsonl(tmp_path / "jobs.jsonl", rows)
    common = ["--steps", "3", "--width", "64", "--height", "64", "--seed", "1000", "--no-progress"]
    assert run([jobs, "--out", tmp_path / "local", *common, "--threads", "1"], capsys)[0] == 0
    code, stdout, err = run([jobs, "--out", tmp_path / "ray", *common, "--ray", "--workers", "2"], capsys)
    assert code == 0, err
    assert "20 generated now" in stdout
    local, remote = pixels(tmp_path / "local"), pixels(tmp_path / "ray")
    assert len(local) == 20 + sum(r.get("batch_size", 1) - 1 for r in rows)
    assert local.keys() == remote.keys()
    for name in local:
        assert np.array_equal(local[name], remote[name]), name
    by_index = {e["index"]: e for e in manifest(tmp_path / "ray")}
    assert sorted(by_index) == list(range(20))
    for e in manifest(tmp_path / "local"):
        assert by_index[e["index"]] == e
    assert infotext(tmp_path / "ray" / "00001-0.png")["Seed"] == "1001"


@pytest.mark.slow
def test_ray_refuses_a_pool_the_cluster_cannot_hold(tmp_path, capsys, ray_cluster):
    jobs = write_jsonl(tmp_path / "jobs.jsonl", ROWS[:1])
    code, _, err = run([jobs, "--out", tmp_path / "out", *FAST, "--ray", "--workers", "3"], capsys)
    assert code == 2 and "--workers: 3 workers × 1 threads" in err
