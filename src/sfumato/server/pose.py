"""The pose editor's route: ``POST /v1/pose/render`` draws a pose (the OpenPose JSON the A1111 pose
editors load and save) as the OpenPose control image, exactly as the preprocessor draws detected
poses, so the web UI's editor sends ControlNet the map the model was trained on."""

from __future__ import annotations

import base64
import io
from typing import Any

from fastapi import Body
from PIL import Image
from starlette.concurrency import run_in_threadpool

from ..errors import ParamError
from .security import ApiError


def render(body: dict[str, Any]) -> dict[str, Any]:
    from ..pipeline.pose import parse_pose, pose_json, render_pose

    if "pose" not in body:
        raise ApiError(422, "is missing (a pose JSON object or its text)", "pose")
    size = []
    for name in ("width", "height"):
        v = body.get(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 8 <= v <= 4096):
            raise ApiError(422, f"must be an integer in [8, 4096], got {v!r}", name)
        size.append(v)
    try:
        pose = parse_pose(body["pose"])
        image = render_pose(pose, *size)
    except ParamError as e:
        raise ApiError(422, e.message, e.field) from None
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return {"image": base64.b64encode(buffer.getvalue()).decode("ascii"), "pose": pose_json(pose)}


def add_routes(app, state) -> None:
    @app.post("/v1/pose/render", tags=["web UI"])
    async def pose_render(body: dict[str, Any] = Body(...)) -> dict[str, Any]:
        return await run_in_threadpool(render, body)
