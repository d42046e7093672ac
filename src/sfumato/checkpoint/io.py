"""Checkpoint file I/O: safetensors through mmap, pickle-based files only through an allow-list.

Formats are told apart by content, never by extension. Pickle-based files (``torch.save``'s zip
format and the legacy raw-pickle format) are read only by torch's weights-only unpickler, widened by
the few names old Stable Diffusion checkpoints carry (numpy scalars, Lightning's ModelCheckpoint).
Anything else is refused before it can run. There is deliberately no option to load unsafely.
"""

from __future__ import annotations

import gc
import hashlib
import io
import json
import math
import os
import pickle
import pickletools
import re
import secrets
import struct
import zipfile
from pathlib import Path
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import IO, Any, Literal

import numpy as np
import safetensors.torch
import torch
from safetensors import SafetensorError

from ..errors import CheckpointError, NonFiniteWeightsError, UnsafeCheckpointError

FileFormat = Literal["safetensors", "torch-zip", "torch-legacy"]
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}

_MAX_HEADER = 64 << 20       # bytes of a safetensors JSON header (the format allows 100 MB; real ones are < 2 MB)
MAX_HEADER_VALUES = 400_000  # JSON values in it (a tensor entry has ~8; a full SDXL file ~3000 entries)
MAX_HEADER_DEPTH = 4         # {name: {"shape": [..]}} is 3 deep
MAX_TENSORS = 100_000        # tensors a file may hold (an SDXL checkpoint with an EMA copy holds ~5000)
MAX_DIMS = 8
MAX_PICKLE_DEPTH = 32        # containers inside containers in a pickle (a state dict: 1–4)
CHECK_LEGACY_BYTES = 256 << 20
MAX_PICKLE_NODES = 200_000   # objects visited when walking an unpickled object, shared references counted again
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
        raise _error(path, "is a directory, not a checkpoint file")
    if not path.exists():
        raise CheckpointError(f"checkpoint file not found: {path}", "file not found")
    if not path.is_file():
        raise _error(path, "is not a regular file")
    try:
        with open(path, "rb") as f:
            head = f.read(32)
    except OSError as e:
        raise _error(path, f"cannot be read ({e.strerror or type(e).__name__})") from None
    if not head:
        raise _error(path, "is empty (0 bytes), not a checkpoint")
    if head.startswith(b"PK\x03\x04"):
        return "torch-zip"
    if head[0] == 0x80 and len(head) > 1 and 2 <= head[1] <= 5:  # pickle PROTO opcode
        return "torch-legacy"
    if len(head) >= 9 and head[8:9] == b"{" and 2 <= struct.unpack("<Q", head[:8])[0] <= _MAX_HEADER:
        return "safetensors"
    for magic, what in _NOT_CHECKPOINTS:
        if head.startswith(magic):
            raise _error(path, f"is {what}")
    # what the file holds is not quoted: the message may reach someone who should not read the file
    raise _error(path, "is not a checkpoint: unrecognised content (neither safetensors nor a torch.save file)")


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
            raise _error(path, f"cannot be read as safetensors ({_one_line(str(e))})") from None
    obj = _load_pickle(path, fmt, device)
    if not isinstance(obj, dict):
        raise _error(path, f"holds a {type(obj).__name__}, not a dict of tensors")
    if isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    return _flatten(obj, path), {}


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
    """Save as safetensors atomically (``atomic_path``)."""
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(tensors, tmp, metadata=metadata)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write the whole file to. When the block ends the file is
    fsynced and renamed over ``path`` (then the folder fsynced where the platform allows), so a
    reader sees the old file or the new one, never half of one; when the block fails the temporary
    file is removed. Made by a plain ``open``, the file gets the permissions the process umask gives."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
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


def check_finite(tensors: Mapping[str, torch.Tensor], what: str, after: Callable[[torch.Tensor], None] | None = None
                 ) -> None:
    """Refuse weights holding NaN or ±inf (they make black images): NonFiniteWeightsError naming the
    first such tensor. ``what`` names the weights ("the UNet of x.safetensors"); ``after(t)`` runs on
    each tensor once checked (to release a mapped file's pages). About 0.15 s per 10⁹ fp16 values."""
    for key, t in tensors.items():
        if t.is_floating_point() and t.numel() and not t.is_meta:
            v = t if t.element_size() > 1 else t.to(torch.float16)     # fp8: amax works from fp16 on
            finite = bool(torch.isfinite(v.amax())) and bool(torch.isfinite(v.amin()))   # NaN propagates
            if not finite:
                raise NonFiniteWeightsError(f"{what}: tensor {key!r} holds NaN or infinite values",
                                            f"{what} hold NaN or infinite values")
        if after is not None:
            after(t)


def sha256_file(path: str | Path, *, chunk: int = 1 << 20) -> str:
    """Full hex SHA-256 of a file (A1111's "Model hash" is its first 10 hex digits)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# --- safetensors ---------------------------------------------------------------------------------


def _read_header(path: Path) -> dict[str, Any]:
    """Parse and check a safetensors header: bounded before it is parsed (size, values, depth), then
    every tensor entry checked against the file (dtype, shape, offsets inside the data, no overlaps)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise _error(path, f"is truncated: {size} bytes, too short for a safetensors header")
        n = struct.unpack("<Q", prefix)[0]
        if n > _MAX_HEADER:
            raise _error(path, f"is corrupt: its safetensors header claims {n} bytes (at most {_MAX_HEADER})")
        if 8 + n > size:
            raise _error(path, f"is truncated: its safetensors header claims {n} bytes but the file has only {size}")
        raw = f.read(n)
    _check_json_shape(path, raw)
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError):
        raise _error(path, "is corrupt: its safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise _error(path, "is corrupt: its safetensors header is not a JSON object")
    _metadata(path, header)
    _check_entries(path, header, size - 8 - n)
    return header


def _check_json_shape(path: Path, raw: bytes) -> None:
    """Refuse a header whose JSON nests deeper or holds more values than a real one could, before
    ``json.loads`` spends time and memory on it."""
    values, depth = json_shape(raw)
    if values > MAX_HEADER_VALUES:
        raise _error(path, f"is corrupt: its safetensors header holds over {MAX_HEADER_VALUES} JSON values")
    if depth > MAX_HEADER_DEPTH:
        raise _error(path, f"is corrupt: its safetensors header nests deeper than {MAX_HEADER_DEPTH} levels")


def json_shape(raw: bytes, chunk: int = 1 << 20) -> tuple[int, int]:
    """(values, deepest nesting) of a JSON text without parsing it: commas and opening brackets,
    and the running depth of brackets, counted outside strings (a quote escaped by an odd run of
    backslashes does not end one). Vectorised a chunk at a time, so a 64 MB header costs ~0.3 s
    and a few tens of MB, whatever it holds."""
    values = depth = deepest = 0
    inside = 0          # 1 while a string is open at a chunk's end
    backslashes = 0     # the run of backslashes a chunk ends with
    for start in range(0, len(raw), chunk):
        a = np.frombuffer(raw, np.uint8, count=min(chunk, len(raw) - start), offset=start)
        index = np.arange(len(a), dtype=np.int32)
        last = np.maximum.accumulate(np.where(a == 92, -1, index))      # last non-backslash at or before i
        run = np.empty(len(a), dtype=np.int32)                           # backslashes right before i
        run[0] = backslashes
        run[1:] = index[:-1] - last[:-1] + np.where(last[:-1] == -1, backslashes, 0)
        quotes = (a == 34) & (run % 2 == 0)
        outside = (np.cumsum(quotes, dtype=np.int32) + inside) % 2 == 0
        opens = ((a == 123) | (a == 91)) & outside
        closes = ((a == 125) | (a == 93)) & outside
        values += int(opens.sum()) + int(((a == 44) & outside).sum())
        level = np.cumsum(opens.astype(np.int8) - closes.astype(np.int8), dtype=np.int32) + depth
        deepest, depth = max(deepest, int(level.max())), int(level[-1])
        inside = int(not outside[-1])
        backslashes = len(a) - 1 - int(last[-1]) + (backslashes if last[-1] == -1 else 0)
    return values, deepest


def _check_entries(path: Path, header: dict[str, Any], data_size: int) -> None:
    entries = [(k, v) for k, v in header.items() if k != "__metadata__"]
    if len(entries) > MAX_TENSORS:
        raise _error(path, f"is corrupt: its header lists {len(entries)} tensors (at most {MAX_TENSORS})")
    spans = []
    for key, entry in entries:
        bad = _bad_entry(entry)
        if bad:
            raise _error(path, f"is corrupt: tensor {key[:100]!r} in its safetensors header {bad}")
        spans.append(tuple(entry["data_offsets"]))
    spans.sort()
    end = max((b for _, b in spans), default=0)
    if end > data_size:
        raise _error(path, f"is truncated: its header describes {end} bytes of tensor data but only {data_size} follow")
    for (_, end), (start, _) in zip(spans, spans[1:]):
        if start < end:
            raise _error(path, "is corrupt: tensors in its safetensors header overlap")


def _bad_entry(entry: Any) -> str | None:
    """What is wrong with one tensor entry of a safetensors header (None: nothing)."""
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        return "is not {dtype, shape, data_offsets}"
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in SAFETENSORS_DTYPES:
        return f"has unsupported dtype {str(dtype)[:20]!r}"
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_is_count(d) for d in shape):
        return "has a malformed shape"
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        return "has malformed data_offsets"
    start, end = offsets
    if not start <= end:
        return "has data_offsets that end before they start"
    itemsize = torch.empty(0, dtype=SAFETENSORS_DTYPES[dtype]).element_size()
    if end - start != itemsize * math.prod(shape):
        return f"has {end - start} bytes for shape {shape}"
    return None


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 62


def _metadata(path: Path, header: dict[str, Any]) -> dict[str, str]:
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _error(path, "is corrupt: its safetensors __metadata__ is not a map of strings")
    return metadata


def _error(path: Path, reason: str) -> CheckpointError:
    """``{path} {reason}``; a remote client sees the reason only (``CheckpointError.public``)."""
    return CheckpointError(f"{path} {reason}", f"the file {reason}")


# --- pickle-based files ----------------------------------------------------------------------------


def _load_pickle(path: Path, fmt: FileFormat, device: str) -> Any:
    # torch.load hands any path ending in ".safetensors" to safetensors whatever its content, so a
    # mislabelled pickle is passed as an open file (which torch cannot memory-map).
    mmap = fmt == "torch-zip" and not str(path).endswith(".safetensors")
    # The cyclic garbage collector is paused while the unpickler builds objects: a crafted file's
    # hundred thousand containers would otherwise set off full collections of a large process's heap
    # (seconds in a server or a test run), and a checkpoint holds no cycles to collect.
    with _gc_paused():
        try:
            with torch.serialization.safe_globals(_EXTRA_SAFE_GLOBALS), open(path, "rb") as f:
                obj = torch.load(path if mmap else f, map_location=device, weights_only=True, mmap=mmap)
        except Exception as e:  # untrusted bytes: whatever goes wrong becomes a one-line CheckpointError
            raise _pickle_error(path, fmt, e) from None
        _flatten(obj, path, collect=False)   # bounded depth and size, tensors within their storage
    return obj


@contextmanager
def _gc_paused() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


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
            f"refusing to load {path}: it references {name[:200]}, which is not on the allow-list of what a "
            "checkpoint may contain (loading it could run arbitrary code); use a .safetensors copy "
            "of the model instead"
        )
    if refused:
        return UnsafeCheckpointError(f"refusing to load {path}: the safe unpickler rejected it ({_one_line(text)})")
    if isinstance(err, RecursionError):
        return _error(path, "nests its objects too deep: refused")
    if isinstance(err, MemoryError):
        return _error(path, "asks for more memory than this machine has: refused")
    return CheckpointError(
        f"cannot read {path} as a {fmt} checkpoint, it is truncated or corrupt "
        f"({type(err).__name__}: {_one_line(text)})",
        f"the file cannot be read as a {fmt} checkpoint: it is truncated or corrupt",
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


def _flatten(obj: Any, path: Path, collect: bool = True) -> dict[str, torch.Tensor]:
    """The tensors under obj keyed by dotted path (see load_file); with ``collect`` False only the
    checks. Iterative, and bounded: nesting deeper than MAX_PICKLE_DEPTH, more than MAX_PICKLE_NODES
    objects (a list that holds itself twice, 22 levels deep, is four million paths from 2 KB) or a
    tensor that claims more elements than its storage holds (a stride-0 view that a copy would
    expand to terabytes) is refused before anything is built from it."""
    out: dict[str, torch.Tensor] = {}
    stack: list[tuple[Any, str, int]] = [(obj, "", 0)]
    visited = 0
    while stack:
        node, prefix, depth = stack.pop()
        visited += 1
        if visited > MAX_PICKLE_NODES:
            raise _error(path, f"holds over {MAX_PICKLE_NODES} objects (shared references that expand?): refused")
        if isinstance(node, torch.Tensor):
            _check_tensor(node, prefix, path)
            if collect:
                if prefix in out:
                    raise _error(path, f"holds two tensors under the same key {prefix[:100]!r}")
                out[prefix] = node.detach()
            continue
        if isinstance(node, dict):
            items = [(k, v) for k, v in node.items() if isinstance(k, (str, int)) and not isinstance(k, bool)]
        elif isinstance(node, (list, tuple)):
            items = list(enumerate(node))
        else:
            continue
        if depth >= MAX_PICKLE_DEPTH:
            raise _error(path, f"nests containers deeper than {MAX_PICKLE_DEPTH} levels: refused")
        for key, value in reversed(items):
            stack.append((value, f"{prefix}.{key}" if prefix else str(key), depth + 1))
    return out


def _check_tensor(t: torch.Tensor, key: str, path: Path) -> None:
    """A tensor from an untrusted file addresses only bytes its storage has, each element once at most."""
    if t.is_meta or t.layout != torch.strided:
        raise _error(path, f"holds tensor {key[:100]!r} of an unsupported kind")
    if t.numel() == 0:
        return
    nbytes = t.untyped_storage().nbytes()
    extent = t.storage_offset() + sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride())) + 1
    if t.numel() * t.element_size() > nbytes or extent * t.element_size() > nbytes:
        raise _error(path, f"holds tensor {key[:100]!r} of {t.numel()} elements over a storage of {nbytes} bytes")


def _one_line(text: str, limit: int = 200) -> str:
    """The informative line of a (possibly multi-line) library message, shortened."""
    lines = [s.strip() for s in text.splitlines() if s.strip() and not s.strip().startswith("Check the documentation")]
    line = lines[-1] if lines else "no details"
    return line if len(line) <= limit else line[: limit - 1] + "…"
