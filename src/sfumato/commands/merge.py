"""``sfumato merge A B [C] --mode weighted|add-difference --alpha X -o OUT.safetensors``: argparse
wiring for :mod:`sfumato.adapters.merge`.

``add_commands(subparsers)`` adds the command to the main parser (it sets ``func``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import SfumatoError


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "merge", help="merge checkpoints: weighted sum or add difference",
        description="Merge single-file checkpoints key by key, as A1111's checkpoint merger does: "
                    "weighted: (1-alpha)*A + alpha*B; add-difference: A + alpha*(B - C). The output has "
                    "A's keys and records the recipe in its metadata (sfumato.merge).")
    p.add_argument("a", metavar="A", help="primary model (its keys, buffers and metadata are kept)")
    p.add_argument("b", metavar="B", help="secondary model")
    p.add_argument("c", metavar="C", nargs="?", help="tertiary model (add-difference only)")
    p.add_argument("--mode", default="weighted", choices=("weighted", "add-difference"))
    p.add_argument("--alpha", type=float, required=True, help="the multiplier: B's share, or the difference's")
    p.add_argument("-o", "--output", required=True, help="the merged .safetensors file")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), help="storage dtype of the weights (default: A's)")
    p.add_argument("--skip-vae", action="store_true", help="keep A's VAE instead of merging it")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_merge)


def cmd_merge(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..adapters.merge import DTYPES, merge_models

    if args.mode == "weighted" and args.c is not None:
        raise SfumatoError("C: --mode weighted merges two models; pass --mode add-difference to use a third")
    if args.mode == "add-difference" and args.c is None:
        raise SfumatoError("C: --mode add-difference needs a third model (A + alpha*(B - C))")
    output = Path(args.output)
    if output.exists() and not args.overwrite:
        raise SfumatoError(f"--output: {output} exists (pass --overwrite to replace it)")
    with tqdm(unit="tensor", desc="merge", file=sys.stderr, disable=args.no_progress) as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        result = merge_models(args.a, args.b, args.c, output=output, mode=args.mode, alpha=args.alpha,
                              dtype=DTYPES[args.dtype] if args.dtype else None, skip_vae=args.skip_vae,
                              progress=progress)
    plan = result.plan
    print(f"{output}: {plan.family}, {args.mode} alpha={args.alpha:g}; merged {len(plan.merged) + len(plan.partial)} "
          f"tensors, kept {len(plan.kept)} buffers/non-float tensors from A")
    if plan.partial:
        print(f"  inpainting A: merged the leading input channels of {', '.join(plan.partial)}")
    if plan.copied:
        reasons: dict[str, list[str]] = {}
        for key, why in plan.copied.items():
            reasons.setdefault(why, []).append(key)
        for why, keys in reasons.items():
            print(f"  {len(keys)} tensors copied from A ({why}), e.g. {', '.join(keys[:3])}")
    if plan.dropped:
        keys = list(plan.dropped)
        print(f"  {len(keys)} keys not in A left out, e.g. {', '.join(f'{k} ({plan.dropped[k]})' for k in keys[:3])}")
    return 0

