"""Images out: PIL conversion, A1111-style infotext, atomic PNG writes."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from PIL import Image, PngImagePlugin
from torch import Tensor

from .. import __version__
from .params import GenerationParams

SAMPLER_DISPLAY = {"euler": "Euler"}
SCHEDULER_DISPLAY = {"normal": "Automatic"}


def to_pil(images: Tensor) -> list[Image.Image]:
    """uint8 [B, H, W, 3] → PIL images."""
    return [Image.fromarray(img.numpy()) for img in images]


def infotext(p: GenerationParams, seed: int, model_name: str, model_hash: str | None) -> str:
    """The ``parameters`` text in AUTOMATIC1111's layout: prompt, negative prompt, settings line."""
    settings = {
        "Steps": p.steps,
        "Sampler": SAMPLER_DISPLAY.get(p.sampler, p.sampler),
        "Schedule type": SCHEDULER_DISPLAY.get(p.scheduler, p.scheduler),
        "CFG scale": f"{p.cfg_scale:g}",
        "Seed": seed,
        "Size": f"{p.width}x{p.height}",
        "Model hash": model_hash,
        "Model": model_name,
        "Clip skip": p.clip_skip if p.clip_skip > 1 else None,
        "Version": f"sfumato {__version__}",
    }
    line = ", ".join(f"{k}: {v}" for k, v in settings.items() if v is not None)
    lines = [p.prompt]
    if p.negative_prompt:
        lines.append(f"Negative prompt: {p.negative_prompt}")
    lines.append(line)
    return "\n".join(lines)


def save_png(image: Image.Image, path: str | Path, parameters: str | None = None) -> Path:
    """Write a PNG atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def batch_paths(output: str | Path, n: int) -> list[Path]:
    """``out.png`` for one image; ``out-0.png``, ``out-1.png``, … for a batch."""
    output = Path(output)
    if n == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i}{output.suffix or '.png'}") for i in range(n)]
