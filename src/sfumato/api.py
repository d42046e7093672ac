"""The Python API: ``sfumato.load(...)`` → :class:`Pipeline`, whose methods build one request
object (:class:`GenerationParams`) and run the one generation loop."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from contextlib import ExitStack
import re
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

import torch
from PIL import Image

from .checkpoint.io import sha256_file
from .adapters.embeddings import EmbeddingSet, load_embeddings
from .adapters.hypernetwork import Hypernetwork, hypernetwork_folder, load_hypernetwork, parse_hypernet_prompt
from .adapters.lora import apply_loras, bake_loras, lora_folder, parse_lora_prompt
from .checkpoint.folders import ModelFolder
from .checkpoint.load import LoadedModel, load_model
from .errors import NameNotFoundError, SfumatoError
from .pipeline.control import control_infotext
from .pipeline.params import DetailSpec as DetailSpec  # re-exported: txt2img(..., detail=[DetailSpec(...)])
from .pipeline.detail import detail_infotext, region_masks, region_params
from .pipeline.image_prompt import ip_adapter_infotext
from .pipeline import fewstep
from .pipeline import patches as patch
from .pipeline.engine import Engine
from .pipeline.generate import Generator, ProgressCallback
from .pipeline.patches import Patch
from .pipeline.infotext import generation_infotext
from .pipeline.masks import check_outpaint, outpaint_canvas
from .pipeline.params import ControlSpec as ControlSpec  # re-exported: txt2img(..., control=[ControlSpec(...)])
from .pipeline.params import GenerationParams, ParamError
from .pipeline.params import IPAdapterSpec as IPAdapterSpec  # re-exported: txt2img(..., ip_adapters=[IPAdapterSpec(...)])
from .pipeline.safety import check_images, safety_infotext
from .pipeline.unclip import unclip_infotext
from .pipeline.watermark import add_watermark

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_FIELDS = {f.name for f in dataclasses.fields(GenerationParams)}


def resolve_device(device: str | torch.device | None) -> str:
    """``auto``/None: CUDA when present, else Apple's MPS, else the CPU; ``cpu``, ``cuda``, ``cuda:N``,
    ``mps`` as given once checked to exist here (a ParamError naming ``device`` otherwise)."""
    if isinstance(device, torch.device):
        device = str(device)
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        return "mps" if mps is not None and mps.is_available() else "cpu"
    if not isinstance(device, str):
        raise ParamError("device", f"expected auto, cpu, cuda, cuda:N or mps, got {device!r}")
    kind, _, index = device.partition(":")
    if kind == "cpu" and not index:
        return "cpu"
    if kind == "cuda" and (not index or index.isdigit()):
        if not torch.cuda.is_available():
            raise ParamError("device", f"{device}: no CUDA GPU is available here (torch {torch.__version__}"
                                       f"{', a CPU-only build' if torch.version.cuda is None else ''})")
        if index and int(index) >= torch.cuda.device_count():
            raise ParamError("device", f"{device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return device
    if kind == "mps" and not index:
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ParamError("device", "mps: Apple's Metal backend is not available here")
        return "mps"
    raise ParamError("device", f"expected auto, cpu, cuda, cuda:N or mps, got {device!r}")


def resolve_dtype(dtype: str | torch.dtype | None, device: str = "cpu") -> torch.dtype:
    """``auto``/None: fp16 on CUDA; on the CPU bf16 where the CPU has fast native bf16 arithmetic
    (``models.layers.cpu_has_fast_bf16``), else fp32 (safe precision)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.startswith("cuda"):
            return torch.float16
        from .models.layers import cpu_has_fast_bf16

        return torch.bfloat16 if device.startswith("cpu") and cpu_has_fast_bf16() else torch.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        raise SfumatoError(f"dtype: unknown dtype {dtype!r}; valid: auto, {', '.join(DTYPES)}") from None


@dataclass
class ImageResult:
    image: Image.Image
    seed: int
    infotext: str
    nsfw: bool | None = None    # the safety checker's verdict (None: no checker ran)


@dataclass
class GenerationResult:
    images: list[Image.Image]
    params: GenerationParams                      # the request, seeds resolved
    items: list[ImageResult] = field(default_factory=list)
    latents: torch.Tensor | None = field(default=None, repr=False)   # the final latents, before decoding

    @property
    def seeds(self) -> list[int]:
        return [item.seed for item in self.items]


@dataclass
class AnimationResult:
    """An AnimateDiff clip: its frames, their rate, the infotext (the request's, with A1111's
    ``AnimateDiff`` entry) and the final latents (frames, C, h, w)."""

    frames: list[Image.Image]
    fps: int
    infotext: str
    params: GenerationParams
    latents: torch.Tensor | None = field(default=None, repr=False)

    def save(self, path: str | Path) -> None:
        """``.gif`` / ``.webp`` (Pillow) or ``.mp4`` (PyAV), the infotext in its metadata."""
        from .pipeline.animate import save_clip

        save_clip(self.frames, path, self.fps, self.infotext)


class Pipeline:
    """A loaded model (and optional refiner). ``lora_folder`` (``lora_dir``) is where ``<lora:name:w>``
    prompt tags are looked up; each run applies the prompt's LoRAs and removes them afterwards.
    ``hypernet_folder`` (``hypernet_dir``) likewise serves ``<hypernet:name:strength>`` tags (hooked
    in for the run only). Names resolve only to files those folders list (``checkpoint.folders``)."""

    def __init__(self, model: LoadedModel, refiner: LoadedModel | None = None, lora_dir: str | Path | None = None,
                 embeddings: EmbeddingSet | None = None, hypernet_dir: str | Path | None = None,
                 hires: LoadedModel | None = None):
        self.model = model
        self.refiner = refiner
        self.hires = hires   # the hires pass's own model (A1111's hr_checkpoint_name), used when a run has one
        # the SD safety checker (pipeline.safety), off unless set; a flagged image is hidden as safety_action says
        self.safety_checker = None
        self.safety_action = "black"
        self.lora_folder: ModelFolder | None = lora_folder(lora_dir) if lora_dir is not None else None
        self.hypernet_folder: ModelFolder | None = hypernetwork_folder(hypernet_dir) if hypernet_dir is not None else None
        self.generator = Generator(model, refiner, embeddings, hires)
        # few-step defaults (pipeline.fewstep): "auto" guesses from the file and LoRA names, logged
        self.few_step_choice = "auto"
        self.few_step: fewstep.FewStep | None = None

    @property
    def engine(self) -> Engine:
        """The base model's engine: its conditioner, schedule, denoiser, VAE encode and decode."""
        return self.generator.base

    @property
    def tiny_decoder(self):
        """A TAESD-compatible decoder used for the final images and the previews (None: the VAE)."""
        return self.generator.tiny_decoder

    @tiny_decoder.setter
    def tiny_decoder(self, decoder) -> None:
        if decoder is not None:
            if decoder.cfg.latent_channels != self.engine.latent_channels:
                raise ParamError("vae_decoder", f"it decodes {decoder.cfg.latent_channels}-channel latents, "
                                                f"the model makes {self.engine.latent_channels}")
            if decoder.factor != self.engine.factor:
                raise ParamError("vae_decoder", f"it upsamples x{decoder.factor}, the model's VAE x{self.engine.factor}")
            decoder = decoder.to(self.engine.device)
        self.generator.tiny_decoder = decoder

    def plan(self, p: GenerationParams):
        """The stages the request would run (``pipeline.plan``), without running anything."""
        return self.generator.plan(p)

    @property
    def embeddings(self) -> EmbeddingSet | None:
        """The textual inversion embeddings usable with this model (misfits in ``.skipped``)."""
        return self.generator.base.conditioner.embeddings

    @property
    def family(self) -> str:
        return self.model.family

    @property
    def prediction(self) -> str:
        return self.model.spec.prediction

    @property
    def model_name(self) -> str:
        return _name(self.model.path)

    @cached_property
    def model_hash(self) -> str | None:
        """A1111's "Model hash": the first 10 hex digits of the file's SHA-256 (None for folders)."""
        return sha256_file(self.model.path)[:10] if self.model.path.is_file() else None

    # -- the workflows: thin builders of one request ----------------------------------------

    def txt2img(self, prompt: str, negative_prompt: str = "", *, watermark: bool = True,
                callback: ProgressCallback | None = None, patches: Sequence[Patch] = (), **settings) -> GenerationResult:
        size = self.model.spec.resolution
        settings.setdefault("width", size)
        settings.setdefault("height", size)
        p = self.params(prompt=prompt, negative_prompt=negative_prompt, **settings)
        return self.run(p, callback, watermark, patches)

    def animate(self, prompt: str, negative_prompt: str = "", *, motion_module=None, frames: int = 16, fps: int = 8,
                context: int | None = None, overlap: int = -1, stride: int = 1, closed_loop: bool = False,
                loop_prompts: bool | None = None, watermark: bool = True, callback=None,
                **settings) -> AnimationResult:
        """An AnimateDiff clip: ``motion_module`` is a motion-module file or MotionAdapter folder (or a
        loaded ``models.motion.MotionAdapter``; None: the bundled model's own, for the bundled model);
        ``prompt`` may travel (lines ``N: text``); ``init_image`` / ``strength`` start every frame from
        an image. See ``pipeline.animate``."""
        from .pipeline.animate import AnimationSettings, animation_infotext, run_animation

        adapter, name = self._motion_module(motion_module)
        size = self.model.spec.resolution
        settings.setdefault("width", size)
        settings.setdefault("height", size)
        p = self.params(prompt=prompt, negative_prompt=negative_prompt, **settings)
        s = AnimationSettings(frames=frames, fps=fps, context=context, overlap=overlap, stride=stride,
                              closed_loop=closed_loop, loop_prompts=loop_prompts)
        prompt, run_patches, extra_networks = self._prompt_patches(p)
        controlnets = self.generator.controlnets.get(p.control, self.generator.base)   # loaded before any work
        with ExitStack() as stack:
            for attach in run_patches:
                stack.enter_context(attach())
            images, latents = run_animation(self.engine, adapter, replace(p, prompt=prompt), s, callback, controlnets)
        if watermark:
            images = [add_watermark(image) for image in images]
        text = generation_infotext(p, seed=p.seed, model_name=self.model_name, model_hash=self.model_hash,
                                   extra={**extra_networks, "TI hashes": self._ti_hashes(p),
                                          **control_infotext(p.control)})
        return AnimationResult(images, fps, animation_infotext(text, name, adapter, s), p, latents)

    def _motion_module(self, source):
        """A loaded motion module and its name (a file is loaded once per version of the file)."""
        from .checkpoint.motion import load_motion_module
        from .data import BUNDLED_MOTION_PATH, BUNDLED_PATH
        from .models.motion import MotionAdapter

        if source is None:
            if self.model.path.resolve() != BUNDLED_PATH or not BUNDLED_MOTION_PATH.is_file():
                raise ParamError("motion_module", "give a motion module (mm_sd_v15_v2.ckpt, v3_sd15_mm.ckpt, …); "
                                                  "only the bundled model has one built in")
            source = BUNDLED_MOTION_PATH
        if isinstance(source, MotionAdapter):
            return source, "motion_module"
        path = Path(source)
        if not path.exists():
            raise ParamError("motion_module", f"motion module not found: {source}")
        key = (str(path.resolve()), path.stat().st_mtime_ns)
        cached = getattr(self, "_motion_cache", None)
        if cached is None or cached[0] != key:
            try:
                adapter = load_motion_module(path)
            except SfumatoError as e:
                raise ParamError("motion_module", str(e)) from None
            self._motion_cache = cached = (key, adapter)
        return cached[1], path.stem if path.is_file() else path.name

    def img2img(self, prompt: str, init_image: Image.Image, negative_prompt: str = "", *, watermark: bool = True,
                callback: ProgressCallback | None = None, **settings) -> GenerationResult:
        settings.setdefault("width", init_image.width // 8 * 8)
        settings.setdefault("height", init_image.height // 8 * 8)
        p = self.params(prompt=prompt, negative_prompt=negative_prompt, init_image=init_image, **settings)
        return self.run(p, callback, watermark)

    def inpaint(self, prompt: str, init_image: Image.Image, mask: Image.Image, negative_prompt: str = "",
                **settings) -> GenerationResult:
        return self.img2img(prompt, init_image, negative_prompt, mask=mask, **settings)

    def outpaint(self, prompt: str, init_image: Image.Image, negative_prompt: str = "", *, left: int = 0,
                 right: int = 0, up: int = 0, down: int = 0, **settings) -> GenerationResult:
        """Grow the canvas by the given pixels and generate the new border, keeping the original."""
        check_outpaint(left, right, up, down)
        canvas, mask = outpaint_canvas(init_image, left, right, up, down)
        settings.setdefault("strength", 1.0)
        settings.setdefault("mask_blur", 0)
        return self.inpaint(prompt, canvas, mask, negative_prompt, **settings)

    def upscale(self, image: Image.Image, prompt: str = "", negative_prompt: str = "", *, noise_level: int = 20,
                watermark: bool = True, callback: ProgressCallback | None = None, **settings) -> GenerationResult:
        """x4 upscaler models: ``image`` to 4x its size, the low-res image noised to ``noise_level``
        (0 … the model's maximum, 350 for SD's) as the model takes it; width/height: the output size."""
        factor = self.engine.factor
        settings.setdefault("width", image.width * factor)
        settings.setdefault("height", image.height * factor)
        p = self.params(prompt=prompt, negative_prompt=negative_prompt, init_image=image, noise_level=noise_level,
                        **settings)
        return self.run(p, callback, watermark)

    def variations(self, images: Sequence, prompt: str = "", negative_prompt: str = "", *, noise_level: int = 0,
                   watermark: bool = True, callback: ProgressCallback | None = None, **settings) -> GenerationResult:
        """Stable unCLIP models: new images from the CLIP image embedding of ``images`` (PIL images, or
        (image, weight) pairs whose embeddings are summed by weight: two of 0.5 mix them), with an optional
        prompt, the embedding noise-augmented to ``noise_level`` (0 … the model's maximum − 1; higher
        levels keep less of the images). The model's native size unless width/height say otherwise."""
        pairs = [item if isinstance(item, (list, tuple)) else (item, 1.0) for item in images]
        if not pairs:
            raise ParamError("unclip_images", "variations need at least one image")
        return self.txt2img(prompt, negative_prompt, watermark=watermark, callback=callback,
                            unclip_images=pairs, unclip_noise_level=noise_level, **settings)

    def few_step_for(self, prompt) -> fewstep.FewStep | None:
        """The few-step preset of a request with ``prompt``: the model's, else (auto) one its LoRA tags name."""
        if self.few_step is not None or self.few_step_choice != "auto" or not isinstance(prompt, str):
            return self.few_step
        return fewstep.resolve("auto", (), [name for name, _ in parse_lora_prompt(prompt)[1]])

    def params(self, **settings) -> GenerationParams:
        """The validated request; a few-step preset (``few_step``) fills the sampler, scheduler, steps
        and CFG the settings leave out."""
        unknown = sorted(set(settings) - _FIELDS)
        if unknown:
            raise ParamError(unknown[0], f"unknown setting; valid: {', '.join(sorted(_FIELDS))}")
        preset = self.few_step_for(settings.get("prompt"))
        if preset is not None:
            for name, value in preset.settings().items():
                settings.setdefault(name, value)
        if self.refiner is not None:
            settings.setdefault("refiner", _name(self.refiner.path))
        if self.hires is not None:
            settings.setdefault("hires_checkpoint", _name(self.hires.path))
        return GenerationParams(**settings).validated()

    def run(self, p: GenerationParams, callback: ProgressCallback | None = None, watermark: bool = True,
            patches: Sequence[Patch] = ()) -> GenerationResult:
        """Run the request: its prompt's LoRAs and hypernetworks, and ``patches`` (e.g. attention-map
        hooks), attached for the run only; images watermarked unless ``watermark`` is False."""
        p.validated()
        prompt, run_patches, extra_networks = self._prompt_patches(p, patches)
        out = self.generator.run(replace(p, prompt=prompt), callback, run_patches)
        if p.detail:   # ADetailer: each image's regions inpainted again, before the checker and the watermark
            out.images = [self._detail(replace(p, prompt=prompt), image, seed, run_patches, callback)
                          for image, seed in zip(out.images, out.seeds)]
        flags = [None] * len(out.images)
        if self.safety_checker is not None:   # on the images as made, before the watermark (as the reference)
            out.images, flags = check_images(self.safety_checker, out.images, self.safety_action)
        extra = {**extra_networks, "TI hashes": self._ti_hashes(p),
                 **control_infotext(p.control),
                 **ip_adapter_infotext(p.ip_adapters, self.generator.image_prompts.modules, len(p.control)),
                 "Noise level": p.noise_level,   # x4 upscaler
                 **unclip_infotext(p, self.model.spec), **detail_infotext(p.detail)}
        items = []
        for i, (image, seed) in enumerate(zip(out.images, out.seeds)):
            if watermark:
                image = add_watermark(image)
            subseed = out.subseeds[i] if out.subseeds else None
            text = generation_infotext(replace(p, seed=seed), seed=seed, subseed=subseed,
                                       model_name=self.model_name, model_hash=self.model_hash,
                                       extra={**extra, **safety_infotext(flags[i], self.safety_action)})
            items.append(ImageResult(image, seed, text, flags[i]))
        return GenerationResult([item.image for item in items], p, items, out.latents)

    def _prompt_patches(self, p: GenerationParams, patches: Sequence[Patch] = ()) -> tuple[str, list[Patch], dict]:
        """The prompt without its LoRA and hypernetwork tags, the run's patches (``patches`` and those the
        tags name) and their infotext entries; refused embeddings and unusable tags are ParamErrors."""
        self._check_refused_embeddings(p)
        prompt, tags = parse_lora_prompt(p.prompt)
        prompt, nets, hypernet_extra = self._hypernets(prompt)
        run_patches = list(patches)
        lora_hashes = None
        if tags:
            if getattr(self.model.unet, "quantized", None):
                raise ParamError("prompt", "it names LoRAs, which an int8 UNet cannot take in place: merge them "
                                           "at load (--lora FILE:WEIGHT, load(loras=…))")
            if self.model.streamed:
                mode = "low-memory" if self.model.low_memory else "by-stage"
                raise ParamError("prompt", f"it names LoRAs, which {mode} loading cannot apply (weights stay on disk)")
            if self.lora_folder is None:
                raise ParamError("prompt", "it names LoRAs but no LoRA folder is set (--lora-dir)")
            files = [(_named_file(self.lora_folder, name), weight) for name, weight in tags]
            run_patches.append(patch.loras(self.model, files, [name for name, _ in tags]))
            lora_hashes = ", ".join(f"{name}: {sha256_file(path)[:12]}" for (name, _), (path, _) in zip(tags, files))
        if nets:
            run_patches.append(patch.hypernetworks(self.model, nets))
        return prompt, run_patches, {**hypernet_extra, "Lora hashes": lora_hashes}

    def _detail(self, p: GenerationParams, image: Image.Image, seed: int, patches: Sequence[Patch],
                callback: ProgressCallback | None) -> Image.Image:
        """The detail passes on one finished image: each spec's regions, in order, each inpainted with
        only-masked at the image's size; region j of a pass takes seed + j (as ADetailer)."""
        for k, spec in enumerate(p.detail):
            if parse_lora_prompt(spec.prompt)[1] or parse_hypernet_prompt(spec.prompt)[1]:
                raise ParamError(f"detail[{k}].prompt", "LoRA and hypernetwork tags belong in the main prompt")
            for j, mask in enumerate(region_masks(spec, image, f"detail[{k}]", str(self.engine.device))):
                q = region_params(p, spec, image, mask, seed + j).validated()
                image = self.generator.run(q, callback, patches).images[0]
        return image

    def _hypernets(self, prompt: str) -> tuple[str, list[tuple[Hypernetwork, float]], dict[str, object]]:
        """The prompt without its ``<hypernet:…>`` tags, the hypernetworks they name (loaded from
        ``hypernet_dir``) with their strengths, and A1111's infotext entries for them."""
        prompt, tags = parse_hypernet_prompt(prompt)
        if not tags:
            return prompt, [], {}
        if self.hypernet_folder is None:
            raise ParamError("prompt", "it names hypernetworks but no hypernetwork folder is set (--hypernet-dir)")
        nets = []
        for name, w in tags:
            path = _named_file(self.hypernet_folder, name)
            try:
                nets.append((load_hypernetwork(path, name), w))
            except SfumatoError as e:   # an unusable file named in the prompt
                raise patch.file_error("hypernetwork", name, e) from None
        names, strengths = ", ".join(n for n, _ in tags), ", ".join(f"{w:g}" for _, w in tags)
        return prompt, nets, {"Hypernet": names, "Hypernet strength": strengths}

    def _check_refused_embeddings(self, p: GenerationParams) -> None:
        """A prompt that names an embedding which was skipped (unreadable, unsafe, NaN, or made for
        other text encoders) is an error saying why, not a silent use of the name as plain words."""
        skipped = self.embeddings.skipped if self.embeddings is not None else {}
        for where in ("prompt", "negative_prompt"):
            text = getattr(p, where)
            for name, reason in skipped.items():
                if name and re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text):
                    raise ParamError(where, f"embedding {name!r} was not loaded: {reason}",
                                     public=f"embedding {name!r} could not be loaded")

    def _ti_hashes(self, p: GenerationParams) -> str | None:
        """A1111's ``TI hashes``: the embeddings the prompts use, with 12 hex digits of their file's SHA-256."""
        if self.embeddings is None:
            return None
        names = dict.fromkeys(self.embeddings.names_in(p.prompt) + self.embeddings.names_in(p.negative_prompt))
        paths = {name: self.embeddings.embeddings[name].path for name in names}
        return ", ".join(f"{n}: {sha256_file(path)[:12]}" for n, path in paths.items() if path is not None) or None


def _named_file(folder: ModelFolder, name: str) -> Path:
    """The file a prompt tag names, resolved inside its folder; a ParamError naming the prompt otherwise."""
    try:
        return folder.path(name)
    except NameNotFoundError as e:
        raise ParamError("prompt", str(e)) from None


def _name(path: Path) -> str:
    return path.stem if path.is_file() else path.name


def load(
    path: str | Path | None = None,
    *,
    vae: str | Path | None = None,
    prediction: str | None = None,
    dtype: str | torch.dtype | None = None,
    device: str = "auto",
    refiner: str | Path | None = None,
    hires: str | Path | None = None,
    loras: list[tuple[str | Path, float]] | None = None,
    lora_dir: str | Path | None = None,
    embeddings_dir: str | Path | None = None,
    hypernet_dir: str | Path | None = None,
    low_memory: bool = False,
    by_stage: bool = False,
    compile: bool = False,
    no_half_vae: bool = False,
    safety_checker: str | Path | None = None,
    few_step: str | None = "auto",
    quant: str | None = None,
    backend: str = "torch",
    backend_precision: str = "f32",
) -> Pipeline:
    """Load a checkpoint (None: the bundled model). ``loras`` are merged into the weights for good
    (``(path, weight)`` pairs); ``lora_dir`` serves ``<lora:name:w>`` tags in prompts; the textual
    inversion embeddings in ``embeddings_dir`` are used by name in prompts and negative prompts;
    ``hypernet_dir`` serves ``<hypernet:name:strength>`` tags (A1111 hypernetwork ``.pt`` files).
    ``hires``: another checkpoint that runs the hires pass (A1111's "Hires checkpoint"; the same
    latent space as ``path``'s); prompt-tag LoRAs and hypernetworks apply to ``path``'s model only.
    ``low_memory``: the weights stay in the (single .safetensors) file and each component, each UNet
    block, is read in as it runs and dropped after; VAE decode/encode are tiled. Same images (up to
    rounding, and the tiled decode's tolerance above 256×256), a fraction of the memory, slower.
    ``by_stage``: the weights stay in the file too, each component read in whole for its stage only
    (the UNet while sampling, the text encoders while encoding, the VAE while decoding): the same
    images, the peak of the largest component instead of all of them, one conversion per stage.
    ``compile``: run the UNet(s) under ``torch.compile`` (the first steps compile, for minutes on a
    CPU; then see ``sfumato bench --compile`` for what it gains on this machine). ``device``: auto
    (CUDA when present), cpu, cuda, cuda:N or mps. ``no_half_vae``: the VAE computes in fp32 whatever
    the weights (A1111's --no-half-vae; without it a half-precision decode that yields NaN is redone
    in fp32 once and the VAE stays fp32). ``safety_checker``: the SD safety checker's folder or file;
    every image is checked and a flagged one hidden (``Pipeline.safety_action``: "black" or "blur").
    ``few_step``: a few-step preset (turbo, lightning, hyper, lcm: see ``pipeline.fewstep``) whose
    sampler, schedule, steps and CFG fill what a request leaves out; "auto" (default) guesses it from
    the file's and the LoRAs' names (logged), "none" never.
    ``quant``: "int8" runs the UNets' linear layers and convolutions with int8 weights and dynamically
    quantized int8 activations (``models.quant``; opt-in: its quality is measured, not exact); LoRAs
    merge before (``loras=``), prompt-tag LoRAs are refused.
    ``backend``: "torch", or "openvino" (``backends.openvino``: the UNet and VAE decoder converted from
    these weights, compiled per shape and cached on disk; ``backend_precision`` f32 (default), bf16,
    f16 or int8; calls it cannot serve run on torch, logged)."""
    fewstep.resolve(few_step if few_step != "auto" else "none", ())   # a bad name fails before loading
    if quant not in (None, "none", "int8"):
        raise ParamError("quant", f"must be int8 or none, got {quant!r}")
    if backend not in ("torch", "openvino"):
        raise ParamError("backend", f"must be torch or openvino, got {backend!r}")
    if backend == "openvino":
        from .backends import openvino as ov_backend

        ov_backend.require()
        for option, on in (("low_memory", low_memory), ("by_stage", by_stage), ("compile", compile),
                           ("quant", quant == "int8")):
            if on:
                raise ParamError("backend", f"the OpenVINO backend keeps its own compiled UNet; not with {option}")
        if dtype not in (None, "auto", "fp32", torch.float32):
            raise ParamError("dtype", "the OpenVINO backend converts fp32 weights: dtype fp32 (its own precision: "
                                      "backend_precision)")
        dtype = "fp32"
        if device == "auto":   # OpenVINO runs on the CPU here: the model stays there
            device = "cpu"
        elif torch.device(resolve_device(device)).type != "cpu":
            raise ParamError("device", f"the OpenVINO backend runs on the CPU, not {device}")
    for option, on in (("low_memory", low_memory), ("by_stage", by_stage)):
        if on and quant == "int8":
            raise ParamError("quant", f"int8 keeps the quantized UNet in memory; not with {option}")
        if on and loras:
            raise ParamError("loras", f"merging LoRAs into the weights needs them in memory; not with {option}")
        if on and compile:
            raise ParamError("compile", f"a compiled UNet keeps its weights in memory; not with {option}")
    if path is None:  # the bundled shapes-world model that ships with the package
        from .data import BUNDLED_PATH

        path = BUNDLED_PATH
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    model = load_model(path, vae=vae, prediction=prediction, dtype=torch_dtype, device=device, low_memory=low_memory,
                       by_stage=by_stage)
    refiner_model = hires_model = None
    if refiner is not None:
        refiner_model = load_model(refiner, dtype=torch_dtype, device=device, low_memory=low_memory, by_stage=by_stage)
    if hires is not None:
        hires_model = load_model(hires, dtype=torch_dtype, device=device, low_memory=low_memory, by_stage=by_stage)
    if loras:   # merged for good: a run's prompt-tag LoRAs are removed down to these weights
        apply_loras(model, loras)
        bake_loras(model)
    if quant == "int8":
        from .models.quant import quantize_int8

        for m in (model, refiner_model, hires_model):
            if m is not None:
                quantize_int8(m.unet)
                # the int8 layers compute in fp32; the rest of the UNet does too: measured faster than
                # bf16 activations converted at every int8 layer (4.6 against 5.4 s a 512² step here)
                m.unet.dtype_override = torch.float32
    if backend == "openvino":
        for m in (model, refiner_model, hires_model):
            if m is not None:
                ov_backend.attach(m, backend_precision)
    if compile:
        for m in (model, refiner_model, hires_model):
            if m is not None:
                m.unet.compile()
    if no_half_vae:
        for m in (model, refiner_model, hires_model):
            if m is not None:
                m.vae.dtype_override = torch.float32
    embeddings = load_embeddings(embeddings_dir, model.spec) if embeddings_dir is not None else None
    pipe = Pipeline(model, refiner_model, lora_dir, embeddings, hypernet_dir, hires_model)
    pipe.few_step_choice = "auto" if few_step is None else str(few_step).lower()
    pipe.few_step = fewstep.resolve(pipe.few_step_choice, [Path(path).name], [Path(f).name for f, _ in loras or ()])
    if safety_checker is not None:
        from .checkpoint.safety import load_safety_checker

        pipe.safety_checker = load_safety_checker(safety_checker, dtype=pipe.engine.dtype, device=pipe.engine.device)
    return pipe
