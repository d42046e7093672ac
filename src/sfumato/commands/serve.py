"""``sfumato serve``: argparse wiring for the HTTP server (``add_commands(subparsers)``)."""

from __future__ import annotations

import argparse
import ipaddress
import logging
from pathlib import Path

from ..errors import SfumatoError

log = logging.getLogger(__name__)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="serve the A1111-compatible API, the job API and the web UI")
    p.add_argument("--host", help="address to bind (default 127.0.0.1; 0.0.0.0 with --listen)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--model", help="checkpoint to load first: a path, or a name inside --models-dir "
                                   "(default: the bundled model)")
    p.add_argument("--models-dir", help="folder of checkpoints that clients may switch to by name; "
                                        "its VAE/, Lora/, embeddings/, hypernetworks/, ControlNet/, clip_vision/ and "
                                        "upscalers/ subfolders "
                                        "hold those, its styles.csv A1111's prompt styles")
    p.add_argument("--outputs-dir", help="keep every image made through the job API (the web UI) here, as PNGs "
                                         "with their parameters, browsable in the web UI's history (default: none kept)")
    p.add_argument("--safety-checker", metavar="PATH",
                   help="check every image with the SD safety checker (its folder or weights file); flagged "
                        "images are hidden and reported (nsfw in the responses)")
    p.add_argument("--safety-action", choices=("black", "blur"), default="black",
                   help="what a flagged image becomes (default black)")
    p.add_argument("--listen", action="store_true", help="accept connections from other machines")
    p.add_argument("--api-auth", metavar="USER:PASS", help="require HTTP Basic auth on every route")
    p.add_argument("--allowed-hosts", metavar="NAMES",
                   help="with --listen: the Host names answered, comma-separated ('*': any). Default without "
                        "--api-auth: this machine's names and addresses (no DNS rebinding); with it: any")
    p.add_argument("--max-queue", type=int, default=16, help="jobs that may wait; more get 429")
    p.add_argument("--device", default="auto", help="auto (CUDA when present, else MPS, else the CPU), cpu, cuda, "
                                                    "cuda:N or mps")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "fp16", "bf16"))
    p.add_argument("--backend", choices=("torch", "openvino"), default="torch",
                   help="openvino: every model's UNet and VAE decoder converted to OpenVINO (cached on disk)")
    p.add_argument("--backend-precision", choices=("f32", "bf16", "f16", "int8"), default="f32")
    p.add_argument("--quant", choices=("none", "int8"), default="none",
                   help="int8: every model's UNet in 8-bit (prompt LoRA tags are then refused)")
    p.add_argument("--no-watermark", action="store_true", help="do not add the invisible watermark")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from ..api import resolve_device
    from ..server.app import ServerConfig, create_app
    from ..server.security import parse_credentials

    device = resolve_device(args.device)
    host = args.host or ("0.0.0.0" if args.listen else "127.0.0.1")
    if not args.listen and not _is_loopback(host):
        raise SfumatoError(f"--host: {host} is not a loopback address; add --listen to serve other machines")
    if not 1 <= args.port <= 65535:
        raise SfumatoError(f"--port: must be in [1, 65535], got {args.port}")
    if args.max_queue < 1:
        raise SfumatoError(f"--max-queue: must be at least 1, got {args.max_queue}")
    try:
        credentials = parse_credentials(args.api_auth) if args.api_auth else None
    except ValueError as e:
        raise SfumatoError(str(e)) from None
    models_dir = Path(args.models_dir) if args.models_dir else None
    if models_dir is not None and not models_dir.is_dir():
        raise SfumatoError(f"--models-dir: {models_dir} is not a folder")
    model = _model_path(args.model, models_dir) if args.model else None
    outputs_dir = Path(args.outputs_dir) if args.outputs_dir else None
    if outputs_dir is not None and outputs_dir.exists() and not outputs_dir.is_dir():
        raise SfumatoError(f"--outputs-dir: {outputs_dir} is not a folder")
    allowed = tuple(h.strip() for h in args.allowed_hosts.split(",") if h.strip()) if args.allowed_hosts else None
    if allowed is not None and not args.listen:
        raise SfumatoError("--allowed-hosts: only with --listen (a loopback server answers loopback names only)")
    if args.listen and credentials is None:
        log.warning("serving other machines without --api-auth: anyone who can reach port %d can use it%s",
                    args.port, "" if allowed == ("*",) else
                    " (only under this machine's names: --allowed-hosts adds others)" if allowed is None else "")
    config = ServerConfig(model=model, models_dir=models_dir, listen=args.listen, api_auth=credentials,
                          max_queue=args.max_queue, watermark=not args.no_watermark, device=device,
                          dtype=args.dtype, backend=args.backend, backend_precision=args.backend_precision,
                          quant=args.quant,
                          allowed_hosts=allowed, host=host,
                          outputs_dir=outputs_dir,
                          safety_checker=Path(args.safety_checker) if args.safety_checker else None,
                          safety_action=args.safety_action)
    app = create_app(config)
    uvicorn.run(app, host=host, port=args.port, log_level="info", proxy_headers=False, server_header=False)
    return 0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _model_path(model: str, models_dir: Path | None) -> Path:
    """``--model``: an existing path, else a name inside ``--models-dir``."""
    from ..data import BUNDLED_PATH
    from ..server.security import ApiError, Catalog

    if Path(model).exists():
        return Path(model)
    if models_dir is None:
        raise SfumatoError(f"--model: {model} not found")
    try:
        return Catalog(BUNDLED_PATH, models_dir).find("checkpoint", model, "--model").path
    except ApiError as e:
        raise SfumatoError(e.body()["detail"]) from None

