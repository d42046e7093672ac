"""The GPU path end to end, on SD 1.5-size random weights (fp16 on disk, as released checkpoints):
load, txt2img 20 steps at 512², img2img, a ControlNet, the hires fix, a tiled VAE decode — each with
its seconds, it/s and peak GPU memory, printed as a table and kept as JSON.

    python bench/gpu.py [--device cuda] [--steps 20] [--json gpu.json]

Needs a CUDA (or MPS) device; on a machine without one it says so and exits 2. The weights are random
(``sfumato.bench.write_checkpoint``), so the images are noise: this measures speed and memory, and
that every stage runs without NaN (a NaN is an error, never a black image).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

import sfumato
from sfumato.api import resolve_device
from sfumato.bench import build, write_checkpoint
from sfumato.checkpoint.io import save_file
from sfumato.errors import SfumatoError
from sfumato.models.controlnet import ControlNet, ControlNetConfig
from sfumato.models.unet import SD1_UNET
from sfumato.pipeline.params import ControlSpec


def _peak(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**30
    return float("nan")


def _reset(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _timed(device: str, steps: int, fn) -> dict:
    _reset(device)
    start = time.perf_counter()
    result = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 3), "it_per_s": round(steps / seconds, 2) if steps else None,
            "peak_gib": round(_peak(device), 3), "result": result}


def run(device: str, steps: int, workdir: Path) -> dict[str, dict]:
    ckpt, control = workdir / "sd15-random.safetensors", workdir / "control-random.safetensors"
    write_checkpoint(ckpt)
    cn = build(lambda: ControlNet(ControlNetConfig(SD1_UNET)), 7)
    save_file({"control_model." + k: v.half().contiguous() for k, v in cn.state_dict().items()}, control)
    del cn
    rows: dict[str, dict] = {}
    rows["load"] = _timed(device, 0, lambda: sfumato.load(ckpt, device=device))
    pipe = rows["load"].pop("result")
    kw = dict(steps=steps, seed=1, width=512, height=512, watermark=False)
    rows["txt2img 512²"] = _timed(device, steps, lambda: pipe.txt2img("a lighthouse", **kw))
    init = rows["txt2img 512²"].pop("result").images[0]
    rows["img2img 512², strength 0.6"] = _timed(
        device, int(steps * 0.6), lambda: pipe.img2img("a lighthouse", init, strength=0.6, **kw))
    hint = Image.new("RGB", (512, 512), "white")
    rows["txt2img + ControlNet"] = _timed(
        device, steps, lambda: pipe.txt2img("a lighthouse", control=[ControlSpec(control, hint, "canny")], **kw))
    rows["hires fix 512² → 1024²"] = _timed(
        device, 2 * steps, lambda: pipe.txt2img("a lighthouse", hires_scale=2.0, hires_denoise=0.5, **kw))
    latents = torch.randn(1, 4, 256, 256, generator=torch.Generator().manual_seed(2))
    rows["VAE decode 2048² (tiled)"] = _timed(device, 0, lambda: pipe.engine.decode(latents))
    for row in rows.values():
        row.pop("result", None)
    return rows


def table(rows: dict[str, dict], device: str) -> str:
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else device
    lines = [f"sfumato {sfumato.__version__}, torch {torch.__version__}, {name}",
             f"{'stage':<30}{'seconds':>10}{'it/s':>8}{'peak GiB':>10}"]
    for stage, r in rows.items():
        lines.append(f"{stage:<30}{r['seconds']:>10.2f}{r['it_per_s'] or '':>8}{r['peak_gib']:>10.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", help="auto (CUDA when present), cuda, cuda:N or mps")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)
    try:
        device = resolve_device(args.device)
    except SfumatoError as e:
        print(f"bench/gpu.py: {e}", file=sys.stderr)
        return 2
    if device == "cpu":
        print("bench/gpu.py: no GPU here (device auto is the CPU); see `sfumato bench` for the CPU", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="sfumato-gpu-") as tmp:
        rows = run(device, args.steps, Path(tmp))
    print(table(rows, device))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
