"""``sfumato bench``: sfumato against diffusers on this machine (``sfumato.bench``). The peer it measures
against is a test-only dependency: without the dev extra the command says so in one line."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import SfumatoError

PARTS = ("load", "memory", "whole", "tiling", "floor", "unet", "openvino", "vae", "text")


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="time sfumato against diffusers on this machine (needs the dev extra)",
                              description="sfumato against diffusers on this machine's CPU: same weights, same "
                                          "dtype, one run; prints a table and ratios.")
    p.add_argument("--quick", action="store_true", help="1 warm-up + 2 repeats (default 1 + 5)")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--only", default=",".join(PARTS), type=_parts,
                   help=f"comma-separated subset of {', '.join(PARTS)}")
    p.add_argument("--sdxl", action="store_true", help="also an SDXL-size UNet step at 1024² in bf16 (~6 GB)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--compile", action="store_true", help="also time the UNet under torch.compile")
    p.set_defaults(func=cmd_bench)


def _parts(text: str) -> str:
    unknown = set(text.split(",")) - set(PARTS)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown part(s) {', '.join(sorted(unknown))}; valid: {', '.join(PARTS)}")
    return text


def cmd_bench(args: argparse.Namespace) -> int:
    parts = set(args.only.split(","))
    try:
        import diffusers  # noqa: F401  (the peer measured against; a test-only dependency)
    except ImportError:
        raise SfumatoError("sfumato bench measures against diffusers: install the dev extra first "
                           "(pip install -e '.[dev]')") from None
    from ..bench import run

    args.warmup, args.repeats = 1, 2 if args.quick else 5
    run(args, parts)
    return 0
