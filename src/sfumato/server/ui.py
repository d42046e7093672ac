"""Routes the web UI needs beyond A1111's API: the loaded model's native size, and the history
kept in the outputs folder (``history.py``). ``add_routes(app, state)`` adds them; call it before
the static files are mounted at ``/``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse

from . import history
from .security import ApiError

if TYPE_CHECKING:
    from .app import State


def add_routes(app: FastAPI, state: "State") -> None:
    @app.get("/v1/ui/model", tags=["web UI"])
    def ui_model() -> dict[str, Any]:
        """The loaded model: its family and native size (the web UI's default width and height)."""
        pipe = state.host.pipe
        entry = state.defaults.checkpoint
        if pipe is None:   # between two models
            raise ApiError(503, "no model is loaded right now; try again in a moment")
        size = int(pipe.model.spec.resolution)
        return {"family": pipe.family, "width": size, "height": size, "title": state.title(entry),
                "unclip": pipe.model.spec.is_unclip,
                "depth_estimator": getattr(pipe.model, "depth_estimator", None) is not None,
                "few_step": _few_step(pipe),
                "history": state.config.outputs_dir is not None}

    def outputs():
        if state.config.outputs_dir is None:
            raise ApiError(404, "this server keeps no history: start it with --outputs-dir")
        return state.config.outputs_dir

    @app.get("/v1/history", tags=["web UI"])
    async def history_list(offset: int = 0, limit: int = 20) -> dict[str, Any]:
        """The images of finished jobs, newest first, each with its infotext (``parameters``)."""
        if state.config.outputs_dir is None:
            return {"enabled": False, "items": [], "more": False}
        listed = await run_in_threadpool(history.list_items, state.config.outputs_dir, offset, limit)
        return {"enabled": True, **listed}

    @app.get("/v1/history/{day}/{stem}.{kind}", tags=["web UI"])
    def history_image(day: str, stem: str, kind: str) -> FileResponse:
        """One image (``.png``, its infotext in ``parameters``) or clip (``.gif``, ``.webp``, ``.mp4``)
        of the history, as it was written."""
        path = history.resolve(outputs(), f"{day}/{stem}", kind)
        if path is None:
            raise ApiError(404, "no such image in the history", "name")
        return FileResponse(path, media_type=history.CLIP_TYPES.get(kind, "image/png"),
                            headers={"Cache-Control": "private, max-age=86400"})


def _few_step(pipe) -> dict[str, Any] | None:
    """The loaded model's few-step preset (pipeline.fewstep), in the A1111 names the web UI's fields use."""
    from ..diffusion.samplers import SAMPLER_DISPLAY

    preset = pipe.few_step
    if preset is None:
        return None
    return {"name": preset.name, "sampler": SAMPLER_DISPLAY[preset.sampler], "scheduler": preset.scheduler or "automatic",
            "steps": preset.steps, "cfg_scale": preset.cfg_scale}
