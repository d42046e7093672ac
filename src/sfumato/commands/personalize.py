"""``sfumato train ti|lora|dreambooth|hypernetwork``: personalization trainers on a folder of images
(captions from ``NAME.txt`` next to each image, else ``--caption``); ``sfumato train demo METHOD``
trains one on the shapes world's demo concept with the bundled model and measures it."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

METHODS = {
    "lora": ("train a LoRA (kohya safetensors)", 400, 2e-3),
    "ti": ("train a textual inversion embedding (A1111 safetensors)", 400, 5e-3),
    "dreambooth": ("fine-tune the model with prior preservation (single-file checkpoint)", 300, 1e-4),
    "hypernetwork": ("train an A1111 hypernetwork (.pt)", 300, 1e-3),
}


def add_commands(train_subparsers: argparse._SubParsersAction) -> None:
    add_demo_command(train_subparsers)
    for method, (what, steps, lr) in METHODS.items():
        p = train_subparsers.add_parser(method, help=what)
        p.add_argument("--model", help="base model file or folder (default: the bundled model)")
        p.add_argument("--images", required=True, help="folder of training images (+ NAME.txt captions)")
        p.add_argument("--out", required=True, help="output file")
        p.add_argument("--caption", help="caption for images without a .txt file")
        p.add_argument("--steps", type=int, default=steps)
        p.add_argument("--lr", type=float, default=lr)
        p.add_argument("--batch-size", type=int, default=4)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--gradient-checkpointing", action="store_true", help="recompute UNet activations (less memory)")
        p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                       help="compute precision; auto: bf16 where the hardware has it natively")
        p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N or mps")
        p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
        if method == "lora":
            p.add_argument("--rank", type=int, default=4)
            p.add_argument("--alpha", type=float, default=4.0)
        if method in ("lora", "dreambooth"):
            p.add_argument("--train-text-encoder", action="store_true")
        if method == "ti":
            p.add_argument("--token", required=True, help="the embedding's name, as used in the captions")
            p.add_argument("--init-word", default="*", help="start the vectors from this word's token embedding")
            p.add_argument("--vectors", type=int, default=1, help="vectors per token")
        if method == "dreambooth":
            p.add_argument("--class-prompt", action="append", default=[],
                           help="prompt for prior-preservation images (repeatable; each used --class-images/N times)")
            p.add_argument("--class-images", type=int, default=16, help="prior-preservation images to generate")
            p.add_argument("--prior-weight", type=float, default=1.0)
        p.set_defaults(func=cmd_personalize, method=method)


def cmd_personalize(args: argparse.Namespace) -> int:
    import torch

    from ..api import load
    from ..errors import SfumatoError
    from ..train import personalize as P

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.steps < 1:
        raise SfumatoError(f"steps: must be ≥ 1, got {args.steps}")
    pipe = load(args.model, dtype="fp32", device=args.device)
    items = P.read_images(args.images, args.caption, pipe.model.spec.resolution)
    cfg = P.TrainConfig(steps=args.steps, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                        gradient_checkpointing=args.gradient_checkpointing,
                        bf16={"auto": None, "fp32": False, "bf16": True}[args.precision])
    if args.method == "lora":
        result = P.train_lora(pipe, items, args.out, rank=args.rank, alpha=args.alpha,
                              text_encoder=args.train_text_encoder, cfg=cfg)
    elif args.method == "ti":
        result = P.train_ti(pipe, items, args.out, token=args.token, init_word=args.init_word,
                            num_vectors=args.vectors, cfg=cfg)
    elif args.method == "dreambooth":
        if not args.class_prompt:
            raise SfumatoError("class-prompt: DreamBooth with prior preservation needs at least one class prompt")
        prompts = [args.class_prompt[k % len(args.class_prompt)] for k in range(args.class_images)]
        classes = P.class_images(pipe, prompts)
        result = P.train_dreambooth(pipe, items, args.out, class_items=classes, prior_weight=args.prior_weight,
                                    text_encoder=args.train_text_encoder, cfg=cfg)
    else:
        result = P.train_hypernetwork(pipe, items, args.out, cfg=cfg)
    print(json.dumps({"out": str(Path(result.path)), "seconds": round(result.seconds, 1),
                      "loss_first": result.losses[0], "loss_last": result.losses[-1]}))
    return 0


def add_demo_command(train_subparsers: argparse._SubParsersAction) -> None:
    p = train_subparsers.add_parser("demo", help="train a demo concept (a diamond) on the bundled model and "
                                                 "measure how often the trained model draws it")
    p.add_argument("method", choices=tuple(METHODS))
    p.add_argument("--out", default="out/personalize")
    p.add_argument("--steps", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-control", action="store_true", help="skip measuring the base model")
    p.add_argument("--concept", choices=("diamond", "teal", "pair"), default="diamond")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from ..train.diamond import demo

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    report = demo(args.method, Path(args.out) / f"{args.method}-{args.concept}", steps=args.steps, lr=args.lr,
                  control=not args.no_control, concept=args.concept)
    print(json.dumps(report, indent=2))
    return 0
