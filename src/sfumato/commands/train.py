"""``sfumato train vae|clip|unet|shapes`` and ``sfumato eval shapes``: the bundled model's recipe and
its evaluation (under ``torchrun``: ``torchrun --nproc_per_node N -m sfumato train shapes --out DIR``)."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from ..errors import SfumatoError

STAGES = ("vae", "clip", "unet", "shapes")


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser("train", help="train the bundled model's recipe on the shapes world")
    stages = train.add_subparsers(dest="stage", required=True)
    for stage in STAGES:
        what = "all stages, then export" if stage == "shapes" else f"the {stage} stage"
        p = stages.add_parser(stage, help=what)
        p.add_argument("--out", default="out/shapes", help="run folder (checkpoints, logs, stage weights)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--steps", type=int, help="override this stage's steps (all stages for 'shapes': no)")
        p.add_argument("--threads", type=int, default=2, help="torch CPU threads per process")
        if stage == "shapes":
            p.add_argument("--export", help="single-file output (default: OUT/bundled.safetensors)")
        p.set_defaults(func=cmd_train)
    p = stages.add_parser("unclip", help="the bundled model's image-conditioned (Stable unCLIP) variant: image "
                                         "encoder, then the UNet's image conditioning; exports an overlay file")
    p.add_argument("--out", default="out/unclip", help="run folder (checkpoints, logs, stage weights)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, help="override the UNet stage's steps")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--export", help="output (default: OUT/bundled-unclip.safetensors); it names bundled.safetensors, "
                                    "which must lie in the same folder, as its base")
    p.set_defaults(func=cmd_train_unclip)
    p = stages.add_parser("sam", help="a small Segment Anything on the shapes world (a demonstration; not shipped)")
    p.add_argument("--out", default="out/sam", help="run folder (checkpoints, logs, the weights)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, help="override the steps")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.set_defaults(func=cmd_train_sam)
    p = stages.add_parser("annotator", help="a ControlNet annotator's published architecture on the shapes world "
                                            "(a demonstration; not shipped)")
    p.add_argument("--kind", required=True, choices=("hed", "lineart", "midas"))
    p.add_argument("--out", default="out/annotators", help="folder of the weights (published names), with a run "
                                                          "folder per kind (checkpoints, logs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, help="override the steps")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.set_defaults(func=cmd_train_annotator)
    p = stages.add_parser("motion", help="a motion module for the bundled model (AnimateDiff) on shapes-world clips")
    p.add_argument("--out", default="out/motion", help="run folder (checkpoints, logs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, help="override the steps")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--export", help="output (default: OUT/bundled-motion.safetensors)")
    p.add_argument("--init", metavar="FILE", help="start from this motion module (e.g. the bundled one)")
    p.add_argument("--text-rank", type=int, default=4,
                   help="rank of the text key/value deltas that let the motion words steer the clip (0: none)")
    p.set_defaults(func=cmd_train_motion)
    from .personalize import add_commands as add_personalize_commands

    add_personalize_commands(stages)

    ev = subparsers.add_parser("eval", help="evaluate a model")
    kinds = ev.add_subparsers(dest="kind", required=True)
    p = kinds.add_parser("shapes", help="prompt accuracy on the shapes world (EVAL_PROMPTS, fixed seeds)")
    p.add_argument("--model", help="model file (default: the bundled model)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg-scale", type=float, default=7.0)
    p.add_argument("--seed", type=int, default=0, help="prompt k uses seed + k")
    p.add_argument("--json", help="write the full report to this JSON file")
    p.add_argument("--no-guidance", action="store_true",
                   help="skip the guidance rows (CFG 1, img2img colour change, inpainting)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: bf16 weights and bf16 arithmetic in the UNet and VAE (forced, whatever the CPU)")
    p.add_argument("--quant", choices=("none", "int8"), default="none", help="int8: the 8-bit UNet (models.quant)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N or mps")
    p.set_defaults(func=cmd_eval)
    p = kinds.add_parser("variations", help="the bundled unCLIP variant: variations keep the scene, mixing keeps both")
    p.add_argument("--model", help="unCLIP model file (default: the bundled variant)")
    p.add_argument("-n", type=int, default=32, help="scenes (and mixing pairs)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg-scale", type=float, default=7.0)
    p.add_argument("--noise-level", type=int, default=0)
    p.add_argument("--seed", type=int, default=0, help="case k uses seed + k")
    p.add_argument("--sheet", help="also write a contact sheet (inputs, variations, mixes) to this PNG")
    p.add_argument("--json", help="write the report to this JSON file")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_eval_variations)
    p = kinds.add_parser("motion", help="a motion module on held-out shapes-world clips: object and motion right")
    p.add_argument("--model", help="motion module (default: the bundled one)")
    p.add_argument("-n", type=int, default=32)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0, help="clip k uses seed + k")
    p.add_argument("--sheet", help="also write the first eight clips' frames to this PNG")
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(func=cmd_eval_motion)
    p = kinds.add_parser("sam", help="a shapes-world SAM: IoU of one click on held-out scenes")
    p.add_argument("--model", required=True, help="the SAM file (sfumato train sam writes OUT/sam_shapes.safetensors)")
    p.add_argument("-n", type=int, default=100)
    p.add_argument("--sheet", help="also write an Inpaint Anything demonstration on the bundled model to this PNG")
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(func=cmd_eval_sam)
    p = kinds.add_parser("annotators", help="shapes-world annotators: edge F1 (HED, line art), depth correlation "
                                            "(MiDaS) on unseen scenes")
    for kind, name in (("hed", "ControlNetHED"), ("lineart", "sk_model"), ("midas", "dpt_hybrid-midas-501f0c75")):
        p.add_argument(f"--{kind}", metavar="FILE", help=f"the {kind} file (sfumato train annotator writes "
                                                         f"OUT/{name}.safetensors)")
    p.add_argument("-n", type=int, default=100)
    p.add_argument("--sheet", help="also write the preprocessors on the bundled model's images to this PNG")
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(func=cmd_eval_annotators)


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from ..train.recipes import Recipe, train_all, train_clip, train_unet, train_vae

    torch.set_num_threads(args.threads)
    recipe = Recipe(seed=args.seed)
    if args.steps is not None and args.stage != "shapes":
        recipe = replace(recipe, **{args.stage: replace(getattr(recipe, args.stage), steps=args.steps)})
    out = Path(args.out)
    if args.stage == "shapes":
        print(train_all(recipe, out, args.export))
    elif args.stage == "vae":
        train_vae(recipe, out)
    elif args.stage == "clip":
        train_clip(recipe, out)
    else:
        train_unet(recipe, out, train_vae(recipe, out), train_clip(recipe, out))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from ..train.bundled import BUNDLED_PATH, evaluate_model, format_report

    torch.set_num_threads(args.threads)
    report = evaluate_model(args.model or BUNDLED_PATH, steps=args.steps, cfg_scale=args.cfg_scale, seed=args.seed,
                            guidance=not args.no_guidance, dtype=args.dtype, device=args.device, quant=args.quant)
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def cmd_train_motion(args: argparse.Namespace) -> int:
    import torch

    from ..train.motion import MotionRecipe, train_motion

    torch.set_num_threads(args.threads)
    recipe = MotionRecipe(seed=args.seed, init=args.init, text_rank=args.text_rank)
    if args.steps is not None:
        recipe = replace(recipe, loop=replace(recipe.loop, steps=args.steps,
                                              decay_start=min(recipe.loop.decay_start, args.steps)))
    print(train_motion(recipe, Path(args.out), args.export))
    return 0


def cmd_eval_motion(args: argparse.Namespace) -> int:
    import torch

    from ..data import BUNDLED_MOTION_PATH
    from ..train.motion import evaluate_motion

    torch.set_num_threads(args.threads)
    report = evaluate_motion(args.model or BUNDLED_MOTION_PATH, n=args.n, frames=args.frames, steps=args.steps,
                             seed=args.seed, save=args.sheet)
    print(f"{report['n']} held-out clips of {report['frames']} frames: object right in "
          f"{100 * report['object_right']:.1f}% of frames, moving as stated in {100 * report['moves_as_stated']:.1f}%")
    return 0


def cmd_train_unclip(args: argparse.Namespace) -> int:
    import torch

    from ..train.unclip import UnCLIPRecipe, train_unclip

    torch.set_num_threads(args.threads)
    recipe = UnCLIPRecipe(seed=args.seed)
    if args.steps is not None:
        recipe = replace(recipe, unet=replace(recipe.unet, steps=args.steps))
    print(train_unclip(recipe, Path(args.out), args.export))
    return 0


def cmd_eval_variations(args: argparse.Namespace) -> int:
    import torch

    from ..data import BUNDLED_UNCLIP_PATH
    from ..train.eval_unclip import evaluate_variations, format_variations

    torch.set_num_threads(args.threads)
    report = evaluate_variations(args.model or BUNDLED_UNCLIP_PATH, n=args.n, steps=args.steps,
                                 cfg_scale=args.cfg_scale, seed=args.seed, noise_level=args.noise_level,
                                 device=args.device, save=args.sheet)
    print(format_variations(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def cmd_train_sam(args: argparse.Namespace) -> int:
    import torch

    from ..train.sam import SamRecipe, train_sam

    torch.set_num_threads(args.threads)
    recipe = SamRecipe(seed=args.seed)
    if args.steps is not None:
        recipe = replace(recipe, loop=replace(recipe.loop, steps=args.steps))
    print(train_sam(recipe, Path(args.out)))
    return 0


def cmd_eval_sam(args: argparse.Namespace) -> int:
    import torch

    from ..train.sam import demo_sheet, evaluate_sam

    torch.set_num_threads(args.threads)
    report = evaluate_sam(args.model, n=args.n)
    print(f"{report['n']} held-out scenes, one click: mean IoU {report['mean_iou']:.4f}, "
          f"IoU ≥ 0.9 in {100 * report['iou_at_least_0.9']:.1f}%")
    if args.sheet:
        demo_sheet(args.model, args.sheet)
    return 0


def cmd_train_annotator(args: argparse.Namespace) -> int:
    import torch

    from ..train.annotators import AnnotatorRecipe, train_annotator

    torch.set_num_threads(args.threads)
    recipe = AnnotatorRecipe(kind=args.kind, seed=args.seed)
    if args.steps is not None:
        loop = recipe.loop_config()
        recipe = replace(recipe, loop=replace(loop, steps=args.steps, decay_start=min(loop.decay_start, args.steps),
                                              checkpoint_every=min(loop.checkpoint_every, args.steps)))
    print(train_annotator(recipe, Path(args.out)))
    return 0


def cmd_eval_annotators(args: argparse.Namespace) -> int:
    import torch

    from ..train.annotators import demo_sheet, evaluate_annotators

    torch.set_num_threads(args.threads)
    files = {kind: getattr(args, kind) for kind in ("hed", "lineart", "midas") if getattr(args, kind)}
    if not files:
        raise SfumatoError("give at least one of --hed, --lineart, --midas")
    for kind, scores in evaluate_annotators(files, n=args.n).items():
        print(f"{kind}: {scores['n']} unseen scenes, " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()
                                                                      if k != "n"))
    if args.sheet:
        demo_sheet(files, args.sheet)
    return 0
