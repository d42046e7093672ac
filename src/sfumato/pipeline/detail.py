"""The detail pass (what ADetailer does): find regions of a finished image, then inpaint each one at
the generation's resolution with "only masked", its own prompt and strength, one after the other.

Detectors, none of which runs an unsafe pickle:

* a YOLO-format ONNX detector (``face_yolov8n.onnx``: ultralytics' export of ADetailer's models) run
  by onnxruntime: letterboxed to its input size (grey 114 borders), YOLOv8's ``(1, 4 + classes, N)``
  output, boxes above ``confidence`` kept after class-agnostic non-maximum suppression (IoU 0.7);
* ``box``: boxes given with the request;
* ``mask``: a mask given with the request (one region);

and each box may be refined into the object's own mask by Segment Anything (``sam``: a SAM file,
the box as its prompt). Boxes become masks as ADetailer makes them (the filled rectangle); then, in
ADetailer's order: kept by area ratio, the ``k_largest``, grown (``dilate`` > 0) or shrunk (< 0) by a
square kernel, and optionally merged (and inverted) into one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import ParamError
from .params import MAX_REGIONS, DetailSpec, GenerationParams

NMS_IOU = 0.7


# -- detectors ------------------------------------------------------------------------------------------

_SESSIONS: dict[tuple, Any] = {}


def _session(path: Path, field_name: str):
    try:
        import onnxruntime as ort
    except ImportError:
        raise ParamError(field_name, "a YOLO ONNX detector needs onnxruntime: pip install 'sfumato[detail]'") from None
    key = (str(path.resolve()), path.stat().st_mtime_ns)
    if key not in _SESSIONS:
        try:
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 — onnxruntime raises its own types for unreadable graphs
            raise ParamError(field_name, f"{path.name} is not an ONNX model onnxruntime can run "
                                         f"({type(e).__name__})") from None
        shape = session.get_inputs()[0].shape
        if len(shape) != 4 or not all(isinstance(v, int) for v in shape[2:]):
            raise ParamError(field_name, f"{path.name}: expected a (1, 3, H, W) image input of fixed size, got {shape}")
        _SESSIONS.clear()
        _SESSIONS[key] = session
    return _SESSIONS[key]


def letterbox(image: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, float, tuple[float, float]]:
    """The image scaled to fit ``size`` (h, w), centred on grey 114: (array, gain, (pad x, pad y))."""
    import cv2

    h, w = image.shape[:2]
    gain = min(size[0] / h, size[1] / w)
    nw, nh = int(round(w * gain)), int(round(h * gain))
    px, py = (size[1] - nw) / 2, (size[0] - nh) / 2
    resized = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR) if (nw, nh) != (w, h) else image
    top, left = int(round(py - 0.1)), int(round(px - 0.1))
    out = np.full((size[0], size[1], 3), 114, dtype=np.uint8)
    out[top:top + nh, left:left + nw] = resized
    return out, gain, (left, top)


def _nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> list[int]:
    order, keep = list(np.argsort(-scores, kind="stable")), []
    while order:
        i = order.pop(0)
        keep.append(i)
        rest = []
        for j in order:
            x0, y0 = max(boxes[i, 0], boxes[j, 0]), max(boxes[i, 1], boxes[j, 1])
            x1, y1 = min(boxes[i, 2], boxes[j, 2]), min(boxes[i, 3], boxes[j, 3])
            inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
            union = (boxes[i, 2] - boxes[i, 0]) * (boxes[i, 3] - boxes[i, 1]) + \
                (boxes[j, 2] - boxes[j, 0]) * (boxes[j, 3] - boxes[j, 1]) - inter
            if union <= 0 or inter / union <= iou:
                rest.append(j)
        order = rest
    return keep


def yolo_boxes(path: Path, image: Image.Image, confidence: float, field_name: str = "detector"
               ) -> list[tuple[float, float, float, float]]:
    """A YOLOv8-format ONNX detector's boxes (x0, y0, x1, y1 in the image's pixels), best first."""
    session = _session(Path(path), field_name)
    inp = session.get_inputs()[0]
    rgb = np.asarray(image.convert("RGB"))
    boxed, gain, (px, py) = letterbox(rgb, tuple(inp.shape[2:]))
    x = np.ascontiguousarray(boxed.transpose(2, 0, 1)[None], dtype=np.float32) / 255.0
    out = session.run(None, {inp.name: x})[0]
    if out.ndim != 3 or out.shape[0] != 1 or out.shape[1] < 5:
        raise ParamError(field_name, f"{Path(path).name}: expected YOLOv8's (1, 4 + classes, N) output, got {out.shape}")
    pred = out[0].T.astype(np.float64)                 # (N, 4 + classes): cx, cy, w, h, class scores
    scores = pred[:, 4:].max(1)
    pred, scores = pred[scores > confidence], scores[scores > confidence]
    xyxy = np.stack([pred[:, 0] - pred[:, 2] / 2, pred[:, 1] - pred[:, 3] / 2,
                     pred[:, 0] + pred[:, 2] / 2, pred[:, 1] + pred[:, 3] / 2], 1)
    keep = _nms(xyxy, scores, NMS_IOU)[:MAX_REGIONS * 4]
    h, w = rgb.shape[:2]
    boxes = []
    for i in keep:
        x0, y0, x1, y1 = (xyxy[i] - [px, py, px, py]) / gain
        boxes.append((float(np.clip(x0, 0, w)), float(np.clip(y0, 0, h)), float(np.clip(x1, 0, w)),
                      float(np.clip(y1, 0, h))))
    return boxes


_SEGMENTERS: dict[tuple, Any] = {}


def _segmenter(path: Path, device: str):
    """The SAM of a detail pass, loaded once per file version and device (every image of a batch
    and every pass reuse it)."""
    from ..checkpoint.sam import load_sam
    from .segment import Segmenter

    key = (str(path.resolve()), path.stat().st_mtime_ns, device)
    if key not in _SEGMENTERS:
        _SEGMENTERS.clear()
        _SEGMENTERS[key] = Segmenter(load_sam(path, device=device))
    return _SEGMENTERS[key]


def _box_mask(box, size: tuple[int, int]) -> np.ndarray:
    w, h = size
    m = np.zeros((h, w), dtype=bool)
    x0, y0, x1, y1 = (int(v) for v in box)
    m[max(0, y0):max(0, y1), max(0, x0):max(0, x1)] = True
    return m


def region_masks(spec: DetailSpec, image: Image.Image, prefix: str = "detail[0]", device: str = "cpu"
                 ) -> list[np.ndarray]:
    """The spec's regions in the image as boolean masks, in ADetailer's order of processing."""
    import cv2

    size = image.size
    if spec.detector == "mask":
        m = spec.mask.convert("L")
        if m.size != size:
            m = m.resize(size, Image.NEAREST)
        masks = [np.asarray(m) > 127]
    else:
        boxes = list(spec.boxes) if spec.detector == "box" else \
            yolo_boxes(Path(spec.detector), image, spec.confidence, f"{prefix}.detector")
        if spec.sam is not None and boxes:
            segmenter = _segmenter(Path(spec.sam), device)
            segmenter.set_image(image)
            masks = [segmenter.predict([], tuple(b), multimask=False).best for b in boxes]
        else:
            masks = [_box_mask(b, size) for b in boxes]
    area = size[0] * size[1]
    masks = [m for m in masks if m.any() and spec.min_ratio <= m.sum() / area <= spec.max_ratio]
    if spec.k_largest:
        masks = sorted(masks, key=lambda m: -int(m.sum()))[:spec.k_largest]
    if spec.dilate:
        kernel = np.ones((abs(spec.dilate), abs(spec.dilate)), np.uint8)
        op = cv2.dilate if spec.dilate > 0 else cv2.erode
        masks = [op(m.astype(np.uint8), kernel, iterations=1) > 0 for m in masks]
        masks = [m for m in masks if m.any()]
    if spec.merge != "none" and masks:
        merged = np.logical_or.reduce(masks)
        masks = [~merged if spec.merge == "merge and invert" else merged]
    return masks[:MAX_REGIONS]


# -- the pass ---------------------------------------------------------------------------------------------

def region_params(p, spec: DetailSpec, image: Image.Image, mask: np.ndarray, seed: int):
    """The inpainting request for one region: the finished image and the region's mask, only masked at
    the image's size (rounded down to 8), the spec's prompt, strength and overrides."""
    return GenerationParams(
        prompt=spec.prompt or p.prompt, negative_prompt=spec.negative_prompt or p.negative_prompt,
        steps=spec.steps or p.steps, cfg_scale=p.cfg_scale if spec.cfg_scale is None else spec.cfg_scale,
        sampler=spec.sampler or p.sampler, scheduler=p.scheduler if spec.sampler is None else None,
        seed=seed, width=image.width // 8 * 8, height=image.height // 8 * 8, clip_skip=p.clip_skip, rng=p.rng,
        eta_noise_seed_delta=p.eta_noise_seed_delta, init_image=image,
        mask=Image.fromarray((mask * 255).astype(np.uint8)), strength=spec.strength, mask_blur=spec.mask_blur,
        only_masked=True, only_masked_padding=spec.padding, masked_content="original")


def detail_infotext(specs: list[DetailSpec]) -> dict[str, object]:
    """ADetailer's infotext entries (the second tab's keys end in " 2nd", and so on)."""
    out: dict[str, object] = {}
    for i, s in enumerate(specs):
        suffix = "" if i == 0 else f" {i + 1}{'nd' if i == 1 else 'rd' if i == 2 else 'th'}"
        out.update({f"ADetailer model{suffix}": s.label, f"ADetailer prompt{suffix}": s.prompt or None,
                    f"ADetailer negative prompt{suffix}": s.negative_prompt or None,
                    f"ADetailer confidence{suffix}": s.confidence, f"ADetailer dilate erode{suffix}": s.dilate,
                    f"ADetailer mask blur{suffix}": s.mask_blur, f"ADetailer denoising strength{suffix}": s.strength,
                    f"ADetailer inpaint only masked{suffix}": "True",
                    f"ADetailer inpaint padding{suffix}": s.padding})
    return out
