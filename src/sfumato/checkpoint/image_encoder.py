"""Loading a CLIP image encoder as IP-Adapter ships it: a transformers ``CLIPVisionModelWithProjection``
folder (``config.json`` and ``model.safetensors`` or ``pytorch_model.bin``, as in IP-Adapter's
``image_encoder/``), or a weights file alone — transformers keys (``vision_model.*``,
``visual_projection.weight``) or open_clip's (``visual.*``) — whose configuration is read from a
``config.json`` beside it, else from the tensor shapes (a preset's heads and activation: ViT-H/14,
ViT-bigG/14, ViT-L/14). Pickled ``.bin`` files go through the allow-list.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..models.clip_vision import CLIPVisionTower
from .convert_vision import hf_vision_to_ours, openclip_vision_to_ours, vision_config_from_hf, vision_config_from_state
from .io import check_finite, load_file

WEIGHTS = ("model.safetensors", "pytorch_model.bin")
MAX_CONFIG = 1 << 20


def image_encoder_files(path: str | Path) -> tuple[Path, Path | None]:
    """(weights file, config.json or None) of an encoder folder or file; CheckpointError when absent."""
    path = Path(path)
    if path.is_dir():
        weights = next((path / name for name in WEIGHTS if (path / name).is_file()), None)
        if weights is None:
            raise CheckpointError(f"{path} holds no {' or '.join(WEIGHTS)}", "the folder holds no weights")
    elif path.is_file():
        weights = path
    else:
        raise CheckpointError(f"image encoder not found: {path}", "not found")
    config = weights.with_name("config.json")
    return weights, config if config.is_file() else None


def load_image_encoder(path: str | Path, *, dtype: torch.dtype = torch.float32,
                       device: str | torch.device = "cpu") -> CLIPVisionTower:
    """The CLIP image tower at ``path`` (see the module docstring), with its projection, ready on ``device``."""
    weights, config_path = image_encoder_files(path)
    sd, _ = load_file(weights)
    config = None
    if config_path is not None:
        if config_path.stat().st_size > MAX_CONFIG:
            raise CheckpointError(f"{config_path} is too large for a config file", "config.json is too large")
        try:
            config = json.loads(config_path.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{config_path} cannot be read: {e}", "config.json cannot be read") from None
        if not isinstance(config, dict):
            raise CheckpointError(f"{config_path}: not a config object", "config.json is not an object")
    try:
        if any(k.startswith(("vision_model.", "visual_projection.")) for k in sd):
            tower = hf_vision_to_ours({k: v for k, v in sd.items() if not k.startswith("text_model.")
                                       and k not in ("logit_scale", "text_projection.weight")})
        else:
            tower = openclip_vision_to_ours(sd)
        cfg = vision_config_from_hf(config) if config is not None else vision_config_from_state(tower)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{weights.name}: not a CLIP image encoder ({e})", "not a CLIP image encoder") from None
    if "proj" not in tower or cfg.projection_dim != tower["proj"].shape[1]:
        raise CheckpointError(f"{weights.name}: the image encoder has no projection to image embeds of the "
                              "configured width (a CLIPVisionModelWithProjection is needed)",
                              "the image encoder has no image projection")
    check_finite(tower, f"the image encoder {weights.name}")
    with torch.device("meta"):
        model = CLIPVisionTower(cfg)
    try:
        model.load_state_dict(tower, strict=True, assign=True)
    except RuntimeError as e:
        detail = " ".join(line.strip() for line in str(e).splitlines()[1:3])
        raise CheckpointError(f"{weights.name}: the weights do not fit the image encoder's config: {detail}",
                              "the weights do not fit the image encoder's config") from None
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
