"""Hostile files × every entry point that loads a file (issue 15's table).

Each crafted file — pickle payloads in every container torch reads, crafted safetensors headers,
deep nesting, shared-reference expansion, stride tricks, truncation, NaN/Inf weights, image bombs —
goes through every way a user or a client can have sfumato load it: a checkpoint, a VAE, a LoRA
(merged and by prompt tag), an embedding (file and PNG), a hypernetwork, a ControlNet, a TAESD
decoder, a merge input, a training resume state, and the server by name. For each: no payload
runs, the refusal takes under 2 s and 200 MB, and it is exit status 2 with one line (CLI) or a 4xx
(server).
"""

from __future__ import annotations

import gc
import io
import json
import os
import pickle
import shutil
import struct
import threading
import time
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image, PngImagePlugin

from sfumato.checkpoint.io import load_file, save_file
from sfumato.cli import main
from sfumato.server.app import ServerConfig, create_app
from sfumato.train.bundled import BUNDLED_PATH
from test_hardening import bomb_png, deep_pickle, deep_safetensors, lora_file, shared_checkpoint, zip_pickle

MAX_SECONDS = 2.0
MAX_BYTES = 200 << 20


# -- the payloads: each would create the marker file if it ran --------------------------------------

def _global_payload(marker: Path, protocol: int) -> bytes:
    """A pickle that calls os.system("touch MARKER") (GLOBAL / STACK_GLOBAL + REDUCE)."""

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    return pickle.dumps({"w": Payload()}, protocol=protocol)


def _exec_payload(marker: Path) -> bytes:
    class Payload:
        def __reduce__(self):
            return exec, (f"open({str(marker)!r}, 'w').close()",)

    return pickle.dumps(Payload(), protocol=2)


def _inst_payload(marker: Path) -> bytes:
    """Protocol 0's INST opcode: builds os.system(...)."""
    return b"(S'touch " + str(marker).encode() + b"'\nios\nsystem\np0\n."


def _legacy(pkl: bytes) -> bytes:
    """torch's legacy (pre-zip) format: magic number, protocol, system info pickles, then the object."""
    out = io.BytesIO()
    pickle.dump(0x1950A86A20F9469CFC6C, out, protocol=2)
    pickle.dump(1001, out, protocol=2)
    pickle.dump({"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}},
                out, protocol=2)
    out.write(pkl)
    pickle.dump([], out, protocol=2)
    return out.getvalue()


def _safetensors(header: dict | bytes, data: bytes = b"") -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _f32(name: str, shape: list, offsets: list) -> dict:
    return {name: {"dtype": "F32", "shape": shape, "data_offsets": offsets}}


def _tensor_file(path: Path, tensors: dict) -> bytes:
    save_file(tensors, path)
    return path.read_bytes()


def _png_with_text(key: str, text: str) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text(key, text)
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def _crafted(tmp: Path, marker: Path) -> dict[str, tuple[str, bytes]]:
    """name → (suffix, bytes) of every crafted file."""
    tmp.mkdir(parents=True, exist_ok=True)
    files: dict[str, tuple[str, bytes]] = {}

    def zipped(pkl: bytes) -> bytes:
        return zip_pickle(tmp / "z.pt", pkl).read_bytes()

    for protocol in (2, 4, 5):
        files[f"zip-os.system-p{protocol}"] = (".pt", zipped(_global_payload(marker, protocol)))
        files[f"raw-os.system-p{protocol}"] = (".pt", _global_payload(marker, protocol))
    files["zip-exec"] = (".pt", zipped(_exec_payload(marker)))
    files["zip-inst-p0"] = (".pt", zipped(_inst_payload(marker)))
    files["legacy-os.system"] = (".pt", _legacy(_global_payload(marker, 2)))
    files["legacy-exec"] = (".pt", _legacy(_exec_payload(marker)))
    files["mislabelled-safetensors"] = (".safetensors", zipped(_global_payload(marker, 2)))
    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    nested = pickle.dumps({"state_dict": {"a": [{"b": Payload()}]}}, protocol=2)
    files["zip-nested-payload"] = (".ckpt", zipped(nested))
    # structure
    files["deep-pickle-zip"] = (".pt", zipped(deep_pickle(100_000)))
    files["deep-pickle-legacy"] = (".pt", _legacy(deep_pickle(100_000)[2:]))
    files["shared-expansion"] = (".ckpt", shared_checkpoint(tmp / "s.ckpt", 22).read_bytes())
    expand = io.BytesIO()
    torch.save({"w": torch.zeros(1).as_strided((100_000, 100_000), (0, 0))}, expand)
    files["stride-zero-expansion"] = (".pt", expand.getvalue())
    good = io.BytesIO()
    torch.save({"w": torch.zeros(64)}, good)
    files["truncated-zip"] = (".pt", good.getvalue()[: len(good.getvalue()) // 2])
    files["deep-header"] = (".safetensors", deep_safetensors(tmp / "d.safetensors").read_bytes())
    files["header-past-end"] = (".safetensors", struct.pack("<Q", 10_000) + b'{"a":1}')
    files["header-2^63"] = (".safetensors", struct.pack("<Q", 1 << 63) + b"{" + b" " * 20)
    files["header-not-json"] = (".safetensors", _safetensors(b"{not json at all}"))
    files["header-array"] = (".safetensors", _safetensors(b"[1, 2, 3]"))
    files["header-bad-dtype"] = (".safetensors", _safetensors({"w": {"dtype": "X99", "shape": [1],
                                                                      "data_offsets": [0, 4]}}, b"\0" * 4))
    files["header-negative-shape"] = (".safetensors", _safetensors(_f32("w", [-1, 4], [0, 16]), b"\0" * 16))
    files["header-float-shape"] = (".safetensors", _safetensors(_f32("w", [2.5], [0, 10]), b"\0" * 10))
    files["offsets-past-data"] = (".safetensors", _safetensors(_f32("w", [1 << 30], [0, 4 << 30]), b"\0" * 16))
    files["offsets-reversed"] = (".safetensors", _safetensors(_f32("w", [1], [8, 4]), b"\0" * 8))
    files["offsets-overlap"] = (".safetensors", _safetensors({**_f32("a", [4], [0, 16]), **_f32("b", [4], [8, 24])},
                                                             b"\0" * 24))
    files["offsets-size-mismatch"] = (".safetensors", _safetensors(_f32("w", [1000, 1000], [0, 16]), b"\0" * 16))
    files["metadata-not-strings"] = (".safetensors", _safetensors({"__metadata__": {"a": [1, 2]},
                                                                   **_f32("w", [1], [0, 4])}, b"\0" * 4))
    many = b"{" + b",".join(b'"t%d":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}' % i
                            for i in range(450_000)) + b"}"
    files["header-450k-entries"] = (".safetensors", _safetensors(many))
    files["empty"] = (".pt", b"")
    files["text"] = (".pt", b"just some text, no weights\n")
    files["html"] = (".safetensors", b"<!DOCTYPE html><html><body>404</body></html>")
    files["git-lfs-pointer"] = (".safetensors", b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 1\n")
    files["gguf"] = (".safetensors", b"GGUF\x03\x00\x00\x00" + b"\0" * 32)
    files["no-tensors"] = (".safetensors", _safetensors({}))
    files["nan-tensor"] = (".safetensors", _tensor_file(tmp / "n.safetensors", {"w": torch.full((4, 4), float("nan"))}))
    files["inf-tensor"] = (".safetensors", _tensor_file(tmp / "i.safetensors", {"w": torch.full((4, 4), float("inf"))}))
    nan_lora = lora_file(tmp / "nl.safetensors", 0)
    sd = {k: v.clone() for k, v in load_file(nan_lora)[0].items()}
    next(v for k, v in sd.items() if k.endswith("down.weight"))[0, 0] = float("nan")
    files["nan-lora"] = (".safetensors", _tensor_file(tmp / "nl2.safetensors", sd))
    files["nan-embedding"] = (".safetensors", _tensor_file(tmp / "ne.safetensors",
                                                           {"emb_params": torch.full((2, 64), float("nan"))}))
    files["png-bomb"] = (".png", bomb_png(tmp / "b.png").read_bytes())
    files["png-deep-json"] = (".png", _png_with_text("sd-ti-embedding", __import__("base64").b64encode(
        b"[" * 100_000 + b"]" * 100_000).decode()))
    files["png-not-base64"] = (".png", _png_with_text("sd-ti-embedding", "%%% not base64 %%%"))
    return files


# -- running one entry point with the time and memory it takes -------------------------------------

def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _Peak:
    """The resident set's peak above its level at the start, sampled every millisecond."""

    def __enter__(self):
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def grew(self) -> int:
        return self.peak - self.base


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    marker = root / "PAYLOAD-RAN"
    files = _crafted(root / "crafted", marker)
    control = root / "control.png"
    Image.new("RGB", (64, 64), "white").save(control)
    # the server's models folder holds every crafted file under each kind's folder
    models = root / "models"
    for sub in ("Lora", "VAE", "embeddings", "hypernetworks"):
        (models / sub).mkdir(parents=True)
    for i, (name, (suffix, data)) in enumerate(files.items()):
        (models / f"m{i}.ckpt").write_bytes(data)
        (models / "VAE" / f"v{i}.pt").write_bytes(data)
        (models / "Lora" / f"l{i}{suffix if suffix != '.png' else '.pt'}").write_bytes(data)
        (models / "hypernetworks" / f"h{i}.pt").write_bytes(data)
        (models / "embeddings" / f"e{i}{suffix if suffix in ('.safetensors', '.png') else '.pt'}").write_bytes(data)
    return root, marker, files, control


def _cli_cases(root: Path, control: Path):
    """entry point → a function (index, path of the crafted file) → argv."""
    out = str(root / "out.png")
    common = ["--steps", "1", "-o", out]

    def folder(kind: str, i: int, path: Path, suffix: str | None = None) -> str:
        d = root / f"{kind}-{i}"
        d.mkdir(exist_ok=True)
        shutil.copy(path, d / f"evil{suffix or path.suffix}")
        return str(d)

    return {
        "checkpoint": lambda i, p: ["txt2img", "x", "--model", str(p), *common],
        "info": lambda i, p: ["info", str(p)],
        "vae": lambda i, p: ["txt2img", "x", "--vae", str(p), *common],
        "lora merged": lambda i, p: ["txt2img", "x", "--lora", f"{p}:0.5", *common],
        "lora tag": lambda i, p: ["txt2img", "x <lora:evil:0.5>", "--lora-dir",
                                  folder("lora", i, p, ".pt" if p.suffix == ".png" else None), *common],
        "embedding": lambda i, p: ["txt2img", "x evil", "--embeddings",
                                   folder("emb", i, p, ".safetensors" if p.suffix == ".safetensors" else ".pt"),
                                   *common],
        "embedding as png": lambda i, p: ["txt2img", "x evil", "--embeddings", folder("png", i, p, ".png"), *common],
        "hypernetwork": lambda i, p: ["txt2img", "x <hypernet:evil>", "--hypernet-dir",
                                      folder("hyper", i, p, ".pt"), *common],
        "controlnet": lambda i, p: ["txt2img", "x", "--control-model", str(p), "--control-image", str(control),
                                    *common],
        "taesd": lambda i, p: ["txt2img", "x", "--vae-decoder", f"taesd:{p}", *common],
        "annotator": lambda i, p: ["pose", "detect", "--image", str(control), "--openpose", str(p), "-o", out],
        "motion module": lambda i, p: ["animate", "x", "--motion-module", str(p), "--steps", "1", "--frames", "2",
                                       "-o", str(root / "out.gif")],
        "merge A": lambda i, p: ["merge", str(p), str(BUNDLED_PATH), "--alpha", "0.5", "--no-progress",
                                 "-o", str(root / "merged.safetensors")],
        "merge B": lambda i, p: ["merge", str(BUNDLED_PATH), str(p), "--alpha", "0.5", "--no-progress",
                                 "-o", str(root / "merged.safetensors")],
        "training resume": lambda i, p: _resume_argv(root, i, p),
    }


def _resume_argv(root: Path, i: int, path: Path) -> list[str]:
    run = root / f"run-{i}"
    (run / "vae").mkdir(parents=True, exist_ok=True)
    shutil.copy(path, run / "vae" / "checkpoint.pt")
    return ["train", "vae", "--out", str(run), "--steps", "1", "--threads", "1"]


@pytest.fixture(autouse=True)
def _frozen_heap():
    """What earlier tests left in this process is set aside from garbage collection for the table: a
    full collection of a large test process's heap (seconds) is not the cost of a refusal."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


def test_hostile_files_through_the_command_line(world, capsys):
    root, marker, files, control = world
    cases = _cli_cases(root, control)
    assert len(files) >= 40
    # warm-up: imports and first allocations are the process's, not a refusal's
    assert main(["txt2img", "x", "--steps", "1", "--memory", "keep", "-o", str(root / "warm.png")]) == 0
    failures, worst = [], (0.0, 0)
    for i, (name, (suffix, data)) in enumerate(files.items()):
        path = root / "crafted" / f"file-{i}{suffix}"
        path.write_bytes(data)
        for entry, argv_of in cases.items():
            argv = argv_of(i, path)
            capsys.readouterr()
            start = time.monotonic()
            with _Peak() as peak:
                code = main(argv)
            seconds = time.monotonic() - start
            worst = (max(worst[0], seconds), max(worst[1], peak.grew))
            err = capsys.readouterr().err.strip()
            ok = code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
            for written in (root / "out.png", root / "merged.safetensors", root / "out.gif"):
                if written.exists():
                    ok = False
                    written.unlink()
            if not ok or seconds > MAX_SECONDS or peak.grew > MAX_BYTES or marker.exists():
                failures.append((name, entry, code, round(seconds, 2), peak.grew >> 20, err[-300:]))
    print(f"{len(files)} files x {len(cases)} CLI entry points: slowest {worst[0]:.2f} s, "
          f"most memory {worst[1] / 2**20:.0f} MiB")
    assert not marker.exists(), "a payload ran"
    assert not failures, "\n".join(map(str, failures))
    assert not (root / "out.png").exists() and not (root / "merged.safetensors").exists()


def test_hostile_files_through_the_server_by_name(world):
    root, marker, files, _ = world
    app = create_app(ServerConfig(models_dir=root / "models"))   # loads the embeddings folder too
    good = {"prompt": "a red circle", "steps": 1, "width": 64, "height": 64, "seed": 1}
    failures, worst = [], (0.0, 0)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        for i, name in enumerate(files):
            suffix = files[name][0]
            lora = f"l{i}{suffix if suffix != '.png' else '.pt'}"
            requests = {
                "checkpoint": {**good, "override_settings": {"sd_model_checkpoint": f"m{i}.ckpt"}},
                "vae": {**good, "override_settings": {"sd_vae": f"v{i}.pt"}},
                "lora": {**good, "prompt": f"x <lora:{lora.rsplit('.', 1)[0]}:0.5>"},
                "hypernetwork": {**good, "prompt": f"x <hypernet:h{i}>"},
                "embedding": {**good, "prompt": f"x e{i}"},
            }
            for entry, body in requests.items():
                start = time.monotonic()
                with _Peak() as peak:
                    r = client.post("/sdapi/v1/txt2img", json=body)
                seconds = time.monotonic() - start
                worst = (max(worst[0], seconds), max(worst[1], peak.grew))
                if not 400 <= r.status_code < 500 or seconds > MAX_SECONDS or peak.grew > MAX_BYTES:
                    failures.append((name, entry, r.status_code, round(seconds, 2), peak.grew >> 20, r.text[:300]))
                elif str(root) in r.text:
                    failures.append((name, entry, "path in the answer", r.text[:300]))
        assert client.post("/sdapi/v1/txt2img", json=good).status_code == 200
    print(f"{len(files)} files x 5 server entry points: slowest {worst[0]:.2f} s, most memory {worst[1] / 2**20:.0f} MiB")
    assert not marker.exists(), "a payload ran"
    assert not failures, "\n".join(map(str, failures))
