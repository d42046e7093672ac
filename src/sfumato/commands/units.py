"""The repeatable unit flags of txt2img / img2img: ControlNet units (``--control-*``), IP-Adapters
(``--ip-*``) and detail passes (``--detail*``), and the request objects they become."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from ..errors import SfumatoError
from ..safe_image import open_image


def add_ip_adapter(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("IP-Adapter", "image prompts; each flag is repeatable: its i-th use belongs to the i-th "
                                          "--ip-adapter (give it once per adapter, or leave it out for the default)")
    g.add_argument("--ip-adapter", action="append", default=[], metavar="FILE",
                   help="an IP-Adapter file (.safetensors or .bin; base or plus)")
    g.add_argument("--ip-image", action="append", default=[], metavar="IMG", help="its image prompt (required)")
    g.add_argument("--ip-scale", action="append", default=[], type=float, metavar="W",
                   help="weight of its attention (1)")
    g.add_argument("--ip-start", action="append", default=[], type=float, metavar="F",
                   help="fraction of the steps at which it starts (0)")
    g.add_argument("--ip-end", action="append", default=[], type=float, metavar="F",
                   help="fraction of the steps at which it ends (1)")
    g.add_argument("--ip-image-encoder", action="append", default=[], metavar="DIR",
                   help="the CLIP image encoder (a CLIPVisionModelWithProjection folder or file; default: the "
                        "image_encoder folder beside the adapter); given once, it serves every adapter")


def add_control(p: argparse.ArgumentParser) -> None:
    from ..pipeline.params import CONTROL_ANNOTATORS, CONTROL_PREPROCESSORS

    g = p.add_argument_group("ControlNet", "each flag is repeatable: its i-th use belongs to the i-th --control-model "
                                          "(give it once per ControlNet, or leave it out for the default)")
    g.add_argument("--control-model", action="append", default=[], metavar="PATH", help="a ControlNet file or folder")
    g.add_argument("--control-image", action="append", default=[], metavar="FILE",
                   help="its control image (required; for animate also a folder: one image per frame, in natural "
                        "name order: f2 before f10)")
    g.add_argument("--control-preprocessor", action="append", default=[],
                   choices=CONTROL_PREPROCESSORS + CONTROL_ANNOTATORS,
                   help="how the image becomes the control image (default none: use it as it is; depth: its grey "
                        "values as they are, no estimation; depth_midas estimates depth). openpose*, softedge_hed*, "
                        "scribble_hed, lineart_* and depth_midas run a network: give --control-annotator")
    g.add_argument("--control-annotator", action="append", default=[], metavar="FILE",
                   help="the annotator network's weights: body_pose_model.pth (openpose), ControlNetHED.pth (HED), "
                        "sk_model.pth / sk_model2.pth (lineart_realistic / lineart_coarse), "
                        "dpt_hybrid-midas-501f0c75.pt (depth_midas); for openpose_hand/_face/_faceonly/_full the "
                        "folder holding body_pose_model.pth, hand_pose_model.pth and facenet.pth, or the files "
                        "joined by commas; 'none' for a unit without one")
    g.add_argument("--control-strength", action="append", default=[], type=float, metavar="W",
                   help="weight of its residuals (1)")
    g.add_argument("--control-start", action="append", default=[], type=float, metavar="F",
                   help="fraction of the steps at which it starts (0)")
    g.add_argument("--control-end", action="append", default=[], type=float, metavar="F",
                   help="fraction of the steps at which it ends (1)")
    from ..pipeline.params import CONTROL_MODES, CONTROL_RESIZE

    g.add_argument("--control-mode", action="append", default=[], choices=CONTROL_MODES,
                   help="balanced (default); prompt: 'My prompt is more important'; control: 'ControlNet is more "
                        "important' (sd-webui-controlnet's control modes)")
    g.add_argument("--control-resize", action="append", default=[], choices=CONTROL_RESIZE,
                   help="how the image meets the generation's aspect: stretch (default, Just Resize), crop "
                        "(Crop and Resize), fill (Resize and Fill)")
    g.add_argument("--control-threshold-a", action="append", default=[], type=float, metavar="A",
                   help="the preprocessor's first threshold (canny: low, default 100; threshold/scribble: 127)")
    g.add_argument("--control-threshold-b", action="append", default=[], type=float, metavar="B",
                   help="the preprocessor's second threshold (canny: high, default 200)")


def add_detail(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("detail pass (ADetailer)", "regions of the finished image inpainted again, each at the "
                                                        "generation's resolution (only masked)")
    g.add_argument("--detail", action="append", default=[], metavar="DETECTOR:PROMPT:STRENGTH",
                   help="repeatable; DETECTOR: a YOLO ONNX file (e.g. face_yolov8n.onnx), box=X0,Y0,X1,Y1[;…] or "
                        "mask=FILE; an empty PROMPT is the main prompt; STRENGTH defaults to 0.4")
    g.add_argument("--detail-sam", metavar="FILE", help="refine each box into the object's mask (Segment Anything)")
    g.add_argument("--detail-confidence", type=float, default=0.3, metavar="C", help="detector threshold (0.3)")
    g.add_argument("--detail-padding", type=int, default=32, metavar="PX", help="context around a region (32)")
    g.add_argument("--detail-dilate", type=int, default=4, metavar="PX",
                   help="grow (or, negative, shrink) each region's mask (4)")


def detail_specs(args: argparse.Namespace) -> list:
    from ..pipeline.params import DetailSpec

    specs = []
    for text in getattr(args, "detail", []):
        detector, sep, rest = text.partition(":")
        if not sep:
            rest = ""
        prompt, strength = rest, 0.4
        head, sep, tail = rest.rpartition(":")
        if sep:
            try:
                prompt, strength = head, float(tail)
            except ValueError:
                pass
        options: dict = dict(prompt=prompt, strength=strength, confidence=args.detail_confidence,
                             padding=args.detail_padding, dilate=args.detail_dilate, sam=args.detail_sam)
        if detector.startswith("box="):
            boxes = []
            for part in detector[4:].split(";"):
                try:
                    values = tuple(float(v) for v in part.split(","))
                except ValueError:
                    values = ()
                if len(values) != 4:
                    raise SfumatoError(f"--detail: a box is X0,Y0,X1,Y1, got {part!r}")
                boxes.append(values)
            specs.append(DetailSpec("box", boxes=boxes, **options))
        elif detector.startswith("mask="):
            specs.append(DetailSpec("mask", mask=open_image(detector[5:], "--detail"), **options))
        else:
            specs.append(DetailSpec(detector, **options))
    return specs


_CONTROL_FIELDS = {"control_preprocessor": "preprocessor", "control_strength": "strength", "control_start": "start",
                   "control_end": "end", "control_mode": "mode", "control_resize": "resize",
                   "control_threshold_a": "threshold_a", "control_threshold_b": "threshold_b",
                   "control_annotator": "annotator"}


def control_specs(args: argparse.Namespace, frames: bool = False) -> list:
    """The --control-* flags as ControlSpecs: the i-th use of each flag belongs to the i-th --control-model
    (``frames``: an animation's, whose --control-image may be a folder of one image per frame)."""
    from ..pipeline.params import ControlSpec

    n = len(args.control_model)
    for name in ("control_image", *_CONTROL_FIELDS):
        given, flag = len(getattr(args, name)), "--" + name.replace("_", "-")
        if given and not n:
            raise SfumatoError(f"{flag}: given without --control-model")
        if given != n and (given or name == "control_image"):
            raise SfumatoError(f"{flag}: given {given} times for {n} --control-model (once per ControlNet, in order)")
    specs = []
    for i, path in enumerate(args.control_model):
        if not Path(path).exists():
            raise SfumatoError(f"--control-model: file not found: {path}")
        options = {field: getattr(args, name)[i] for name, field in _CONTROL_FIELDS.items() if getattr(args, name)}
        if options.get("annotator") in ("none", ""):   # a placeholder for a unit without one
            del options["annotator"]
        elif "," in options.get("annotator", ""):      # OpenPose's body, hand and face files
            options["annotator"] = [part for part in options["annotator"].split(",") if part]
        specs.append(ControlSpec(path, _control_image(args.control_image[i], frames), **options))
    return specs


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _natural(path: Path) -> list:
    """frame2 before frame10: runs of digits compare as numbers."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


def _control_image(path: str, frames: bool):
    """The image, or for an animation (``frames``) a folder's images in natural name order (f2 before
    f10): one per frame."""
    folder = Path(path)
    if not folder.is_dir():
        return open_image(path, "--control-image")
    if not frames:
        raise SfumatoError(f"--control-image: {path} is a folder; a folder of frames is for animations")
    files = sorted((f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES), key=_natural)
    if not files:
        raise SfumatoError(f"--control-image: no images ({', '.join(IMAGE_SUFFIXES)}) in {path}")
    return [open_image(str(f), "--control-image") for f in files]


_IP_FIELDS = {"ip_scale": "scale", "ip_start": "start", "ip_end": "end", "ip_image_encoder": "image_encoder"}


def ip_specs(args: argparse.Namespace) -> list:
    """The --ip-* flags as IPAdapterSpecs: the i-th use of each flag belongs to the i-th --ip-adapter (one
    --ip-image-encoder may serve them all)."""
    from ..pipeline.params import IPAdapterSpec

    n = len(args.ip_adapter)
    for name in ("ip_image", *_IP_FIELDS):
        given, flag = len(getattr(args, name)), "--" + name.replace("_", "-")
        if given and not n:
            raise SfumatoError(f"{flag}: given without --ip-adapter")
        shared = name == "ip_image_encoder" and given == 1
        if given != n and not shared and (given or name == "ip_image"):
            raise SfumatoError(f"{flag}: given {given} times for {n} --ip-adapter (once per adapter, in order)")
    specs = []
    for i, path in enumerate(args.ip_adapter):
        if not Path(path).is_file():
            raise SfumatoError(f"--ip-adapter: file not found: {path}")
        options = {field: getattr(args, name)[i if len(getattr(args, name)) > 1 else 0]
                   for name, field in _IP_FIELDS.items() if getattr(args, name)}
        specs.append(IPAdapterSpec(path, open_image(args.ip_image[i], "--ip-image"), **options))
    return specs
