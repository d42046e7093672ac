"""AUTOMATIC1111's "infotext": the generation parameters text stored with every image.

Layout (what the web UI writes and its "PNG Info" tab reads back)::

    a prompt, possibly
    over several lines
    Negative prompt: the negative prompt (line left out when empty)
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512, …

Settings follow A1111's key order and appear only when used; a value holding ``,``, ``:`` or a
newline is written as a JSON string. Reading follows A1111's rules: the last line is the settings
line only if it holds at least three ``key: value`` pairs, and ``WxH`` values split into
``Key-1`` / ``Key-2``. In files the text is a PNG ``parameters`` chunk, or for JPEG and WebP the
EXIF ``UserComment`` (``images.save_image`` writes both).
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PIL import ExifTags

from ..version import __version__
from ..diffusion.samplers import SAMPLER_DISPLAY, implied_scheduler, resolve_sampler
from ..errors import ParamError, SfumatoError
from .params import GenerationParams

# A1111's scheduler labels by its scheduler names (its own vocabulary: "normal" is "Normal").
SCHEDULER_DISPLAY: dict[str, str] = {
    "uniform": "Uniform",
    "karras": "Karras",
    "exponential": "Exponential",
    "polyexponential": "Polyexponential",
    "sgm_uniform": "SGM Uniform",
    "kl_optimal": "KL Optimal",
    "align_your_steps": "Align Your Steps",
    "simple": "Simple",
    "normal": "Normal",
    "ddim": "DDIM",
    "beta": "Beta",
    "trailing": "Trailing",   # not A1111's: diffusers' trailing spacing (few-step models)
    "turbo": "Turbo",         # not A1111's: ComfyUI's SDTurboScheduler
}
AUTOMATIC = "Automatic"   # A1111: the sampler's default scheduler (``resolve_sampler``'s default)
UPSCALER_DISPLAY: dict[str, str] = {"latent": "Latent", "lanczos": "Lanczos"}
RNG_DISPLAY: dict[str, str] = {"cpu": "CPU", "nv": "NV"}
CFG_RESCALE_KEY = "CFG Rescale φ"   # as written by the CFG-rescale extension for A1111

_PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^(\d+)x(\d+)$")
_NEGATIVE = "Negative prompt:"
_EXIF_IFD = int(ExifTags.IFD.Exif)
_USER_COMMENT = int(ExifTags.Base.UserComment)
_UNICODE = b"UNICODE\0"   # EXIF character-code prefix; the text follows as UTF-16 (big-endian here)


# -- writing -----------------------------------------------------------------------------------

def format_value(value: object) -> str:
    """A value as A1111 shows it: ``7`` for 7.0, ``7.5`` stays, booleans as ``True``/``False``."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def quote(text: str) -> str:
    """JSON-quote a value that would otherwise break the settings line (A1111's rule, plus values
    starting with a quote, which A1111 would read back unquoted)."""
    if any(c in text for c in ",:\n") or text.startswith('"'):
        return json.dumps(text, ensure_ascii=False)
    return text


def format_infotext(prompt: str, negative_prompt: str, settings: Mapping[str, object]) -> str:
    """The infotext for a prompt pair and ordered settings; ``None`` values are left out and a
    value equal to its key is written as the bare key (both as A1111 does)."""
    pairs = []
    for key, value in settings.items():
        if value is None:
            continue
        text = format_value(value)
        pairs.append(key if text == key else f"{key}: {quote(text)}")
    negative = f"\n{_NEGATIVE} {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{', '.join(pairs)}".strip()


def infotext_settings(
    p: GenerationParams,
    *,
    seed: int | None = None,
    subseed: int | None = None,
    model_name: str | None = None,
    model_hash: str | None = None,
    vae_name: str | None = None,
    vae_hash: str | None = None,
    extra: Mapping[str, object] | None = None,
) -> dict[str, object]:
    """The settings line of one image of request ``p`` in A1111's key order (``None``: not used).

    ``seed``/``subseed`` are this image's (default: the request's). ``extra`` settings go where
    A1111 puts its extra generation parameters, just before ``Version``.
    """
    variation = p.subseed_strength > 0
    hires = p.hires_scale > 1 and not p.is_img2img
    inpaint = p.mask is not None
    if p.is_img2img:
        denoising = p.strength
    elif hires:
        denoising = p.hires_denoise
    else:
        denoising = None
    return {
        "Steps": p.steps,
        "Sampler": SAMPLER_DISPLAY.get(p.sampler, p.sampler),
        "Schedule type": _scheduler_label(p.sampler, p.scheduler),
        "CFG scale": p.cfg_scale,
        "Seed": p.seed if seed is None else seed,
        "Size": f"{p.width}x{p.height}",
        "Model hash": model_hash,
        "Model": model_name,
        "VAE hash": vae_hash,
        "VAE": vae_name,
        "Variation seed": (p.subseed if subseed is None else subseed) if variation else None,
        "Variation seed strength": p.subseed_strength if variation else None,
        "Denoising strength": denoising,
        "Seed resize from": f"{p.seed_resize_from_w}x{p.seed_resize_from_h}" if p.seed_resize_from else None,
        "Clip skip": p.clip_skip if p.clip_skip > 1 else None,
        "ENSD": p.eta_noise_seed_delta or None,
        "RNG": RNG_DISPLAY.get(p.rng, p.rng),   # A1111 omits only its own default, GPU
        # A1111's extra generation parameters, in the order its processing adds them
        "Mask blur": p.mask_blur if inpaint and p.mask_blur > 0 else None,
        "Inpaint area": "Only masked" if inpaint and p.only_masked else None,
        "Masked area padding": p.only_masked_padding if inpaint and p.only_masked else None,
        "Masked content": p.masked_content if inpaint and p.masked_content != "original" else None,
        "Hires upscale": p.hires_scale if hires else None,
        "Hires steps": p.hires_steps if hires and p.hires_steps else None,
        "Hires upscaler": UPSCALER_DISPLAY.get(p.hires_upscaler, p.hires_upscaler) if hires else None,
        "Hires checkpoint": p.hires_checkpoint if hires else None,
        "Hires sampler": SAMPLER_DISPLAY.get(p.hires_sampler, p.hires_sampler)
        if hires and p.hires_sampler not in (None, p.sampler) else None,
        "Hires schedule type": SCHEDULER_DISPLAY.get(p.hires_scheduler, p.hires_scheduler)
        if hires and p.hires_scheduler not in (None, p.scheduler) else None,
        "Hires prompt": p.hires_prompt if hires and p.hires_prompt not in (None, p.prompt) else None,
        "Hires negative prompt": p.hires_negative_prompt
        if hires and p.hires_negative_prompt not in (None, p.negative_prompt) else None,
        "Refiner": p.refiner,
        "Refiner switch at": p.refiner_switch if p.refiner else None,
        CFG_RESCALE_KEY: p.guidance_rescale if p.guidance_rescale > 0 else None,
        "Token merging ratio": p.tome_ratio if p.tome_ratio > 0 else None,   # A1111's key
        "DeepCache interval": p.deepcache_interval if p.deepcache_interval > 1 else None,
        **(extra or {}),
        "Version": f"sfumato {__version__}",
    }


def _scheduler_label(sampler: str, scheduler: str | None) -> str:
    """The schedule that was chosen, as A1111 writes ``p.scheduler``: ``Automatic`` when none was."""
    return AUTOMATIC if scheduler is None else SCHEDULER_DISPLAY.get(scheduler, scheduler)


def generation_infotext(p: GenerationParams, **kwargs: Any) -> str:
    """The full infotext of one image: ``format_infotext`` over ``infotext_settings(p, **kwargs)``."""
    return format_infotext(p.prompt, p.negative_prompt, infotext_settings(p, **kwargs))


# -- reading -----------------------------------------------------------------------------------

def parse_infotext(text: str) -> dict[str, str]:
    """Split an infotext into ``Prompt``, ``Negative prompt`` and its settings, as A1111 reads it.

    Values are unquoted; ``Size: 512x512`` gives ``Size-1: 512`` and ``Size-2: 512``. Settings that
    are absent stay absent (A1111 fills its UI defaults afterwards; ``params_from_infotext`` maps
    what sfumato uses).
    """
    *lines, last = text.strip().split("\n")
    if len(_PAIR.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt: list[str] = []
    negative: list[str] = []
    for line in lines:
        line = line.strip()
        if line.startswith(_NEGATIVE):
            negative.append(line[len(_NEGATIVE):].strip())
        elif negative:
            negative.append(line)
        else:
            prompt.append(line)
    result = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _PAIR.findall(last):
        value = _unquote(value)
        size = _SIZE.match(value)
        if size:
            result[f"{key}-1"], result[f"{key}-2"] = size.groups()
        else:
            result[key] = value
    return result


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def params_from_infotext(text: str) -> dict[str, Any]:
    """``_params_from_infotext``; a value that is not what its key needs (text read from an image
    anyone may have written) is a ParamError, never an untyped exception."""
    try:
        return _params_from_infotext(text)
    except (ValueError, ZeroDivisionError, KeyError, OverflowError) as e:
        if isinstance(e, ParamError):
            raise
        raise ParamError("infotext", f"a setting has a value it cannot have ({type(e).__name__})") from None


def _params_from_infotext(text: str) -> dict[str, Any]:
    """The infotext's settings as :class:`GenerationParams` keyword arguments.

    Sampler and scheduler labels become internal names (an old combined label such as
    ``DPM++ 2M Karras`` is split; ``Automatic`` becomes the scheduler A1111 would pick, or None
    where that is the model's default σ's); labels not known here pass through for validation to
    report. ``Denoising strength`` is the hires-fix denoise when the text has hires settings,
    else the img2img strength. A missing ``RNG`` (A1111's GPU noise, which the CPU cannot
    reproduce) leaves ``rng`` to the request's default, as do other missing settings.
    """
    s = parse_infotext(text)
    out: dict[str, Any] = {"prompt": s["Prompt"], "negative_prompt": s["Negative prompt"]}
    conversions: dict[str, tuple[str, type]] = {
        "Steps": ("steps", int),
        "CFG scale": ("cfg_scale", float),
        "Seed": ("seed", int),
        "Size-1": ("width", int),
        "Size-2": ("height", int),
        "Clip skip": ("clip_skip", int),
        "Variation seed": ("subseed", int),
        "Variation seed strength": ("subseed_strength", float),
        "Mask blur": ("mask_blur", int),
        "Masked area padding": ("only_masked_padding", int),
        "Masked content": ("masked_content", str),
        "Hires steps": ("hires_steps", int),
        "Refiner": ("refiner", str),
        "Hires checkpoint": ("hires_checkpoint", str),
        "Refiner switch at": ("refiner_switch", float),
        "Token merging ratio": ("tome_ratio", float),
        "DeepCache interval": ("deepcache_interval", int),
        "ENSD": ("eta_noise_seed_delta", int),
    }
    for key, (name, kind) in conversions.items():
        if key in s:
            try:
                out[name] = kind(s[key])
            except ValueError:
                raise ParamError(name, f"the infotext's {key!r} is {s[key][:40]!r}, not a number") from None
    if "Seed resize from-1" in s:   # "Seed resize from: WxH", split as Size is
        out["seed_resize_from_w"], out["seed_resize_from_h"] = int(s["Seed resize from-1"]), int(s["Seed resize from-2"])
    if "Sampler" in s:
        out["sampler"], out["scheduler"] = _sampler_and_scheduler(s["Sampler"], s.get("Schedule type"))
    if "RNG" in s:
        out["rng"] = s["RNG"].lower()
    for key in (CFG_RESCALE_KEY, "CFG Rescale phi", "CFG Rescale"):
        if key in s:
            out["guidance_rescale"] = float(s[key])
            break
    if "Inpaint area" in s:
        out["only_masked"] = s["Inpaint area"] == "Only masked"
    hires_scale = _hires_scale(s)
    if hires_scale is not None:
        out["hires_scale"] = hires_scale
        if "Hires upscaler" in s:
            out["hires_upscaler"] = _internal(UPSCALER_DISPLAY, s["Hires upscaler"])
        if "Hires sampler" in s:
            out["hires_sampler"], out["hires_scheduler"] = _sampler_and_scheduler(s["Hires sampler"],
                                                                                  s.get("Hires schedule type"))
        elif "Hires schedule type" in s:
            out["hires_scheduler"] = _internal(SCHEDULER_DISPLAY, s["Hires schedule type"])
        for key, name in (("Hires prompt", "hires_prompt"), ("Hires negative prompt", "hires_negative_prompt")):
            if key in s:
                out[name] = s[key]
    if "Denoising strength" in s:
        out["hires_denoise" if hires_scale is not None else "strength"] = float(s["Denoising strength"])
    return out


def _internal(display: Mapping[str, str], label: str) -> str:
    """Internal name of a label (case-insensitive), or the label itself if unknown."""
    by_label = {v.lower(): k for k, v in display.items()}
    return by_label.get(label.lower(), label)


def _sampler_and_scheduler(label: str, scheduler: str | None) -> tuple[str, str | None]:
    """A1111's labels → (sampler, scheduler); old combined labels (``DPM++ 2M Karras``, before
    A1111 1.9) and ``Automatic`` give the scheduler A1111 would use (None: the model's default)."""
    try:
        sampler, _ = resolve_sampler(label)
    except ValueError:   # not a sampler we know: passed on for validation to report
        return label, None if scheduler in (None, AUTOMATIC) else _internal(SCHEDULER_DISPLAY, scheduler)
    if scheduler == AUTOMATIC:
        return sampler, None
    if scheduler is None:   # before A1111 1.9 the label held the schedule: "DPM++ 2M Karras"
        return sampler, implied_scheduler(label)
    return sampler, _internal(SCHEDULER_DISPLAY, scheduler)


def _hires_scale(s: Mapping[str, str]) -> float | None:
    """``Hires upscale``, or the scale ``Hires resize`` implies when it keeps the aspect ratio."""
    if "Hires upscale" in s:
        return float(s["Hires upscale"])
    if "Hires resize-1" in s and "Size-1" in s:
        sx = int(s["Hires resize-1"]) / int(s["Size-1"])
        sy = int(s["Hires resize-2"]) / int(s["Size-2"])
        if sx == sy > 0:
            return sx
    return None


# -- in image files ---------------------------------------------------------------------------

def read_image_parameters(path: str | Path, field: str = "image") -> str | None:
    """The infotext stored in an image: the PNG ``parameters`` chunk, else EXIF ``UserComment``. A file
    that is missing, no image, a decompression bomb or corrupt is a SfumatoError naming ``field``."""
    from ..safe_image import open_image

    with open_image(path, field, load=False) as image:
        try:
            text = getattr(image, "text", {}).get("parameters")   # PNG: all text chunks, even after IDAT
            if text is not None:
                return text
            comment = image.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT)
        except Exception as e:  # noqa: BLE001 — untrusted bytes: corrupt chunks, oversized text
            raise SfumatoError(f"{field}: cannot read the text of {path} ({type(e).__name__})") from None
    try:
        return decode_user_comment(comment) if isinstance(comment, bytes) and comment else None
    except (UnicodeDecodeError, ValueError):
        raise SfumatoError(f"{field}: {path} holds an unreadable EXIF UserComment") from None


def user_comment_exif(text: str) -> bytes:
    """A minimal EXIF block (as ``piexif.dump`` lays it out for A1111): IFD0 holding only the
    pointer to an Exif IFD, which holds only ``UserComment`` (type UNDEFINED), UNICODE-encoded."""
    comment = _UNICODE + text.encode("utf-16-be")
    exif_ifd = 8 + 2 + 12 + 4                 # TIFF header, one-entry IFD0, its next-IFD link
    data = exif_ifd + 2 + 12 + 4              # after the one-entry Exif IFD
    return (
        b"Exif\0\0MM\0\x2a" + struct.pack(">I", 8)
        + struct.pack(">HHHII", 1, 0x8769, 4, 1, exif_ifd) + struct.pack(">I", 0)
        + struct.pack(">HHHII", 1, _USER_COMMENT, 7, len(comment), data) + struct.pack(">I", 0)
        + comment
    )


def decode_user_comment(comment: bytes) -> str:
    """EXIF UserComment bytes → text (8-byte character-code prefix, then the text)."""
    code, body = comment[:8], comment[8:]
    if code == _UNICODE:
        if body[:2] in (b"\xff\xfe", b"\xfe\xff"):
            return body.decode("utf-16")
        return body.decode("utf-16-be", errors="replace")
    return body.decode("utf-8", errors="replace").rstrip("\0")
