"""The A1111 extension APIs clients send: sd-webui-controlnet's units in ``alwayson_scripts`` and its
``/controlnet/*`` routes, on the library's ControlNets (``ControlSpec``).

A unit names its model as the extension lists it (``name [hash]``, or the bare name) from the models
folder's ``ControlNet`` subfolder; its image (or, in img2img, the init image when it has none) goes
through the named preprocessor at the generation size (the extension's "pixel perfect"); ``weight``,
``guidance_start`` / ``guidance_end``, ``control_mode`` and ``resize_mode`` mean what they mean there.
Preprocessors that are not implemented here are refused by name, never replaced by another.
With AnimateDiff a unit may steer each frame with its own image: ``batch_images`` as a list of base64
images, one per frame (the extension's batch folder is a path on the server: not read here).
IP-Adapter units are the extension's too: a unit whose module is an ``ip-adapter_clip_*``
preprocessor and whose model is an IP-Adapter file in the ControlNet folder becomes an
``IPAdapterSpec`` (weight → scale, guidance start/end → its step window); its CLIP image encoder is
the one the extension names for the module, ``clip_h`` (ViT-H/14) or ``clip_g`` (ViT-bigG/14), found
in the models folder's ``clip_vision`` subfolder.
Other always-on scripts are accepted only when they carry nothing to do (``{"args": []}`` or
``[False]``, as clients send for extensions they do not use).

Also here: sfumato's own request fields for Stable unCLIP image prompts (``unclip_images``).
"""

from __future__ import annotations

import base64
import io
from typing import Any

from PIL import Image
from pydantic import BaseModel, ConfigDict

from ..errors import ParamError, SfumatoError
from ..pipeline.animate import MAX_FRAMES
from ..pipeline.params import ControlSpec, IPAdapterSpec
from .security import ApiError, Catalog, Limits, decode_image

CONTROLNET_VERSION = 2
# the extension's preprocessor ("module") names that are implemented here → ours
MODULES = {"none": "none", "canny": "canny", "threshold": "threshold"}
# … and those that run annotator networks: module → (ours, per network the file stems it may have in
# models-dir/annotators — the names the extension downloads them under). "depth" and "hed" are the
# extension's older names.
_BODY, _HAND, _FACE = ("body_pose_model",), ("hand_pose_model",), ("facenet",)
_MIDAS = ("dpt_hybrid-midas-501f0c75", "dpt_large-midas-2f21e586")
ANNOTATOR_MODULES = {
    "openpose": ("openpose", (_BODY,)),
    "openpose_hand": ("openpose_hand", (_BODY, _HAND)),
    "openpose_face": ("openpose_face", (_BODY, _FACE)),
    "openpose_faceonly": ("openpose_faceonly", (_BODY, _FACE)),
    "openpose_full": ("openpose_full", (_BODY, _HAND, _FACE)),
    "softedge_hed": ("softedge_hed", (("ControlNetHED",),)), "hed": ("softedge_hed", (("ControlNetHED",),)),
    "softedge_hedsafe": ("softedge_hedsafe", (("ControlNetHED",),)),
    "scribble_hed": ("scribble_hed", (("ControlNetHED",),)),
    "lineart_realistic": ("lineart_realistic", (("sk_model",),)),
    "lineart_coarse": ("lineart_coarse", (("sk_model2",),)),
    "depth_midas": ("depth_midas", (_MIDAS,)),
    "depth": ("depth_midas", (_MIDAS,)),
}


def annotator_file(module: str, catalog: Catalog):
    """The weights file of an annotator module in the models folder's ``annotators`` (any depth) — a
    list of files for a module that runs several networks — or None when one is missing."""
    folder = catalog.folder("annotator")
    if folder is None:
        return None
    paths = []
    for stems in ANNOTATOR_MODULES[module][1]:
        found = sorted((e for e in folder.entries() if e.stem in stems), key=lambda e: (stems.index(e.stem), e.name))
        if not found:
            return None
        paths.append(found[0].path)
    return paths[0] if len(paths) == 1 else paths


def available_modules(catalog: Catalog) -> list[str]:
    return [*MODULES, *(m for m in ANNOTATOR_MODULES if annotator_file(m, catalog) is not None), *IP_MODULES]


def resolve_module(module: str, catalog: Catalog, field: str) -> tuple[str, Any]:
    """A unit's module → (our preprocessor, its annotator file or None); 422 naming ``field`` otherwise."""
    if module in MODULES:
        return MODULES[module], None
    if module in ANNOTATOR_MODULES:
        path = annotator_file(module, catalog)
        if path is None:
            names = " and ".join(" or ".join(stems) for stems in ANNOTATOR_MODULES[module][1])
            raise ApiError(422, f"preprocessor {module!r} runs a network: put {names} (.pth, .pt or .safetensors) "
                                "in the models folder's annotators/", field)
        return ANNOTATOR_MODULES[module][0], path
    raise ApiError(422, f"preprocessor {module!r} is not available here; available: "
                        f"{', '.join(available_modules(catalog))}", field)
CONTROL_MODES = {0: "balanced", 1: "prompt", 2: "control", "balanced": "balanced",
                 "my prompt is more important": "prompt", "controlnet is more important": "control"}
# the extension's IP-Adapter preprocessors → the CLIP image encoder each uses (in models-dir/clip_vision)
IP_MODULES = {"ip-adapter_clip_sd15": "clip_h", "ip-adapter_clip_h": "clip_h", "ip-adapter_clip_sdxl_plus_vith": "clip_h",
              "ip-adapter_clip_sdxl": "clip_g", "ip-adapter_clip_g": "clip_g"}
RESIZE_MODES = {0: "stretch", 1: "crop", 2: "fill", "just resize": "stretch", "crop and resize": "crop",
                "resize and fill": "fill", "scale to fit (inner fit)": "crop", "envelope (outer fit)": "fill",
                "inner fit (scale to fit)": "crop", "outer fit (shrink to fit)": "fill"}


def control_specs(scripts: dict[str, Any], catalog: Catalog, limits: Limits,
                  init: Image.Image | None = None, frames: int | None = None
                  ) -> tuple[list[ControlSpec], list[IPAdapterSpec]]:
    """The ControlNet units of ``alwayson_scripts`` as ControlSpecs, and its IP-Adapter units (422
    naming the unit's field); every other script must be empty. ``frames``: the AnimateDiff clip's
    length, which a unit's ``batch_images`` must match (None: a still, which takes none)."""
    specs: list[ControlSpec | IPAdapterSpec] = []
    if not isinstance(scripts, dict):
        raise ApiError(422, "expected an object of {script name: {args: [...]}}", "alwayson_scripts")
    for name, value in scripts.items():
        args = value.get("args", []) if isinstance(value, dict) else value
        field = f"alwayson_scripts.{name}.args"
        if not isinstance(args, list):
            raise ApiError(422, "expected a list", field)
        if str(name).lower() in ("adetailer", "animatediff"):   # server.adetailer, server.animatediff
            continue
        if str(name).lower() != "controlnet":
            if any(a not in (False, None, {}, [], "") for a in args):
                raise ApiError(422, f"the extension {name!r} is not available on this server", f"alwayson_scripts.{name}")
            continue
        for i, unit in enumerate(args):
            spec = _unit(unit, f"{field}[{i}]", catalog, limits, init, frames)
            if spec is not None:
                specs.append(spec)
    return ([s for s in specs if isinstance(s, ControlSpec)], [s for s in specs if isinstance(s, IPAdapterSpec)])


def _unit(unit: Any, field: str, catalog: Catalog, limits: Limits, init: Image.Image | None,
          clip: int | None = None) -> ControlSpec | IPAdapterSpec | None:
    if unit in (False, None):
        return None
    if not isinstance(unit, dict):
        raise ApiError(422, "expected a ControlNet unit (an object)", field)
    if not unit.get("enabled", True):
        return None
    model = unit.get("model", "None")
    if model in (None, "", "None", "none"):
        return None
    entry = catalog.find("controlnet", model, f"{field}.model")
    module = str(unit.get("module", "none")).lower()
    preprocessor, annotator = resolve_module(module, catalog, f"{field}.module") if module not in IP_MODULES \
        else (None, None)
    image = unit.get("image", unit.get("input_image"))
    if isinstance(image, dict):   # the older {"image": …, "mask": …} form
        if image.get("mask"):
            raise ApiError(422, "a unit's mask is not supported", f"{field}.image.mask")
        image = image.get("image")
    if unit.get("mask") or unit.get("mask_image"):
        raise ApiError(422, "a unit's mask (effective region) is not supported", f"{field}.mask")
    frames = unit.get("batch_images")
    if isinstance(frames, str) and frames.strip():
        raise ApiError(422, "this server reads no folders of its own: send the frames as a list of base64 images",
                       f"{field}.batch_images")
    if frames:   # one control image per frame of an AnimateDiff clip
        if not isinstance(frames, list) or len(frames) > MAX_FRAMES:
            raise ApiError(422, f"expected a list of 1 to {MAX_FRAMES} base64 images (one per frame)",
                           f"{field}.batch_images")
        if clip is None:
            raise ApiError(422, "one control image per frame is for AnimateDiff clips", f"{field}.batch_images")
        if len(frames) not in (1, clip):
            raise ApiError(422, f"{len(frames)} frames for a clip of {clip} (video_length): send one image, or one "
                                "per frame", f"{field}.batch_images")
        image = [decode_image(data, f"{field}.batch_images[{j}]", limits).convert("RGB")
                 for j, data in enumerate(frames)]
    elif image:
        image = decode_image(image, f"{field}.image", limits).convert("RGB")
    elif init is not None:
        image = init   # as the extension does in img2img: the init image is the control image
    else:
        raise ApiError(422, "a unit needs an image in txt2img", f"{field}.image")
    if module in IP_MODULES:
        if isinstance(image, list):
            raise ApiError(422, "an IP-Adapter unit takes one image", f"{field}.batch_images")
        return _ip_adapter(unit, field, entry.path, image, catalog, module)
    hr = str(unit.get("hr_option", "Both")).lower()
    if hr not in ("both", "1", "0"):
        raise ApiError(422, "only 'Both' is supported (the ControlNet steers both passes)", f"{field}.hr_option")
    mode = CONTROL_MODES.get(_key(unit.get("control_mode", 0)))
    resize = RESIZE_MODES.get(_key(unit.get("resize_mode", "Crop and Resize")))
    for name, value in (("control_mode", mode), ("resize_mode", resize)):
        if value is None:
            raise ApiError(422, f"unknown {name} {unit.get(name)!r}", f"{field}.{name}")
    thresholds = [_threshold(unit.get(name), f"{field}.{name}") for name in ("threshold_a", "threshold_b")]
    spec = ControlSpec(entry.path, image, preprocessor, _number(unit.get("weight", 1.0), f"{field}.weight"),
                       _number(unit.get("guidance_start", 0.0), f"{field}.guidance_start"),
                       _number(unit.get("guidance_end", 1.0), f"{field}.guidance_end"), mode, resize,
                       *thresholds if preprocessor in ("canny", "threshold") else (None, None), annotator=annotator)
    try:
        spec.validate("unit")
    except ParamError as e:
        names = {"strength": "weight", "start": "guidance_start", "end": "guidance_end", "annotator": "module"}
        sub = e.field.removeprefix("unit.")
        raise ApiError(422, e.message, f"{field}.{names.get(sub, sub)}") from None
    return spec


def _ip_adapter(unit: dict, field: str, model, image: Image.Image, catalog: Catalog, module: str) -> IPAdapterSpec:
    encoder = IP_MODULES[module]
    if catalog.folder("clip_vision") is None:
        raise ApiError(422, f"{module} needs the CLIP image encoder {encoder}: the server has no models folder",
                       f"{field}.module")
    try:
        found = catalog.folder("clip_vision").find(encoder)
    except SfumatoError:
        raise ApiError(422, f"{module} needs the CLIP image encoder {encoder!r} in the models folder's clip_vision/",
                       f"{field}.module") from None
    spec = IPAdapterSpec(model, image, _number(unit.get("weight", 1.0), f"{field}.weight"),
                         _number(unit.get("guidance_start", 0.0), f"{field}.guidance_start"),
                         _number(unit.get("guidance_end", 1.0), f"{field}.guidance_end"), found.path)
    try:
        spec.validate("unit")
    except ParamError as e:
        names = {"scale": "weight", "start": "guidance_start", "end": "guidance_end", "image_encoder": "module"}
        sub = e.field.removeprefix("unit.")
        raise ApiError(422, e.public.split(": ", 1)[-1], f"{field}.{names.get(sub, sub)}") from None
    return spec


def _key(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


def _number(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(422, f"expected a number, got {value!r}", field)
    return float(value)


def _threshold(value: Any, field: str) -> float | None:
    """A threshold of the unit; -1 (and absent) means the preprocessor's default, as in the extension."""
    if value is None or value == -1:
        return None
    return _number(value, field)


def detect(body: dict[str, Any], limits: Limits, catalog: Catalog, device: str = "cpu") -> dict[str, Any]:
    """``POST /controlnet/detect``: the named preprocessor on each image (its short side brought to
    ``controlnet_processor_res`` first when that is positive). For the ``openpose*`` modules the response
    also carries ``poses``, each image's people (with hands and face where detected) in the OpenPose
    JSON format (as the extension returns them to its pose editor)."""
    from ..adapters.controlnet import PREPROCESSORS
    from ..pipeline.annotate import ANNOTATORS, annotator_network, detect_poses
    from ..pipeline.control import preprocessor_args
    from ..pipeline.pose import pose_json, render_pose

    module = str(body.get("controlnet_module", "none")).lower()
    if module in IP_MODULES:
        raise ApiError(422, f"{module} makes an image embedding, not a control image", "controlnet_module")
    preprocessor, annotator = resolve_module(module, catalog, "controlnet_module")
    images = body.get("controlnet_input_images", body.get("controlnet_images"))
    if not isinstance(images, list) or not images or len(images) > 16:
        raise ApiError(422, "expected a list of 1 to 16 base64 images", "controlnet_input_images")
    res = body.get("controlnet_processor_res", 512)
    if isinstance(res, bool) or not isinstance(res, int) or not -1 <= res <= 4096:
        raise ApiError(422, f"must be an integer in [-1, 4096], got {res!r}", "controlnet_processor_res")
    thresholds = [_threshold(body.get(f"controlnet_threshold_{k}"), f"controlnet_threshold_{k}") for k in "ab"]
    spec = ControlSpec("unused", Image.new("RGB", (1, 1)), preprocessor, threshold_a=thresholds[0],
                       threshold_b=thresholds[1])
    net = None
    if annotator is not None:
        try:
            net = annotator_network(annotator, ANNOTATORS[preprocessor][0], "controlnet_module", device)
        except ParamError as e:
            raise ApiError(422, e.message, "controlnet_module") from None
    out, poses = [], []
    for i, data in enumerate(images):
        image = decode_image(data, f"controlnet_input_images[{i}]", limits).convert("RGB")
        if res > 0 and min(image.size) != res:
            scale = res / min(image.size)
            image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                 Image.LANCZOS)
        try:
            if preprocessor.startswith("openpose"):
                pose = detect_poses(net, image, hands="hand" in preprocessor or preprocessor.endswith("full"),
                                    face="face" in preprocessor or preprocessor.endswith("full"))
                poses.append(pose_json(pose))
                result = Image.fromarray(render_pose(pose, body=preprocessor != "openpose_faceonly"))
            elif net is not None:
                result = Image.fromarray(ANNOTATORS[preprocessor][1](net, image))
            else:
                result = image if preprocessor == "none" else \
                    Image.fromarray(PREPROCESSORS[preprocessor](image, **preprocessor_args(spec)))
        except ValueError as e:
            raise ApiError(422, str(e), "controlnet_threshold_a") from None
        buffer = io.BytesIO()
        result.save(buffer, format="PNG")
        out.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    response: dict[str, Any] = {"images": out, "info": "Success"}
    if preprocessor.startswith("openpose"):
        response["poses"] = poses
    return response


# -- sfumato's own request fields: Stable unCLIP image prompts ---------------------------------------

class UnclipImage(BaseModel):
    """One Stable unCLIP image prompt: a base64 image and the weight its embedding is summed with."""

    model_config = ConfigDict(allow_inf_nan=False)

    image: str
    weight: float = 1.0


def unclip_settings(images: list[UnclipImage], noise_level: int, limits: Limits) -> dict[str, Any]:
    """``unclip_images`` decoded (bounded like every image field) and the embedding's noise level."""
    from ..pipeline.params import MAX_UNCLIP_IMAGES

    if len(images) > MAX_UNCLIP_IMAGES:
        raise ApiError(422, f"at most {MAX_UNCLIP_IMAGES} images", "unclip_images")
    decoded = [(decode_image(u.image, f"unclip_images[{i}].image", limits).convert("RGB"), u.weight)
               for i, u in enumerate(images)]
    return {"unclip_images": decoded, "unclip_noise_level": noise_level}
