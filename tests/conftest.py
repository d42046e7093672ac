"""Shared fixtures: tiny random models in the original single-file layout (configuration carried in
the file's metadata), built from sfumato's own modules — for tests of plumbing, not of numerics."""

from __future__ import annotations

import contextlib

import pytest
import torch

from sfumato.checkpoint.io import save_file
from sfumato.checkpoint.specs import SPEC_METADATA_KEY, UNET_PREFIX, VAE_PREFIX, ModelSpec, TextSlot, spec_to_json
from sfumato.models.clip import TextEncoderConfig, build_text_encoder
from sfumato.models.unet import UNetConfig, UNetModel
from sfumato.models.vae import AutoencoderKL, VAEConfig

TINY_SPEC = ModelSpec(
    "custom",
    UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(1, 0),
               num_heads=2, context_dim=32),
    VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1),
    (TextSlot("cond_stage_model.transformer.", TextEncoderConfig("hf", 32, 2, 2)),),
    resolution=64,
)


def write_tiny_model(path, spec: ModelSpec = TINY_SPEC, seed: int = 0):
    torch.manual_seed(seed)
    sd = {}
    parts = [(UNET_PREFIX, UNetModel(spec.unet)), (VAE_PREFIX, AutoencoderKL(spec.vae))]
    parts += [(slot.prefix, build_text_encoder(slot.config)) for slot in spec.text]
    for prefix, module in parts:
        with torch.no_grad():
            for p in module.parameters():  # default inits leave some outputs at zero: shake them up
                p.add_(torch.randn_like(p) * 0.05)
        sd.update({prefix + k: v.contiguous() for k, v in module.state_dict().items()})
    save_file(sd, path, {SPEC_METADATA_KEY: spec_to_json(spec)})
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny.safetensors")


@contextlib.contextmanager
def live_server(app):
    """Serve an ASGI ``app`` with uvicorn on a free loopback port in a background thread; yields the port."""
    import socket
    import threading
    import time

    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
