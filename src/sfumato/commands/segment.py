"""``sfumato segment``: Segment Anything masks from points and a box."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import SfumatoError


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("segment", help="a mask of the object at points / in a box (Segment Anything)")
    p.add_argument("--image", required=True)
    p.add_argument("--point", action="append", default=[], metavar="X,Y[:neg]",
                   help="a point on the object (repeatable); ':neg' marks a point off it")
    p.add_argument("--box", metavar="X0,Y0,X1,Y1", help="a box around the object")
    p.add_argument("--sam", required=True, metavar="FILE",
                   help="sam_vit_{b,l,h}_*.pth (or .safetensors), or a transformers SamModel folder")
    p.add_argument("--single", action="store_true", help="the single-mask output instead of the best of three")
    p.add_argument("--all", action="store_true", help="write every mask: OUT-0.png, OUT-1.png, … (scores printed)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N or mps")
    p.add_argument("-o", "--output", required=True, help="the mask (PNG, white = the object)")
    p.set_defaults(func=cmd_segment)


def _numbers(text: str, count: int, field: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != count:
        raise SfumatoError(f"{field}: expected {count} comma-separated numbers, got {text!r}")
    return values


def parse_point(text: str) -> tuple[float, float, int]:
    """``X,Y`` (positive) or ``X,Y:neg`` / ``X,Y:pos``."""
    coords, _, kind = text.partition(":")
    if kind not in ("", "pos", "neg"):
        raise SfumatoError(f"--point: the label must be pos or neg, got {kind!r}")
    x, y = _numbers(coords, 2, "--point")
    return x, y, 0 if kind == "neg" else 1


def cmd_segment(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image

    from ..api import resolve_device
    from ..checkpoint.sam import load_sam
    from ..pipeline.segment import Segmenter
    from ..safe_image import open_image

    output = Path(args.output)
    if not output.parent.is_dir():
        raise SfumatoError(f"--output: folder {output.parent} does not exist")
    points = [parse_point(p) for p in args.point]
    box = tuple(_numbers(args.box, 4, "--box")) if args.box else None
    if not points and box is None:
        raise SfumatoError("--point: give at least one point or a --box")
    image = open_image(args.image, "--image")
    segmenter = Segmenter(load_sam(args.sam, device=resolve_device(args.device)))
    segmenter.set_image(image)
    result = segmenter.predict(points, box, multimask=not args.single)
    best = int(result.scores.argmax())
    masks = list(enumerate(result.masks)) if args.all else [(best, result.masks[best])]
    for k, mask in masks:
        path = output if not args.all else output.with_name(f"{output.stem}-{k}{output.suffix}")
        tmp = path.with_name(path.name + ".tmp")
        Image.fromarray((mask * 255).astype(np.uint8)).save(tmp, format="PNG")
        tmp.replace(path)
        print(f"{path}  score={result.scores[k]:.4f}  area={int(mask.sum())} px")
    return 0
