"""Checkpoint file I/O: safetensors through mmap, pickle-based files only through an allow-list.

Formats are told apart by content, never by extension. Pickle-based files (``torch.save``'s zip
format and the legacy raw-pickle format) are read only by torch's weights-only unpickler, widened by
the few names old Stable Diffusion checkpoints carry (numpy scalars, Lightning's ModelCheckpoint).
Anything else is refused before it can run. There is deliberately no option to load unsafely.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import pickletools
import re
import secrets
import struct
import zipfile
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np
import safetensors.torch
import torch
from safetensors import SafetensorError

from ..errors import CheckpointError, UnsafeCheckpointError

FileFormat = Literal["safetensors", "torch-zip", "torch-legacy"]

_MAX_HEADER = 100_000_000  # safetensors' own bound on the JSON header
_NOT_CHECKPOINTS = (
    (b"version https://git-lfs", "a Git LFS pointer, not the weights (fetch them with `git lfs pull`)"),
    (b"GGUF", "a GGUF file, which is not supported"),
    (b"<", "text or HTML (a failed download?), not a checkpoint"),
)


class LightningModelCheckpoint:
    """Inert stand-in for pytorch_lightning's ModelCheckpoint.

    SD 1.x .ckpt files name that class (as a dict key) in their "callbacks" entry. This placeholder
    only stores what the unpickler hands it; it has no behaviour.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _extra_safe_globals() -> list[tuple[Any, str]]:
    """(object, pickled name) pairs allowed on top of torch's weights-only defaults."""
    scalar = np.int64(0).__reduce__()[0]  # numpy.core.multiarray.scalar (numpy._core in numpy 2)
    reconstruct = np.zeros(0).__reduce__()[0]  # numpy.core.multiarray._reconstruct
    pairs = [(np.dtype, "numpy.dtype"), (np.ndarray, "numpy.ndarray")]
    for core in ("numpy.core", "numpy._core"):
        pairs += [(scalar, f"{core}.multiarray.scalar"), (reconstruct, f"{core}.multiarray._reconstruct")]
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25: pickled dtypes are built on these classes
    if dtypes is not None:
        pairs += [(cls, f"numpy.dtypes.{name}") for name, cls in vars(dtypes).items() if name.endswith("DType")]
    pairs.append((LightningModelCheckpoint, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"))
    return pairs


_EXTRA_SAFE_GLOBALS = _extra_safe_globals()
# Only used to *name* the culprit when torch's refusal message does not; torch alone decides what loads.
_TORCH_DEFAULT_NON_TORCH = {"collections.OrderedDict", "collections.Counter", "_codecs.encode",
                            "builtins.set", "builtins.bytearray", "builtins.complex"}
_KNOWN_SAFE_NAMES = _TORCH_DEFAULT_NON_TORCH | {name for _, name in _EXTRA_SAFE_GLOBALS}


def sniff_format(path: str | Path) -> FileFormat:
    """Tell the file format by content (never by extension); anything else is a CheckpointError."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a checkpoint file")
    if not path.exists():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"{path} is not a regular file")
    with open(path, "rb") as f:
        head = f.read(32)
    if not head:
        raise CheckpointError(f"{path} is empty (0 bytes), not a checkpoint")
    if head.startswith(b"PK\x03\x04"):
        return "torch-zip"
    if head[0] == 0x80 and len(head) > 1 and 2 <= head[1] <= 5:  # pickle PROTO opcode
        return "torch-legacy"
    if len(head) >= 9 and head[8:9] == b"{" and 2 <= struct.unpack("<Q", head[:8])[0] <= _MAX_HEADER:
        return "safetensors"
    for magic, what in _NOT_CHECKPOINTS:
        if head.startswith(magic):
            raise CheckpointError(f"{path} is {what}")
    raise CheckpointError(
        f"{path} is not a checkpoint: unrecognised content starting {head[:16]!r} "
        f"({path.stat().st_size} bytes; expected safetensors or a torch.save file)"
    )


def load_file(path: str | Path, *, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load a checkpoint file as (flat tensor dict, metadata).

    safetensors files are memory-mapped; metadata is their ``__metadata__``. Pickle-based files go
    through the allow-list (UnsafeCheckpointError otherwise) and have metadata ``{}``; the loaded
    object is flattened by this rule:

    - a Lightning-style checkpoint (a dict holding a ``"state_dict"`` dict) gives that state dict alone;
    - dicts, lists and tuples are walked and each tensor is keyed by the dotted path of keys and
      indices leading to it (``string_to_param.*`` for an A1111 embedding, ``768.0.linear.0.weight``
      for a hypernetwork); a bare state dict therefore comes back as is;
    - values that are not tensors are bookkeeping and dropped, as are entries under keys that are
      neither str nor int (Lightning keys its callbacks by class);
    - parameters come back as plain (detached) tensors.
    """
    path = Path(path)
    fmt = sniff_format(path)
    if fmt == "safetensors":
        metadata = _metadata(path, _read_header(path))
        try:
            return safetensors.torch.load_file(path, device=device), metadata
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"cannot read {path} as safetensors: {_one_line(str(e))}") from None
    obj = _load_pickle(path, fmt, device)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a dict of tensors")
    if isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    flat: dict[str, torch.Tensor] = {}
    _flatten(obj, "", flat, path)
    return flat, {}


def load_object(path: str | Path, *, device: str = "cpu") -> Any:
    """The object a pickle-based file holds, unflattened (for formats whose non-tensor entries
    matter, such as an A1111 hypernetwork's settings); through the allow-list like ``load_file``."""
    path = Path(path)
    fmt = sniff_format(path)
    if fmt == "safetensors":
        raise CheckpointError(f"{path} is safetensors, not a pickle-based file (read it with load_file)")
    return _load_pickle(path, fmt, device)


def read_metadata(path: str | Path) -> dict[str, str]:
    """The safetensors header metadata, without loading tensors ({} for pickle-based files)."""
    path = Path(path)
    if sniff_format(path) != "safetensors":
        return {}
    return _metadata(path, _read_header(path))


def save_file(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Save as safetensors atomically: write a temp file in the same folder, fsync, then rename over."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        safetensors.torch.save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable; not possible on every platform
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def sha256_file(path: str | Path, *, chunk: int = 1 << 20) -> str:
    """Full hex SHA-256 of a file (A1111's "Model hash" is its first 10 hex digits)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# --- safetensors ---------------------------------------------------------------------------------


def _read_header(path: Path) -> dict[str, Any]:
    """Parse a safetensors header and check it against the file size (truncation, corruption)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path} is truncated: {size} bytes, too short for a safetensors header")
        n = struct.unpack("<Q", prefix)[0]
        if 8 + n > size:
            raise CheckpointError(
                f"{path} is truncated: its safetensors header claims {n} bytes but the file has only {size}"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except ValueError:
        raise CheckpointError(f"{path} is corrupt: its safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is corrupt: its safetensors header is not a JSON object")
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise CheckpointError(f"{path} is corrupt: a tensor entry in its safetensors header is malformed") from None
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path} is truncated: its header describes {end} bytes of tensor data but only {size - 8 - n} follow"
        )
    return header


def _metadata(path: Path, header: dict[str, Any]) -> dict[str, str]:
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path} is corrupt: its safetensors __metadata__ is not a map of strings")
    return metadata


# --- pickle-based files ----------------------------------------------------------------------------


def _load_pickle(path: Path, fmt: FileFormat, device: str) -> Any:
    # torch.load hands any path ending in ".safetensors" to safetensors whatever its content, so a
    # mislabelled pickle is passed as an open file (which torch cannot memory-map).
    mmap = fmt == "torch-zip" and not str(path).endswith(".safetensors")
    try:
        with torch.serialization.safe_globals(_EXTRA_SAFE_GLOBALS), open(path, "rb") as f:
            return torch.load(path if mmap else f, map_location=device, weights_only=True, mmap=mmap)
    except Exception as e:  # untrusted bytes: whatever goes wrong becomes a one-line CheckpointError
        raise _pickle_error(path, fmt, e) from None


_GLOBAL_IN_MESSAGE = re.compile(r"GLOBAL (\S+) (?:was not an allowed global|whose module)")


def _pickle_error(path: Path, fmt: FileFormat, err: Exception) -> CheckpointError:
    """Turn torch's refusal (or a read failure) into a one-line error naming the offending global."""
    text = str(err)
    refused = isinstance(err, pickle.UnpicklingError) or "Weights only load failed" in text
    found = _GLOBAL_IN_MESSAGE.search(text)
    name = found.group(1) if found else None
    if name is not None and "." not in name:
        name = f"builtins.{name}"  # torch strips the "builtins." prefix in its message
    if name is None and refused:
        name = next(iter(_suspect_globals(path, fmt)), None)
    if name is not None:
        return UnsafeCheckpointError(
            f"refusing to load {path}: it references {name}, which is not on the allow-list of what a "
            "checkpoint may contain (loading it could run arbitrary code); use a .safetensors copy "
            "of the model instead"
        )
    if refused:
        return UnsafeCheckpointError(f"refusing to load {path}: the safe unpickler rejected it ({_one_line(text)})")
    return CheckpointError(
        f"cannot read {path} as a {fmt} checkpoint, it is truncated or corrupt "
        f"({type(err).__name__}: {_one_line(text)})"
    )


def _suspect_globals(path: Path, fmt: FileFormat) -> list[str]:
    """Globals a refused pickle names outside torch and the allow-list, found statically (nothing runs)."""
    found: list[str] = []
    try:
        with open(path, "rb") as f:
            stream: IO[bytes] = f
            if fmt == "torch-zip":
                with zipfile.ZipFile(f) as z:
                    stream = io.BytesIO(z.read(next(n for n in z.namelist() if n.endswith("data.pkl"))))
            for _ in range(5):  # a legacy file: magic, protocol, sys info, the object, storage keys
                found += _pickle_globals(stream)
    except Exception:  # the bytes after the last pickle (or garbage) end the scan
        pass
    return [g for g in found if not g.startswith("torch.") and g not in _KNOWN_SAFE_NAMES]


_STRING_OPS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8"}


def _pickle_globals(stream: IO[bytes]) -> list[str]:
    """The globals one pickle references, read from its opcodes (STACK_GLOBAL's strings tracked)."""
    names: list[str] = []
    pushed: list[str | None] = []  # recent pushes: the string, or None for anything else
    memo: dict[int, str | None] = {}
    for op, arg, _ in pickletools.genops(stream):
        if op.name in ("GLOBAL", "INST"):
            names.append(arg.replace(" ", "."))
        elif op.name == "STACK_GLOBAL" and len(pushed) >= 2:
            names.append(f"{pushed[-2]}.{pushed[-1]}")
        elif op.name in _STRING_OPS:
            pushed.append(arg)
        elif op.name in ("GET", "BINGET", "LONG_BINGET"):
            pushed.append(memo.get(arg))
        elif op.name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
            memo[len(memo) if op.name == "MEMOIZE" else arg] = pushed[-1] if pushed else None
        elif op.name != "FRAME":
            pushed.append(None)
    return names


def _flatten(obj: Any, prefix: str, out: dict[str, torch.Tensor], path: Path) -> None:
    """Collect the tensors under obj into out, keyed by dotted path (see load_file)."""
    if isinstance(obj, torch.Tensor):
        if prefix in out:
            raise CheckpointError(f"{path} holds two tensors under the same key {prefix!r}")
        out[prefix] = obj.detach()
        return
    if isinstance(obj, dict):
        items = [(k, v) for k, v in obj.items() if isinstance(k, (str, int)) and not isinstance(k, bool)]
    elif isinstance(obj, (list, tuple)):
        items = list(enumerate(obj))
    else:
        return
    for key, value in items:
        _flatten(value, f"{prefix}.{key}" if prefix else str(key), out, path)


def _one_line(text: str, limit: int = 200) -> str:
    """The informative line of a (possibly multi-line) library message, shortened."""
    lines = [s.strip() for s in text.splitlines() if s.strip() and not s.strip().startswith("Check the documentation")]
    line = lines[-1] if lines else "no details"
    return line if len(line) <= limit else line[: limit - 1] + "…"
