"""A1111's other endpoints: extras upscaling (``extra-single-image``, ``extra-batch-images``,
``upscalers``), ``png-info`` and the sampler and scheduler lists.

Extras upscalers: ``Lanczos`` and ``Nearest`` (PIL), ``None``, and the SD x4 upscaler models in the
models folder's ``upscalers`` subfolder, named by file (``x4-upscaler-ema``), run on the worker by
``pipeline.resize.upscale_image`` (the library's and the CLI's extras). Face restoration is not
here: its fields must be 0.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from typing import Any, Callable

from PIL import ExifTags, Image, PngImagePlugin
from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict

from ..diffusion.samplers import SAMPLER_ALIASES, SAMPLER_DISPLAY
from ..diffusion.schedule import SCHEDULERS
from ..pipeline.infotext import SCHEDULER_DISPLAY, decode_user_comment, parse_infotext
from .jobs import Job, QueueFull, wait
from ..pipeline.params import ParamError
from ..pipeline.resize import upscale_image, upscaled_size
from .security import ApiError, Catalog, Entry, Limits, decode_image

PIL_UPSCALERS = {"lanczos": "Lanczos", "nearest": "Nearest"}


class ExtrasRequest(BaseModel):
    """A1111's ``ExtrasBaseRequest`` fields."""

    model_config = ConfigDict(allow_inf_nan=False)

    resize_mode: int = 0                 # 0: scale by upscaling_resize, 1: to upscaling_resize_w x _h
    show_extras_results: bool = True
    gfpgan_visibility: float = 0
    codeformer_visibility: float = 0
    codeformer_weight: float = 0
    upscaling_resize: float = 2
    upscaling_resize_w: int = 512
    upscaling_resize_h: int = 512
    upscaling_crop: bool = True
    upscaler_1: str = "None"
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: float = 0
    upscale_first: bool = False


class ExtrasSingleImageRequest(ExtrasRequest):
    image: str = ""


class ImageItem(BaseModel):
    data: str
    name: str = ""


class ExtrasBatchImagesRequest(ExtrasRequest):
    imageList: list[ImageItem] = []


@dataclass
class Upscaler:
    name: str
    entry: Entry | None = None           # an x4 upscaler model's file; None: a PIL filter (or "None")


@dataclass
class ExtrasWork:
    images: list[Image.Image]
    scale: float | None                  # by this, or to ``size``
    size: tuple[int, int] | None
    crop: bool
    first: Upscaler
    second: Upscaler
    blend: float
    info: str


def upscalers(catalog: Catalog) -> list[dict[str, Any]]:
    """A1111's ``/upscalers`` list."""
    out = [{"name": "None", "model_name": None, "model_path": None, "model_url": None, "scale": 4}]
    out += [{"name": label, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
            for label in PIL_UPSCALERS.values()]
    out += [{"name": e.stem, "model_name": "SD x4 upscaler", "model_path": e.name, "model_url": None, "scale": 4}
            for e in catalog.entries("upscaler")]
    return out


def _upscaler(name: Any, field: str, catalog: Catalog) -> Upscaler:
    if not isinstance(name, str):
        raise ApiError(422, f"expected an upscaler name, got {name!r}", field)
    key = name.strip().lower()
    if key in ("", "none"):
        return Upscaler("None")
    if key in PIL_UPSCALERS:
        return Upscaler(PIL_UPSCALERS[key])
    if catalog.folder("upscaler") is None:
        raise ApiError(422, f"unknown upscaler {name!r}; valid: None, Lanczos, Nearest (x4 upscaler models "
                            "need a models folder, --models-dir)", field)
    entry = catalog.find("upscaler", name, field)
    return Upscaler(entry.stem, entry=entry)


def build_extras(req: ExtrasRequest, images: list[Image.Image], catalog: Catalog, limits: Limits) -> ExtrasWork:
    """Validate an extras request fully (422 naming the field) before it is queued."""
    for name in ("gfpgan_visibility", "codeformer_visibility"):
        if getattr(req, name):
            raise ApiError(422, "face restoration is not supported", name)
    first, second = _upscaler(req.upscaler_1, "upscaler_1", catalog), _upscaler(req.upscaler_2, "upscaler_2", catalog)
    if not 0 <= req.extras_upscaler_2_visibility <= 1:
        raise ApiError(422, f"must be in [0, 1], got {req.extras_upscaler_2_visibility}", "extras_upscaler_2_visibility")
    if req.resize_mode not in (0, 1):
        raise ApiError(422, "must be 0 (scale by) or 1 (scale to)", "resize_mode")
    if req.resize_mode == 0:
        scale, size, field = req.upscaling_resize, None, "upscaling_resize"
    else:
        scale, size, field = None, (req.upscaling_resize_w, req.upscaling_resize_h), "upscaling_resize_w"
    for im in images:
        try:
            out_w, out_h, _ = upscaled_size(im, scale, size, req.upscaling_crop)
        except ParamError as e:
            raise ApiError(422, e.message, field) from None
        if out_w * out_h > limits.max_image_pixels:
            raise ApiError(422, f"the result would be {out_w}x{out_h} pixels; at most {limits.max_image_pixels}",
                           field)
        for upscaler in (first, second):
            if upscaler.entry is not None and (out_w > limits.max_width * 4 or out_h > limits.max_height * 4):
                raise ApiError(422, f"the x4 upscaler cannot make {out_w}x{out_h} here (at most "
                                    f"{limits.max_width * 4}x{limits.max_height * 4})", field)
    info = f"Postprocess upscale by: {req.upscaling_resize:g}" if req.resize_mode == 0 else \
        f"Postprocess upscale to: {req.upscaling_resize_w}x{req.upscaling_resize_h}"
    info += f", Postprocess upscaler: {first.name}"
    if second.name != "None" and req.extras_upscaler_2_visibility > 0:
        info += f", Postprocess upscaler 2: {second.name}"
    return ExtrasWork(images, scale, size, req.upscaling_crop, first, second, req.extras_upscaler_2_visibility, info)


def run_extras(work: ExtrasWork, job: Job, load: Callable[[Entry], Any], watermark: bool) -> list[Image.Image]:
    """Upscale every image on the worker (``load``: an upscaler entry → its pipeline)."""
    def callback(progress) -> None:
        job.check_stop()
        job.update(stage="upscale", step=progress.index + 1, steps=progress.total)

    def run(image: Image.Image, upscaler: Upscaler) -> Image.Image:
        how = load(upscaler.entry) if upscaler.entry is not None else upscaler.name
        return upscale_image(image, how, work.scale, work.size, crop=work.crop, watermark=watermark,
                             callback=callback)

    out = []
    for i, image in enumerate(work.images):
        job.begin_iteration(i)
        job.check_stop()
        result = run(image, work.first)
        if work.second.name != "None" and work.blend > 0:
            result = Image.blend(result, run(image, work.second), work.blend)
        out.append(result)
    return out


def encode_result(image: Image.Image, source: Image.Image, info: str) -> str:
    """The upscaled image as A1111 sends it: the source's infotext kept, the steps in ``postprocessing``."""
    meta = PngImagePlugin.PngInfo()
    if isinstance(source.info.get("parameters"), str):
        meta.add_text("parameters", source.info["parameters"])
    meta.add_text("postprocessing", info)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=meta)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_batch(req: ExtrasBatchImagesRequest, limits: Limits) -> list[Image.Image]:
    if not req.imageList:
        raise ApiError(422, "expected at least one image", "imageList")
    if len(req.imageList) > limits.max_batch_size * limits.max_n_iter:
        raise ApiError(422, f"at most {limits.max_batch_size * limits.max_n_iter} images", "imageList")
    return [decode_image(item.data, f"imageList.{i}.data", limits) for i, item in enumerate(req.imageList)]
# -- png-info and lists ---------------------------------------------------------------------------

def png_info(image: Image.Image) -> dict[str, Any]:
    """A1111's ``png-info``: the infotext, the image's other text items, the parsed parameters."""
    text = image.info.get("parameters")
    if not isinstance(text, str):
        comment = image.getexif().get_ifd(ExifTags.IFD.Exif).get(ExifTags.Base.UserComment)
        text = decode_user_comment(comment) if isinstance(comment, bytes) and comment else ""
    items = {k: v for k, v in image.info.items() if isinstance(k, str) and isinstance(v, str) and k != "parameters"}
    return {"info": text, "items": items, "parameters": parse_infotext(text) if text else {}}


def samplers() -> list[dict[str, Any]]:
    out = []
    for internal, display in SAMPLER_DISPLAY.items():
        aliases = [internal] + [a for a, (s, _) in SAMPLER_ALIASES.items() if s == internal and a != display]
        default = SAMPLER_ALIASES[display][1]
        out.append({"name": display, "aliases": aliases, "options": {"scheduler": default} if default else {}})
    return out


def schedulers() -> list[dict[str, Any]]:
    names = ("automatic", *SCHEDULERS)
    return [{"name": name, "label": SCHEDULER_DISPLAY.get(name, "Automatic"), "aliases": None,
             "default_rho": 7.0 if name == "karras" else -1.0, "need_inner_model": False} for name in names]


# -- routes ------------------------------------------------------------------------------------------

def add_routes(app, state) -> None:
    """``/sdapi/v1/extra-single-image``, ``extra-batch-images``, ``upscalers`` on ``app`` (``state``:
    the server's ``app.State``). Upscaling runs on the worker, as generation does."""
    v1 = "/sdapi/v1"
    limits = state.config.limits

    async def run(req: ExtrasRequest, images: list[Image.Image], request: Request) -> tuple[ExtrasWork, list]:
        work = await run_in_threadpool(build_extras, req, images, state.catalog, limits)

        def load(entry: Entry):
            field = "upscaler_1" if entry == work.first.entry else "upscaler_2"
            return state.host.get(entry, None, (field, "sd_vae", "refiner_checkpoint"))

        def task(job: Job) -> list[Image.Image]:
            return run_extras(work, job, load, state.config.watermark)

        try:
            job = state.queue.submit(Job(task, kind="extras", origin="a1111", n_iter=len(images)))
        except QueueFull as e:
            raise ApiError(429, str(e)) from None
        try:
            await wait(job, request, lambda: state.queue.cancel(job))
        finally:
            state.queue.forget(job)
        if job.status != "done":
            raise job.error or ApiError(503, "the request was interrupted")
        return work, job.result

    @app.post(f"{v1}/extra-single-image", tags=["A1111"])
    async def extra_single_image(req: ExtrasSingleImageRequest, request: Request) -> dict[str, Any]:
        image = await run_in_threadpool(decode_image, req.image, "image", limits)
        work, out = await run(req, [image], request)
        return {"html_info": work.info, "image": encode_result(out[0], image, work.info)}

    @app.post(f"{v1}/extra-batch-images", tags=["A1111"])
    async def extra_batch_images(req: ExtrasBatchImagesRequest, request: Request) -> dict[str, Any]:
        images = await run_in_threadpool(decode_batch, req, limits)
        work, out = await run(req, images, request)
        return {"html_info": work.info, "images": [encode_result(o, i, work.info) for o, i in zip(out, images)]}

    @app.get(f"{v1}/upscalers", tags=["A1111"])
    def list_upscalers() -> list[dict[str, Any]]:
        return upscalers(state.catalog)
