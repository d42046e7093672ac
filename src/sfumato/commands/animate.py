"""``sfumato animate``: an AnimateDiff clip (GIF, WebP or MP4) from a prompt, with a motion module."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import SfumatoError
from .generate import add_few_step, add_quant, note_few_step
from .units import add_control, control_specs


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("animate", help="a short clip from a prompt (AnimateDiff motion module)")
    p.add_argument("prompt", help="the prompt; lines 'N: text' are keyframes (prompt travel)")
    p.add_argument("--negative-prompt", "-n", default="")
    p.add_argument("--model", help="checkpoint file or diffusers folder (default: the bundled model)")
    p.add_argument("--motion-module", metavar="FILE",
                   help="mm_sd_v15_v2.ckpt, v3_sd15_mm.ckpt, … (.ckpt through the allow-list, .safetensors) or a "
                        "diffusers MotionAdapter folder (default: the bundled model's own)")
    p.add_argument("--frames", type=int, default=16, help="frames of the clip (default 16)")
    p.add_argument("--fps", type=int, default=8, help="frames per second of the file (default 8)")
    p.add_argument("--context", type=int, help="frames per context window (default 16, at most the module's)")
    p.add_argument("--overlap", type=int, default=-1, help="frames neighbouring windows share (-1: a quarter)")
    p.add_argument("--stride", type=int, default=1, help="the A1111 extension's context stride")
    p.add_argument("--closed-loop", action="store_true", help="the last frame leads back to the first")
    p.add_argument("--init-image", help="start every frame from this image (img2img; --strength)")
    p.add_argument("--strength", type=float, default=0.75)
    p.add_argument("--steps", type=int, help="default 20 (a few-step preset's own)")
    p.add_argument("--cfg-scale", type=float, help="default 7 (a few-step preset's own)")
    p.add_argument("--sampler", help="default Euler a (a few-step preset's own)")
    p.add_argument("--scheduler")
    p.add_argument("--seed", type=int, default=-1, help="-1 picks a random seed (reported); frame f uses seed + f")
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "fp16", "bf16"))
    p.add_argument("--no-watermark", action="store_true")
    p.add_argument("--lora-dir", help="folder searched for <lora:name:weight> tags in the prompt")
    add_few_step(p)
    add_quant(p)
    p.add_argument("-o", "--output", default="output.gif", help=".gif, .webp or .mp4 (PyAV)")
    add_control(p)
    p.set_defaults(func=cmd_animate)


def cmd_animate(args: argparse.Namespace) -> int:
    from ..api import load
    from ..safe_image import open_image

    out = Path(args.output)
    if not out.parent.is_dir():
        raise SfumatoError(f"--output: folder {out.parent} does not exist")
    if out.suffix.lower() not in (".gif", ".webp", ".mp4"):
        raise SfumatoError(f"output: an animation is written as .gif, .webp or .mp4, got {out.name}")
    if args.motion_module is not None and not Path(args.motion_module).exists():
        raise SfumatoError(f"motion_module: not found: {args.motion_module}")
    settings = dict(seed=args.seed)
    for name in ("width", "height", "steps", "cfg_scale", "sampler", "scheduler"):
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    if args.init_image:
        settings.update(init_image=open_image(args.init_image, "--init-image"), strength=args.strength)
    from ..pipeline.animate import MAX_FRAMES

    if not 1 <= args.frames <= MAX_FRAMES:   # checked before any model loads
        raise SfumatoError(f"frames: must be 1 to {MAX_FRAMES}, got {args.frames}")
    if not 1 <= args.fps <= 60:
        raise SfumatoError(f"fps: must be 1 to 60, got {args.fps}")
    control = control_specs(args, frames=True)   # every unit's image (or folder of frames) read before loading
    if control:
        settings["control"] = control
    pipe = load(args.model, dtype=args.dtype, device=args.device, lora_dir=args.lora_dir, few_step=args.few_step,
                quant=args.quant, backend=args.backend, backend_precision=args.backend_precision)
    note_few_step(pipe, settings, args.prompt)
    if pipe.few_step_for(args.prompt) is None:   # the clip's own default (the library's is a still's: Euler)
        settings.setdefault("sampler", "Euler a")
    result = pipe.animate(args.prompt, args.negative_prompt, motion_module=args.motion_module, frames=args.frames,
                          fps=args.fps, context=args.context, overlap=args.overlap, stride=args.stride,
                          closed_loop=args.closed_loop, watermark=not args.no_watermark, **settings)
    result.save(out)
    print(f"{out}  {len(result.frames)} frames at {args.fps} fps, seed {result.params.seed}")
    return 0
