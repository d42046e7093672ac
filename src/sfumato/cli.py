"""The ``sfumato`` command line. Thin: builds a request, calls the library, writes files.

Every error the user can cause is a one-line message and exit status 2; nothing is written
unless the whole job succeeded up to that image.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .errors import SfumatoError

# generation flags → GenerationParams fields (defaults live in GenerationParams; None = not given)
_GEN_FLAGS = {
    "negative_prompt": str, "sampler": str, "scheduler": str, "steps": int, "cfg_scale": float, "seed": int,
    "width": int, "height": int, "batch_size": int, "clip_skip": int, "subseed": int, "subseed_strength": float,
    "rng": str, "guidance_rescale": float, "strength": float, "mask_blur": int, "only_masked_padding": int,
    "masked_content": str, "hires_scale": float, "hires_steps": int, "hires_denoise": float, "hires_upscaler": str,
    "refiner_switch": float,
}


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="?", help="the prompt (may come from --from-png instead)")
    p.add_argument("--model", help="checkpoint file (.safetensors/.ckpt/…) or diffusers folder")
    p.add_argument("--vae", help="a VAE file to use instead of the checkpoint's")
    p.add_argument("--prediction", choices=("eps", "v"), help="override the prediction type (SD 2.x)")
    p.add_argument("--refiner", help="an SDXL refiner checkpoint to hand the last steps to")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:WEIGHT]",
                   help="merge a LoRA file into the model (repeatable; weight default 1.0)")
    p.add_argument("--lora-dir", help="folder searched for <lora:name:weight> tags in the prompt")
    p.add_argument("--embeddings", metavar="DIR", help="textual inversion embeddings, used by file name in prompts")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "fp16", "bf16"))
    p.add_argument("--from-png", metavar="FILE", help="take the settings from an image's infotext")
    p.add_argument("--no-watermark", action="store_true", help="do not add the invisible watermark")
    p.add_argument("-o", "--output", default="output.png",
                   help="image path (.png, .jpg, .webp); a batch writes NAME-0.png, NAME-1.png, …")
    for name, kind in _GEN_FLAGS.items():
        flag = "--" + name.replace("_", "-")
        p.add_argument(flag, type=kind, default=None, help=_HELP.get(name))


_HELP = {
    "sampler": "euler, euler_a, heun, dpmpp_2m, … or an A1111 name such as 'DPM++ 2M Karras'",
    "scheduler": "normal (A1111 'Automatic'), karras, exponential, sgm_uniform, simple",
    "seed": "-1 picks a random seed (reported)",
    "width": "default: the model's native size (img2img: the init image's)",
    "rng": "cpu (default) or nv (A1111's CPU imitation of CUDA's generator)",
    "strength": "img2img denoising strength in [0, 1]",
    "masked_content": "fill, original, 'latent noise' or 'latent nothing'",
    "hires_scale": "hires fix: upscale factor of a second pass (txt2img)",
    "hires_upscaler": "latent or lanczos",
    "refiner_switch": "fraction of the steps after which the refiner takes over",
}


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors as one line (and exit status 2, as argparse has it)."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sfumato", description="Stable Diffusion in PyTorch.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("txt2img", help="generate images from a prompt")
    _add_common(p)
    p.add_argument("--attention-maps", metavar="DIR",
                   help="also write a heat map per prompt word (cross-attention, DAAM) as overlays into DIR")
    p = sub.add_parser("img2img", help="transform an image under a prompt")
    _add_common(p)
    p.add_argument("--init-image", required=True)
    p = sub.add_parser("inpaint", help="repaint the masked part of an image")
    _add_common(p)
    p.add_argument("--init-image", required=True)
    p.add_argument("--mask", required=True, help="white = repaint")
    p.add_argument("--only-masked", action="store_true", help="work on the masked area at full resolution")
    p = sub.add_parser("outpaint", help="extend an image beyond its borders")
    _add_common(p)
    p.add_argument("--init-image", required=True)
    for side in ("left", "right", "up", "down"):
        p.add_argument(f"--{side}", type=int, default=0, help=f"pixels to add on the {side} (multiple of 8)")
    p = sub.add_parser("png-info", help="print the generation parameters stored in an image")
    p.add_argument("file")
    p = sub.add_parser("info", help="describe a checkpoint: family, prediction type, components, hash")
    p.add_argument("model")
    p.add_argument("--prediction", choices=("eps", "v"))
    p.add_argument("--json", action="store_true", help="print JSON")
    from .batch_cli import add_commands as add_batch_commands
    from .merge_cli import add_commands as add_merge_commands
    from .server.cli import add_commands as add_server_commands
    from .train.cli import add_commands

    add_commands(sub)
    add_batch_commands(sub)
    add_server_commands(sub)
    add_merge_commands(sub)
    return parser


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


def _open_image(path: str, field: str):
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(path)
        image.load()
        return image
    except (OSError, UnidentifiedImageError) as e:
        raise SfumatoError(f"{field}: cannot read image {path}: {e}") from None


def cmd_generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .api import load
    from .pipeline.images import batch_paths, save_image
    from .pipeline.infotext import params_from_infotext, read_image_parameters

    settings: dict = {}
    if args.from_png:
        text = read_image_parameters(args.from_png)
        if text is None:
            raise SfumatoError(f"--from-png: {args.from_png} carries no generation parameters")
        settings.update(params_from_infotext(text))
    settings.update({k: getattr(args, k) for k in _GEN_FLAGS if getattr(args, k) is not None})
    if args.prompt is not None:
        settings["prompt"] = args.prompt
    if "prompt" not in settings:
        raise SfumatoError("prompt: no prompt given")
    output = Path(args.output)
    if not output.parent.is_dir():
        raise SfumatoError(f"--output: folder {output.parent} does not exist")
    if output.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise SfumatoError(f"--output: unsupported image type {output.suffix!r} (use .png, .jpg or .webp)")
    from .train.bundled import BUNDLED_PATH

    model = args.model or BUNDLED_PATH

    extra: dict = {}
    if args.command in ("img2img", "inpaint", "outpaint"):
        extra["init_image"] = _open_image(args.init_image, "--init-image")
    if args.command == "inpaint":
        extra["mask"] = _open_image(args.mask, "--mask")
        extra["only_masked"] = args.only_masked
    if args.command == "outpaint":
        extra.update(left=args.left, right=args.right, up=args.up, down=args.down)
    settings.pop("refiner", None)

    # validate the request before loading any model: a throwaway copy with placeholder sizes
    _dry_validate(args.command, settings, extra)
    loras = [_lora_arg(text) for text in args.lora]
    pipe = load(model, vae=args.vae, prediction=args.prediction, dtype=args.dtype, refiner=args.refiner,
                loras=loras, lora_dir=args.lora_dir, embeddings_dir=args.embeddings)
    bar = tqdm(desc=args.command, unit="step", file=sys.stderr, leave=False)

    def progress(rec) -> None:
        if rec.index == 0:
            bar.reset(total=rec.total)
            bar.set_description(rec.stage)
        bar.update(1)

    method = {"txt2img": pipe.txt2img, "img2img": pipe.img2img, "inpaint": pipe.img2img, "outpaint": pipe.outpaint}
    prompt = settings.pop("prompt")
    negative = settings.pop("negative_prompt", "")
    kwargs = {**settings, **extra}
    init = kwargs.pop("init_image", None)
    maps_dir = getattr(args, "attention_maps", None)
    if maps_dir is not None:
        from .pipeline.attention_maps import generate_with_maps, save_overlays

        result, maps = generate_with_maps(pipe, prompt, negative_prompt=negative, watermark=not args.no_watermark,
                                          callback=progress, **kwargs)
        for i, (image, words) in enumerate(zip(result.images, maps)):
            save_overlays(image, words, Path(maps_dir) / f"{i:02d}" if len(maps) > 1 else Path(maps_dir))
    elif init is None:
        result = pipe.txt2img(prompt, negative, watermark=not args.no_watermark, callback=progress, **kwargs)
    else:
        result = method[args.command](prompt, init, negative, watermark=not args.no_watermark, callback=progress, **kwargs)
    bar.close()
    for item, path in zip(result.items, batch_paths(output, len(result.items))):
        save_image(item.image, path, item.infotext)
        print(f"{path}  seed={item.seed}")
    return 0


def _dry_validate(command: str, settings: dict, extra: dict) -> None:
    from .pipeline.params import GenerationParams

    s = {**settings}
    s.setdefault("width", 8)
    s.setdefault("height", 8)
    if "init_image" in extra:
        s["init_image"] = extra["init_image"]
        if "mask" in extra:
            s["mask"] = extra["mask"]
    for side in ("left", "right", "up", "down"):
        value = extra.get(side, 0)
        if value < 0 or value % 8:
            raise SfumatoError(f"{side}: must be a non-negative multiple of 8, got {value}")
    GenerationParams(**s).validated()


def cmd_png_info(args: argparse.Namespace) -> int:
    from .pipeline.infotext import read_image_parameters

    if not Path(args.file).is_file():
        raise SfumatoError(f"file: {args.file} not found")
    text = read_image_parameters(args.file)
    if text is None:
        raise SfumatoError(f"file: {args.file} carries no generation parameters")
    print(text)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .checkpoint.info import describe

    info = describe(args.model, prediction=args.prediction)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            if isinstance(value, dict):
                value = ", ".join(f"{k}: {v}" for k, v in value.items())
            print(f"{key:>17}: {value}")
    return 0


COMMANDS = {"txt2img": cmd_generate, "img2img": cmd_generate, "inpaint": cmd_generate, "outpaint": cmd_generate,
            "png-info": cmd_png_info, "info": cmd_info}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        if getattr(args, "func", None) is not None:
            return args.func(args) or 0
        return COMMANDS[args.command](args)
    except SfumatoError as e:
        print(f"sfumato: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
