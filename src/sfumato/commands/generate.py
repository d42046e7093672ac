"""``sfumato txt2img | img2img | inpaint | outpaint | upscale``: build one request from the flags (and
``--from-png``), validate it before any model loads, run it, write the images atomically."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..errors import SfumatoError
from .units import add_control, add_detail, add_ip_adapter, control_specs, detail_specs, ip_specs

# generation flags → GenerationParams fields (defaults live in GenerationParams; None = not given)
_GEN_FLAGS = {
    "negative_prompt": str, "sampler": str, "scheduler": str, "steps": int, "cfg_scale": float, "seed": int,
    "width": int, "height": int, "batch_size": int, "clip_skip": int, "subseed": int, "subseed_strength": float,
    "rng": str, "guidance_rescale": float, "strength": float, "mask_blur": int, "only_masked_padding": int,
    "masked_content": str, "hires_scale": float, "hires_steps": int, "hires_denoise": float, "hires_upscaler": str,
    "hires_sampler": str, "hires_scheduler": str, "hires_prompt": str, "hires_negative_prompt": str,
    "refiner_switch": float, "tome_ratio": float, "deepcache_interval": int,
    "seed_resize_from_w": int, "seed_resize_from_h": int, "eta_noise_seed_delta": int,
}
_FLAG_ALIASES = {"tome_ratio": ("--tome",), "deepcache_interval": ("--deepcache",)}


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="?", help="the prompt (may come from --from-png instead)")
    p.add_argument("--model", help="checkpoint file (.safetensors/.ckpt/…) or diffusers folder")
    p.add_argument("--vae", help="a VAE file to use instead of the checkpoint's")
    p.add_argument("--vae-decoder", metavar="taesd:PATH",
                   help="decode (and preview) with a TAESD-compatible tiny decoder (taesd_decoder.safetensors "
                        "or a diffusers AutoencoderTiny file): much faster, lower quality")
    p.add_argument("--prediction", choices=("eps", "v"), help="override the prediction type (SD 2.x)")
    p.add_argument("--refiner", help="an SDXL refiner checkpoint to hand the last steps to")
    p.add_argument("--hires-checkpoint", metavar="FILE",
                   help="hires fix: run the second pass on this checkpoint (same latent space as --model)")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:WEIGHT]",
                   help="merge a LoRA file into the model (repeatable; weight default 1.0)")
    p.add_argument("--lora-dir", help="folder searched for <lora:name:weight> tags in the prompt")
    p.add_argument("--hypernet-dir", help="folder searched for <hypernet:name:strength> tags in the prompt (A1111 .pt)")
    p.add_argument("--embeddings", metavar="DIR", help="textual inversion embeddings, used by file name in prompts")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "fp16", "bf16"),
                   help="auto: fp16 on a GPU; on a CPU bf16 where it has fast bf16 arithmetic, else fp32")
    p.add_argument("--no-half-vae", action="store_true",
                   help="decode in fp32 whatever the weights (without it, a half-precision decode that yields "
                        "NaN is redone in fp32)")
    p.add_argument("--memory", choices=("auto", "keep", "by-stage", "low"), default="auto",
                   help="keep: every component in memory throughout; by-stage: each read from the .safetensors "
                        "file for its stage only (the UNet while sampling, the VAE while decoding: same images, "
                        "less memory, a conversion per stage); low: UNet blocks streamed one by one, tiled VAE "
                        "(least memory, slower); auto (default): by-stage for a .safetensors file without LoRAs")
    p.add_argument("--low-memory", action="store_true", help="the same as --memory low")
    p.add_argument("--compile", action="store_true",
                   help="run the UNet under torch.compile (keeps it in memory: --memory auto becomes keep)")
    add_few_step(p)
    add_quant(p)
    p.add_argument("--from-png", metavar="FILE", help="take the settings from an image's infotext")
    p.add_argument("--style", action="append", default=[], metavar="NAME",
                   help="apply a prompt style from --styles-file (repeatable, in order)")
    p.add_argument("--styles-file", metavar="CSV", help="A1111's styles.csv (name,prompt,negative_prompt)")
    p.add_argument("--no-watermark", action="store_true", help="do not add the invisible watermark")
    p.add_argument("--safety-checker", metavar="PATH",
                   help="check every image with the SD safety checker (its folder, e.g. a diffusers model's "
                        "safety_checker/, or its weights file); a flagged image is hidden and reported")
    p.add_argument("--safety-action", choices=("black", "blur"), default="black",
                   help="what a flagged image becomes (default black, as the reference)")
    p.add_argument("-o", "--output", default="output.png",
                   help="image path (.png, .jpg, .webp); a batch writes NAME-0.png, NAME-1.png, …")
    for name, kind in _GEN_FLAGS.items():
        flag = "--" + name.replace("_", "-")
        p.add_argument(flag, *_FLAG_ALIASES.get(name, ()), type=kind, default=None, help=_HELP.get(name))
    add_control(p)
    add_ip_adapter(p)


def add_few_step(p: argparse.ArgumentParser) -> None:
    from ..pipeline.fewstep import CHOICES

    p.add_argument("--few-step", choices=CHOICES, default="auto",
                   help="the sampler, scheduler, steps and CFG of a few-step model for the flags not given: turbo "
                        "(SD/SDXL-Turbo), lightning, hyper (Hyper-SD), lcm (LCM, LCM-LoRA); auto (default): guessed "
                        "from the model's and LoRAs' file names; none: never")


def add_quant(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quant", choices=("none", "int8"), default="none",
                   help="int8: the UNet's linear layers and convolutions in 8-bit (int8 weights, int8 activations "
                        "quantized per call): faster on the CPU, not bit-exact (see the README's numbers); LoRAs "
                        "only through --lora")
    p.add_argument("--backend", choices=("torch", "openvino"), default="torch",
                   help="openvino: the UNet and VAE decoder converted to OpenVINO (pip install 'sfumato[openvino]'), "
                        "cached on disk per shape; what it cannot run (ControlNet, LoRA tags, AnimateDiff) runs on "
                        "torch, logged")
    p.add_argument("--backend-precision", choices=("f32", "bf16", "f16", "int8"), default="f32",
                   help="OpenVINO's precision: f32 (default; images within ±2 of torch), bf16/f16, int8 (NNCF "
                        "8-bit weights)")


def note_few_step(pipe, settings: dict, prompt: str | None = None) -> None:
    """One line on stderr when a few-step preset fills settings the flags left out."""
    preset = pipe.few_step_for(prompt if prompt is not None else settings.get("prompt"))
    if preset is None:
        return
    filled = {k: v for k, v in preset.settings().items() if settings.get(k) is None}
    if filled:
        shown = ", ".join(f"{k} {v}" for k, v in filled.items() if v is not None)
        print(f"few-step preset {preset.name}: {shown} (--few-step none to turn off)", file=sys.stderr)


_HELP = {
    "sampler": "euler, euler_a, heun, dpmpp_2m, … or an A1111 name such as 'DPM++ 2M Karras'",
    "scheduler": "normal (A1111 'Automatic'), karras, exponential, sgm_uniform, simple, trailing (diffusers' "
                 "spacing for Turbo / Lightning / Hyper-SD), turbo (ComfyUI's SD Turbo: 1 to 10 steps)",
    "seed": "-1 picks a random seed (reported)",
    "width": "default: the model's native size (img2img: the init image's)",
    "rng": "cpu (default) or nv (A1111's CPU imitation of CUDA's generator)",
    "strength": "img2img denoising strength in [0, 1]",
    "masked_content": "fill, original, 'latent noise' or 'latent nothing'",
    "hires_scale": "hires fix: upscale factor of a second pass (txt2img)",
    "hires_upscaler": "latent or lanczos",
    "hires_sampler": "hires fix: the second pass's own sampler (default: the first pass's)",
    "hires_scheduler": "hires fix: the second pass's own schedule type (default: the first pass's)",
    "hires_prompt": "hires fix: the second pass's own prompt (default: the prompt)",
    "hires_negative_prompt": "hires fix: the second pass's own negative prompt (default: the negative prompt)",
    "refiner_switch": "fraction of the steps after which the refiner takes over",
    "tome_ratio": "ToMe: merge this fraction of the self-attention tokens at the finest attention level (0 = off)",
    "deepcache_interval": "DeepCache: a full UNet pass every N steps, the shallow branch in between (1 = off)",
    "seed_resize_from_w": "A1111's resize seed from width: draw the seed's noise at this size (with the height)",
    "seed_resize_from_h": "A1111's resize seed from height (0 = off)",
    "eta_noise_seed_delta": "A1111's ENSD: ancestral noise after the first draw from seed + this (0 = off)",
}


DEVICE_HELP = "auto (CUDA when present, else MPS, else the CPU), cpu, cuda, cuda:N or mps"
_DEPTH_HELP = "depth map for SD 2's depth model (greyscale, white = near, as MiDaS writes it)"


def _add_xyz(p: argparse.ArgumentParser) -> None:
    for k in "xyz":
        p.add_argument(f"--xyz-{k}", metavar="AXIS=VALUES",
                       help=f"X/Y/Z plot: the {k.upper()} axis, an A1111 axis name and its values, e.g. "
                            + {"x": "'Seed=1,2,3'", "y": "'Steps=10-30 (+10)'", "z": "'Sampler=Euler,DPM++ 2M'"}[k]
                            + "; -o gets the grid")
    p.add_argument("--xyz-cells", action="store_true", help="X/Y/Z plot: also write each cell (NAME-cell-NN.png)")


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("txt2img", help="generate images from a prompt")
    _add_common(p)
    _add_xyz(p)
    add_detail(p)
    p.add_argument("--attention-maps", metavar="DIR",
                   help="also write a heat map per prompt word (cross-attention, DAAM) as overlays into DIR")
    p.add_argument("--depth-map", metavar="FILE", help=_DEPTH_HELP)
    p = subparsers.add_parser("img2img", help="transform an image under a prompt")
    _add_common(p)
    _add_xyz(p)
    add_detail(p)
    p.add_argument("--init-image", required=True)
    p.add_argument("--depth-map", metavar="FILE", help=_DEPTH_HELP)
    p.add_argument("--depth-model", metavar="FILE",
                   help="SD 2 depth model: infer the depth map from the init image with this MiDaS DPT "
                        "(dpt_hybrid-midas-501f0c75.pt or dpt_large-midas-2f21e586.pt), as ldm's depth2img does")
    p = subparsers.add_parser("inpaint", help="repaint the masked part of an image")
    _add_common(p)
    p.add_argument("--init-image", required=True)
    p.add_argument("--mask", help="white = repaint (or make it with --sam)")
    p.add_argument("--only-masked", action="store_true", help="work on the masked area at full resolution")
    p.add_argument("--sam", metavar="FILE", help="Inpaint Anything: the mask is Segment Anything's for --sam-point / "
                                                "--sam-box (sam_vit_*.pth or .safetensors)")
    p.add_argument("--sam-point", action="append", default=[], metavar="X,Y[:neg]", help="a point on the object")
    p.add_argument("--sam-box", metavar="X0,Y0,X1,Y1", help="a box around the object")
    p.add_argument("--sam-grow", type=int, default=8, metavar="PX", help="grow the object's mask by PX (default 8)")
    p.add_argument("--remove", action="store_true",
                   help="Inpaint Anything's remove: fill the masked object from its surroundings (masked content "
                        "'fill') and repaint it under the prompt, which may be empty or name the background")
    p = subparsers.add_parser("outpaint", help="extend an image beyond its borders")
    _add_common(p)
    p.add_argument("--init-image", required=True)
    for side in ("left", "right", "up", "down"):
        p.add_argument(f"--{side}", type=int, default=0, help=f"pixels to add on the {side} (multiple of 8)")
    p = subparsers.add_parser("upscale", help="upscale an image 4x with an x4 upscaler model (the prompt is optional)")
    _add_common(p)
    p.add_argument("--image", required=True, help="the low-res image (sides multiples of 8)")
    p.add_argument("--noise-level", type=int, default=20,
                   help="noise added to the low-res image, 0 to the model's maximum (350); default 20")
    p.add_argument("--upscaler", choices=("lanczos", "nearest"),
                   help="extras upscaling with a PIL filter instead of the x4 model (no model is loaded)")
    p.add_argument("--scale", type=float,
                   help="extras upscaling by this factor (A1111's 'Scale by'): with the x4 model, its output is "
                        "resized with Lanczos to it (the model runs again beyond 4)")
    p = subparsers.add_parser("variations", help="new images from images (Stable unCLIP; the prompt is optional)")
    _add_common(p)
    p.add_argument("--image", action="append", required=True, metavar="FILE[:WEIGHT]",
                   help="an image whose CLIP embedding conditions the model (repeatable: embeddings summed by "
                        "weight, default 1; two images at 0.5 mix them)")
    p.add_argument("--noise-level", type=int, default=0,
                   help="noise added to the image embedding, 0 to the model's maximum − 1 (999); higher keeps "
                        "less of the images; default 0")
    for name in ("txt2img", "img2img", "inpaint", "outpaint", "upscale", "variations"):
        subparsers.choices[name].set_defaults(func=cmd_generate)


def _inpaint_mask(args: argparse.Namespace, image):
    """--mask, or with --sam the best-scoring Segment Anything mask of the prompts, grown."""
    if (args.mask is None) == (args.sam is None):
        raise SfumatoError("--mask: give a mask file or --sam with --sam-point / --sam-box (one of the two)")
    if args.mask is not None:
        return _open_image(args.mask, "--mask")
    import numpy as np
    from PIL import Image

    from ..api import resolve_device
    from ..checkpoint.sam import load_sam
    from ..pipeline.masks import dilate
    from ..pipeline.segment import Segmenter
    from .segment import _numbers, parse_point

    points = [parse_point(text) for text in args.sam_point]
    box = tuple(_numbers(args.sam_box, 4, "--sam-box")) if args.sam_box else None
    if not points and box is None:
        raise SfumatoError("--sam-point: give at least one point or a --sam-box")
    if not 0 <= args.sam_grow <= 256:
        raise SfumatoError(f"--sam-grow: must be 0 to 256, got {args.sam_grow}")
    segmenter = Segmenter(load_sam(args.sam, device=resolve_device(args.device)))
    segmenter.set_image(image)
    mask = dilate(segmenter.predict(points, box).best, args.sam_grow)
    if not mask.any():
        raise SfumatoError("--sam-point: Segment Anything found no object at these prompts (an empty mask)")
    return Image.fromarray((mask * 255).astype(np.uint8))


def _weighted_image(text: str) -> tuple:
    """``FILE[:WEIGHT]`` → (opened image, weight)."""
    path, weight = text, 1.0
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            weight = float(tail)
            path = head
        except ValueError:
            pass
    return _open_image(path, "--image"), weight


def _lora_arg(text: str) -> tuple[str, float]:
    """``PATH[:WEIGHT]`` → (path, weight); the file must exist."""
    path, weight = text, 1.0
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            path, weight = head, float(tail)
        except ValueError:
            pass   # a colon inside the path (e.g. a Windows drive)
    if not Path(path).is_file():
        raise SfumatoError(f"--lora: file not found: {path}")
    return path, weight


def _tiny_decoder(text: str, latent_channels: int, factor: int):
    from ..checkpoint.taesd import load_tiny_decoder

    kind, _, path = text.partition(":")
    if kind != "taesd" or not path:
        raise SfumatoError(f"--vae-decoder: expected taesd:PATH, got {text!r}")
    if not Path(path).is_file():
        raise SfumatoError(f"--vae-decoder: file not found: {path}")
    try:
        decoder = load_tiny_decoder(path)
    except (ValueError, RuntimeError) as e:
        raise SfumatoError(f"--vae-decoder: {e}") from None
    if decoder.cfg.latent_channels != latent_channels:
        raise SfumatoError(f"--vae-decoder: {path} decodes {decoder.cfg.latent_channels}-channel latents, "
                           f"the model makes {latent_channels}")
    if decoder.factor != factor:
        raise SfumatoError(f"--vae-decoder: {path} upsamples ×{decoder.factor}, the model's VAE ×{factor}")
    return decoder


def _open_image(path: str, field: str):
    from ..safe_image import open_image

    return open_image(path, field)


def cmd_generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..api import load
    from ..pipeline.images import batch_paths, save_image
    from ..pipeline.infotext import params_from_infotext, read_image_parameters

    settings: dict = {}
    if args.from_png:
        text = read_image_parameters(args.from_png, "--from-png")
        if text is None:
            raise SfumatoError(f"--from-png: {args.from_png} carries no generation parameters")
        settings.update(params_from_infotext(text))
    settings.update({k: getattr(args, k) for k in _GEN_FLAGS if getattr(args, k) is not None})
    if args.prompt is not None:
        settings["prompt"] = args.prompt
    if args.command == "upscale" and (args.upscaler or args.scale is not None):
        return _extras(args)
    if args.command in ("upscale", "variations") or getattr(args, "remove", False):
        settings.setdefault("prompt", "")
    if getattr(args, "remove", False):
        if settings.get("masked_content", "fill") != "fill":
            raise SfumatoError("--remove: fills the object from its surroundings; leave out --masked-content")
        settings["masked_content"] = "fill"
    if "prompt" not in settings:
        raise SfumatoError("prompt: no prompt given")
    if args.style:
        from ..text.styles import apply_styles, read_styles

        if not args.styles_file:
            raise SfumatoError("--style: needs --styles-file (A1111's styles.csv)")
        settings["prompt"], settings["negative_prompt"] = apply_styles(
            settings["prompt"], settings.get("negative_prompt", ""), args.style, read_styles(args.styles_file), "--style")
    output = Path(args.output)
    if not output.parent.is_dir():
        raise SfumatoError(f"--output: folder {output.parent} does not exist")
    if output.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise SfumatoError(f"--output: unsupported image type {output.suffix!r} (use .png, .jpg or .webp)")
    from ..data import BUNDLED_PATH, BUNDLED_UNCLIP_PATH

    model = args.model or (BUNDLED_UNCLIP_PATH if args.command == "variations" else BUNDLED_PATH)

    extra: dict = {}
    if args.command in ("img2img", "inpaint", "outpaint"):
        extra["init_image"] = _open_image(args.init_image, "--init-image")
    if args.command == "inpaint":
        extra["mask"] = _inpaint_mask(args, extra["init_image"])
        extra["only_masked"] = args.only_masked
    if args.command == "outpaint":
        extra.update(left=args.left, right=args.right, up=args.up, down=args.down)
    if getattr(args, "depth_map", None) is not None:
        extra["depth_map"] = _open_image(args.depth_map, "--depth-map")
    if getattr(args, "depth_model", None) is not None:
        extra["depth_model"] = args.depth_model
    if args.command == "upscale":
        extra.update(init_image=_open_image(args.image, "--image"), noise_level=args.noise_level)
    if args.command == "variations":
        extra.update(unclip_images=[_weighted_image(text) for text in args.image], unclip_noise_level=args.noise_level)
    settings.pop("refiner", None)            # names from --from-png: the files come from --refiner,
    settings.pop("hires_checkpoint", None)   # --hires-checkpoint
    control = control_specs(args)
    if control:
        settings["control"] = control
    ip_adapters = ip_specs(args)
    if ip_adapters:
        settings["ip_adapters"] = ip_adapters
    detail = detail_specs(args)
    if detail:
        settings["detail"] = detail

    # validate the request before loading any model: a throwaway copy with placeholder sizes
    _dry_validate(args.command, settings, extra)
    axes = _xyz_axes(args)
    if args.safety_checker and not Path(args.safety_checker).exists():
        raise SfumatoError(f"--safety-checker: not found: {args.safety_checker}")
    loras = [_lora_arg(text) for text in args.lora]
    memory = _memory_mode(args, model, settings["prompt"], loras)
    if args.hires_checkpoint and not Path(args.hires_checkpoint).exists():
        raise SfumatoError(f"--hires-checkpoint: file not found: {args.hires_checkpoint}")
    pipe = load(model, vae=args.vae, prediction=args.prediction, dtype=args.dtype, device=args.device,
                no_half_vae=args.no_half_vae, refiner=args.refiner, hires=args.hires_checkpoint,
                loras=loras, lora_dir=args.lora_dir, embeddings_dir=args.embeddings, low_memory=memory == "low",
                by_stage=memory == "by-stage", hypernet_dir=args.hypernet_dir, compile=args.compile,
                few_step=args.few_step, quant=args.quant, backend=args.backend,
                backend_precision=args.backend_precision)
    note_few_step(pipe, settings)
    if args.vae_decoder:
        pipe.tiny_decoder = _tiny_decoder(args.vae_decoder, pipe.engine.latent_channels, pipe.engine.factor)
    if args.safety_checker:
        from ..checkpoint.safety import load_safety_checker

        pipe.safety_checker = load_safety_checker(args.safety_checker, dtype=pipe.engine.dtype, device=pipe.engine.device)
        pipe.safety_action = args.safety_action
    bars: list = []   # made at the first step: a request refused before sampling leaves no bar behind

    def progress(rec) -> None:
        if not bars:   # disable=None: no bar when stderr is not a terminal (logs, pipes)
            bars.append(tqdm(desc=args.command, unit="step", file=sys.stderr, leave=False, disable=None))
        bar = bars[0]
        if rec.index == 0:
            bar.reset(total=rec.total)
            bar.set_description(rec.stage)
        bar.update(1)

    method = {"txt2img": pipe.txt2img, "img2img": pipe.img2img, "inpaint": pipe.img2img, "outpaint": pipe.outpaint,
              "upscale": lambda prompt, image, negative, **kw: pipe.upscale(image, prompt, negative, **kw)}
    prompt = settings.pop("prompt")
    negative = settings.pop("negative_prompt", "")
    kwargs = {**settings, **extra}
    init = kwargs.pop("init_image", None)
    maps_dir = getattr(args, "attention_maps", None)
    if axes is not None:
        return _plot(pipe, axes, args, dict(prompt=prompt, negative_prompt=negative, init_image=init, **kwargs),
                     progress, output)
    if maps_dir is not None:
        from ..pipeline.attention_maps import generate_with_maps, save_overlays

        result, maps = generate_with_maps(pipe, prompt, negative_prompt=negative, watermark=not args.no_watermark,
                                          callback=progress, **kwargs)
        for i, (image, words) in enumerate(zip(result.images, maps)):
            save_overlays(image, words, Path(maps_dir) / f"{i:02d}" if len(maps) > 1 else Path(maps_dir))
    elif init is None:
        result = pipe.txt2img(prompt, negative, watermark=not args.no_watermark, callback=progress, **kwargs)
    else:
        result = method[args.command](prompt, init, negative, watermark=not args.no_watermark, callback=progress, **kwargs)
    for bar in bars:
        bar.close()
    for item, path in zip(result.items, batch_paths(output, len(result.items))):
        save_image(item.image, path, item.infotext)
        print(f"{path}  seed={item.seed}" + ("  flagged by the safety checker" if item.nsfw else ""))
    return 0


def _extras(args: argparse.Namespace) -> int:
    """``upscale --upscaler/--scale``: A1111's extras upscaling, the image's own infotext kept."""
    from ..api import load
    from ..pipeline.images import save_image
    from ..pipeline.params import ParamError
    from ..pipeline.resize import upscale_image, upscaled_size

    output = Path(args.output)
    if not output.parent.is_dir():
        raise SfumatoError(f"--output: folder {output.parent} does not exist")
    image = _open_image(args.image, "--image")
    scale = args.scale if args.scale is not None else 4.0
    try:
        upscaled_size(image, scale)
    except ParamError as e:
        raise SfumatoError(f"--scale: {e.message}") from None
    how = args.upscaler or load(args.model or _no_model(), dtype=args.dtype, device=args.device)
    out = upscale_image(image, how, scale, watermark=not args.no_watermark)
    text = image.info.get("parameters")
    save_image(out, output, text if isinstance(text, str) else None)
    print(f"{output}  {out.width}x{out.height}")
    return 0


def _no_model():
    raise SfumatoError("--model: the x4 upscaler model to use (or --upscaler lanczos|nearest)")


def _xyz_axes(args: argparse.Namespace) -> tuple | None:
    """The --xyz-* flags as plot axes (None: no plot); checked before any model loads."""
    from ..pipeline import grid

    given = {k: getattr(args, f"xyz_{k}", None) for k in "xyz"}
    if not any(given.values()):
        if getattr(args, "xyz_cells", False):
            raise SfumatoError("--xyz-cells: given without --xyz-x")
        return None
    if not given["x"]:
        raise SfumatoError("--xyz-y/--xyz-z: need --xyz-x")
    if getattr(args, "attention_maps", None):
        raise SfumatoError("--attention-maps: not with an X/Y/Z plot")
    axes = []
    for k, text in given.items():
        if not text:
            axes.append(grid.NOTHING)
            continue
        name, sep, values = text.partition("=")
        if not sep:
            raise SfumatoError(f"--xyz-{k}: expected AXIS=VALUES, got {text!r}")
        axes.append(grid.axis(name, values, f"--xyz-{k}"))
    return tuple(axes)


def _plot(pipe, axes: tuple, args: argparse.Namespace, settings: dict, progress, output: Path) -> int:
    from ..pipeline import grid
    from ..pipeline.images import save_image

    settings = {k: v for k, v in settings.items() if v is not None or k != "init_image"}
    result = grid.plot(pipe, *axes, run=lambda p: pipe.run(p, progress, not args.no_watermark).items[0], **settings)
    save_image(result.grid, output, result.infotext)
    print(f"{output}  grid of {len(result.cells)} cells")
    if args.xyz_cells:
        for i, item in enumerate(result.cells):
            path = output.with_name(f"{output.stem}-cell-{i:02d}{output.suffix}")
            save_image(item.image, path, item.infotext)
            print(f"{path}  seed={item.seed}")
    return 0


def _memory_mode(args, model: str | Path, prompt: str, loras: list) -> str:
    """``--memory`` (``--low-memory`` is "low") with auto resolved: by-stage where the weights can stay in
    .safetensors files and no LoRA has to be merged into them. A command runs once, so keeping a model
    in memory after its stage saves nothing."""
    if args.low_memory:
        if args.memory not in ("auto", "low"):
            raise SfumatoError(f"--low-memory contradicts --memory {args.memory}")
        return "low"
    if args.memory != "auto":
        return args.memory
    if args.compile or args.quant == "int8" or args.backend != "torch":
        return "keep"
    from ..adapters.lora import parse_lora_prompt
    from ..checkpoint.io import sniff_format

    files = [Path(model), *(Path(f) for f in (args.refiner, args.hires_checkpoint) if f)]
    single = all(f.is_file() and sniff_format(f) == "safetensors" for f in files)
    mode = "by-stage" if single and not loras and not parse_lora_prompt(prompt)[1] else "keep"
    logging.getLogger(__name__).info("--memory auto: %s", mode)
    return mode


def _dry_validate(command: str, settings: dict, extra: dict) -> None:
    from ..pipeline.masks import check_outpaint
    from ..pipeline.params import GenerationParams

    s = {**settings}
    if "width" not in s or "height" not in s:   # the model's size, known after loading: checked then
        scale = s.get("hires_scale", 1)
        s.update(width=s.get("width", 8), height=s.get("height", 8),
                 hires_scale=1 if isinstance(scale, (int, float)) and 1 <= scale <= 8 else scale)
    for name in ("unclip_images", "unclip_noise_level"):
        if name in extra:
            s[name] = extra[name]
    if "init_image" in extra:
        s["init_image"] = extra["init_image"]
        if "mask" in extra:
            s["mask"] = extra["mask"]
    if command == "outpaint":
        check_outpaint(*(extra[side] for side in ("left", "right", "up", "down")))
    GenerationParams(**s).validated()
