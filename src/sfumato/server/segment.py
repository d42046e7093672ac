"""Segment Anything over HTTP, as the A1111 Segment Anything extension (sd-webui-segment-anything)
exposes it: ``GET /sam/heartbeat``, ``GET /sam/sam-model`` (the files of the models folder's ``sam``
subfolder), ``POST /sam/sam-predict`` (points in, the three multimask outputs out as blended images,
masks and masked images) and ``POST /sam/dilate-mask`` (grow a mask). GroundingDINO text prompts are
not implemented: ``dino_enabled`` must stay false. sfumato adds ``sam_box`` (a box prompt) to the
request and ``scores`` (each mask's predicted IoU) to the response.

A model is loaded once and kept while requests name it; predictions run one at a time.
"""

from __future__ import annotations

import base64
import io
import threading
from typing import Any

import numpy as np
from fastapi.concurrency import run_in_threadpool
from PIL import Image
from pydantic import BaseModel, ConfigDict

from ..errors import CheckpointError, ParamError
from ..pipeline.masks import dilate
from .security import ApiError, Catalog, Limits, decode_image

TINT = (30, 144, 255)   # the blended images' mask colour
MAX_POINTS = 64
MAX_DILATE = 256


class SamPredictRequest(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False, protected_namespaces=())

    sam_model_name: str = "sam_vit_h_4b8939.pth"
    input_image: str
    sam_positive_points: list[list[float]] = []
    sam_negative_points: list[list[float]] = []
    sam_box: list[float] | None = None            # sfumato's addition
    dino_enabled: bool = False
    dino_model_name: str | None = None
    dino_text_prompt: str | None = None
    dino_box_threshold: float | None = 0.3
    dino_preview_checkbox: bool = False
    dino_preview_boxes_selection: list[int] | None = None


class DilateMaskRequest(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False)

    input_image: str
    mask: str
    dilate_amount: int = 10


def encode(image: Image.Image) -> str:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def views(image: Image.Image, mask: np.ndarray) -> tuple[Image.Image, Image.Image, Image.Image]:
    """(blended: the mask tinted over the image, the mask, the masked image: RGBA, transparent outside)."""
    rgb = np.asarray(image.convert("RGB")).astype(np.float32)
    tint = np.array(TINT, dtype=np.float32)
    blended = np.where(mask[..., None], rgb * 0.5 + tint * 0.5, rgb).round().astype(np.uint8)
    rgba = np.dstack([rgb.astype(np.uint8), (mask * 255).astype(np.uint8)])
    return Image.fromarray(blended), Image.fromarray((mask * 255).astype(np.uint8)), Image.fromarray(rgba, "RGBA")


class SamModels:
    """The SAM model last named (one kept), and the lock predictions take."""

    def __init__(self, device: str):
        self.device = device
        self.lock = threading.Lock()
        self._key: tuple | None = None
        self._segmenter = None

    def segmenter(self, path):
        from ..checkpoint.sam import load_sam
        from ..pipeline.segment import Segmenter

        key = (str(path), path.stat().st_mtime_ns)
        if key != self._key:
            self._segmenter, self._key = None, None
            self._segmenter = Segmenter(load_sam(path, device=self.device))
            self._key = key
        return self._segmenter


_SHARED: list[SamModels] = []   # the server's (one per process: the latest server made)


def shared_models() -> SamModels:
    """The SAM models the routes use, for an img2img request's Inpaint Anything mask (CPU when no
    server has set them up)."""
    if not _SHARED:
        _SHARED.append(SamModels("cpu"))
    return _SHARED[-1]


def run_sam(catalog: Catalog, models: SamModels, name: str, image: Image.Image, positive: list, negative: list,
            box: list | None, fields: dict[str, str]):
    """Segment Anything on an image for point / box prompts; 422 naming the request's fields
    (``fields`` maps model, positive, negative, box to their names)."""
    entry = catalog.find("sam", name, fields["model"])
    points = []
    for field, label, given in ((fields["positive"], 1, positive), (fields["negative"], 0, negative)):
        for i, p in enumerate(given):
            if len(p) != 2:
                raise ApiError(422, f"a point is [x, y], got {len(p)} numbers", f"{field}[{i}]")
            points.append((p[0], p[1], label, f"{field}[{i}]"))
    if len(points) > MAX_POINTS:
        raise ApiError(422, f"at most {MAX_POINTS} points", fields["positive"])
    if box is not None and len(box) != 4:
        raise ApiError(422, "a box is [x0, y0, x1, y1]", fields["box"])
    if not points and box is None:
        raise ApiError(422, f"give at least one point (or {fields['box']})", fields["positive"])
    with models.lock:
        try:
            segmenter = models.segmenter(entry.path)
        except CheckpointError as e:
            raise ApiError(422, e.public, fields["model"]) from None
        segmenter.set_image(image)
        try:
            return entry, segmenter.predict([p[:3] for p in points], tuple(box) if box is not None else None)
        except ParamError as e:
            field = e.field
            if field.startswith("points["):
                field = points[int(field[7:-1])][3]
            elif field == "box":
                field = fields["box"]
            raise ApiError(422, e.message, field) from None


PREDICT_FIELDS = {"model": "sam_model_name", "positive": "sam_positive_points", "negative": "sam_negative_points",
                  "box": "sam_box"}


def predict(req: SamPredictRequest, catalog: Catalog, limits: Limits, models: SamModels) -> dict[str, Any]:
    if req.dino_enabled:
        raise ApiError(422, "GroundingDINO text prompts are not supported; send points or sam_box", "dino_enabled")
    image = decode_image(req.input_image, "input_image", limits)
    entry, result = run_sam(catalog, models, req.sam_model_name, image, req.sam_positive_points,
                            req.sam_negative_points, req.sam_box, PREDICT_FIELDS)
    outputs = [views(image, mask) for mask in result.masks]
    return {"msg": f"{len(outputs)} masks from {entry.name}",
            "blended_images": [encode(v[0]) for v in outputs], "masks": [encode(v[1]) for v in outputs],
            "masked_images": [encode(v[2]) for v in outputs], "scores": [float(s) for s in result.scores]}


def object_mask(catalog: Catalog, image: Image.Image, name: str, positive: list, negative: list, box: list | None,
                dilation: int) -> Image.Image:
    """Inpaint Anything's mask for an img2img request: the best-scoring mask of the prompts, grown by
    ``dilation`` pixels (the request's ``sam_*`` fields)."""
    if not 0 <= dilation <= MAX_DILATE:
        raise ApiError(422, f"must be 0 to {MAX_DILATE}", "sam_dilation")
    _, result = run_sam(catalog, shared_models(), name, image, positive, negative, box, PREDICT_FIELDS)
    mask = dilate(result.best, dilation)
    if not mask.any():
        raise ApiError(422, "Segment Anything found no object at these prompts (an empty mask)", "sam_positive_points")
    return Image.fromarray((mask * 255).astype(np.uint8))


def dilate_mask(req: DilateMaskRequest, limits: Limits) -> dict[str, Any]:
    if not 0 <= req.dilate_amount <= MAX_DILATE:
        raise ApiError(422, f"must be 0 to {MAX_DILATE}", "dilate_amount")
    image = decode_image(req.input_image, "input_image", limits)
    mask = decode_image(req.mask, "mask", limits)
    if mask.size != image.size:
        raise ApiError(422, f"size {mask.size[0]}x{mask.size[1]} differs from the image's {image.size[0]}x{image.size[1]}",
                       "mask")
    grown = dilate(np.asarray(mask.convert("L")) > 127, req.dilate_amount)
    blended, m, masked = views(image, grown)
    return {"blended_image": encode(blended), "mask": encode(m), "masked_image": encode(masked)}


def add_routes(app, state) -> None:
    from ..api import resolve_device

    models = SamModels(resolve_device(state.config.device))
    _SHARED[:] = [models]
    limits = state.config.limits

    @app.get("/sam/heartbeat", tags=["Segment Anything"])
    def heartbeat() -> dict[str, str]:
        return {"msg": "Success!"}

    @app.get("/sam/sam-model", tags=["Segment Anything"])
    def sam_model() -> list[str]:
        return [e.name for e in state.catalog.entries("sam")]

    @app.post("/sam/sam-predict", tags=["Segment Anything"])
    async def sam_predict(req: SamPredictRequest) -> dict[str, Any]:
        return await run_in_threadpool(predict, req, state.catalog, limits, models)

    @app.post("/sam/dilate-mask", tags=["Segment Anything"])
    async def sam_dilate_mask(req: DilateMaskRequest) -> dict[str, Any]:
        return await run_in_threadpool(dilate_mask, req, limits)
