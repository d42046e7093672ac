"""The ``sfumato`` command line. Thin: builds a request, calls the library, writes files."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .errors import SfumatoError


def _add_txt2img(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("txt2img", help="generate images from a prompt")
    p.add_argument("prompt")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--model", help="checkpoint file (.safetensors/.ckpt/…) or diffusers folder")
    p.add_argument("--vae", help="a VAE file to use instead of the checkpoint's")
    p.add_argument("--prediction", choices=("eps", "v"), help="override the prediction type (SD 2.x)")
    p.add_argument("--sampler", default="euler")
    p.add_argument("--scheduler", default="normal")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg-scale", type=float, default=7.0)
    p.add_argument("--seed", type=int, default=-1, help="-1 picks a random seed (reported)")
    p.add_argument("--width", type=int, help="default: the model's native size")
    p.add_argument("--height", type=int, help="default: the model's native size")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "fp16", "bf16"))
    p.add_argument(
        "--no-watermark", action="store_true",
        help="accepted for compatibility; this version does not add the invisible watermark yet",
    )
    p.add_argument("-o", "--output", default="output.png", help="PNG path; a batch writes NAME-0.png, NAME-1.png, …")


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="describe a checkpoint: family, prediction type, components, hash")
    p.add_argument("model")
    p.add_argument("--prediction", choices=("eps", "v"))
    p.add_argument("--json", action="store_true", help="print JSON")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sfumato", description="Stable Diffusion in PyTorch.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_txt2img(sub)
    _add_info(sub)
    return parser


def cmd_txt2img(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .api import load
    from .pipeline.images import batch_paths, save_png
    from .pipeline.params import GenerationParams

    if args.model is None:
        raise SfumatoError("--model: no model given (a checkpoint file or a diffusers folder)")
    output = Path(args.output)
    if not output.parent.is_dir():
        raise SfumatoError(f"--output: folder {output.parent} does not exist")
    # validate the request before loading anything
    p = GenerationParams(
        args.prompt, args.negative_prompt, args.steps, args.cfg_scale, args.sampler, args.scheduler,
        args.seed, args.width or 8, args.height or 8, args.batch_size,
    ).validated()
    pipe = load(args.model, vae=args.vae, prediction=args.prediction, dtype=args.dtype)
    p.width = args.width or pipe.model.spec.resolution
    p.height = args.height or pipe.model.spec.resolution
    bar = tqdm(total=p.steps, desc="sampling", unit="step", file=sys.stderr)
    result = pipe.run(p, callback=lambda rec: bar.update(1))
    bar.close()
    for item, path in zip(result.items, batch_paths(output, len(result.items))):
        save_png(item.image, path, item.infotext)
        print(f"{path}  seed={item.seed}")
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
            print(f"{key:>16}: {value}")
    return 0


COMMANDS = {"txt2img": cmd_txt2img, "info": cmd_info}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except SfumatoError as e:
        print(f"sfumato: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
