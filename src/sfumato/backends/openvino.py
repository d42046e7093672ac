"""The OpenVINO backend (optional: ``pip install 'sfumato[openvino]'``): sfumato's own UNet and VAE
decoder, exported with ``torch.export`` and converted by ``openvino.convert_model`` — no diffusers, no
downloads — then compiled for the CPU.

- One compiled model per input shape (batch rows, latent size, context length), converted on first use.
  Converted models are cached on disk (``~/.cache/sfumato/openvino`` or ``$SFUMATO_CACHE``), keyed by a
  digest of the weights, the shape, the precision, both libraries' versions, sfumato's version and the
  traced modules' source: a second run of the same model and size skips the export and conversion;
  OpenVINO's own compiled-blob cache sits beside them.
- ``precision``: "f32" (the default: images within ±2 levels of the torch path), or "bf16" / "f16"
  (OpenVINO's inference precision; bf16 is fast only where the CPU has it natively), or "int8":
  8-bit weights (NNCF's weight compression, when NNCF is installed).
- A call the compiled graph cannot serve runs on torch, and the reason is logged once: the UNet patched
  for the run (LoRA tags change weights in place, hooks: AnimateDiff, IP-Adapter, hypernetworks,
  attention maps; ToMe and DeepCache replace forwards), ControlNet residuals, a failed conversion.
  The text encoders stay on torch (0.1 s of a 20-step run).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import ParamError

log = logging.getLogger(__name__)
PRECISIONS = ("f32", "bf16", "f16", "int8")
MAX_COMPILED = 4   # compiled shapes kept in memory per model part (the disk cache keeps them all)


def available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def require() -> None:
    if not available():
        raise ParamError("backend", "the OpenVINO backend needs OpenVINO: pip install 'sfumato[openvino]'")


def cache_root() -> Path:
    base = os.environ.get("SFUMATO_CACHE")
    return Path(base) / "openvino" if base else Path.home() / ".cache" / "sfumato" / "openvino"


def weights_digest(module: nn.Module) -> str:
    """A digest of the module's parameters and buffers (names, dtypes, shapes, bytes)."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in list(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _patched(module: nn.Module) -> str | None:
    """Why ``module`` as it is now is not the module that was converted (None: it is)."""
    for name, m in module.named_modules():
        if m._forward_hooks or m._forward_pre_hooks:
            return f"hooks on {name or 'the UNet'} (AnimateDiff, IP-Adapter, hypernetworks, attention maps)"
        if "forward" in m.__dict__:
            return f"a replaced forward on {name or 'the UNet'} (ToMe, DeepCache)"
    return None


class _Compiled:
    """One module converted to OpenVINO and compiled per input shape."""

    def __init__(self, module: nn.Module, what: str, precision: str, cache: Path | None):
        import openvino as ov

        self.module, self.what, self.precision = module, what, precision
        self.core = ov.Core()
        self.cache = cache
        if cache is not None:
            cache.mkdir(parents=True, exist_ok=True)
            self.core.set_property({"CACHE_DIR": str(cache / "blobs")})
        self.digest = weights_digest(module)
        self.versions = self._versions()
        self.compiled: dict[tuple, object] = {}

    def _versions(self) -> tuple[tuple[int, int], ...]:
        """Each parameter's storage and version: a LoRA swaps in new tensors (and removing it puts the
        originals back), an in-place change bumps the version."""
        return tuple((p.data_ptr(), p._version) for p in self.module.parameters())

    def stale(self) -> str | None:
        if self._versions() != self.versions:
            return "its weights changed since they were converted (LoRA tags)"
        return _patched(self.module)

    def _config(self) -> dict:
        hint = {"f32": "f32", "bf16": "bf16", "f16": "f16", "int8": "f32"}[self.precision]
        return {"INFERENCE_PRECISION_HINT": hint}

    def __call__(self, fn_inputs: tuple[Tensor, ...], export_module: nn.Module) -> np.ndarray | str:
        """The output, or (a str) why this shape cannot be served: its export, conversion or
        compilation failed (remembered: the shape then runs on torch from here on)."""
        key = tuple((tuple(t.shape), str(t.dtype)) for t in fn_inputs)
        compiled = self.compiled.pop(key, None)
        if compiled is not None:
            self.compiled[key] = compiled   # most recently used last
        else:
            try:
                compiled = self._compile(key, fn_inputs, export_module)
            except Exception as e:   # noqa: BLE001 — any failure of torch.export / OpenVINO: run on torch
                compiled = f"its conversion failed for {key}: {type(e).__name__}: {str(e)[:200]}"
            self.compiled[key] = compiled
            while len(self.compiled) > MAX_COMPILED:   # a server seeing many sizes: the least recently used go
                self.compiled.pop(next(iter(self.compiled)))
        if isinstance(compiled, str):
            return compiled
        return compiled([t.numpy() for t in fn_inputs])[0]

    def _compile(self, key: tuple, inputs: tuple[Tensor, ...], export_module: nn.Module):
        import openvino as ov

        name = hashlib.blake2b(repr((self.what, self.digest, key, self.precision, ov.__version__, torch.__version__,
                                     _code_digest())).encode(), digest_size=12).hexdigest()
        path = self.cache / f"{self.what}-{name}.xml" if self.cache is not None else None
        if path is not None and path.is_file():
            model = self.core.read_model(str(path))
            log.info("OpenVINO: %s for %s read from the cache", self.what, key)
        else:
            log.info("OpenVINO: converting the %s for %s (once per shape; cached)", self.what, key)
            with torch.no_grad():
                exported = torch.export.export(export_module, inputs)
            model = ov.convert_model(exported)
            if self.precision == "int8":
                model = _compress_int8(model)
            if path is not None:   # written under a name of this process's, then renamed: .bin first
                tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.xml")
                ov.save_model(model, str(tmp), compress_to_fp16=False)
                tmp.with_suffix(".bin").replace(path.with_suffix(".bin"))
                tmp.replace(path)
        return self.core.compile_model(model, "CPU", self._config())


def _code_digest() -> str:
    """sfumato's version and the source of the modules a conversion traces: a cached graph of older code
    is not reused."""
    from ..version import __version__
    from ..models import layers, quant, unet, vae

    h = hashlib.blake2b(__version__.encode(), digest_size=8)
    for module in (layers, unet, vae, quant):
        h.update(Path(module.__file__).read_bytes())
    return h.hexdigest()


def _compress_int8(model):
    try:
        import nncf
    except ImportError:
        raise ParamError("backend", "OpenVINO int8 weights need NNCF: pip install nncf") from None
    return nncf.compress_weights(model)


class _UNetCall(nn.Module):
    """The UNet's call with the optional vector ``y`` as a fixed part of the graph's inputs."""

    def __init__(self, unet: nn.Module, with_y: bool):
        super().__init__()
        self.unet, self.with_y = unet, with_y

    def forward(self, x: Tensor, t: Tensor, context: Tensor, *y: Tensor) -> Tensor:
        return self.unet(x, t, context, y[0] if self.with_y else None)


class _Decode(nn.Module):
    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, z: Tensor) -> Tensor:
        return self.vae.decode(z)


class OpenVINOUNet:
    """Serves plain UNet calls (x, t, context, y) of an fp32 UNet from OpenVINO; ``None`` for a call
    it cannot serve (the caller runs torch), the reason logged once."""

    def __init__(self, unet: nn.Module, precision: str = "f32", cache: Path | None = None):
        self.unet = unet
        self.compiled = _Compiled(unet, "unet", precision, cache)
        self._said: set[str] = set()

    def why_not(self, control, dtype: torch.dtype) -> str | None:
        if control is not None:
            return "ControlNet residuals"
        if dtype != torch.float32:
            return f"a {str(dtype).removeprefix('torch.')} call (the backend converts fp32)"
        return self.compiled.stale()

    def note(self, reason: str) -> None:
        """Log once that calls run on torch, and why."""
        if reason not in self._said:
            self._said.add(reason)
            log.warning("OpenVINO backend: this UNet call runs on torch: %s", reason)

    def __call__(self, x: Tensor, t: Tensor, context: Tensor, y: Tensor | None = None, control=None) -> Tensor | None:
        reason = self.why_not(control, x.dtype)
        if reason is not None:
            self.note(reason)
            return None
        t = t.reshape(-1).expand(x.shape[0]).float() if t.numel() in (1, x.shape[0]) else t
        if y is not None:   # SDXL's vector (float) or the x4 upscaler's class labels (int)
            y = y.float() if y.is_floating_point() else y
        inputs = (x.float(), t.contiguous(), context.float()) + ((y,) if y is not None else ())
        out = self.compiled(inputs, _UNetCall(self.unet, y is not None))
        if isinstance(out, str):
            self.note(out)
            return None
        return torch.from_numpy(out)


class OpenVINODecoder:
    """The VAE decoder of one image (1, C, h, w) → (1, 3, H, W), fp32, from OpenVINO."""

    def __init__(self, vae: nn.Module, precision: str = "f32", cache: Path | None = None):
        self.vae = vae
        self.compiled = _Compiled(vae, "vae-decoder", precision, cache)

    def __call__(self, z: Tensor) -> Tensor | None:
        stale = self.compiled.stale()
        if stale is not None:
            log.warning("OpenVINO backend: this decode runs on torch: %s", stale)
            return None
        out = self.compiled((z.float().contiguous(),), _Decode(self.vae))
        if isinstance(out, str):
            log.warning("OpenVINO backend: this decode runs on torch: %s", out)
            return None
        return torch.from_numpy(out)


def attach(model, precision: str = "f32", cache: Path | None | bool = True) -> None:
    """Give ``model`` (a LoadedModel) OpenVINO runners for its UNet and VAE decoder: ``model.unet_backend``,
    ``model.decoder_backend``. The UNet and VAE must hold fp32 weights (``load(dtype="fp32")``)."""
    require()
    if precision not in PRECISIONS:
        raise ParamError("backend", f"OpenVINO precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    for what, module in (("UNet", model.unet), ("VAE", model.vae)):
        dtype = next(module.parameters()).dtype
        if dtype != torch.float32:
            raise ParamError("dtype", f"the OpenVINO backend converts fp32 weights; the {what} holds "
                                      f"{str(dtype).removeprefix('torch.')} (load with dtype='fp32'; OpenVINO's "
                                      "own precision is the backend's: f32, bf16, f16, int8)")
    root = cache_root() if cache is True else (Path(cache) if cache else None)
    model.unet_backend = OpenVINOUNet(model.unet, precision, root)
    model.decoder_backend = OpenVINODecoder(model.vae, precision, root)
