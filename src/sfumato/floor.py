"""This CPU's arithmetic floor, and how close the UNet step comes to it (``sfumato bench --only floor``).

The floor of a workload is its floating-point operations over the machine's matrix-multiply peak for
the dtype, both measured in the same run:

- the peak: the best of GEMMs at the UNet's own shapes (4096 tokens × 320…1280 channels, batch 2 at
  64×64 latents) and a large square one, through ``torch.mm`` for fp32 and bf16, and through
  ``torch._int_mm`` (int8 × int8 → int32) for int8;
- the work: one SD 1.5-size UNet step with classifier-free guidance (batch 2, 64×64 latents, 77
  context tokens), counted op by op with ``torch.utils.flop_counter`` (attention, which it does not
  count on the CPU, as 4·B·H·N·M·d), and timed op by op with ``torch.profiler``.

Each layer type (convolutions, linear layers, attention, norms, the rest) gets its FLOPs, its time,
its rate and its fraction of the floor ((FLOPs / peak) / time); the step as a whole its fraction of
the floor — the number issue 19 asks to be ≥ 0.9 for fp32. Ratios only: both sides come from the
same run on the same machine.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import torch

from .bench_models import DTYPES, _has, build, diffusers_unet, rel_err, timed
from .models.unet import SD1_UNET, UNetModel

# the UNet's GEMMs at 512² with CFG: (tokens, in, out) of its linear layers and 1×1 / im2col'ed convs
GEMM_SHAPES = ((8192, 320, 1280), (8192, 1280, 320), (2048, 640, 2560), (512, 1280, 5120), (2048, 2048, 2048))
CATEGORIES = ("conv", "linear", "attention", "norm", "other")


def _best_rate(fn: Callable[[], object], flops: float, seconds: float = 0.6) -> float:
    """FLOP/s of ``fn``: the best of repeated runs within about ``seconds`` after one warm-up."""
    fn()
    best, spent = float("inf"), 0.0
    while spent < seconds:
        start = time.perf_counter()
        fn()
        took = time.perf_counter() - start
        best, spent = min(best, took), spent + took
    return flops / best


def matmul_peaks(shapes=GEMM_SHAPES) -> dict[str, float]:
    """GFLOP/s (GOP/s for int8) of this CPU's best GEMM per dtype, at ``torch``'s thread count."""
    g = torch.Generator().manual_seed(0)
    out: dict[str, float] = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("int8", torch.int8)):
        rates = []
        for m, k, n in shapes:
            if dtype == torch.int8:
                a = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
                b = torch.randint(-127, 128, (k, n), generator=g, dtype=torch.int8)
                fn = lambda a=a, b=b: torch._int_mm(a, b)  # noqa: E731
            else:
                a, b = torch.randn(m, k, generator=g).to(dtype), torch.randn(k, n, generator=g).to(dtype)
                fn = lambda a=a, b=b: torch.mm(a, b)  # noqa: E731
            try:
                rates.append(_best_rate(fn, 2.0 * m * k * n))
            except RuntimeError:   # no int8 GEMM for this CPU in this torch build
                break
        if rates:
            out[name] = max(rates) / 1e9
    return out


def category(op: str) -> str:
    """A profiler / FLOP-counter op name's layer type."""
    name = op.lower().removeprefix("aten::").removeprefix("aten.")
    if "conv" in name:
        return "conv"
    if name.startswith(("addmm", "mm", "linear", "matmul", "_int_mm", "bmm", "baddbmm")):
        return "linear"   # (bmm: a linear layer on a strided 3-D input; attention here is SDPA)
    if "attention" in name or name.startswith(("_softmax", "softmax")):
        return "attention"
    if "norm" in name:
        return "norm"
    return "other"


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """Q·Kᵀ and P·V: 2 · 2·B·H·N·M·d (the CPU attention kernels have no formula in flop_counter)."""
    *batch, n, d = query_shape
    m = key_shape[-2]
    size = 1
    for b in batch:
        size *= b
    return 4 * size * n * m * d


def step_profile(fn: Callable[[], object]) -> dict[str, dict[str, float]]:
    """FLOPs and self time of one call of ``fn`` per layer type (``CATEGORIES``)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    custom = {}
    for name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_attention_math"):
        op = getattr(torch.ops.aten, name, None)
        if op is not None:
            custom[op] = _sdpa_flops
    with torch.inference_mode():
        fn()   # warm-up
        with FlopCounterMode(display=False, custom_mapping=custom) as counter:
            fn()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
    out = {c: {"flops": 0.0, "seconds": 0.0} for c in CATEGORIES}
    for op, flops in counter.get_flop_counts().get("Global", {}).items():
        out[category(getattr(op, "_qualified_op_name", str(op)))]["flops"] += flops
    for event in prof.key_averages():
        out[category(event.key)]["seconds"] += event.self_cpu_time_total / 1e6
    return out


def floor_report(profile_: dict[str, dict[str, float]], peak_gflops: float, step_seconds: float) -> dict:
    """Per layer type and for the step: GFLOP, seconds, GFLOP/s, fraction of the floor."""
    rows = {}
    for c, r in profile_.items():
        floor = r["flops"] / (peak_gflops * 1e9)
        rows[c] = {"gflop": round(r["flops"] / 1e9, 2), "seconds": round(r["seconds"], 3),
                   "gflops": round(r["flops"] / 1e9 / r["seconds"], 1) if r["seconds"] else None,
                   "of_floor": round(floor / r["seconds"], 3) if r["seconds"] and r["flops"] else None}
    total = sum(r["flops"] for r in profile_.values())
    floor = total / (peak_gflops * 1e9)
    rows["step"] = {"gflop": round(total / 1e9, 1), "seconds": round(step_seconds, 3), "floor_seconds": round(floor, 3),
                    "gflops": round(total / 1e9 / step_seconds, 1), "of_floor": round(floor / step_seconds, 3)}
    return rows


# -- the bench parts (sfumato bench --only floor / openvino) ------------------------------------------

def bench_floor(args, results: dict) -> None:
    """This CPU's matmul peaks and the fp32 (and, where native, bf16) UNet step against its floor, per
    layer type, for sfumato and diffusers on the same weights (``sfumato.floor``)."""
    peaks = matmul_peaks()
    results["matmul_peak_gflops"] = {k: round(v, 1) for k, v in peaks.items()}
    print(f"  matmul peaks (GFLOP/s): {results['matmul_peak_gflops']}", file=sys.stderr, flush=True)
    ours = build(lambda: UNetModel(SD1_UNET), 0)
    x = torch.randn(2, 4, 64, 64, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500.0, 500.0])
    ctx = torch.randn(2, 77, 768, generator=torch.Generator().manual_seed(2))
    for name, dtype in DTYPES.items():
        ours.to(dtype)
        if dtype != torch.float32 and ours.compute_dtype != dtype:
            continue   # bf16 weights computed in fp32 here (no native bf16): the fp32 floor is the one
        ref = diffusers_unet(ours, SD1_UNET)
        xd, cd = x.to(dtype), ctx.to(dtype)
        fns = {"sfumato": lambda: ours(xd, t, cd), "diffusers": lambda: ref(xd, t, cd).sample}
        times = timed(fns, args.warmup, args.repeats)
        for impl, fn in fns.items():
            report = floor_report(step_profile(fn), peaks[name], times[impl]["wall_s"])
            results[f"floor_unet_step_{name}_{impl}"] = report
            print(f"  {impl} {name}: step {report['step']}", file=sys.stderr, flush=True)
        ref = None


def bench_openvino(args, results: dict) -> None:
    """The UNet step (512², CFG) through the OpenVINO backend (``backends.openvino``) at each of its
    precisions, against sfumato's torch fp32 and diffusers fp32 on the same weights; the conversion
    (export + convert + compile, first call) timed apart. Skipped, and said so, without OpenVINO."""
    from .backends import openvino as ovb

    if not ovb.available():
        results["openvino"] = {"skipped": "pip install 'sfumato[openvino]'"}
        return
    import openvino

    ours = build(lambda: UNetModel(SD1_UNET), 0)
    ref = diffusers_unet(ours, SD1_UNET)
    x = torch.randn(2, 4, 64, 64, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500.0, 500.0])
    ctx = torch.randn(2, 77, 768, generator=torch.Generator().manual_seed(2))
    outputs = {}
    fns = {"sfumato (torch fp32)": lambda: outputs.__setitem__("torch", ours(x, t, ctx)),
           "diffusers": lambda: ref(x, t, ctx).sample}
    convert = {}
    precisions = ["f32", "bf16"] + (["int8"] if _has("nncf") else [])
    for precision in precisions:
        runner = ovb.OpenVINOUNet(ours, precision, cache=None)
        start = time.perf_counter()
        with torch.inference_mode():
            outputs[precision] = runner(x, t, ctx)
        convert[precision] = round(time.perf_counter() - start, 1)
        fns[f"sfumato (OpenVINO {precision})"] = lambda r=runner, k=precision: outputs.__setitem__(k, r(x, t, ctx))
    results["openvino_unet_step_512"] = timed(fns, args.warmup, args.repeats)
    results["openvino_unet_step_512"]["first_call_s"] = convert
    q = results["quality"]
    q["openvino_version"] = openvino.__version__
    for precision in precisions:
        q[f"unet_openvino_{precision}_vs_torch_fp32_rel_err"] = rel_err(outputs[precision], outputs["torch"])
