"""Weights straight from a memory-mapped safetensors file, and modules whose weights stay there.

``MappedFile`` gives every tensor of a safetensors file as a zero-copy view of one private memory
map. Pages a view touches count towards the process's resident set while they stay mapped, so a
loader that converts views one by one (fp16 → bf16, say) calls ``release`` on each source as soon
as its converted copy exists: the source's pages leave the resident set again (they stay in the
kernel's page cache), and the peak is about one model copy instead of file + copy.

``stream_weights`` is the low-memory mode: a module built on the ``meta`` device keeps a view of
each of its tensors, and each *unit* (a block of the UNet, a whole text encoder or VAE) reads its
weights in, converted to the compute device and dtype, just before it runs and drops them just
after. ``resident(...)`` keeps whole streamed modules loaded for the duration of a block (a text
encoder while a prompt is encoded, the VAE while an image is decoded tile by tile).
"""

from __future__ import annotations

import ctypes
import logging
import math
import mmap
from collections.abc import Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import CheckpointError
from .io import SAFETENSORS_DTYPES, _metadata, _read_header

_PAGE = mmap.PAGESIZE
_M_MMAP_THRESHOLD = -3   # glibc's mallopt parameter
log = logging.getLogger(__name__)


class MappedFile:
    """A safetensors file mapped once (copy-on-write: writes never reach the file)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        header = _read_header(self.path)
        self.metadata = _metadata(self.path, header)
        with open(self.path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        self._bytes = torch.frombuffer(self._map, dtype=torch.uint8)
        self._base = self._bytes.data_ptr()
        start = 8 + int.from_bytes(self._map[:8], "little")
        self.tensors: dict[str, Tensor] = {}
        for key, entry in header.items():
            if key == "__metadata__":
                continue
            dtype = SAFETENSORS_DTYPES.get(entry.get("dtype"))
            if dtype is None:
                raise CheckpointError(f"{self.path}: tensor {key!r} has unsupported dtype {entry.get('dtype')!r}")
            a, b = (start + int(o) for o in entry["data_offsets"])
            shape = [int(n) for n in entry["shape"]]
            raw = self._bytes[a:b]
            itemsize = torch.empty(0, dtype=dtype).element_size()
            if b - a != itemsize * math.prod(shape):
                raise CheckpointError(f"{self.path} is corrupt: tensor {key!r} has {b - a} bytes for shape {shape}")
            if a % itemsize:  # misaligned for its dtype: the one case that needs a copy
                raw = raw.clone()
            self.tensors[key] = raw.view(dtype).reshape(shape)

    def owns(self, t: Tensor) -> bool:
        return t.device.type == "cpu" and self._base <= t.data_ptr() < self._base + len(self._map)

    def release(self, t: Tensor) -> None:
        """Drop the pages of view `t` (the whole pages inside it) from this process's resident set.
        Data is re-read from the page cache if the view is used again; a no-op for other tensors."""
        if not self.owns(t):
            return
        a = t.data_ptr() - self._base
        b = a + t.numel() * t.element_size()
        a, b = -(-a // _PAGE) * _PAGE, b // _PAGE * _PAGE
        if b > a and hasattr(mmap, "MADV_DONTNEED"):  # elsewhere (Windows) the pages just stay
            self._map.madvise(mmap.MADV_DONTNEED, a, b - a)


def read_mapped(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str], MappedFile]:
    """A safetensors file as (views of its tensors, metadata, the mapping that can release them)."""
    mapped = MappedFile(path)
    return dict(mapped.tensors), mapped.metadata, mapped


def release(t: Tensor, files: Iterable[MappedFile]) -> None:
    for f in files:
        if f.owns(t):
            f.release(t)
            return


def materialize(v: Tensor, dtype: torch.dtype, device: torch.device | str, files: Iterable[MappedFile],
                copy: bool = False) -> Tensor:
    """`v` on `device`, floating-point tensors in `dtype`; a mapped source's pages are released once
    a converted copy exists (a view kept as is, same dtype and device, stays mapped unless `copy`)."""
    dtype = dtype if v.is_floating_point() else v.dtype
    out = v.to(device=device, dtype=dtype, copy=copy)
    if out.data_ptr() != v.data_ptr():
        release(v, files)
    return out


# --- streamed modules -----------------------------------------------------------------------------


class _Stream:
    """The unit-by-unit loader attached to one module (see ``stream_weights``)."""

    def __init__(self, module: nn.Module, sources: Mapping[str, Tensor], units: list[nn.Module],
                 dtype: torch.dtype, device: torch.device, files: list[MappedFile]):
        self.dtype, self.device, self.files = dtype, device, files
        self.pinned = 0  # > 0 inside `resident`: units stay loaded after they run
        self.slots: dict[nn.Module, list[tuple[nn.Module, str, bool, Tensor, Tensor]]] = {}
        names = {id(m): n for n, m in module.named_modules()}
        covered: set[str] = set()
        for unit in units:
            prefix = names[id(unit)]
            slots = []
            for kind, items in (("p", unit.named_parameters()), ("b", unit.named_buffers())):
                for name, placeholder in items:
                    full = f"{prefix}.{name}" if prefix else name
                    owner_name, _, leaf = name.rpartition(".")
                    owner = unit.get_submodule(owner_name) if owner_name else unit
                    if full not in sources:
                        raise CheckpointError(f"streamed weights: no source tensor for {full}")
                    slots.append((owner, leaf, kind == "p", placeholder, sources[full]))
                    covered.add(full)
            self.slots[unit] = slots
            unit.register_forward_pre_hook(lambda m, args: self.load(m))
            unit.register_forward_hook(lambda m, args, out: None if self.pinned else self.unload(m), always_call=True)
        left = [n for n, _ in [*module.named_parameters(), *module.named_buffers()] if n not in covered]
        if left:
            raise CheckpointError(f"streamed weights: tensors in no unit: {', '.join(left[:5])}")

    def load(self, unit: nn.Module) -> None:
        for owner, leaf, is_param, placeholder, source in self.slots[unit]:
            current = owner._parameters[leaf] if is_param else owner._buffers[leaf]
            if current is not placeholder:  # already loaded
                continue
            t = materialize(source, self.dtype, self.device, self.files, copy=True)
            if is_param:
                owner._parameters[leaf] = nn.Parameter(t, requires_grad=False)
            else:
                owner._buffers[leaf] = t

    def unload(self, unit: nn.Module) -> None:
        for owner, leaf, is_param, placeholder, _ in self.slots[unit]:
            (owner._parameters if is_param else owner._buffers)[leaf] = placeholder


def stream_weights(module: nn.Module, sources: Mapping[str, Tensor], units: list[nn.Module], *,
                   dtype: torch.dtype, device: str | torch.device, files: list[MappedFile]) -> nn.Module:
    """Make `module` (built on ``meta``, its tensors already of the right shapes and dtypes) read its
    weights from `sources` (state-dict names → tensors, usually views of `files`) one unit at a time,
    around each unit's forward call. Every tensor of the module must belong to exactly one unit."""
    module._sfumato_stream = _Stream(module, sources, units, dtype, torch.device(device), files)
    return module


def is_streamed(module: nn.Module) -> bool:
    return getattr(module, "_sfumato_stream", None) is not None


@contextmanager
def resident(*modules: nn.Module) -> Iterator[None]:
    """All units of the streamed ones among `modules` loaded for the block, dropped after it (other
    modules are left as they are)."""
    streams = [m._sfumato_stream for m in modules if is_streamed(m)]
    with ExitStack() as stack:
        for s in streams:
            s.pinned += 1
            stack.callback(_unpin, s)
            for unit in s.slots:
                s.load(unit)
        yield


def _unpin(s: _Stream) -> None:
    s.pinned -= 1
    if not s.pinned:
        for unit in s.slots:
            s.unload(unit)
        trim_heap()


def trim_heap() -> bool:
    """glibc: hand the heap's free pages back to the system (``malloc_trim``). Weights dropped at the
    end of a stage were mostly allocated from the heap, which glibc shrinks only from its top: without
    this their pages would stay in the resident set through the next stage. False without glibc."""
    try:
        malloc_trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    return bool(malloc_trim(0))


def unet_units(unet: nn.Module) -> list[nn.Module]:
    """The UNet's blocks: each input and output block, the middle block, the embeddings, the head."""
    units: list[nn.Module] = []
    for child in unet.children():
        units += list(child.children()) if isinstance(child, nn.ModuleList) else [child]
    return units




def module_device(module: nn.Module) -> torch.device:
    """Where `module` computes: its weights' device, or for a streamed module where they are read to."""
    if is_streamed(module):
        return module._sfumato_stream.device
    return next(module.parameters()).device


def fix_malloc_mmap_threshold(threshold: int = 1 << 18) -> bool:
    """glibc: serve every allocation above `threshold` bytes by its own mapping, handed back to the
    system when freed. By default glibc raises that threshold as large blocks are freed and then keeps
    such blocks in a heap it rarely shrinks: streamed weights and activations, freed and allocated again
    block after block, would leave that heap holding hundreds of MB. Process-wide, so only low-memory
    mode sets it; False where the C library has no ``mallopt`` (not glibc)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    done = bool(mallopt(_M_MMAP_THRESHOLD, threshold))
    if done:
        log.info("low-memory mode: malloc mmap threshold fixed at %d bytes", threshold)
    return done
