"""``sfumato info MODEL`` (family, prediction type, components, hash) and ``sfumato png-info FILE``
(the generation parameters an image carries)."""

from __future__ import annotations

import argparse
import json

from ..errors import SfumatoError


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("png-info", help="print the generation parameters stored in an image")
    p.add_argument("file")
    p.set_defaults(func=cmd_png_info)
    p = subparsers.add_parser("info", help="describe a checkpoint: family, prediction type, components, hash")
    p.add_argument("model")
    p.add_argument("--prediction", choices=("eps", "v"))
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)


def cmd_png_info(args: argparse.Namespace) -> int:
    from ..pipeline.infotext import read_image_parameters

    text = read_image_parameters(args.file, "file")
    if text is None:
        raise SfumatoError(f"file: {args.file} carries no generation parameters")
    print(text)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from ..checkpoint.info import describe

    info = describe(args.model, prediction=args.prediction)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            if isinstance(value, dict):
                value = ", ".join(f"{k}: {v}" for k, v in value.items())
            print(f"{key:>17}: {value}")
    return 0
