"""The A1111 AnimateDiff extension's API (sd-webui-animatediff): ``alwayson_scripts.AnimateDiff.args``
(one object: ``model``, ``format``, ``enable``, ``video_length``, ``fps``, ``loop_number``,
``closed_loop``, ``batch_size`` (the context), ``stride``, ``overlap``, …) turns a txt2img / img2img
request into a clip. Motion modules live in the models folder's ``animatediff`` subfolder.

The response is the extension's: ``images`` holds the clip once per video format asked for (GIF,
MP4, WEBP, in that order, base64), then every frame as a PNG when ``format`` has ``Frame``; ``info``
carries the infotext with its ``AnimateDiff`` entry. The job API shows the middle frame's x̂0 as the
preview. ControlNet units steer every frame (their ``batch_images``: one image per frame) and the
prompt's LoRA tags apply, as for a still. Features this server does not have are refused by field when
set (WEBM, frame interpolation, video sources for ControlNet V2V, last-frame latents).
"""

from __future__ import annotations

import base64
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ..errors import ParamError
from ..pipeline.animate import MAX_FRAMES, AnimationSettings
from .security import ApiError, Catalog

VIDEO_FORMATS = ("GIF", "MP4", "WEBP")
FORMATS = (*VIDEO_FORMATS, "PNG", "TXT", "FRAME")
LOOPS = {"N": (False, False), "R-P": (True, False), "R+P": (True, True), "A": (True, True)}
# fields accepted only at their default (what the extension does without them)
INERT = {"interp": "Off", "video_source": None, "video_path": None, "last_frame": None, "latent_power": 1,
         "latent_scale": 32, "latent_power_last": 1, "latent_scale_last": 32, "freeinit_enable": False}
KNOWN = {"model", "format", "enable", "video_length", "fps", "loop_number", "closed_loop", "batch_size", "stride",
         "overlap", "interp_x", "request_id", "is_i2i_batch", "video_default", "freeinit_filter", *INERT}


@dataclass
class AnimationRequest:
    path: Path
    name: str
    settings: AnimationSettings
    formats: list[str] = field(default_factory=list)
    loop_number: int = 0


def _int(unit: dict, key: str, default: int, lo: int, hi: int, where: str) -> int:
    v = unit.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ApiError(422, f"must be an integer in [{lo}, {hi}], got {v!r}", f"{where}.{key}")
    return v


def parse(args: Any, catalog: Catalog, field_name: str) -> AnimationRequest | None:
    """The extension's args as an AnimationRequest (None when not enabled); 422 naming the field."""
    if not isinstance(args, list):
        raise ApiError(422, "expected a list", field_name)
    if not args or args[0] in (False, None, {}):
        return None
    unit, where = args[0], f"{field_name}[0]"
    if not isinstance(unit, dict):
        raise ApiError(422, "send the AnimateDiff settings as an object ({model, enable, video_length, …})", where)
    if not unit.get("enable", True):
        return None
    for key in unit:
        if key not in KNOWN:
            raise ApiError(422, f"{key} is not an AnimateDiff field this server knows", f"{where}.{key}")
    for key, default in INERT.items():
        if key in unit and unit[key] not in (default, "", None if default is None else default):
            raise ApiError(422, f"not supported here (only {default!r})", f"{where}.{key}")
    model = unit.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(422, "name a motion module of the models folder's animatediff/", f"{where}.model")
    entry = catalog.find("motion", model, f"{where}.model")
    formats = unit.get("format", ["GIF"])
    if isinstance(formats, str):
        formats = [formats]
    if not isinstance(formats, list) or not formats:
        raise ApiError(422, "expected a list such as ['GIF']", f"{where}.format")
    formats = [str(f).upper() for f in formats]
    for f in formats:
        if f not in FORMATS:
            raise ApiError(422, f"{f} is not supported here; use {', '.join(FORMATS)}", f"{where}.format")
    loop = str(unit.get("closed_loop", "N"))
    if loop not in LOOPS:
        raise ApiError(422, f"must be one of {', '.join(LOOPS)}", f"{where}.closed_loop")
    context = _int(unit, "batch_size", 16, 1, 32, where)
    frames = _int(unit, "video_length", 16, 0, MAX_FRAMES, where) or context   # 0: the context's length
    settings = AnimationSettings(frames=frames, fps=_int(unit, "fps", 8, 1, 60, where), context=context,
                                 overlap=_int(unit, "overlap", -1, -1, 31, where),
                                 stride=_int(unit, "stride", 1, 1, 8, where), closed_loop=LOOPS[loop][0],
                                 loop_prompts=LOOPS[loop][1])
    return AnimationRequest(entry.path, entry.stem, settings, formats, _int(unit, "loop_number", 0, 0, 10_000, where))


def check_request(animation: AnimationRequest, settings: dict[str, Any], n_iter: int) -> None:
    if n_iter != 1:
        raise ApiError(422, "one clip per request here (n_iter 1): the frames are the batch", "n_iter")
    if settings.get("batch_size", 1) != 1:
        raise ApiError(422, "a clip's frames are video_length, not batch_size (1)", "batch_size")


def _encode(images: list[Image.Image], fmt: str, fps: int, infotext: str, loops: int) -> str:
    from ..pipeline.animate import save_clip

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"clip.{fmt.lower()}"
        save_clip(images, path, fps, infotext, loops)
        return base64.b64encode(path.read_bytes()).decode("ascii")


def run(work, job, pipe, watermark: bool) -> tuple[list[str], list[Image.Image], str]:
    """The clip of a validated request: the videos asked for (base64, in ``VIDEO_FORMATS`` order),
    the frames to send as PNGs (those of a ``Frame`` request) and the infotext."""
    from ..pipeline.preview import latent_to_rgb

    a: AnimationRequest = work.animation
    p = work.params

    def callback(record) -> None:
        job.check_stop()
        middle = record.denoised[record.denoised.shape[0] // 2:][:1]
        preview = latent_to_rgb(middle, "sdxl" if pipe.model.spec.is_sdxl else "sd").numpy()[0] \
            if pipe.engine.preview_factors is None else None
        job.update(stage="animate", step=record.index + 1, steps=record.total, preview=preview)

    kwargs = dict(motion_module=a.path, frames=a.settings.frames, fps=a.settings.fps, context=a.settings.context,
                  overlap=a.settings.overlap, stride=a.settings.stride, closed_loop=a.settings.closed_loop,
                  loop_prompts=a.settings.loop_prompts, watermark=watermark, callback=callback)
    settings = {k: getattr(p, k) for k in ("steps", "cfg_scale", "sampler", "scheduler", "seed", "width", "height",
                                           "clip_skip", "rng", "init_image", "strength", "control")}
    try:
        result = pipe.animate(p.prompt, p.negative_prompt, **kwargs, **settings)
    except ParamError as e:
        raise ApiError(422, e.message, e.field) from None
    videos = [_encode(result.frames, f, a.settings.fps, result.infotext, a.loop_number)
              for f in VIDEO_FORMATS if f in a.formats]
    return videos, result.frames if "FRAME" in a.formats else [], result.infotext


def add_routes(app, state) -> None:
    @app.get("/v1/motion-modules", tags=["AnimateDiff"])
    def motion_modules() -> list[str]:
        """The motion modules of the models folder's ``animatediff`` subfolder."""
        return [e.name for e in state.catalog.entries("motion")]
