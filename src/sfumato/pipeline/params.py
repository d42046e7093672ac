"""The one request object every front-end builds, and its validation.

Validation happens before any model work, and every error names the offending field.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import ParamError as ParamError  # re-exported: raised by validation
from ..errors import SfumatoError

MAX_SEED = 2**32 - 1
MAX_PROMPT_LENGTH = 65536   # characters; the server allows fewer (server.security.Limits)
MAX_AND_PARTS = 64          # composable-diffusion parts of one prompt: each is a UNet evaluation per step
MAX_EMPHASIS = 1e4          # an emphasis or AND weight beyond this only overflows the conditioning
MAX_HIRES_TOTAL_STEPS = 10000
MAX_UNCLIP_IMAGES = 16      # image prompts mixed into one unCLIP embedding
LCM_MAX_STEPS = 50          # diffusion.schedule.lcm_sigmas' distillation schedule
TURBO_MAX_STEPS = 10        # diffusion.schedule.turbo_sigmas' timesteps
MASKED_CONTENT = ("fill", "original", "latent noise", "latent nothing")
UPSCALERS = ("latent", "lanczos")
RNGS = ("cpu", "nv")
CONTROL_PREPROCESSORS = ("none", "canny", "threshold", "scribble", "depth")  # adapters.controlnet.PREPROCESSORS
# the preprocessors that run an annotator network (pipeline.annotate.ANNOTATORS): their spec names its weights
CONTROL_ANNOTATORS = ("openpose", "openpose_hand", "openpose_face", "openpose_faceonly", "openpose_full",
                      "softedge_hed", "softedge_hedsafe", "scribble_hed", "lineart_realistic", "lineart_coarse",
                      "depth_midas")
# sd-webui-controlnet's control modes: Balanced; "My prompt is more important" (residuals scaled
# 0.825^(12−i), deepest kept); "ControlNet is more important" (that, and none on the uncond rows)
CONTROL_MODES = ("balanced", "prompt", "control")
# its resize modes: Just Resize (stretch), Crop and Resize (centre crop to the aspect), Resize and Fill
CONTROL_RESIZE = ("stretch", "crop", "fill")


@dataclass
class ControlSpec:
    """One ControlNet of a request: a ControlNet file or diffusers folder (or an already loaded
    ``models.controlnet.ControlNet``), the control image (PIL, or uint8 (H, W[, C]) array; for an
    animation also a list of them, one per frame), its
    preprocessor, the strength of its residuals and its active span of the sampling run (step
    fractions ``start`` ≤ i/steps ≤ ``end``). The image is fitted to the generation size by ``resize``
    (``CONTROL_RESIZE``); ``mode`` is the control mode (``CONTROL_MODES``); ``threshold_a`` /
    ``threshold_b`` are the preprocessor's (canny: low, high; threshold, scribble: the level). An
    annotator preprocessor (``CONTROL_ANNOTATORS``: OpenPose, HED, line art, MiDaS) runs the network
    in ``annotator``: its weights file (``body_pose_model.pth``, ``ControlNetHED.pth``, ``sk_model.pth``,
    ``dpt_hybrid-midas-501f0c75.pt``, …) or a loaded network; OpenPose with hands or a face takes a
    list of its files (body, ``hand_pose_model.pth``, ``facenet.pth``) or their folder."""

    model: str | Path | Any
    image: Image.Image | np.ndarray = field(repr=False)
    preprocessor: str = "none"
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0
    mode: str = "balanced"
    resize: str = "stretch"
    threshold_a: float | None = None
    threshold_b: float | None = None
    annotator: str | Path | Any | None = None

    @property
    def model_name(self) -> str:
        return Path(self.model).stem if isinstance(self.model, (str, Path)) else "unnamed"

    def validate(self, prefix: str) -> None:
        """Checks every field; errors name ``{prefix}.{field}``."""
        from ..models.controlnet import ControlNet

        if isinstance(self.model, (str, Path)):
            if not Path(self.model).exists():
                raise ParamError(f"{prefix}.model", f"ControlNet file not found: {self.model}")
        elif not isinstance(self.model, ControlNet):
            raise ParamError(f"{prefix}.model", f"must be a file path or a ControlNet, got {type(self.model).__name__}")
        if isinstance(self.image, (list, tuple)):   # one per frame of an animation
            if not self.image:
                raise ParamError(f"{prefix}.image", "an empty list of frames")
            for j, image in enumerate(self.image):
                _check_control_image(f"{prefix}.image[{j}]", image)
        else:
            _check_control_image(f"{prefix}.image", self.image)
        if self.preprocessor not in CONTROL_PREPROCESSORS + CONTROL_ANNOTATORS:
            raise ParamError(f"{prefix}.preprocessor", f"must be one of "
                                                       f"{', '.join(CONTROL_PREPROCESSORS + CONTROL_ANNOTATORS)}, "
                                                       f"got {self.preprocessor!r}")
        if self.preprocessor in CONTROL_ANNOTATORS:
            if self.annotator is None:
                raise ParamError(f"{prefix}.annotator", f"the {self.preprocessor} preprocessor runs a network: "
                                                        "give its weights file")
            paths = self.annotator if isinstance(self.annotator, (list, tuple)) else [self.annotator]
            for j, path in enumerate(paths):
                where = f"{prefix}.annotator" + (f"[{j}]" if paths is self.annotator else "")
                if isinstance(path, (str, Path)) and not (Path(path).is_file() or
                                                          self.preprocessor.startswith("openpose") and Path(path).is_dir()):
                    raise ParamError(where, f"annotator file not found: {path}")
        elif self.annotator is not None:
            raise ParamError(f"{prefix}.annotator", f"the {self.preprocessor} preprocessor takes no annotator "
                                                    f"(those that do: {', '.join(CONTROL_ANNOTATORS)})")
        for name, valid in (("mode", CONTROL_MODES), ("resize", CONTROL_RESIZE)):
            if getattr(self, name) not in valid:
                raise ParamError(f"{prefix}.{name}", f"must be one of {', '.join(valid)}, got {getattr(self, name)!r}")
        for name in ("threshold_a", "threshold_b"):
            if getattr(self, name) is not None:
                _float_range(f"{prefix}.{name}", getattr(self, name), 0, 255)
        if self.preprocessor == "canny" and None not in (self.threshold_a, self.threshold_b) and \
                self.threshold_a > self.threshold_b:
            raise ParamError(f"{prefix}.threshold_a", f"canny's low threshold must not exceed the high one "
                                                      f"({self.threshold_a} > {self.threshold_b})")
        _float_range(f"{prefix}.strength", self.strength, 0, 2)
        _float_range(f"{prefix}.start", self.start, 0, 1)
        _float_range(f"{prefix}.end", self.end, 0, 1)
        if self.start > self.end:
            raise ParamError(f"{prefix}.start", f"must not exceed end ({self.start} > {self.end})")


def _check_control_image(name: str, image) -> None:
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
            raise ParamError(name, f"an array must be uint8 (H, W), (H, W, 1|3|4), got {image.dtype} {image.shape}")
    elif not isinstance(image, Image.Image):
        raise ParamError(name, f"must be a PIL image or a uint8 array, got {type(image).__name__}")


@dataclass
class IPAdapterSpec:
    """One IP-Adapter of a request: the adapter file (``.safetensors`` or ``.bin``), the image prompt (PIL),
    the weight of its attention (``scale``), its active span of the sampling run (step fractions
    ``start`` ≤ i/steps ≤ ``end``; start = end: never) and the CLIP image encoder — a transformers
    CLIPVisionModelWithProjection folder or a weights file; None: the ``image_encoder`` folder beside the
    adapter file, as IP-Adapter's releases lay it out."""

    model: str | Path
    image: Image.Image = field(repr=False)
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    image_encoder: str | Path | None = None

    @property
    def model_name(self) -> str:
        return Path(self.model).stem

    @property
    def encoder_path(self) -> Path:
        """The encoder named, or the ``image_encoder`` folder beside the adapter."""
        return Path(self.image_encoder) if self.image_encoder is not None else \
            Path(self.model).parent / "image_encoder"

    def validate(self, prefix: str) -> None:
        """Checks every field; errors name ``{prefix}.{field}``."""
        if not isinstance(self.model, (str, Path)):
            raise ParamError(f"{prefix}.model", f"must be a file path, got {type(self.model).__name__}")
        if not Path(self.model).is_file():
            raise ParamError(f"{prefix}.model", f"IP-Adapter file not found: {self.model}")
        if not isinstance(self.image, Image.Image):
            raise ParamError(f"{prefix}.image", f"must be a PIL image, got {type(self.image).__name__}")
        _float_range(f"{prefix}.scale", self.scale, 0, 2)
        _float_range(f"{prefix}.start", self.start, 0, 1)
        _float_range(f"{prefix}.end", self.end, 0, 1)
        if self.start > self.end:
            raise ParamError(f"{prefix}.start", f"must not exceed end ({self.start} > {self.end})")
        if self.image_encoder is not None and not isinstance(self.image_encoder, (str, Path)):
            raise ParamError(f"{prefix}.image_encoder", f"must be a path, got {type(self.image_encoder).__name__}")
        if not self.encoder_path.exists():
            where = "" if self.image_encoder is not None else " (none given, and no image_encoder folder beside the adapter)"
            raise ParamError(f"{prefix}.image_encoder", f"CLIP image encoder not found: {self.encoder_path}{where}")


# the detail pass (pipeline.detail): ways to merge a pass's regions, and the most regions a pass inpaints
DETAIL_MERGE = ("none", "merge", "merge and invert")
MAX_REGIONS = 32


@dataclass
class DetailSpec:
    """One detail pass (ADetailer's tab). ``detector``: a YOLO ONNX file, ``"box"`` (``boxes``) or
    ``"mask"`` (``mask``). ``prompt`` / ``negative_prompt``: empty means the request's. ``steps``,
    ``cfg_scale``, ``sampler``: None means the request's."""

    detector: str | Path
    prompt: str = ""
    negative_prompt: str = ""
    strength: float = 0.4
    confidence: float = 0.3
    k_largest: int = 0
    min_ratio: float = 0.0
    max_ratio: float = 1.0
    dilate: int = 4
    merge: str = "none"
    mask_blur: int = 4
    padding: int = 32
    steps: int | None = None
    cfg_scale: float | None = None
    sampler: str | None = None
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)
    mask: Image.Image | None = field(default=None, repr=False)
    sam: str | Path | None = None
    name: str | None = None   # what the infotext calls the detector (default: the file name)

    @property
    def label(self) -> str:
        return self.name or (Path(self.detector).name if self.detector not in ("box", "mask") else str(self.detector))

    def validate(self, prefix: str) -> None:
        d = self.detector
        if d == "box":
            if not self.boxes:
                raise ParamError(f"{prefix}.boxes", "the box detector needs at least one box (x0, y0, x1, y1)")
            for i, b in enumerate(self.boxes):
                if len(b) != 4 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in b) \
                        or not (b[0] < b[2] and b[1] < b[3]):
                    raise ParamError(f"{prefix}.boxes[{i}]", f"must be (x0, y0, x1, y1) with x0 < x1, y0 < y1, got {b!r}")
        elif d == "mask":
            if not isinstance(self.mask, Image.Image):
                raise ParamError(f"{prefix}.mask", "the mask detector needs a mask image (white = the region)")
            if not (np.asarray(self.mask.convert("L")) > 127).any():
                raise ParamError(f"{prefix}.mask", "is empty (no white pixel): no region to detail")
        elif not (isinstance(d, (str, Path)) and str(d).lower().endswith(".onnx")):
            raise ParamError(f"{prefix}.detector", f"must be a YOLO ONNX file, 'box' or 'mask', got {d!r}")
        elif not Path(d).is_file():
            raise ParamError(f"{prefix}.detector", f"detector file not found: {d}")
        if self.sam is not None and not Path(self.sam).is_file():
            raise ParamError(f"{prefix}.sam", f"Segment Anything file not found: {self.sam}")
        for name in ("prompt", "negative_prompt"):
            if not isinstance(getattr(self, name), str):
                raise ParamError(f"{prefix}.{name}", "must be text")
        _float_range(f"{prefix}.strength", self.strength, 0, 1)
        _float_range(f"{prefix}.confidence", self.confidence, 0, 1)
        _float_range(f"{prefix}.min_ratio", self.min_ratio, 0, 1)
        _float_range(f"{prefix}.max_ratio", self.max_ratio, 0, 1)
        if self.min_ratio > self.max_ratio:
            raise ParamError(f"{prefix}.min_ratio", f"must not exceed max_ratio ({self.min_ratio} > {self.max_ratio})")
        _int_range(f"{prefix}.k_largest", self.k_largest, 0, MAX_REGIONS)
        _int_range(f"{prefix}.dilate", self.dilate, -128, 128)
        _int_range(f"{prefix}.mask_blur", self.mask_blur, 0, 64)
        _int_range(f"{prefix}.padding", self.padding, 0, 256)
        if self.merge not in DETAIL_MERGE:
            raise ParamError(f"{prefix}.merge", f"must be one of {', '.join(DETAIL_MERGE)}, got {self.merge!r}")
        if self.steps is not None:
            _int_range(f"{prefix}.steps", self.steps, 1, 1000)
        if self.cfg_scale is not None:
            _float_range(f"{prefix}.cfg_scale", self.cfg_scale, 0, 100)


@dataclass
class GenerationParams:
    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    cfg_scale: float = 7.0
    sampler: str = "euler"
    scheduler: str | None = None          # None: A1111's "Automatic", the sampler's default ("normal" for most)
    seed: int = -1
    width: int = 512
    height: int = 512
    batch_size: int = 1
    clip_skip: int = 1
    subseed: int = -1
    subseed_strength: float = 0.0
    rng: str = "cpu"
    guidance_rescale: float = 0.0
    # img2img / inpainting (init_image set); outpainting is inpainting on a padded canvas
    init_image: Image.Image | None = field(default=None, repr=False)
    strength: float = 0.75
    mask: Image.Image | None = field(default=None, repr=False)
    mask_blur: int = 4
    only_masked: bool = False
    only_masked_padding: int = 32
    masked_content: str = "original"
    # hires fix (txt2img): enabled when hires_scale > 1
    hires_scale: float = 1.0
    hires_steps: int = 0                  # 0: same as steps
    hires_denoise: float = 0.7
    hires_upscaler: str = "latent"
    hires_sampler: str | None = None      # None: the first pass's (A1111's "Use same sampler")
    hires_scheduler: str | None = None    # None: the first pass's
    hires_prompt: str | None = None       # None: the prompt
    hires_negative_prompt: str | None = None
    hires_checkpoint: str | None = None   # the hires pass on another model (given to the pipeline, named here)
    # SDXL refiner hand-off (the refiner model is given to the pipeline, its name recorded here)
    refiner: str | None = None
    refiner_switch: float = 0.8
    # depth2img (SD 2's depth model): the depth map, greyscale, white = near (as MiDaS writes it)
    depth_map: Image.Image | None = field(default=None, repr=False)
    # … or a MiDaS DPT model (weights file or loaded network) that infers it from the init image
    depth_model: str | Path | Any | None = field(default=None, repr=False)
    # x4 upscaler (init_image is the low-res image; width/height the 4x output): noise added to it
    noise_level: int | None = None
    # Stable unCLIP: image prompts (PIL image, weight), their CLIP image embeddings summed by weight, and
    # the level (0 … the model's maximum − 1) the embedding is noised to; none: the init image (A1111)
    unclip_images: list[tuple[Image.Image, float]] = field(default_factory=list, repr=False)
    unclip_noise_level: int = 0
    # ControlNets steering the base model (not the refiner), their residuals summed
    control: list[ControlSpec] = field(default_factory=list)
    # IP-Adapters steering the base model (image prompts), their attention added in order
    ip_adapters: list[IPAdapterSpec] = field(default_factory=list)
    # detail passes (ADetailer): regions of each finished image inpainted again (DetailSpec; run by pipeline.detail)
    detail: list[DetailSpec] = field(default_factory=list)
    # training-free accelerations (opt-in): ToMe token merging, DeepCache (1 = every step in full)
    tome_ratio: float = 0.0
    deepcache_interval: int = 1
    # A1111's "Resize seed from width/height" (the seed's noise drawn at that size, centred; 0: off)
    seed_resize_from_w: int = 0
    seed_resize_from_h: int = 0
    # A1111's "Eta noise seed delta" (ENSD): ancestral noise after the first draw from seed + delta
    # (the SDE samplers draw from a Brownian tree seeded by the seed alone, as in A1111)
    eta_noise_seed_delta: int = 0

    @property
    def is_img2img(self) -> bool:
        return self.init_image is not None

    def validated(self) -> "GenerationParams":
        """Checks every field; resolves seeds −1 to concrete random seeds and the sampler's
        display names to internal names. Returns self."""
        from ..diffusion.samplers import implied_scheduler, resolve_sampler
        from ..diffusion.schedule import SCHEDULERS

        _int_range("steps", self.steps, 1, 1000)
        for name in ("prompt", "negative_prompt"):
            check_prompt(name, getattr(self, name), self.steps)
        _int_range("batch_size", self.batch_size, 1, 64)
        _int_range("clip_skip", self.clip_skip, 1, 12)
        for name in ("width", "height"):
            value = getattr(self, name)
            _int_range(name, value, 8, 8192)
            if value % 8:
                raise ParamError(name, f"must be a multiple of 8, got {value}")
        _float_range("cfg_scale", self.cfg_scale, 0, 100)
        _float_range("guidance_rescale", self.guidance_rescale, 0, 1)
        self._check_types()
        try:
            sampler, _ = resolve_sampler(self.sampler)
        except ValueError as e:
            raise ParamError("sampler", str(e)) from None
        # None stays None: A1111's "Automatic", the sampler's own default at sampling time; an old
        # combined label ("DPM++ 2M Karras") chose one
        self.scheduler = self.scheduler or implied_scheduler(self.sampler)
        self.sampler = sampler
        if self.scheduler is not None and self.scheduler not in SCHEDULERS:
            raise ParamError("scheduler", f"unknown scheduler {self.scheduler!r}; valid: {', '.join(SCHEDULERS)}")
        if self.rng not in RNGS:
            raise ParamError("rng", f"must be one of {', '.join(RNGS)}, got {self.rng!r}")
        _int_range("seed", self.seed, -1, MAX_SEED)
        _int_range("subseed", self.subseed, -1, MAX_SEED)
        _float_range("subseed_strength", self.subseed_strength, 0, 1)
        _float_range("strength", self.strength, 0, 1)
        _int_range("mask_blur", self.mask_blur, 0, 256)
        _int_range("only_masked_padding", self.only_masked_padding, 0, 4096)
        if self.masked_content not in MASKED_CONTENT:
            raise ParamError("masked_content", f"must be one of {', '.join(MASKED_CONTENT)}, got {self.masked_content!r}")
        if self.mask is not None and self.init_image is None:
            raise ParamError("mask", "a mask needs an init image")
        if self.mask is not None and self.mask.size != self.init_image.size:
            raise ParamError("mask", f"size {self.mask.size[0]}x{self.mask.size[1]} differs from the init image's "
                             f"{self.init_image.size[0]}x{self.init_image.size[1]}")
        _float_range("hires_scale", self.hires_scale, 1, 8)
        _int_range("hires_steps", self.hires_steps, 0, 1000)
        _float_range("hires_denoise", self.hires_denoise, 0, 1)
        if self.hires_upscaler not in UPSCALERS:
            raise ParamError("hires_upscaler", f"must be one of {', '.join(UPSCALERS)}, got {self.hires_upscaler!r}")
        self._check_hires_sampler()
        if self.hires_scale > 1:
            if self.init_image is not None:
                raise ParamError("hires_scale", "hires fix applies to txt2img only")
            for name, value in (("width", self.hires_width), ("height", self.hires_height)):
                if value % 8:
                    raise ParamError("hires_scale", f"hires {name} {value} is not a multiple of 8")
        if self.sampler == "lcm" and self.scheduler in (None, "normal"):
            for name, steps in (("steps", self.steps), ("hires_steps", self.hires_total_steps)):
                if steps > LCM_MAX_STEPS:
                    raise ParamError(name, f"LCM with its own schedule takes 1 to {LCM_MAX_STEPS} steps, got {steps}"
                                     + (" (the hires pass runs steps / hires_denoise)" if name == "hires_steps" else ""))
        hires_scheduler = self.hires_scheduler or self.scheduler
        for name, steps, scheduler in (("steps", self.steps, self.scheduler),
                                       ("hires_steps", self.hires_total_steps, hires_scheduler)):
            if scheduler == "turbo" and steps > TURBO_MAX_STEPS and (name == "steps" or self.hires_scale > 1):
                raise ParamError(name, f"the turbo schedule takes 1 to {TURBO_MAX_STEPS} steps, got {steps}"
                                 + (" (the hires pass runs steps / hires_denoise)" if name == "hires_steps" else ""))
        if self.hires_total_steps > MAX_HIRES_TOTAL_STEPS:
            raise ParamError("hires_denoise", f"the hires pass would schedule {self.hires_total_steps} steps "
                                              f"(steps / denoise); at most {MAX_HIRES_TOTAL_STEPS}")
        _float_range("refiner_switch", self.refiner_switch, 0, 1)
        if self.depth_map is not None and not isinstance(self.depth_map, Image.Image):
            raise ParamError("depth_map", f"must be a PIL image, got {type(self.depth_map).__name__}")
        if self.depth_model is not None:
            if self.depth_map is not None:
                raise ParamError("depth_model", "give a depth map or a depth model to infer one, not both")
            if isinstance(self.depth_model, (str, Path)) and not Path(self.depth_model).is_file():
                raise ParamError("depth_model", f"MiDaS model file not found: {self.depth_model}")
        if self.noise_level is not None:
            _int_range("noise_level", self.noise_level, 0, 999)
            if self.init_image is None:
                raise ParamError("noise_level", "upscaling needs the low-res image (init_image)")
        self._check_unclip()
        for name in ("seed_resize_from_w", "seed_resize_from_h"):
            _int_range(name, getattr(self, name), -1, 8192)
        _int_range("eta_noise_seed_delta", self.eta_noise_seed_delta, 0, MAX_SEED)
        _float_range("tome_ratio", self.tome_ratio, 0, 0.75)
        _int_range("deepcache_interval", self.deepcache_interval, 1, 100)
        if not isinstance(self.control, (list, tuple)):
            raise ParamError("control", f"must be a list of ControlSpec, got {type(self.control).__name__}")
        for i, spec in enumerate(self.control):
            if not isinstance(spec, ControlSpec):
                raise ParamError(f"control[{i}]", f"must be a ControlSpec, got {type(spec).__name__}")
            spec.validate(f"control[{i}]")
        if not isinstance(self.detail, (list, tuple)):
            raise ParamError("detail", f"must be a list of DetailSpec, got {type(self.detail).__name__}")
        for i, spec in enumerate(self.detail):
            if not isinstance(spec, DetailSpec):
                raise ParamError(f"detail[{i}]", f"must be a DetailSpec, got {type(spec).__name__}")
            spec.validate(f"detail[{i}]")
        if not isinstance(self.ip_adapters, (list, tuple)):
            raise ParamError("ip_adapters", f"must be a list of IPAdapterSpec, got {type(self.ip_adapters).__name__}")
        for i, spec in enumerate(self.ip_adapters):
            if not isinstance(spec, IPAdapterSpec):
                raise ParamError(f"ip_adapters[{i}]", f"must be an IPAdapterSpec, got {type(spec).__name__}")
            spec.validate(f"ip_adapters[{i}]")
        if self.seed == -1:
            self.seed = random.randint(0, MAX_SEED - 64)
        if self.subseed == -1:
            self.subseed = random.randint(0, MAX_SEED - 64) if self.subseed_strength > 0 else -1
        return self

    def _check_unclip(self) -> None:
        if not isinstance(self.unclip_images, (list, tuple)):
            raise ParamError("unclip_images", f"must be a list of (image, weight), got {type(self.unclip_images).__name__}")
        if len(self.unclip_images) > MAX_UNCLIP_IMAGES:
            raise ParamError("unclip_images", f"at most {MAX_UNCLIP_IMAGES} images, got {len(self.unclip_images)}")
        for i, item in enumerate(self.unclip_images):
            if not (isinstance(item, (list, tuple)) and len(item) == 2):
                raise ParamError(f"unclip_images[{i}]", f"must be an (image, weight) pair, got {type(item).__name__}")
            image, weight = item
            if not isinstance(image, Image.Image):
                raise ParamError(f"unclip_images[{i}]", f"must be a PIL image, got {type(image).__name__}")
            _float_range(f"unclip_images[{i}].weight", weight, -10, 10)
        _int_range("unclip_noise_level", self.unclip_noise_level, 0, 9999)

    def _check_hires_sampler(self) -> None:
        from ..diffusion.samplers import implied_scheduler, resolve_sampler
        from ..diffusion.schedule import SCHEDULERS

        if self.hires_sampler is not None:
            try:
                sampler, _ = resolve_sampler(self.hires_sampler)
            except ValueError as e:
                raise ParamError("hires_sampler", str(e)) from None
            self.hires_scheduler = self.hires_scheduler or implied_scheduler(self.hires_sampler)
            self.hires_sampler = sampler
        if self.hires_scheduler is not None and self.hires_scheduler not in SCHEDULERS:
            raise ParamError("hires_scheduler", f"unknown scheduler {self.hires_scheduler!r}; valid: {', '.join(SCHEDULERS)}")
        for name in ("hires_prompt", "hires_negative_prompt"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ParamError(name, f"must be text, got {value!r}")

    def _check_types(self) -> None:
        """Fields whose type alone can be wrong (a string for an image, a number for a name)."""
        for name in ("init_image", "mask", "depth_map"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Image.Image):
                raise ParamError(name, f"must be a PIL image, got {type(value).__name__}")
        for name, optional in (("sampler", False), ("scheduler", True), ("rng", False), ("masked_content", False),
                               ("hires_upscaler", False), ("refiner", True), ("hires_checkpoint", True)):
            value = getattr(self, name)
            if not (isinstance(value, str) or optional and value is None):
                raise ParamError(name, f"must be a name (a string), got {value!r}")
        if not isinstance(self.only_masked, bool):
            raise ParamError("only_masked", f"must be true or false, got {self.only_masked!r}")

    @property
    def hires_total_steps(self) -> int:
        """The length of the schedule the hires pass takes its steps from (A1111: steps / denoise);
        0 without a hires pass."""
        if self.hires_scale <= 1 or self.hires_denoise <= 0:
            return 0
        return int((self.hires_steps or self.steps) / min(self.hires_denoise, 0.999))

    @property
    def seed_resize_from(self) -> tuple[int, int] | None:
        """(height, width) the seeds' noise is drawn at, or None (off unless both are positive)."""
        h, w = self.seed_resize_from_h, self.seed_resize_from_w
        return (h, w) if h > 0 and w > 0 else None

    @property
    def hires_width(self) -> int:
        return int(self.width * self.hires_scale)

    @property
    def hires_height(self) -> int:
        return int(self.height * self.hires_scale)


def check_prompt(name: str, text: object, steps: int = 1) -> None:
    """A prompt the pipeline can take, checked before any work: a string of valid Unicode (no lone
    surrogates, which no image file can store), within ``MAX_PROMPT_LENGTH`` characters and
    ``MAX_AND_PARTS`` AND-parts, its ``<lora:…>`` / ``<hypernet:…>`` tags well-formed, its emphasis
    weights finite (5000 nested brackets give 1.1^5000)."""
    from ..adapters.hypernetwork import parse_hypernet_prompt
    from ..adapters.lora import parse_lora_prompt
    from ..text.prompt import parse_attention, prompt_schedule, split_and

    if not isinstance(text, str):
        raise ParamError(name, f"must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ParamError(name, f"is not valid text: character {e.start} is an unpaired surrogate "
                               f"({text[e.start]!r}); was it decoded with the wrong encoding?") from None
    if len(text) > MAX_PROMPT_LENGTH:
        raise ParamError(name, f"is {len(text)} characters long; at most {MAX_PROMPT_LENGTH}")
    try:
        text, _ = parse_lora_prompt(text)
        text, _ = parse_hypernet_prompt(text)
    except SfumatoError as e:
        raise ParamError(name, str(e)) from None
    for _, variant in prompt_schedule(text, steps):
        parts = split_and(variant)
        if len(parts) > MAX_AND_PARTS:
            raise ParamError(name, f"has {len(parts)} AND-parts; at most {MAX_AND_PARTS}")
        for part, weight in parts:
            weights = [w for _, w in parse_attention(part)] + [weight]
            bad = next((w for w in weights if not math.isfinite(w) or abs(w) > MAX_EMPHASIS), None)
            if bad is not None:
                raise ParamError(name, f"an emphasis or AND weight is {bad:g}; weights must be finite and at most "
                                       f"{MAX_EMPHASIS:g} in size (too many nested brackets?)")


def prompt_workload(text: str, steps: int) -> int:
    """Characters the text encoders read for ``text`` over ``steps`` steps: every distinct prompt of
    its schedule (prompt editing, alternation), every AND-part. Bounds what one request costs."""
    from ..text.prompt import prompt_schedule, split_and

    return sum(len(part) for _, variant in prompt_schedule(text, steps) for part, _ in split_and(variant))


def _int_range(name: str, value: object, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParamError(name, f"must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ParamError(name, f"must be in [{lo}, {hi}], got {value}")


def _float_range(name: str, value: object, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ParamError(name, f"must be a number, got {value!r}")
    if not lo <= value <= hi:
        raise ParamError(name, f"must be in [{lo}, {hi}], got {value}")
