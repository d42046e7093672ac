"""Checkpoint file I/O: safetensors round trips, the pickle allow-list, corrupt files, hashing."""

from __future__ import annotations

import builtins
import hashlib
import os
import pickle
import sys
import types

import numpy as np
import pytest
import safetensors.torch
import torch

from sfumato.checkpoint.io import load_file, read_metadata, save_file, sha256_file, sniff_format
from sfumato.errors import CheckpointError, SfumatoError, UnsafeCheckpointError


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.diffusion_model.w": torch.randn(4, 3, generator=g),
        "first_stage_model.b": torch.randn(5, generator=g).half(),
        "cond_stage_model.e": torch.randn(2, 2, generator=g).bfloat16(),
    }


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


# --- good files --------------------------------------------------------------------------------


def test_safetensors_round_trip(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file(_tensors(), path, metadata={"modelspec.title": "x", "ss_network_dim": "8"})
    got, meta = load_file(path)
    _assert_same(got, _tensors())
    assert meta == {"modelspec.title": "x", "ss_network_dim": "8"}
    assert read_metadata(path) == meta
    assert os.listdir(tmp_path) == ["m.safetensors"]  # no temp file left behind
    save_file({"a": torch.ones(1)}, path)
    assert read_metadata(path) == {} and sniff_format(path) == "safetensors"


def test_save_failure_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    save_file(_tensors(), path)
    before = path.read_bytes()
    with pytest.raises(ValueError):
        save_file({"a": [1, 2]}, path)  # not a tensor: safetensors refuses it
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["m.safetensors"]

    def half_write(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", half_write)
    with pytest.raises(OSError, match="disk full"):
        save_file(_tensors(), path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["m.safetensors"]


@pytest.mark.parametrize("zipped", [True, False], ids=["torch-zip", "torch-legacy"])
def test_torch_save_state_dict(tmp_path, zipped):
    path = tmp_path / "m.pt"
    torch.save(_tensors(), path, _use_new_zipfile_serialization=zipped)
    assert sniff_format(path) == ("torch-zip" if zipped else "torch-legacy")
    got, meta = load_file(path)
    _assert_same(got, _tensors())
    assert meta == {} and read_metadata(path) == {}


@pytest.mark.parametrize("zipped", [True, False], ids=["torch-zip", "torch-legacy"])
def test_lightning_checkpoint(tmp_path, monkeypatch, zipped):
    """An SD 1.x-shaped .ckpt: its pickle names Lightning's ModelCheckpoint and a numpy global_step."""
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    fake = types.ModuleType(names[-1])
    fake.ModelCheckpoint = type("ModelCheckpoint", (), {"__module__": names[-1]})
    state = {"model.diffusion_model.w": torch.nn.Parameter(torch.randn(3, 2)), "model_ema.decay": torch.tensor(0.9999)}
    ckpt = {
        "epoch": 6,
        "global_step": np.int64(470000),
        "pytorch-lightning_version": "1.4.2",
        "state_dict": state,
        "callbacks": {fake.ModelCheckpoint: {"monitor": None, "best_model_score": torch.tensor(0.5)}},
        "optimizer_states": [],
        "lr_schedulers": [],
    }
    path = tmp_path / "sd-v1.ckpt"
    with monkeypatch.context() as m:
        for name in names:
            m.setitem(sys.modules, name, fake if name == names[-1] else types.ModuleType(name))
        torch.save(ckpt, path, _use_new_zipfile_serialization=zipped)
    assert not any(n in sys.modules for n in names)
    assert b"pytorch_lightning.callbacks.model_checkpoint" in path.read_bytes()  # the pickle really names it
    got, _ = load_file(path)
    assert sorted(got) == sorted(state)
    assert not got["model.diffusion_model.w"].requires_grad
    assert torch.equal(got["model.diffusion_model.w"], state["model.diffusion_model.w"].detach())


def test_nested_objects_keep_dotted_paths(tmp_path):
    emb = torch.nn.Parameter(torch.randn(2, 8))
    layers = ({"linear.0.weight": torch.ones(2, 2)}, {"linear.0.weight": torch.zeros(2, 2)})
    path = tmp_path / "emb.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": emb}, "name": "x", "step": 3,
                768: layers, "layer_structure": [1, 2, 1]}, path)
    got, _ = load_file(path)
    assert sorted(got) == ["768.0.linear.0.weight", "768.1.linear.0.weight", "string_to_param.*"]
    assert torch.equal(got["string_to_param.*"], emb.detach()) and not got["string_to_param.*"].requires_grad


@pytest.mark.parametrize("fmt, name", [("safetensors", "lying.ckpt"), ("torch-zip", "lying.safetensors"),
                                       ("torch-legacy", "lying.safetensors")])
def test_extension_lies(tmp_path, fmt, name):
    path = tmp_path / name
    if fmt == "safetensors":
        save_file(_tensors(), path)
    else:
        torch.save(_tensors(), path, _use_new_zipfile_serialization=fmt == "torch-zip")
    assert sniff_format(path) == fmt
    _assert_same(load_file(path)[0], _tensors())


# --- malicious files ---------------------------------------------------------------------------


class MkdirPayload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


class ExecPayload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.exec, (f"open({self.marker!r}, 'w').close()",))


def _write_evil(path, kind: str, payload) -> None:
    if kind == "torch-zip":
        torch.save({"state_dict": {"w": torch.ones(2)}, "evil": payload}, path)
    elif kind == "raw-pickle":
        with open(path, "wb") as f:
            pickle.dump({"w": torch.ones(2), "evil": payload}, f)
    elif kind == "legacy":
        torch.save({"w": torch.ones(2), "evil": payload}, path, _use_new_zipfile_serialization=False)
    else:  # an A1111 textual-inversion embedding
        torch.save({"string_to_param": {"*": torch.ones(1, 8)}, "name": "x", "evil": payload}, path)


EVIL_CASES = [("torch-zip", "evil.ckpt"), ("raw-pickle", "evil.pt"), ("raw-pickle", "evil.safetensors"),
              ("legacy", "evil.bin"), ("embedding", "evil.pt")]
PAYLOADS = [(MkdirPayload, ("posix.mkdir", "os.mkdir")), (ExecPayload, ("builtins.exec",))]


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note on plain pickle.dump files
@pytest.mark.parametrize("payload, names", PAYLOADS, ids=["mkdir", "exec"])
@pytest.mark.parametrize("kind, name", EVIL_CASES, ids=[n for _, n in EVIL_CASES])
def test_malicious_file_refused_before_it_runs(tmp_path, kind, name, payload, names):
    marker = tmp_path / "pwned"
    path = tmp_path / name
    _write_evil(path, kind, payload(marker))
    with pytest.raises(UnsafeCheckpointError) as info:
        load_file(path)
    message = str(info.value)
    assert any(n in message for n in names), message
    assert name in message and "refusing to load" in message and "\n" not in message
    assert not marker.exists()


@pytest.mark.parametrize("payload", [MkdirPayload, ExecPayload], ids=["mkdir", "exec"])
@pytest.mark.parametrize("kind", ["torch-zip", "raw-pickle"])
def test_payloads_are_live(tmp_path, kind, payload):
    """Proves the refusal tests can fail: unsafe unpickling (test-only, never in the library) runs them."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    _write_evil(path, kind, payload(marker))
    if kind == "torch-zip":
        torch.load(path, weights_only=False)
    else:
        with open(path, "rb") as f:
            pickle.load(f)
    assert marker.exists()


# --- truncated and unknown files ---------------------------------------------------------------


def _header_len(path) -> int:
    return int.from_bytes(path.read_bytes()[:8], "little")


@pytest.mark.parametrize("cut, words", [
    (lambda p: 8 + _header_len(p) + 10, "is truncated: its header describes"),
    (lambda p: 8 + _header_len(p) // 2, "is truncated: its safetensors header claims"),
    (lambda p: 5, "is not a checkpoint: unrecognised content"),
], ids=["data", "header", "prefix"])
def test_truncated_safetensors(tmp_path, cut, words):
    path = tmp_path / "cut.safetensors"
    save_file(_tensors(), path)
    data = path.read_bytes()
    path.write_bytes(data[: cut(path)])
    for fn in (load_file, read_metadata):
        with pytest.raises(CheckpointError) as info:
            fn(path)
        assert type(info.value) is CheckpointError
        message = str(info.value)
        assert "cut.safetensors" in message and "\n" not in message
        assert words in message, message


def test_corrupt_safetensors_header(tmp_path):
    path = tmp_path / "bad.safetensors"
    header = b'{"a": not json}'
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 16)
    with pytest.raises(CheckpointError, match="bad.safetensors is corrupt: .*not valid JSON"):
        load_file(path)


@pytest.mark.parametrize("zipped", [True, False], ids=["torch-zip", "torch-legacy"])
def test_truncated_torch_file(tmp_path, zipped):
    path = tmp_path / "cut.ckpt"
    torch.save(_tensors(), path, _use_new_zipfile_serialization=zipped)
    path.write_bytes(path.read_bytes()[: os.path.getsize(path) // 2])
    with pytest.raises(CheckpointError) as info:
        load_file(path)
    assert type(info.value) is CheckpointError, info.value
    assert "cut.ckpt" in str(info.value) and "truncated or corrupt" in str(info.value)


def test_sniff_errors(tmp_path):
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    lfs = tmp_path / "lfs.ckpt"
    lfs.write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 4\n")
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"\x00\x01 just some bytes")
    cases = [(tmp_path, "is a directory"), (tmp_path / "missing.ckpt", "not found"), (empty, "is empty"),
             (lfs, "Git LFS pointer"), (junk, "unrecognised content")]
    for path, words in cases:
        for fn in (sniff_format, load_file, read_metadata):
            with pytest.raises(CheckpointError, match=words):
                fn(path)
    assert issubclass(UnsafeCheckpointError, CheckpointError) and issubclass(CheckpointError, SfumatoError)


# --- hashing -----------------------------------------------------------------------------------


def test_sha256_file(tmp_path):
    path = tmp_path / "blob.bin"
    data = os.urandom(3 * 1000 + 7)
    path.write_bytes(data)
    want = hashlib.sha256(data).hexdigest()
    assert sha256_file(path) == want and sha256_file(path, chunk=1000) == want


def _shape_reference(obj, depth: int = 0) -> tuple[int, int]:
    """(commas + opening brackets, deepest nesting) of json.dumps(obj), from the object itself."""
    if isinstance(obj, (dict, list)):
        items = list(obj.values()) if isinstance(obj, dict) else obj
        values, deepest = 1 + max(len(items) - 1, 0), depth + 1
        for item in items:
            v, d = _shape_reference(item, depth + 1)
            values, deepest = values + v, max(deepest, d)
        return values, deepest
    return 0, depth


def test_json_shape_counts_outside_strings_across_chunks():
    """The header pre-check (bounded before json.loads) agrees with the parsed structure on random
    JSON full of quotes, backslashes and brackets inside strings, for any chunking."""
    import json
    import random

    from sfumato.checkpoint.io import json_shape

    rng = random.Random(0)

    def gen(depth=0):
        if depth > 5 or rng.random() < 0.3:
            return rng.choice([1, 'a\\"[{', "\\\\", '"', "x,y", None, 2.5, "\\", "]]}}"])
        if rng.random() < 0.5:
            return [gen(depth + 1) for _ in range(rng.randrange(4))]
        return {f"k{rng.random()}\\\"[": gen(depth + 1) for _ in range(rng.randrange(4))}

    for _ in range(500):
        obj = gen()
        text = json.dumps(obj).encode()
        for chunk in (1, 2, 3, 7, 1 << 20):
            assert json_shape(text, chunk) == _shape_reference(obj), (text, chunk)
