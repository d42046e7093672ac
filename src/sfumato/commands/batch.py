"""``sfumato batch PROMPTS.(jsonl|csv) --out DIR``: argparse wiring for :mod:`sfumato.batch`.

``add_commands(subparsers)`` adds the command to the main parser (it sets ``func``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..batch import FIELDS
from ..errors import SfumatoError

_HELP = {
    "seed": "base seed: a line without a seed gets SEED + its 0-based job index (default 0)",
    "width": "default: the model's native size",
    "height": "default: the model's native size",
}


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "batch", help="generate the images of every line of a JSONL or CSV file (resumable)",
        description="One txt2img job per line: a prompt plus optional per-line settings (the flags "
                    "below, in snake_case). Outputs OUT/NNNNN-K.png and OUT/manifest.jsonl; rerunning "
                    "the same command resumes.")
    p.add_argument("jobs", metavar="PROMPTS",
                   help="a .jsonl file (one JSON object a line) or a .csv file with a header")
    p.add_argument("--out", required=True, help="output folder (created; holds the images and manifest.jsonl)")
    p.add_argument("--model", help="checkpoint file or diffusers folder (default: the bundled model)")
    p.add_argument("--vae", help="a VAE file to use instead of the checkpoint's")
    p.add_argument("--prediction", choices=("eps", "v"), help="override the prediction type (SD 2.x)")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "fp16", "bf16"))
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N or mps "
                                                    "(with --ray: each worker's)")
    p.add_argument("--no-watermark", action="store_true", help="do not add the invisible watermark")
    p.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                   help="run on a Ray cluster (no ADDRESS: start a local one); put it after PROMPTS")
    p.add_argument("--workers", type=int, help="Ray workers (default: one per GPU, else one)")
    p.add_argument("--threads", type=int,
                   help="torch CPU threads per process or Ray worker (Ray default: CPUs / workers); "
                        "images are bit-identical across runs with the same thread count")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    for name, kind in FIELDS.items():
        if name != "prompt":
            p.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=_HELP.get(name))
    p.set_defaults(func=cmd_batch)


def cmd_batch(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..batch import load_jobs, model_label, open_run, run_local
    from ..data import BUNDLED_PATH

    for flag in ("workers", "threads"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise SfumatoError(f"--{flag}: must be at least 1, got {getattr(args, flag)}")
    if args.workers is not None and args.ray is None:
        raise SfumatoError("--workers: only with --ray")
    if args.ray is None:   # a Ray cluster's workers may have devices this machine lacks
        from ..api import resolve_device

        resolve_device(args.device)
    overrides = {name: getattr(args, name) for name in FIELDS if name not in ("prompt", "seed")}
    overrides = {name: value for name, value in overrides.items() if value is not None}
    jobs = load_jobs(args.jobs, overrides, base_seed=0 if args.seed is None else args.seed)
    model = args.model or str(BUNDLED_PATH)
    if not args.ray and not Path(model).exists():   # a remote cluster's workers may see other files
        raise SfumatoError(f"--model: {model} not found")
    manifest, todo = open_run(jobs, args.out, model_label(model))
    with tqdm(total=len(jobs), initial=len(jobs) - len(todo), unit="job", desc="batch", file=sys.stderr,
              disable=True if args.no_progress else None) as bar:
        if todo and args.ray is not None:
            from ..batch_ray import run_ray

            run_ray(todo, args.out, manifest, model=model, address=args.ray or None, workers=args.workers,
                    threads=args.threads, vae=args.vae, prediction=args.prediction, dtype=args.dtype,
                    watermark=not args.no_watermark, bar=bar, device=args.device)
        elif todo:
            import torch

            from ..api import load

            if args.threads is not None:
                torch.set_num_threads(args.threads)
            pipe = load(model, vae=args.vae, prediction=args.prediction, dtype=args.dtype, device=args.device)
            run_local(todo, args.out, manifest, pipe, watermark=not args.no_watermark, bar=bar)
    print(f"{args.out}: {len(jobs)} jobs done ({len(todo)} generated now, {len(jobs) - len(todo)} already there)")
    return 0

