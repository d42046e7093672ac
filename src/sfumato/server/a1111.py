"""AUTOMATIC1111's web UI API, as its clients see it: request models with A1111's field names,
types and defaults; their mapping onto the one request object (:class:`GenerationParams`); and
responses shaped as A1111's (``images`` as base64 PNGs carrying the infotext, ``parameters``
echoing the request, ``info`` a JSON *string*).

A1111 fields that sfumato does not implement are accepted only at values that change nothing
(``restore_faces: false``, ``styles: []``, …); any other value is a 422 naming the field.
"""

from __future__ import annotations

import base64
import io
import json
import math
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Literal

from PIL import Image, PngImagePlugin
from pydantic import BaseModel, ConfigDict, Field

from ..version import __version__
from ..api import ImageResult, Pipeline
from ..diffusion.samplers import SAMPLER_DISPLAY
from ..pipeline.attention_maps import AttentionMaps, attention_hooks, overlay
from ..pipeline.generate import Progress
from ..pipeline.images import to_pil
from ..pipeline.infotext import SCHEDULER_DISPLAY, generation_infotext
from ..adapters.hypernetwork import parse_hypernet_prompt
from ..adapters.lora import parse_lora_prompt
from ..pipeline.params import GenerationParams, ParamError, check_prompt, prompt_workload
from ..errors import SfumatoError
from ..pipeline.safety import check_images, safety_infotext
from ..pipeline.watermark import add_watermark
from ..text.styles import apply_styles
from . import animatediff
from .adetailer import detail_specs
from .extensions import UnclipImage, control_specs, unclip_settings
from .jobs import Job, Stopped
from .img2img import img2img_settings
from .security import A1111_FIELDS, ApiError, Catalog, Entry, Limits

# -- requests -----------------------------------------------------------------------------------


class _Processing(BaseModel):
    """Fields common to txt2img and img2img (A1111's StableDiffusionProcessing + API extras)."""

    model_config = ConfigDict(protected_namespaces=(), allow_inf_nan=False)

    prompt: str = ""
    negative_prompt: str | None = None
    styles: list[str] | None = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int | None = -1
    seed_resize_from_w: int | None = -1
    sampler_name: str | None = None
    sampler_index: str | None = "Euler"
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    denoising_strength: float | None = 0.75
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = False
    firstpass_image: str | None = None
    comments: dict[str, Any] | None = None
    script_name: str | None = None
    script_args: list[Any] = []
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = {}
    force_task_id: str | None = None
    infotext: str | None = None
    # sfumato's addition: per image, each prompt word's attention heat map over it (the response's
    # ``attention_maps``: [[{"word", "image"}, ...] per image])
    attention_maps: bool = False
    # sfumato's addition, for Stable unCLIP models: image prompts whose CLIP embeddings are summed by
    # weight (txt2img: variations; img2img without them embeds its init image, as A1111), and the
    # noise level of that embedding (0 … the model's maximum − 1)
    unclip_images: list[UnclipImage] = []
    unclip_noise_level: int = 0


class Txt2ImgRequest(_Processing):
    enable_hr: bool = False
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""


class Img2ImgRequest(_Processing):
    init_images: list[str] | None = None
    resize_mode: int = 0
    image_cfg_scale: float | None = None
    mask: str | None = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: int | None = None
    mask_round: bool = True
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool = Field(default=False, exclude=True)
    # sfumato's addition: outpainting, pixels to add on each side (multiples of 8)
    outpaint_left: int = 0
    outpaint_right: int = 0
    outpaint_up: int = 0
    outpaint_down: int = 0
    # sfumato's addition: the depth map of SD 2's depth model (greyscale, white = near)
    depth_map: str | None = None
    # sfumato's addition, Inpaint Anything in one call: the mask is Segment Anything's best for these
    # prompts on the init image (a model of the models folder's sam/, named as /sam/sam-predict takes
    # it), grown by sam_dilation pixels. "Remove" is inpainting_fill 0 (fill from the surroundings).
    sam_model_name: str | None = None
    sam_positive_points: list[list[float]] = []
    sam_negative_points: list[list[float]] = []
    sam_box: list[float] | None = None
    sam_dilation: int = 8


class Txt2ImgJob(Txt2ImgRequest):
    mode: Literal["txt2img"]


class Img2ImgJob(Img2ImgRequest):
    mode: Literal["img2img"]


class PngInfoRequest(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False)

    image: str


def _absent(v: Any) -> bool:
    return v in (None, "", 0, False, [], {})


# A1111 fields without an implementation here: (value check, what the user is told).
_INERT: dict[str, tuple[Callable[[Any], bool], str]] = {
    "restore_faces": (_absent, "face restoration is not supported"),
    "tiling": (_absent, "tiling is not supported"),
    "eta": (lambda v: v in (None, 1), "only the samplers' default eta is supported"),
    "s_min_uncond": (_absent, "not supported"),
    "s_churn": (_absent, "not supported"),
    "s_tmin": (_absent, "not supported"),
    "s_tmax": (lambda v: _absent(v) or v == math.inf, "not supported"),
    "s_noise": (lambda v: v in (None, 1), "not supported"),
    "firstpass_image": (_absent, "not supported"),
    "script_name": (_absent, "scripts other than the X/Y/Z plot (\"x/y/z plot\") are not supported"),
    "script_args": (_absent, "scripts other than the X/Y/Z plot are not supported"),
    "save_images": (_absent, "this server saves no files: images come back in the response"),
    "infotext": (_absent, "not supported: send the settings as fields"),
    "firstphase_width": (_absent, "deprecated in A1111 and not supported"),
    "firstphase_height": (_absent, "deprecated in A1111 and not supported"),
    "resize_mode": (_absent, "only resize mode 0 (just resize) is supported"),
    "mask_round": (lambda v: v is True, "only a rounded latent mask is supported"),
    "initial_noise_multiplier": (lambda v: v in (None, 1), "not supported"),
    "latent_mask": (_absent, "not supported"),
}

UPSCALERS = {"latent": "latent", "lanczos": "lanczos"}   # A1111 hires upscaler name (any case) → ours
RNG_SOURCES = {"CPU": "cpu", "NV": "nv"}


# -- settings shared by all requests (A1111's "options") -----------------------------------------

@dataclass
class Defaults:
    """What a request does not say itself: the current model and the generation options."""

    checkpoint: Entry
    vae: Entry | None = None
    clip_skip: int = 1
    rng: str = "cpu"
    ensd: int = 0


SETTABLE_OPTIONS = ("sd_model_checkpoint", "sd_vae", "CLIP_stop_at_last_layers", "randn_source", "eta_noise_seed_delta")


def apply_options(values: dict[str, Any], defaults: Defaults, catalog: Catalog, prefix: str = "") -> Defaults:
    """``defaults`` with A1111 options applied; only ``SETTABLE_OPTIONS``, models by name only."""
    out = replace(defaults)
    for key, value in values.items():
        field = f"{prefix}{key}"
        if key not in SETTABLE_OPTIONS:
            raise ApiError(422, f"not a settable option; settable: {', '.join(SETTABLE_OPTIONS)}", field)
        if key == "sd_model_checkpoint":
            out.checkpoint = catalog.find("checkpoint", _string(value, field), field)
        elif key == "sd_vae":
            name = _string(value, field)
            out.vae = None if name in ("Automatic", "None") else catalog.find("vae", name, field)
        elif key == "CLIP_stop_at_last_layers":
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 12:
                raise ApiError(422, f"must be an integer in [1, 12], got {value!r}", field)
            out.clip_skip = value
        elif key == "eta_noise_seed_delta":
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**32:
                raise ApiError(422, f"must be an integer in [0, 2^32), got {value!r}", field)
            out.ensd = value
        elif key == "randn_source":
            if not isinstance(value, str) or value not in RNG_SOURCES:
                raise ApiError(422, f"must be one of {', '.join(RNG_SOURCES)}, got {value!r}", field)
            out.rng = RNG_SOURCES[value]
    return out


def _string(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise ApiError(422, f"expected a string, got {value!r}", field)
    return value


# -- request → work --------------------------------------------------------------------------------

@dataclass
class Work:
    """A validated A1111 request, ready for the worker."""

    mode: str
    params: GenerationParams        # seeds resolved; iteration k shifts them by k·batch_size
    n_iter: int
    send_images: bool
    parameters: dict[str, Any]      # the request as A1111 echoes it
    checkpoint: Entry
    vae: Entry | None
    fields: tuple[str, ...] = ("sd_model_checkpoint", "sd_vae", "refiner_checkpoint")   # the fields that chose them
    refiner: Entry | None = None
    attention_maps: bool = False
    hires: Entry | None = None      # the hires pass's own checkpoint
    animation: Any = None           # an AnimateDiff clip (server.animatediff.AnimationRequest)


def build_work(req: Txt2ImgRequest | Img2ImgRequest, defaults: Defaults, catalog: Catalog, limits: Limits) -> Work:
    """Validate a request fully (422 naming the field) before it is queued."""
    img2img = isinstance(req, Img2ImgRequest)
    for name, (ok, why) in _INERT.items():
        if name in type(req).model_fields and not ok(getattr(req, name)):
            raise ApiError(422, why, name)
    prompt, negative = req.prompt, req.negative_prompt or ""
    if req.styles:   # A1111's styles, from the models folder's styles.csv, applied in order
        try:
            prompt, negative = apply_styles(prompt, negative, req.styles, catalog.styles())
        except ParamError as e:
            raise ApiError(422, e.public.split(": ", 1)[-1], "styles") from None
        except SfumatoError:
            raise ApiError(422, "the server's styles.csv cannot be read", "styles") from None
    _check_prompts(prompt, negative, req.steps, limits)
    options = apply_options(req.override_settings or {}, defaults, catalog, "override_settings.")
    if req.disable_extra_networks:   # as in A1111: the tags are taken out of the prompt, nothing is applied
        prompt = _without_tags(prompt)
    else:
        _check_tags(prompt, catalog)
    if req.denoising_strength is not None and not 0 <= req.denoising_strength <= 1:
        raise ApiError(422, f"must be in [0, 1], got {req.denoising_strength}", "denoising_strength")
    refiner = None
    if req.refiner_checkpoint not in (None, "", "None"):   # A1111: an SDXL refiner for the schedule's tail
        refiner = catalog.find("checkpoint", req.refiner_checkpoint, "refiner_checkpoint")
    settings: dict[str, Any] = dict(
        prompt=prompt, negative_prompt=negative, steps=req.steps, cfg_scale=req.cfg_scale,
        sampler=req.sampler_name or req.sampler_index or "Euler", scheduler=scheduler_name(req.scheduler),
        seed=req.seed, width=req.width, height=req.height, batch_size=req.batch_size, clip_skip=options.clip_skip,
        subseed=req.subseed, subseed_strength=req.subseed_strength, rng=options.rng,
        seed_resize_from_w=req.seed_resize_from_w if req.seed_resize_from_w is not None else 0,
        seed_resize_from_h=req.seed_resize_from_h if req.seed_resize_from_h is not None else 0,
        eta_noise_seed_delta=options.ensd,
    )
    if refiner is not None:
        settings.update(refiner=refiner.stem, refiner_switch=0.8 if req.refiner_switch_at is None else req.refiner_switch_at)
    elif req.refiner_switch_at is not None and "refiner_switch_at" in req.model_fields_set and \
            req.refiner_switch_at not in (0, 1):
        raise ApiError(422, "needs refiner_checkpoint", "refiner_switch_at")
    if img2img:
        settings.update(img2img_settings(req, limits, catalog))
    elif req.enable_hr:
        settings.update(_hires_settings(req))
        if req.hr_checkpoint_name not in (None, "", "Use same checkpoint"):
            hires = catalog.find("checkpoint", req.hr_checkpoint_name, "hr_checkpoint_name")
            if hires != options.checkpoint:   # the model in use itself: nothing to change
                if refiner is not None:
                    raise ApiError(422, "a hires checkpoint and a refiner together are not supported",
                                   "hr_checkpoint_name")
                settings["hires_checkpoint"] = hires.stem
    settings.update(unclip_settings(req.unclip_images, req.unclip_noise_level, limits))
    animation = None
    if req.alwayson_scripts:   # sd-webui-controlnet's units (other extensions only when empty)
        scripts = req.alwayson_scripts if isinstance(req.alwayson_scripts, dict) else {}
        for name, value in scripts.items():
            args = value.get("args", []) if isinstance(value, dict) else value
            if str(name).lower() == "adetailer":
                settings["detail"] = detail_specs(args, catalog, f"alwayson_scripts.{name}.args")
            elif str(name).lower() == "animatediff":
                animation = animatediff.parse(args, catalog, f"alwayson_scripts.{name}.args")
                if animation is not None:
                    animatediff.check_request(animation, settings, req.n_iter)
        settings["control"], ips = control_specs(req.alwayson_scripts, catalog, limits, settings.get("init_image"),
                                                 animation.settings.frames if animation is not None else None)
        if ips:
            settings["ip_adapters"] = ips
    _check_limits(settings, req.n_iter, limits)
    try:
        params = GenerationParams(**settings).validated()
    except ParamError as e:
        field = A1111_FIELDS.get(e.field, e.field)
        raise ApiError(422, e.public.split(": ", 1)[-1], field) from None
    parameters = req.model_dump()
    parameters["unclip_images"] = [{"weight": u.weight} for u in req.unclip_images]   # not the images again
    if img2img and not req.include_init_images:
        parameters.update(init_images=None, mask=None, depth_map=None)
    overridden = set(req.override_settings or {})
    fields = tuple(f"override_settings.{name}" if name in overridden else name
                   for name in ("sd_model_checkpoint", "sd_vae")) + ("refiner_checkpoint", "hr_checkpoint_name")
    work = Work("img2img" if img2img else "txt2img", params, req.n_iter, req.send_images, parameters,
                options.checkpoint, options.vae, fields, refiner, req.attention_maps)
    if params.hires_checkpoint is not None:
        work.hires = catalog.find("checkpoint", req.hr_checkpoint_name, "hr_checkpoint_name")
    work.animation = animation
    return work


def scheduler_name(value: str | None) -> str | None:
    """An A1111 scheduler name or label → ours (None: the sampler's default, A1111's Automatic).
    Names sfumato lacks pass through for validation to report with the valid ones."""
    if value is None or value.strip().lower() in ("", "automatic"):
        return None
    for name, label in SCHEDULER_DISPLAY.items():
        if value.strip().lower() in (name, label.lower()):
            return name
    return value


def _check_prompts(prompt: str, negative: str, steps: int, limits: Limits) -> None:
    """The server's bounds on what the text encoders are asked to read, before anything else."""
    steps = steps if isinstance(steps, int) and 1 <= steps <= limits.max_steps else 1
    for field, text in (("prompt", prompt), ("negative_prompt", negative)):
        if len(text) > limits.max_prompt_length:
            raise ApiError(422, f"{len(text)} characters; at most {limits.max_prompt_length}", field)
        try:
            check_prompt(field, text, steps)
            work = prompt_workload(text, steps)
        except ParamError as e:
            raise ApiError(422, e.message, field) from None
        if work > limits.max_prompt_workload:
            raise ApiError(422, f"the prompt's schedule and AND-parts come to {work} characters for the text encoder "
                                f"to read; at most {limits.max_prompt_workload}", field)


def _without_tags(prompt: str) -> str:
    return parse_hypernet_prompt(parse_lora_prompt(prompt)[0])[0]


def _check_tags(prompt: str, catalog: Catalog) -> None:
    """Every LoRA and hypernetwork the prompt names is one the catalog lists (a 4xx naming the
    prompt otherwise); the pipeline resolves the names through the same folders."""
    text, loras = parse_lora_prompt(prompt)
    _, nets = parse_hypernet_prompt(text)
    for kind, tags in (("lora", loras), ("hypernetwork", nets)):
        for name, _ in tags:
            catalog.find(kind, name, "prompt")


def _hires_settings(req: Txt2ImgRequest) -> dict[str, Any]:
    same = dict(hr_sampler_name="Use same sampler", hr_scheduler="Use same scheduler")
    own = {name: getattr(req, name) for name in same if getattr(req, name) not in (None, "", same[name])}
    scale = req.hr_scale
    if req.hr_resize_x or req.hr_resize_y:
        sx = req.hr_resize_x / req.width if req.hr_resize_x else None
        sy = req.hr_resize_y / req.height if req.hr_resize_y else None
        if sx is not None and sy is not None and sx != sy:
            raise ApiError(422, "hr_resize_x/hr_resize_y must keep the aspect ratio", "hr_resize_x")
        scale = sx if sx is not None else sy
    if not scale > 1:
        raise ApiError(422, f"the hires pass must upscale (scale > 1), got {scale}", "hr_scale")
    upscaler = UPSCALERS.get((req.hr_upscaler or "Latent").lower())
    if upscaler is None:
        raise ApiError(422, f"unknown upscaler {req.hr_upscaler!r}; valid: Latent, Lanczos", "hr_upscaler")
    return dict(hires_scale=scale, hires_steps=req.hr_second_pass_steps, hires_upscaler=upscaler,
                hires_denoise=req.denoising_strength if req.denoising_strength is not None else 0.7,
                hires_sampler=own.get("hr_sampler_name"), hires_scheduler=scheduler_name(own.get("hr_scheduler")),
                hires_prompt=req.hr_prompt or None, hires_negative_prompt=req.hr_negative_prompt or None)


def _check_limits(s: dict[str, Any], n_iter: int, limits: Limits) -> None:
    bounds = (("width", 8, limits.max_width), ("height", 8, limits.max_height), ("steps", 1, limits.max_steps),
              ("batch_size", 1, limits.max_batch_size))
    for name, lo, hi in bounds:
        if not lo <= s[name] <= hi:
            raise ApiError(422, f"must be in [{lo}, {hi}], got {s[name]}", name)
    if not 1 <= n_iter <= limits.max_n_iter:
        raise ApiError(422, f"must be in [1, {limits.max_n_iter}], got {n_iter}", "n_iter")
    if s.get("hires_steps", 0) > limits.max_steps:
        raise ApiError(422, f"must be at most {limits.max_steps}", "hr_second_pass_steps")
    scale = s.get("hires_scale", 1.0)
    total = s["width"] * s["height"] * scale * scale * s["batch_size"] * n_iter
    if total > limits.max_total_pixels:
        raise ApiError(422, f"width·height·hr_scale²·batch_size·n_iter = {int(total)} pixels exceeds the "
                            f"limit of {limits.max_total_pixels}", "batch_size")


# -- running ------------------------------------------------------------------------------------

def run_work(work: Work, job: Job, pipe: Pipeline, watermark: bool) -> dict[str, Any]:
    """Run every iteration on the worker; returns A1111's response."""
    if work.animation is not None:   # the AnimateDiff extension's response: the clip, then any frames
        videos, frames, text = animatediff.run(work, job, pipe, watermark)
        details = info(work, pipe, [], job.started or time.time())
        details.update(infotexts=[text], all_seeds=[work.params.seed], seed=work.params.seed)
        images = videos + [encode_png(frame, text) for frame in frames]
        return {"images": images if work.send_images else [], "parameters": work.parameters,
                "info": json.dumps(details)}
    items, maps, _ = run_items(work, job, pipe, watermark)
    out = response(work, pipe, items, job.started or time.time())
    if work.attention_maps:
        out["attention_maps"] = maps
    return out


def run_items(work: Work, job: Job, pipe: Pipeline, watermark: bool, first: int = 0
              ) -> tuple[list[ImageResult], list[list[dict[str, str]]], bool]:
    """The images of every iteration (the job's iterations ``first`` on), with their attention maps
    when asked for, and whether the job was interrupted. A skipped or interrupted iteration gives
    the images of its latest x̂0, as A1111 does; a cancel raises."""
    p0 = work.params
    items: list[ImageResult] = []
    maps: list[list[dict[str, str]]] = []
    for k in range(work.n_iter):
        job.begin_iteration(first + k)
        shift = k * p0.batch_size
        p = replace(p0, seed=p0.seed + shift, subseed=p0.subseed + shift if p0.subseed >= 0 else -1)
        latest: list[Progress] = []

        def callback(progress: Progress) -> None:
            job.check_stop()
            latest[:] = [progress]
            job.update(stage=progress.stage, step=progress.index + 1, steps=progress.total,   # no unchecked
                       preview=progress.preview()[0] if pipe.safety_checker is None else None)   # previews

        collector = AttentionMaps(p.batch_size, pipe.embeddings) if work.attention_maps else None
        patches = [lambda: attention_hooks(pipe.model.unet, collector)] if collector is not None else []
        try:
            made = pipe.run(p, callback, watermark, patches).items
        except Stopped as e:
            if e.reason == "cancel":
                raise
            made = _partial(pipe, p, latest[0], watermark) if latest else []
            items += made
            maps += [[] for _ in made]
            if e.reason == "interrupt":
                return items, maps, True
            continue
        items += made
        if collector is not None:
            maps += [_word_maps(collector, p.prompt, item.image, i) for i, item in enumerate(made)]
    return items, maps, False


def _word_maps(collector: AttentionMaps, prompt: str, image: Image.Image, index: int) -> list[dict[str, str]]:
    words = collector.word_maps(prompt, (image.height, image.width), index)
    return [{"word": word, "image": encode_png(overlay(image, heat))} for word, heat in words.items()]


def _partial(pipe: Pipeline, p: GenerationParams, progress: Progress, watermark: bool) -> list[ImageResult]:
    """The images of an interrupted run's latest x̂0 (checked by the safety checker as finished ones are)."""
    images = to_pil(pipe.engine.decode(progress.denoised))
    flags: list = [None] * len(images)
    if pipe.safety_checker is not None:
        images, flags = check_images(pipe.safety_checker, images, pipe.safety_action)
    out = []
    for i, image in enumerate(images):
        seed = p.seed + i
        subseed = p.subseed + i if p.subseed_strength > 0 else None
        text = generation_infotext(replace(p, seed=seed), seed=seed, subseed=subseed, model_name=pipe.model_name,
                                   model_hash=pipe.model_hash, extra=safety_infotext(flags[i], pipe.safety_action))
        out.append(ImageResult(add_watermark(image) if watermark else image, seed, text, flags[i]))
    return out


def response(work: Work, pipe: Pipeline, items: list[ImageResult], started: float) -> dict[str, Any]:
    images = [encode_png(item.image, item.infotext) for item in items] if work.send_images else []
    out = {"images": images, "parameters": work.parameters, "info": json.dumps(info(work, pipe, items, started))}
    if any(item.nsfw is not None for item in items):   # the safety checker ran: its verdict per image
        out["nsfw"] = [bool(item.nsfw) for item in items]
    return out


def info(work: Work, pipe: Pipeline, items: list[ImageResult], started: float) -> dict[str, Any]:
    """A1111's ``Processed.js()`` keys."""
    p = work.params
    n = len(items)
    seeds = [item.seed for item in items]
    subseeds = [p.subseed + (s - p.seed) for s in seeds] if p.subseed >= 0 else [-1] * n
    hires = p.hires_scale > 1 and not p.is_img2img
    return {
        "prompt": p.prompt, "all_prompts": [p.prompt] * n,
        "negative_prompt": p.negative_prompt, "all_negative_prompts": [p.negative_prompt] * n,
        "seed": seeds[0] if seeds else p.seed, "all_seeds": seeds,
        "subseed": subseeds[0] if subseeds else p.subseed, "all_subseeds": subseeds,
        "subseed_strength": p.subseed_strength, "width": p.width, "height": p.height,
        "sampler_name": SAMPLER_DISPLAY.get(p.sampler, p.sampler),
        "scheduler": SCHEDULER_DISPLAY.get(p.scheduler, p.scheduler) if p.scheduler else "Automatic",
        "cfg_scale": p.cfg_scale, "steps": p.steps, "batch_size": p.batch_size,
        "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": pipe.model_name, "sd_model_hash": pipe.model_hash,
        "sd_vae_name": work.vae.stem if work.vae else None, "sd_vae_hash": None,
        "seed_resize_from_w": p.seed_resize_from_w if p.seed_resize_from else -1,
        "seed_resize_from_h": p.seed_resize_from_h if p.seed_resize_from else -1,
        "denoising_strength": p.strength if p.is_img2img else (p.hires_denoise if hires else None),
        "extra_generation_params": {}, "index_of_first_image": 0,
        "infotexts": [item.infotext for item in items], "styles": work.parameters.get("styles") or [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(started)),
        "clip_skip": p.clip_skip,
        "is_using_inpainting_conditioning": p.mask is not None and pipe.model.spec.unet.in_channels == 9,
        "version": f"sfumato {__version__}",
    }


def encode_png(image: Image.Image, infotext: str | None = None) -> str:
    """A PNG as base64 text (no ``data:`` prefix, as A1111 sends), infotext in ``parameters``."""
    meta = PngImagePlugin.PngInfo()
    if infotext is not None:
        meta.add_text("parameters", infotext)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=meta)
    return base64.b64encode(buffer.getvalue()).decode("ascii")
