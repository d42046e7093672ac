"""The A1111 ADetailer extension's API: ``alwayson_scripts.ADetailer.args`` (``[ad_enable,
skip_img2img, {tab}, {tab}, …]``, the booleans optional) as the library's detail passes, and its
``/adetailer/v1/version`` and ``/adetailer/v1/ad_model`` routes.

A tab's ``ad_model`` names a YOLO-format ONNX detector in the models folder's ``adetailer``
subfolder (ultralytics exports ADetailer's ``face_yolov8n.pt`` with ``yolo export ... format=onnx``);
the ``.pt`` files themselves are pickles of ultralytics classes, and MediaPipe's detectors are not
installed, so both are refused by name. Fields this server cannot honour are refused when set to
anything but their default; an override (``ad_steps``, …) counts only when its ``ad_use_…`` is on.
"""

from __future__ import annotations

from typing import Any

from ..errors import ParamError
from ..pipeline.params import DetailSpec
from .security import ApiError, Catalog

VERSION = "24.11.1"
# the tab's fields → DetailSpec's
FIELDS = {"ad_prompt": "prompt", "ad_negative_prompt": "negative_prompt", "ad_confidence": "confidence",
          "ad_mask_k_largest": "k_largest", "ad_mask_min_ratio": "min_ratio", "ad_mask_max_ratio": "max_ratio",
          "ad_dilate_erode": "dilate", "ad_mask_blur": "mask_blur", "ad_denoising_strength": "strength",
          "ad_inpaint_only_masked_padding": "padding"}
OVERRIDES = {"ad_use_steps": ("ad_steps", "steps"), "ad_use_cfg_scale": ("ad_cfg_scale", "cfg_scale"),
             "ad_use_sampler": ("ad_sampler", "sampler")}
MERGES = {"none": "none", "merge": "merge", "merge and invert": "merge and invert"}
# fields accepted only at their default (what this server does anyway)
INERT = {"ad_x_offset": 0, "ad_y_offset": 0, "ad_inpaint_only_masked": True, "ad_use_inpaint_width_height": False,
         "ad_use_checkpoint": False, "ad_use_vae": False, "ad_use_noise_multiplier": False, "ad_use_clip_skip": False,
         "ad_restore_face": False, "ad_controlnet_model": "None", "ad_model_classes": "", "ad_use_scheduler": False}
# fields that only matter under an override or an option this server refuses when on
GATED = {"ad_steps", "ad_cfg_scale", "ad_sampler", "ad_inpaint_width", "ad_inpaint_height", "ad_checkpoint", "ad_vae",
         "ad_noise_multiplier", "ad_clip_skip", "ad_controlnet_module", "ad_controlnet_weight",
         "ad_controlnet_guidance_start", "ad_controlnet_guidance_end", "ad_scheduler", "ad_tab_enable",
         "ad_tap_enable", "is_api", "ad_mask_merge_invert", "ad_model", "ad_mask_filter_method", "ad_use_steps",
         "ad_use_cfg_scale", "ad_use_sampler", *FIELDS, *INERT}


def detail_specs(args: Any, catalog: Catalog, field: str) -> list[DetailSpec]:
    """The tabs of ``alwayson_scripts.ADetailer.args`` as DetailSpecs (422 naming the tab's field)."""
    if not isinstance(args, list):
        raise ApiError(422, "expected a list", field)
    tabs = list(enumerate(args))
    flags = [a for _, a in tabs[:2] if isinstance(a, bool)]
    if flags and not flags[0]:
        return []
    specs = []
    for i, tab in tabs[len(flags):]:
        where = f"{field}[{i}]"
        if not isinstance(tab, dict):
            raise ApiError(422, "expected an ADetailer tab (an object)", where)
        if not tab.get("ad_tab_enable", tab.get("ad_tap_enable", True)):
            continue
        model = tab.get("ad_model", "None")
        if model in (None, "", "None"):
            continue
        specs.append(_tab(tab, where, catalog))
    return specs


def _tab(tab: dict, where: str, catalog: Catalog) -> DetailSpec:
    for key in tab:
        if key not in GATED:
            raise ApiError(422, f"{key} is not an ADetailer field this server knows", f"{where}.{key}")
    for key, default in INERT.items():
        if key in tab and tab[key] != default:
            raise ApiError(422, f"only {default!r} is supported here", f"{where}.{key}")
    model = tab["ad_model"]
    if not isinstance(model, str):
        raise ApiError(422, "expected a model name", f"{where}.ad_model")
    if model.lower().startswith("mediapipe"):
        raise ApiError(422, "MediaPipe detectors are not available here; use a YOLO ONNX file from adetailer/",
                       f"{where}.ad_model")
    if model.lower().endswith((".pt", ".pth")):
        raise ApiError(422, f"{model} is an ultralytics pickle, which this server does not run: export it to ONNX "
                            "(yolo export model=... format=onnx) into the models folder's adetailer/", f"{where}.ad_model")
    entry = catalog.find("adetailer", model, f"{where}.ad_model")
    options: dict[str, Any] = {ours: tab[theirs] for theirs, ours in FIELDS.items() if theirs in tab}
    for use, (theirs, ours) in OVERRIDES.items():
        if tab.get(use) and theirs in tab:
            options[ours] = tab[theirs]
    merge = MERGES.get(str(tab.get("ad_mask_merge_invert", "None")).lower())
    if merge is None:
        raise ApiError(422, "must be None, Merge or Merge and Invert", f"{where}.ad_mask_merge_invert")
    spec = DetailSpec(entry.path, merge=merge, name=entry.name, **options)
    try:
        spec.validate("tab")
    except ParamError as e:
        names = {ours: theirs for theirs, ours in FIELDS.items()} | {o: u for u, (_, o) in OVERRIDES.items()}
        sub = e.field.removeprefix("tab.")
        raise ApiError(422, e.message, f"{where}.{names.get(sub, sub)}") from None
    return spec


def add_routes(app, state) -> None:
    @app.get("/adetailer/v1/version", tags=["ADetailer"])
    def version() -> dict[str, str]:
        return {"version": VERSION}

    @app.get("/adetailer/v1/ad_model", tags=["ADetailer"])
    def ad_model() -> dict[str, list[str]]:
        return {"ad_model": [e.name for e in state.catalog.entries("adetailer")]}
