"""``sfumato pose``: OpenPose poses as ControlNet control images — render a pose JSON (the A1111
pose editors' format) exactly as the OpenPose preprocessor draws it, start a new pose file, or
detect the poses in a photo with an OpenPose body model (and its hand and face models)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import ParamError, SfumatoError


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("pose", help="OpenPose poses: render a pose JSON, start one, detect one")
    sub = p.add_subparsers(dest="pose_command", required=True, parser_class=type(p))
    r = sub.add_parser("render", help="draw a pose JSON as the OpenPose control image")
    r.add_argument("json", help="pose JSON (sd-webui-openpose-editor / ControlNet, or fkunn1326's Openpose Editor)")
    r.add_argument("--width", type=int, help="draw at this width (default: the pose's canvas)")
    r.add_argument("--height", type=int, help="draw at this height (default: the pose's canvas)")
    r.add_argument("-o", "--output", required=True, help="the control image (PNG)")
    r.set_defaults(func=cmd_render)
    n = sub.add_parser("new", help="a pose JSON with standing figures, to edit")
    n.add_argument("--width", type=int, default=512)
    n.add_argument("--height", type=int, default=512)
    n.add_argument("--people", type=int, default=1, help="figures, side by side")
    n.add_argument("-o", "--output", required=True, help="the pose JSON")
    n.set_defaults(func=cmd_new)
    d = sub.add_parser("detect", help="the poses in an image (OpenPose body model; hands and face with theirs)")
    d.add_argument("--image", required=True)
    d.add_argument("--openpose", required=True, metavar="FILE", help="body_pose_model.pth (or .safetensors)")
    d.add_argument("--hand", metavar="FILE", help="hand_pose_model.pth: also find each person's hands")
    d.add_argument("--face", metavar="FILE", help="facenet.pth: also find each person's face landmarks")
    d.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N or mps")
    d.add_argument("--png", help="also write the control image here")
    d.add_argument("-o", "--output", required=True, help="the pose JSON")
    d.set_defaults(func=cmd_detect)


def _output(path: str) -> Path:
    out = Path(path)
    if not out.parent.is_dir():
        raise SfumatoError(f"--output: folder {out.parent} does not exist")
    return out


def _write_png(array, path: Path) -> None:
    from PIL import Image

    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    tmp.replace(path)


def _write_json(data: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


def _read(path: str) -> str:
    from ..pipeline.pose import MAX_JSON_BYTES

    p = Path(path)
    if not p.is_file():
        raise SfumatoError(f"json: no such file: {path}")
    if p.stat().st_size > MAX_JSON_BYTES:
        raise SfumatoError(f"json: {path} is larger than {MAX_JSON_BYTES} bytes")
    return p.read_text(errors="replace")


def cmd_render(args: argparse.Namespace) -> int:
    from ..pipeline.pose import parse_pose, render_pose

    out = _output(args.output)
    pose = parse_pose(_read(args.json))
    image = render_pose(pose, args.width, args.height)
    _write_png(image, out)
    print(f"{out}  {image.shape[1]}×{image.shape[0]}, {len(pose.people)} people")
    return 0


def cmd_new(args: argparse.Namespace) -> int:
    from ..pipeline.pose import Pose, default_person, pose_json

    out = _output(args.output)
    if not 1 <= args.people <= 8:
        raise SfumatoError(f"--people: must be 1 to 8, got {args.people}")
    n, w, h = args.people, args.width, args.height
    s = min(1.0, w / (h * n))   # each figure keeps its proportions and fits its share of the width
    people = tuple(tuple(((i + 0.5) / n + (x - 0.5) * s * h / w, 0.5 + (y - 0.5) * s)
                         for x, y in default_person(w, h)) for i in range(n))
    _write_json(pose_json(Pose(args.width, args.height, people)), out)
    print(f"{out}  {args.width}×{args.height}, {n} people")
    return 0


def cmd_detect(args: argparse.Namespace) -> int:
    from ..api import resolve_device
    from ..pipeline.annotate import annotator_network, detect_poses
    from ..pipeline.pose import pose_json, render_pose
    from ..safe_image import open_image

    out = _output(args.output)
    png = _output(args.png) if args.png else None
    image = open_image(args.image, "--image").convert("RGB")
    kind = "+".join(["openpose"] + [part for part in ("hand", "face") if getattr(args, part)])
    files = [args.openpose] + [getattr(args, part) for part in ("hand", "face") if getattr(args, part)]
    for flag, path in zip(("--openpose", "--hand", "--face"), [args.openpose, args.hand, args.face]):
        if path is not None and not Path(path).is_file():
            raise SfumatoError(f"{flag}: file not found: {path}")
    try:
        nets = annotator_network(files, kind, "--openpose", resolve_device(args.device))
    except ParamError as e:
        raise SfumatoError(f"--openpose/--hand/--face: {e.message}") from None
    pose = detect_poses(nets, image, hands=args.hand is not None, face=args.face is not None)
    _write_json(pose_json(pose), out)
    if png is not None:
        _write_png(render_pose(pose), png)
    parts = f", {sum(h is not None for pair in pose.hands for h in pair)} hands" if args.hand else ""
    parts += f", {sum(f is not None for f in pose.faces)} faces" if args.face else ""
    print(f"{out}  {len(pose.people)} people{parts}")
    return 0
