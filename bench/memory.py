"""Peak resident memory of sfumato, each case in a fresh process (``VmHWM`` from /proc/self/status).

- a whole 512×512 txt2img (load + text encoding + sampling + VAE decode) of a random-weight SD1.5-size
  single file in bf16: normal (all kept), by-stage (``by_stage``: each component read in for its stage,
  what ``sfumato txt2img`` does with a .safetensors file) and ``low_memory``; the load's peak and the generation's peak (the
  high-water mark reset after loading) are reported apart;
- an AnimateDiff clip (``--only animate``): 16 frames at 512² with a random motion module of
  mm_sd_v15_v2's shapes, sampled as one context window, each frame decoded on its own;
- the VAE decode alone at 512², 1024² and 2048² (bf16 weights), whole and tiled, above the
  resident weights: tiled, the peak should not grow with the image area.

The checkpoint stores fp16 (what released files hold; loading as bf16 converts every tensor) or,
with ``--storage bf16``, bf16 (no conversion: the weights stay in the file's memory map). Linux only.

    python bench/memory.py [--steps 2] [--only generate,decode] [--sides 64,128,256] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from sfumato.bench import TEXT_PREFIX, _proc_status  # sfumato bench's process helpers
from sfumato.bench_models import build, random_  # its seeded random weights
from sfumato.checkpoint.io import save_file
from sfumato.checkpoint.specs import UNET_PREFIX, VAE_PREFIX
from sfumato.models.clip import CLIP_L, build_text_encoder
from sfumato.models.unet import SD1_UNET, UNetModel
from sfumato.models.vae import SD_VAE, AutoencoderKL

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def write_checkpoint(path: Path, dtype: torch.dtype) -> None:
    """An SD1.5-layout single file with bench.py's random weights, stored in `dtype`; one component in
    fp32 at a time while it is built."""
    sd = {}
    parts = ((UNET_PREFIX, lambda: UNetModel(SD1_UNET), 0), (VAE_PREFIX, lambda: AutoencoderKL(SD_VAE), 3),
             (TEXT_PREFIX, lambda: build_text_encoder(CLIP_L), 5))
    for prefix, make, seed in parts:
        module = build(make, seed).to(dtype)
        sd.update({prefix + k: v for k, v in module.state_dict().items()})
        del module
    save_file(sd, path)


def _gib(kib: int) -> float:
    return round(kib / 2**20, 3)


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def child(spec: dict) -> dict:
    torch.set_num_threads(spec["threads"])
    result: dict = {}
    if spec["task"] == "write":
        write_checkpoint(Path(spec["ckpt"]), DTYPES[spec["storage"]])
    elif spec["task"] == "generate":
        import sfumato

        start = time.perf_counter()
        pipe = sfumato.load(spec["ckpt"], dtype="bf16", low_memory=spec["mode"] == "low",
                            by_stage=spec["mode"] == "by-stage")
        if spec.get("compute") == "bf16":   # bf16 arithmetic too, as on CPUs with fast native bf16
            pipe.model.unet.dtype_override = pipe.model.vae.dtype_override = torch.bfloat16
        result["load_s"] = round(time.perf_counter() - start, 2)
        result["load_peak_gib"] = _gib(_proc_status("VmHWM"))
        result["after_load_gib"] = _gib(_proc_status("VmRSS"))
        _reset_peak()
        start = time.perf_counter()
        sampling = []  # the high-water mark after each step: text encoding and sampling, before the decode
        pipe.txt2img("a red circle", width=512, height=512, steps=spec["steps"], sampler="Euler", cfg_scale=7.0,
                     seed=1, watermark=False, callback=lambda rec: sampling.append(_proc_status("VmHWM")))
        result["generate_s"] = round(time.perf_counter() - start, 2)
        result["sampling_peak_gib"] = _gib(max(sampling))
        result["generate_peak_gib"] = _gib(_proc_status("VmHWM"))
        result["peak_gib"] = max(result["load_peak_gib"], result["generate_peak_gib"])
    elif spec["task"] == "animate":   # an AnimateDiff clip: 16 frames, each decoded on its own
        import sfumato
        from sfumato.models.motion import MotionAdapter, MotionConfig

        motion = Path(spec["ckpt"]).with_name("mm-v2-random.safetensors")
        if not motion.exists():
            adapter = random_(MotionAdapter(MotionConfig()), 7)   # mm_sd_v15_v2's shapes (built here: its buffers)
            save_file({k: v.to(torch.float16).contiguous() for k, v in adapter.state_dict().items()}, motion)
            del adapter
        _reset_peak()
        pipe = sfumato.load(spec["ckpt"], dtype="bf16")
        result["load_peak_gib"] = _gib(_proc_status("VmHWM"))
        _reset_peak()
        start = time.perf_counter()
        sampling = []
        clip = pipe.animate("a red circle moving to the right", motion_module=motion, frames=spec["frames"],
                            width=512, height=512, steps=spec["steps"], sampler="Euler", cfg_scale=7.0, seed=1,
                            watermark=False, callback=lambda rec: sampling.append(_proc_status("VmHWM")))
        result["frames"] = len(clip.frames)
        result["generate_s"] = round(time.perf_counter() - start, 2)
        result["sampling_peak_gib"] = _gib(max(sampling))
        result["generate_peak_gib"] = _gib(_proc_status("VmHWM"))
        result["peak_gib"] = max(result["load_peak_gib"], result["generate_peak_gib"])
    else:  # the VAE decode alone, whole or tiled, as the generation loop calls it
        from sfumato.pipeline import tiling

        vae = build(lambda: AutoencoderKL(SD_VAE), 3).to(torch.bfloat16)
        z = torch.randn(1, 4, spec["side"], spec["side"], generator=torch.Generator().manual_seed(4))
        _reset_peak()
        base = _proc_status("VmRSS")
        start = time.perf_counter()
        with torch.no_grad():
            if spec["tile"]:
                tiling.tiled_decode(vae, z, tile=spec["tile"], stats_size=spec["tile"])
            else:
                vae.decode(z)
        result["decode_s"] = round(time.perf_counter() - start, 2)
        result["above_weights_gib"] = _gib(_proc_status("VmHWM") - base)
        result["peak_gib"] = _gib(_proc_status("VmHWM"))
    return result


def in_process(**spec) -> dict:
    spec["threads"] = torch.get_num_threads()
    cmd = [sys.executable, __file__, "--child", json.dumps(spec, default=str)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if proc.returncode:
        return {"error": f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        print(json.dumps(child(json.loads(sys.argv[2]))))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--storage", choices=("fp16", "bf16"), default="fp16", help="the checkpoint's storage dtype")
    ap.add_argument("--only", default="generate,decode", help="generate, decode, animate (an AnimateDiff clip)")
    ap.add_argument("--frames", type=int, default=16, help="animate: the clip's frames")
    ap.add_argument("--modes", default="normal,by-stage,low",
                    help="generate: normal (all kept), by-stage (each component loaded for its stage), low (low_memory)")
    ap.add_argument("--sides", default="64,128,256", help="decode: latent sides (×8 image pixels)")
    ap.add_argument("--tiles", default="0,64,32", help="decode: 0 = whole, else tile (and statistics) size")
    ap.add_argument("--compute", choices=("auto", "bf16"), default="auto",
                    help="generate: the arithmetic dtype; auto = this CPU's rule (fp32 where bf16 is slow), bf16 = forced")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--ckpt", type=Path, help="keep the random checkpoint here (reused when it exists)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if not Path("/proc/self/clear_refs").exists():
        sys.exit("bench/memory.py needs Linux (/proc/self/clear_refs)")
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = set(args.only.split(","))
    results: dict = {"machine": {"cores": os.cpu_count(), "threads": torch.get_num_threads(),
                                 "torch": torch.__version__, "loadavg_start": os.getloadavg()}}

    def report(key: str, value: dict) -> None:
        results[key] = value
        print(f"{key}: {json.dumps(value)}", flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))

    if "generate" in parts:
        with tempfile.TemporaryDirectory(prefix="sfumato-memory-") as tmp:
            ckpt = args.ckpt or Path(tmp) / f"sd15-random-{args.storage}.safetensors"
            if not ckpt.exists():
                print(f"writing a random SD1.5 checkpoint ({args.storage})…", file=sys.stderr, flush=True)
                in_process(task="write", ckpt=ckpt, storage=args.storage)  # its ~3.5 GB peak leaves with the child
            for mode in args.modes.split(","):
                report(f"generate_512_bf16_{args.storage}_file_{mode}_compute_{args.compute}",
                       in_process(task="generate", ckpt=ckpt, steps=args.steps, mode=mode,
                                  compute=args.compute))
    if "animate" in parts:
        with tempfile.TemporaryDirectory(prefix="sfumato-memory-") as tmp:
            ckpt = args.ckpt or Path(tmp) / f"sd15-random-{args.storage}.safetensors"
            if not ckpt.exists():
                in_process(task="write", ckpt=ckpt, storage=args.storage)
            report(f"animate_{args.frames}x512_bf16_{args.storage}_file",
                   in_process(task="animate", ckpt=ckpt, steps=args.steps, frames=args.frames))
    if "decode" in parts:
        for tile in (int(t) for t in args.tiles.split(",")):
            for side in (int(s) for s in args.sides.split(",")):
                if tile == 0 and side > 128:
                    continue  # a whole 2048² decode needs ~10 GB of activations
                name = "whole" if tile == 0 else f"tiled {tile}"
                report(f"decode_{side * 8}_bf16_{name}", in_process(task="decode", side=side, tile=tile))
    results["machine"]["loadavg_end"] = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
