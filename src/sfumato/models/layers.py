"""Layers that compute in the dtype of their input, and the choice of that compute dtype.

Weights may be stored in bf16/fp16 (half the memory) while the arithmetic runs in fp32: on CPUs
without fast native bf16 (no AMX, or Intel cores whose AVX512-BF16 dot product is no faster than
fp32 FMA) a bf16 matrix product is *slower* than an fp32 one, so there the models keep bf16 weights
and upcast each layer's weights as it runs. The casts happen at call time, never cached, so
weights patched in place (LoRA) are always seen as they are now. Parameter names are those of the
``torch.nn`` layers these subclass, hence of the original checkpoints.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

HALF = (torch.bfloat16, torch.float16)
_SCRATCH = threading.local()
_SCRATCH_MIN = 1 << 18  # elements: smaller casts allocate as usual


def cast(t: Tensor | None, like: Tensor) -> Tensor | None:
    """`t` in the dtype of `like` (no copy when it already is)."""
    return t if t is None or t.dtype == like.dtype else t.to(like.dtype)


def cast_weight(w: Tensor, like: Tensor) -> Tensor:
    """A layer's weight in the dtype of `like`, for one immediate use. Without autograd, large casts
    go into a per-thread scratch buffer that the next large cast overwrites: a fresh 100 MB tensor
    per layer per step costs more in page faults than the copy itself (measured 1.1 s against 0.3 s
    for an SD1 UNet's weights)."""
    if w.dtype == like.dtype:
        return w
    if torch.is_grad_enabled() or w.numel() < _SCRATCH_MIN or torch.compiler.is_compiling():
        return w.to(like.dtype)
    key = (like.dtype, like.device)
    buf = getattr(_SCRATCH, "buffers", {}).get(key)
    if buf is None or buf.numel() < w.numel():
        buf = torch.empty(w.numel(), dtype=like.dtype, device=like.device)
        _SCRATCH.buffers = {**getattr(_SCRATCH, "buffers", {}), key: buf}
    return buf[: w.numel()].as_strided(w.shape, w.stride()).copy_(w)


def release_scratch() -> None:
    """Drop this thread's scratch buffers (`cast_weight`'s; the next large cast makes a new one): at the
    end of a stage, so that the UNet's largest weight in fp32 does not sit through the VAE decode."""
    _SCRATCH.buffers = {}


def silu(x: Tensor) -> Tensor:
    """SiLU of a temporary: in place when no gradient is recorded (saves a feature map of memory)."""
    return F.silu(x, inplace=not torch.is_grad_enabled())


class Linear(nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, cast_weight(self.weight, x), cast(self.bias, x))


MATMUL_CONV_MAX_ROWS = 1024  # output pixels (batch × height × width) up to which a CPU fp32 conv runs as unfold + matmul


class Conv2d(nn.Conv2d):
    def forward(self, x: Tensor) -> Tensor:
        if self._as_matmul(x):
            return conv_as_matmul(x, self.weight, cast(self.bias, x), self.stride, self.padding)
        return self._conv_forward(x, cast_weight(self.weight, x), cast(self.bias, x))

    def _as_matmul(self, x: Tensor) -> bool:
        """Small feature maps (the 8×8 and 16×16 levels of a 512² UNet) on the CPU in fp32, inference only:
        oneDNN re-lays out the whole weight for every call, which there costs as much as the arithmetic
        (1280→1280 at 8×8: 133 GFLOP/s against 269 as a matrix product; at 64×64 the convolution wins)."""
        if x.device.type != "cpu" or x.dtype != torch.float32 or x.ndim != 4 or torch.is_grad_enabled():
            return False
        if self.groups != 1 or self.dilation != (1, 1) or self.padding_mode != "zeros" or isinstance(self.padding, str):
            return False
        oh, ow = _conv_out_size(x, self.kernel_size, self.stride, self.padding)
        return x.shape[0] * oh * ow <= MATMUL_CONV_MAX_ROWS

    def as_linear(self, tokens: Tensor) -> Tensor:
        """A 1×1 convolution applied to tokens [..., C_in] (channels last): one matrix product."""
        return F.linear(tokens, cast_weight(self.weight.flatten(1), tokens), cast(self.bias, tokens))


MATMUL_CONV_CAST_CHUNK = 1 << 23  # weight elements cast to the compute dtype at a time (32 MB in fp32)


def conv_as_matmul(x: Tensor, weight: Tensor, b: Tensor | None, stride: tuple[int, int],
                   padding: tuple[int, int]) -> Tensor:
    """``F.conv2d(x, weight, b, stride, padding)`` (no groups or dilation) as matrix products over the
    unfolded input patches. A weight in another dtype than x is cast a block of output channels at a
    time (the largest SD weights, 1280×2560×3×3 at the 8×8 level, would take 118 MB in fp32 at once)."""
    n = x.shape[0]
    kh, kw = weight.shape[-2:]
    size = _conv_out_size(x, (kh, kw), stride, padding)
    cols = F.unfold(x, (kh, kw), padding=padding, stride=stride)  # [N, C·kh·kw, L], same (c, i, j) order as w
    w = weight.flatten(1)
    if w.dtype == x.dtype:
        out = torch.matmul(w, cols)  # [N, O, L]
        if b is not None:
            out += b[:, None]
        return out.view(n, w.shape[0], *size)
    flat = cols.transpose(0, 1).reshape(w.shape[1], -1)  # [K, N·L]
    prod = torch.empty(w.shape[0], flat.shape[1], dtype=x.dtype, device=x.device)
    step = max(1, MATMUL_CONV_CAST_CHUNK // w.shape[1])
    for o in range(0, w.shape[0], step):
        torch.mm(cast_weight(w[o:o + step], x), flat, out=prod[o:o + step])
    prod = prod.view(w.shape[0], n, -1).transpose(0, 1)  # [N, O, L], strided
    out = torch.empty(n, w.shape[0], prod.shape[-1], dtype=x.dtype, device=x.device)
    if b is None:
        out.copy_(prod)
    else:
        torch.add(prod, b[:, None], out=out)
    return out.view(n, w.shape[0], *size)


def _conv_out_size(x: Tensor, kernel: tuple[int, int], stride: tuple[int, int],
                   padding: tuple[int, int]) -> tuple[int, int]:
    return tuple((x.shape[2 + i] + 2 * padding[i] - kernel[i]) // stride[i] + 1 for i in range(2))


UPSAMPLE_PHASES_MIN_PIXELS = 32 * 32  # below this input size the phase kernels cost more to build than they save


def upsample_conv(x: Tensor, conv: Conv2d) -> Tensor:
    """``conv(interpolate(x, scale_factor=2, mode="nearest"))`` for a 3×3, stride-1, padding-1 conv,
    computed at x's resolution: each of the four output phases sees a 2×2 neighbourhood of x, with
    the 3×3 taps that land on the same source pixel summed. 16 instead of 36 multiply-adds per
    input pixel and channel pair, and the 4× upsampled input is never built. Small inputs take the
    plain route: building the phase kernels costs more than it saves there (1280 channels at 8×8:
    0.20 s against 0.08 s)."""
    if x.shape[-2] * x.shape[-1] < UPSAMPLE_PHASES_MIN_PIXELS or not isinstance(conv, nn.Conv2d):
        return conv(F.interpolate(x, scale_factor=2, mode="nearest"))   # (not a Conv2d: models.quant's)
    w, b = cast_weight(conv.weight, x), cast(conv.bias, x)
    kernels = [k for rows in _phase_taps(w, 2) for k in _phase_taps(rows, 3)]  # phases (0,0), (0,1), (1,0), (1,1)
    o = F.conv2d(x, torch.cat(kernels), None if b is None else b.repeat(4), padding=1)  # [B, 4·O, H+1, W+1]
    n, _, h, wd = x.shape
    out_ch = w.shape[0]
    y = torch.empty(n, out_ch, 2 * h, 2 * wd, dtype=o.dtype, device=o.device, memory_format=_memory_format(x))
    phases = y.view(n, out_ch, h, 2, wd, 2)
    for k, (pa, pb) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):  # phase (a, b) sits at offset (a, b) in o
        phases[:, :, :, pa, :, pb] = o[:, k * out_ch:(k + 1) * out_ch, pa:pa + h, pb:pb + wd]
    return y


def _phase_taps(w: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Along kernel axis `dim`: output phase 0 reads source pixels (i-1, i) with taps (w0, w1 + w2),
    phase 1 reads (i, i+1) with taps (w0 + w1, w2)."""
    w0, w1, w2 = w.unbind(dim)
    return torch.stack([w0, w1 + w2], dim), torch.stack([w0 + w1, w2], dim)


def _memory_format(x: Tensor) -> torch.memory_format:
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


NormOverride = Callable[["GroupNorm", Tensor], "Tensor | None"]
_NORM_OVERRIDE: ContextVar[NormOverride | None] = ContextVar("sfumato_norm_override", default=None)


@contextmanager
def group_norm_override(fn: NormOverride) -> Iterator[None]:
    """Inside the block, every `GroupNorm` first calls ``fn(layer, x)``; a tensor it returns replaces
    the layer's output (tiled VAE passes share one image's statistics across tiles this way)."""
    token = _NORM_OVERRIDE.set(fn)
    try:
        yield
    finally:
        _NORM_OVERRIDE.reset(token)


class GroupNorm(nn.GroupNorm):
    def forward(self, x: Tensor) -> Tensor:
        override = _NORM_OVERRIDE.get()
        if override is not None and (out := override(self, x)) is not None:
            return out
        return F.group_norm(x, self.num_groups, cast(self.weight, x), cast(self.bias, x), self.eps)


class LayerNorm(nn.LayerNorm):
    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.normalized_shape, cast(self.weight, x), cast(self.bias, x), self.eps)


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """`bf16_is_fast` for this machine's CPU (Linux ``/proc/cpuinfo``, else torch's own checks)."""
    try:
        flags, vendor = parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:
        flags, vendor = set(), ""
    checks = {"amx_bf16": "_is_amx_tile_supported", "avx512_bf16": "_is_avx512_bf16_supported"}
    flags |= {flag for flag, name in checks.items() if getattr(torch.cpu, name, lambda: False)()}
    return bf16_is_fast(flags, vendor)


def bf16_is_fast(flags: set[str], vendor: str) -> bool:
    """Whether bf16 matrix products beat fp32: with AMX tiles, or AVX512-BF16 on AMD (Zen 4+), whose
    bf16 dot product runs at twice the fp32 FMA rate. On an Intel Xeon with AVX512-BF16 but no AMX
    (a VM hiding it) they measured 84 GFLOP/s against fp32's 167 per core."""
    return "amx_bf16" in flags or (vendor == "AuthenticAMD" and "avx512_bf16" in flags)


def parse_cpuinfo(text: str) -> tuple[set[str], str]:
    """The first processor's flags and vendor id from ``/proc/cpuinfo`` text."""
    flags: set[str] | None = None
    vendor = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "flags" and flags is None:
            flags = set(value.split())
        elif key == "vendor_id" and not vendor:
            vendor = value.strip()
    return flags or set(), vendor


def resolve_compute_dtype(param_dtype: torch.dtype, device: torch.device,
                          override: torch.dtype | None = None) -> torch.dtype:
    """The dtype a model computes in: `override` if given, else its weights' dtype, except half
    precision on a CPU without fast bf16 arithmetic (and fp16 on any CPU), which computes in fp32."""
    if override is not None:
        return override
    if device.type == "cpu" and param_dtype in HALF and not (param_dtype == torch.bfloat16 and cpu_has_fast_bf16()):
        return torch.float32
    return param_dtype
