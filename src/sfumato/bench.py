"""sfumato against diffusers on this machine's CPU, same weights, same dtype, one run.

Builds one random-weight SD1.5-size model (sfumato's modules, seeded fan-in-scaled weights) and
gives diffusers / transformers the very same tensors (converted key names, ``assign=True``), then
measures, interleaving the two implementations so that load from other processes hits both alike:

- a UNet step with classifier-free guidance (batch 2, 64×64 latent, 77-token context),
- a VAE decode to 512×512 (and sfumato's tiled decode),
- text encoding (batch 2 × 77 tokens),
- loading a single-file checkpoint (fp16 on disk, a fresh process each time),
- peak RSS of a whole 512×512 txt2img, and of sfumato's VAE decode whole and tiled (fresh processes,
  ``VmHWM``),
- with ``--sdxl``, an SDXL-size UNet step at 1024×1024 in bf16;
- ``whole``: whole 512² images in fresh processes: 20 steps (sfumato fp32, bf16, int8, OpenVINO;
  diffusers fp32) and a 1-step SD-Turbo-style image;
- ``openvino``: the UNet step through the OpenVINO backend (f32, bf16, NNCF int8 weights), the
  first call (export, conversion, compilation) timed apart;
- ``floor``: this CPU's matmul peaks (fp32, bf16, int8) and the UNet step as a fraction of its
  floor, per layer type, for both implementations (``sfumato.floor``).

Times are medians over repeats after warm-up, both wall-clock and process CPU time (the latter
is steadier on a shared machine). Prints a table and the machine, writes ``--json``.

    sfumato bench [--quick] [--json out.json] [--only floor,unet,vae,text,load,memory] [--sdxl]
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from sfumato.bench_models import DTYPES, build, diffusers_unet, diffusers_vae, rel_err, timed, transformers_clip
from sfumato.checkpoint.io import save_file
from sfumato.floor import bench_floor, bench_openvino
from sfumato.checkpoint.specs import UNET_PREFIX, VAE_PREFIX
from sfumato.models.clip import CLIP_L, build_text_encoder
from sfumato.models.layers import cpu_has_fast_bf16, resolve_compute_dtype
from sfumato.models.unet import SD1_UNET, SDXL_UNET, UNetModel
from sfumato.models.vae import SD_VAE, AutoencoderKL
from sfumato.pipeline.tiling import tiled_decode

TEXT_PREFIX = "cond_stage_model.transformer."


# -- the machine ---------------------------------------------------------------------------------


def machine() -> dict:
    flags, model = set(), platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    import diffusers
    import transformers

    return {
        "cpu": model, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
        "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
        "flags": sorted(flags & {"avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16",
                                 "amx_int8", "amx_tile", "f16c", "avx512_fp16"}),
        "fast_bf16": cpu_has_fast_bf16(),
        "bf16_compute_dtype": str(resolve_compute_dtype(torch.bfloat16, torch.device("cpu"))).removeprefix("torch."),
        "loadavg_start": os.getloadavg(),
    }


def bench_unet(args, results: dict) -> None:
    ours = build(lambda: UNetModel(SD1_UNET), 0)
    x = torch.randn(2, 4, 64, 64, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500.0, 500.0])
    ctx = torch.randn(2, 77, 768, generator=torch.Generator().manual_seed(2))
    outputs = {}
    for name, dtype in DTYPES.items():
        ours.to(dtype)
        ref = diffusers_unet(ours, SD1_UNET)
        xd, cd = x.to(dtype), ctx.to(dtype)
        fns = {"sfumato": lambda: outputs.__setitem__(name, ours(xd, t, cd)),
               "diffusers": lambda: outputs.__setitem__("diffusers_" + name, ref(xd, t, cd).sample)}
        if dtype != torch.float32 and ours.compute_dtype != dtype:  # also show native bf16 arithmetic
            fns["sfumato (bf16 arithmetic)"] = lambda: _with_override(ours, dtype, lambda: ours(xd, t, cd))
        if args.compile:  # the warm-up run compiles
            compiled = torch.compile(ours)
            fns["sfumato (torch.compile)"] = lambda: compiled(xd, t, cd)
        if dtype == torch.float32:   # the 8-bit path (models.quant) from the same weights
            import copy

            from .models.quant import quantize_int8

            int8 = copy.deepcopy(ours)
            quantize_int8(int8)
            fns["sfumato (int8)"] = lambda: outputs.__setitem__("int8", int8(xd, t, cd))
        results[f"unet_step_{name}"] = timed(fns, args.warmup, args.repeats)
        results[f"unet_step_{name}"]["sfumato"]["compute_dtype"] = str(ours.compute_dtype).removeprefix("torch.")
        ref = int8 = None  # frees the previous dtype's tensors
    q = results["quality"]
    q["unet_int8_vs_fp32_rel_err"] = rel_err(outputs["int8"], outputs["fp32"])
    q["unet_fp32_sfumato_vs_diffusers_rel_err"] = rel_err(outputs["fp32"], outputs["diffusers_fp32"])
    q["unet_bf16_vs_fp32_rel_err"] = rel_err(outputs["bf16"], outputs["fp32"])
    q["unet_diffusers_bf16_vs_fp32_rel_err"] = rel_err(outputs["diffusers_bf16"], outputs["diffusers_fp32"])


def _with_override(model: nn.Module, dtype: torch.dtype, fn: Callable[[], object]) -> object:
    model.dtype_override = dtype
    try:
        return fn()
    finally:
        model.dtype_override = None


def bench_sdxl(args, results: dict) -> None:
    ours = build(lambda: UNetModel(SDXL_UNET), 0).to(torch.bfloat16)
    ref = diffusers_unet(ours, SDXL_UNET)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 128, 128, generator=g).bfloat16()
    ctx = torch.randn(2, 77, 2048, generator=g).bfloat16()
    text_embeds = torch.randn(2, 1280, generator=g).bfloat16()
    time_ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * 2)
    from sfumato.models.unet import timestep_embedding

    y = torch.cat([text_embeds.float(), timestep_embedding(time_ids.flatten(), 256).reshape(2, -1)], 1).bfloat16()
    t = torch.tensor([500.0, 500.0])
    added = {"text_embeds": text_embeds, "time_ids": time_ids.bfloat16()}
    results["sdxl_unet_step_bf16_1024"] = timed(
        {"sfumato": lambda: ours(x, t, ctx, y), "diffusers": lambda: ref(x, t, ctx, added_cond_kwargs=added).sample},
        min(args.warmup, 1), max(1, args.repeats // 2))


def bench_vae(args, results: dict) -> None:
    ours = build(lambda: AutoencoderKL(SD_VAE), 3)
    z = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(4))
    images = {}
    for name, dtype in DTYPES.items():
        ours.to(dtype)
        ref = diffusers_vae(ours)
        zd = z.to(dtype)
        fns = {
            "sfumato": lambda: images.__setitem__(name, ours.decode(zd)),
            "diffusers": lambda: images.__setitem__("diffusers_" + name, ref.decode(zd).sample),
            "sfumato tiled 32": lambda: images.__setitem__(name + "_tiled",
                                                           tiled_decode(ours, zd, tile=32, stats_size=32)),
        }
        results[f"vae_decode_512_{name}"] = timed(fns, args.warmup, args.repeats)
        ref = None  # frees the previous dtype's tensors
    q = results["quality"]
    q["vae_fp32_sfumato_vs_diffusers_rel_err"] = rel_err(images["fp32"], images["diffusers_fp32"])
    q["vae_bf16_vs_fp32_rel_err"] = rel_err(images["bf16"], images["fp32"])
    q["vae_diffusers_bf16_vs_fp32_rel_err"] = rel_err(images["diffusers_bf16"], images["diffusers_fp32"])
    tiled_diff = (images["fp32_tiled"] - images["fp32"]).abs()
    q["vae_tiled_vs_full_fp32_max_abs"] = tiled_diff.max().item()
    q["vae_tiled_vs_full_fp32_mean_abs"] = tiled_diff.mean().item()


def bench_text(args, results: dict) -> None:
    ours = build(lambda: build_text_encoder(CLIP_L), 5)
    tokens = torch.randint(0, 49406, (2, 77), generator=torch.Generator().manual_seed(6))
    for name, dtype in DTYPES.items():
        ours.to(dtype)
        ref = transformers_clip(ours)
        results[f"text_encode_{name}"] = timed(
            {"sfumato": lambda: ours(tokens).final, "transformers": lambda: ref(tokens).last_hidden_state},
            args.warmup, max(3, args.repeats))


# -- separate processes: load time and peak RSS --------------------------------------------------


def write_checkpoint(path: Path) -> None:
    """An SD1.5-layout single file with random fp16 weights (what released checkpoints store)."""
    sd = {}
    parts = ((UNET_PREFIX, lambda: UNetModel(SD1_UNET), 0), (VAE_PREFIX, lambda: AutoencoderKL(SD_VAE), 3),
             (TEXT_PREFIX, lambda: build_text_encoder(CLIP_L), 5))
    for prefix, make, seed in parts:
        module = build(make, seed)
        sd.update({prefix + k: v.half() for k, v in module.state_dict().items()})
        del module
    save_file(sd, path)


def write_diffusers_config(folder: Path) -> None:
    """The config files (no weights) diffusers needs to read our single file offline."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from sfumato.text.tokenizer import _load_vocab

    vocab = _load_vocab()
    tok_dir = folder / "tokenizer"
    tok_dir.mkdir(parents=True, exist_ok=True)
    (tok_dir / "vocab.json").write_text(json.dumps(vocab.encoder))
    merges = sorted(vocab.ranks, key=vocab.ranks.__getitem__)
    (tok_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=77)
    tokenizer.save_pretrained(tok_dir)
    with torch.device("meta"):
        unet = diffusers_unet(build_meta(lambda: UNetModel(SD1_UNET)), SD1_UNET)
        vae = diffusers_vae(build_meta(lambda: AutoencoderKL(SD_VAE)))
        text = transformers_clip(build_meta(lambda: build_text_encoder(CLIP_L)))
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionPipeline(vae, text, tokenizer, unet, sched, None, None,
                                   requires_safety_checker=False)
    pipe.save_config(folder)
    for name, part in (("unet", unet), ("vae", vae), ("scheduler", sched)):
        part.save_config(folder / name)
    text.config.save_pretrained(folder / "text_encoder")


def build_meta(make: Callable[[], nn.Module]) -> nn.Module:
    with torch.device("meta"):
        return make()


def child(spec: dict) -> None:
    """Runs in a fresh process and prints its timings and peak memory as JSON. ``spec``: ``task``
    (load, generate, decode), ``impl``, ``dtype``, ``threads`` and the task's own fields."""
    torch.set_num_threads(spec["threads"])
    task, impl, dtype = spec["task"], spec["impl"], spec["dtype"]
    result: dict = {}
    start = time.perf_counter()
    if task == "decode":  # sfumato's VAE alone: whole or tiled
        vae = build(lambda: AutoencoderKL(SD_VAE), 3).to(DTYPES[dtype])
        z = torch.randn(1, 4, spec["side"], spec["side"], generator=torch.Generator().manual_seed(4))
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS, forgetting the weights' set-up
        base = _proc_status("VmRSS")
        start = time.perf_counter()
        with torch.inference_mode():
            tiled_decode(vae, z, tile=spec["tile"], stats_size=spec["tile"]) if spec["tile"] else vae.decode(z)
        result["above_weights_gib"] = (_proc_status("VmHWM") - base) / 2**20
    elif impl == "sfumato":
        import sfumato

        pipe = sfumato.load(spec["ckpt"], dtype=dtype, low_memory=spec.get("low_memory", False),
                            by_stage=spec.get("by_stage", False), quant=spec.get("quant"),
                            backend=spec.get("backend", "torch"), backend_precision=spec.get("precision", "f32"),
                            few_step="none")
        if spec.get("compute") == "bf16":   # bf16 arithmetic as on CPUs with fast native bf16
            pipe.model.unet.dtype_override = pipe.model.vae.dtype_override = torch.bfloat16
        result["load_s"] = time.perf_counter() - start
        if task == "generate":
            def generate():
                pipe.txt2img("a red circle", width=512, height=512, steps=spec["steps"], sampler="Euler",
                             cfg_scale=spec.get("cfg", 7.0), scheduler=spec.get("scheduler"), seed=1, watermark=False)

            if spec.get("warm"):   # a first image (OpenVINO converts and compiles here), timed apart
                t0 = time.perf_counter()
                generate()
                result["first_image_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            generate()
            result["generate_s"] = time.perf_counter() - t0
    else:
        from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_single_file(spec["ckpt"], config=spec["config"], local_files_only=True,
                                                        torch_dtype=DTYPES[dtype], safety_checker=None,
                                                        requires_safety_checker=False)
        result["load_s"] = time.perf_counter() - start
        if task == "generate":
            pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
            t0 = time.perf_counter()
            with torch.inference_mode():
                pipe("a red circle", width=512, height=512, num_inference_steps=spec["steps"],
                     guidance_scale=spec.get("cfg", 7.0), generator=torch.Generator().manual_seed(1))
            result["generate_s"] = time.perf_counter() - t0
    result["total_s"] = time.perf_counter() - start
    # VmHWM belongs to this process's own address space; ru_maxrss would start from the parent's
    # resident set at fork time.
    result["peak_rss_gib"] = _proc_status("VmHWM") / 2**20
    print(json.dumps(result))


def in_process(env: dict[str, str] | None = None, **spec) -> dict:
    """Run `child` with `spec` in a fresh interpreter (this process's thread count)."""
    spec["threads"] = torch.get_num_threads()
    cmd = [sys.executable, "-m", "sfumato.bench", "--child", json.dumps(spec, default=str)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    if proc.returncode:
        return {"error": f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# glibc raises its mmap threshold as large blocks are freed, then serves blocks of the sizes seen
# from a heap it rarely returns: RSS then counts that slack too. A fixed threshold shows the
# computation's own needs (and is what a memory-tight deployment would set).
FIXED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": str(1 << 18)}


def bench_tiling(args, results: dict) -> None:
    """Peak memory of a VAE decode in bf16 above the resident weights, in fresh processes: whole at
    512², tiled (32-latent-pixel tiles and statistics) at 512² and at 1024²; glibc's default
    allocator and a fixed mmap threshold."""
    if not Path("/proc/self/clear_refs").exists():
        return
    cases = {"whole 512": (64, 0), "tiled 512": (64, 32), "tiled 1024": (128, 32)}
    rows = {}
    for name, (side, tile) in cases.items():
        rows[name] = in_process(task="decode", impl="sfumato", dtype="bf16", side=side, tile=tile)
        rows[name + ", fixed mmap threshold"] = in_process(FIXED_MMAP_THRESHOLD, task="decode", impl="sfumato",
                                                           dtype="bf16", side=side, tile=tile)
    results["vae_decode_memory_bf16"] = rows


def _proc_status(key: str) -> int:
    """A ``/proc/self/status`` value in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def bench_processes(args, results: dict, parts: set[str], workdir: Path) -> None:
    ckpt, config = workdir / "sd15-random.safetensors", workdir / "diffusers-config"
    print("writing a random SD1.5 checkpoint…", file=sys.stderr, flush=True)
    write_checkpoint(ckpt)
    write_diffusers_config(config)
    impls = ("sfumato", "diffusers")
    if "load" in parts:
        for dtype in DTYPES:
            runs = {impl: [in_process(task="load", impl=impl, ckpt=ckpt, config=config, dtype=dtype)
                           for _ in range(1 + args.repeats)][1:] for impl in impls}
            results[f"load_{dtype}"] = {impl: _median_runs(rs) for impl, rs in runs.items()}
    if "whole" in parts:
        bench_whole(args, results, ckpt, config, workdir)
    if "memory" in parts:
        steps = 2 if args.quick else 4
        results["generate_512_bf16"] = {
            impl: in_process(task="generate", impl=impl, ckpt=ckpt, config=config, dtype="bf16", steps=steps)
            for impl in impls
        }
        results["generate_512_bf16"]["sfumato, fixed mmap threshold"] = in_process(
            FIXED_MMAP_THRESHOLD, task="generate", impl="sfumato", ckpt=ckpt, config=config, dtype="bf16", steps=steps)
        if resolve_compute_dtype(torch.bfloat16, torch.device("cpu")) != torch.bfloat16:
            results["generate_512_bf16"]["sfumato, bf16 arithmetic forced"] = in_process(
                task="generate", impl="sfumato", ckpt=ckpt, config=config, dtype="bf16", steps=steps, compute="bf16")
        results["generate_512_bf16"]["sfumato, by stage (sfumato txt2img)"] = in_process(
            task="generate", impl="sfumato", ckpt=ckpt, config=config, dtype="bf16", steps=steps, by_stage=True)
        results["generate_512_bf16"]["sfumato, low memory"] = in_process(
            task="generate", impl="sfumato", ckpt=ckpt, config=config, dtype="bf16", steps=steps, low_memory=True)
        results["generate_512_bf16"]["steps"] = steps


def bench_whole(args, results: dict, ckpt: Path, config: Path, workdir: Path) -> None:
    """Whole 512² txt2img images, each path in a fresh process: 20 Euler steps at CFG 7 (sfumato in its
    auto dtype, int8, OpenVINO at this CPU's fast precision; diffusers fp32), and one step at CFG 1
    (an SD-Turbo-style image: the trailing schedule's single step, no uncond pass). The OpenVINO rows
    make one image first (conversion and compilation, ``first_image_s``) and time the second."""
    from .backends.openvino import available

    env = {"SFUMATO_CACHE": str(workdir / "cache")}
    fast_bf16 = cpu_has_fast_bf16()
    paths = {"sfumato (auto dtype)": dict(dtype="auto"), "sfumato int8": dict(dtype="auto", quant="int8")}
    if available():   # OpenVINO at the precision this CPU runs fastest (its UNet step: the `openvino` part)
        precision = "bf16" if fast_bf16 else "f32"
        paths[f"sfumato OpenVINO {precision}"] = dict(dtype="fp32", backend="openvino", precision=precision, warm=True)
    for name, steps, cfg, scheduler in (("txt2img_512_20_steps", 20, 7.0, None), ("turbo_512_1_step", 1, 1.0, "trailing")):
        rows = {impl: in_process(env, task="generate", impl="sfumato", ckpt=ckpt, config=config, steps=steps, cfg=cfg,
                                 scheduler=scheduler, **opts) for impl, opts in paths.items()}
        if name.startswith("txt2img"):
            rows["diffusers"] = in_process(task="generate", impl="diffusers", ckpt=ckpt, config=config, dtype="fp32",
                                           steps=steps, cfg=cfg)
        results[name] = {impl: {k: round(v, 2) for k, v in r.items()} for impl, r in rows.items()}
        save(args, results)


def _median_runs(runs: list[dict]) -> dict:
    if any("error" in r for r in runs):
        return next(r for r in runs if "error" in r)
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


# -- report --------------------------------------------------------------------------------------


def table(results: dict) -> str:
    lines = [f"{'benchmark':28s} {'impl':28s} {'wall s':>8s} {'cpu s':>8s} {'speed-up':>9s}"]
    for key, rows in results.items():
        if key == "matmul_peak_gflops":
            lines.append(f"{key:28s} " + ", ".join(f"{k}={v:.1f}" for k, v in rows.items()))
            continue
        if not isinstance(rows, dict) or key in ("machine", "quality"):
            continue
        base = next((r for name, r in rows.items() if name in ("diffusers", "transformers")), None)
        for name, r in rows.items():
            if not isinstance(r, dict):
                continue
            if "cpu_s" in r:
                ratio = f"{base['wall_s'] / r['wall_s']:.2f}x" if base and "wall_s" in base else ""
                lines.append(f"{key:28s} {name:28s} {r['wall_s']:8.2f} {r['cpu_s']:8.2f} {ratio:>9s}")
            else:
                lines.append(f"{key:28s} {name:28s} " + ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                                                                for k, v in r.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m sfumato.bench --child SPEC`` (a measurement in a fresh process), else ``sfumato bench``."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) > 1 and argv[0] == "--child":
        child(json.loads(argv[1]))
        return 0
    from .commands import main as command

    return command(["bench", *argv])


def run(args, parts: set[str]) -> None:
    """The measurements ``parts`` with ``args`` (``commands.bench``'s options), printed as a table."""
    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict = {"machine": machine(), "quality": {}}
    print(json.dumps(results["machine"]), file=sys.stderr)
    # separate processes first, while this one is small: their peaks and ours add up
    if parts & {"load", "memory", "whole"}:
        with tempfile.TemporaryDirectory(prefix="sfumato-bench-") as tmp:
            bench_processes(args, results, parts, Path(tmp))
            save(args, results)
    steps = [(bench_floor, "floor" in parts), (bench_tiling, "tiling" in parts), (bench_unet, "unet" in parts),
             (bench_openvino, "openvino" in parts),
             (bench_vae, "vae" in parts),
             (bench_text, "text" in parts), (bench_sdxl, args.sdxl)]
    for step, wanted in steps:
        if wanted:
            step(args, results)
            save(args, results)
    results["machine"]["loadavg_end"] = os.getloadavg()
    save(args, results)
    print(table(results))
    print("quality:", json.dumps(results["quality"]))
    print("machine:", json.dumps(results["machine"]))


def save(args, results: dict) -> None:
    """Write the results so far (a crash or interruption later keeps them)."""
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
