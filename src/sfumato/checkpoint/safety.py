"""Loading the SD safety checker as published: a transformers-layout folder (``config.json`` and
``model.safetensors`` or ``pytorch_model.bin``; also a diffusers model folder's ``safety_checker/``,
or the model folder itself) or a weights file alone (its image tower then read from the tensor
shapes, the published ViT-L/14's activation). Keys: ``vision_model.[vision_model.]*`` (transformers
4 saves the inner ``vision_model.`` twice, 5 once), ``visual_projection.weight``, the concept and
special-care embeddings and thresholds. Pickled ``.bin`` files go through the allow-list.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import CheckpointError, ParamError
from ..models.safety_checker import SafetyChecker
from .convert_vision import hf_vision_to_ours, vision_config_from_hf, vision_config_from_state
from .io import check_finite, load_file

WEIGHTS = ("model.safetensors", "pytorch_model.bin")
MAX_CONFIG = 1 << 20
_OWN = ("concept_embeds", "special_care_embeds", "concept_embeds_weights", "special_care_embeds_weights")


def _files(path: Path) -> tuple[Path, dict | None]:
    """(weights file, config.json's dict or None) of ``path``."""
    if path.is_dir():
        if (path / "safety_checker").is_dir():
            path = path / "safety_checker"
        weights = next((path / name for name in WEIGHTS if (path / name).is_file()), None)
        if weights is None:
            raise ParamError("safety_checker", f"{path} holds no {' or '.join(WEIGHTS)}")
        config = path / "config.json"
        if not config.is_file():
            return weights, None
        if config.stat().st_size > MAX_CONFIG:
            raise ParamError("safety_checker", f"{config} is too large for a config file")
        try:
            return weights, json.loads(config.read_text())
        except (OSError, ValueError) as e:
            raise ParamError("safety_checker", f"{config} cannot be read: {e}") from None
    if not path.is_file():
        raise ParamError("safety_checker", f"not found: {path}")
    return path, None


def load_safety_checker(path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
                        ) -> SafetyChecker:
    """The checker at ``path`` (see the module docstring), ready on ``device`` in ``dtype``."""
    weights, config = _files(Path(path))
    sd, _ = load_file(weights)
    if not all(key in sd for key in (*_OWN, "visual_projection.weight")):
        raise ParamError("safety_checker", f"{weights.name} is not a safety checker (no concept embeddings "
                                           "or visual projection)")
    own = {key: sd.pop(key) for key in _OWN}
    vision = {key.removeprefix("vision_model."): value for key, value in sd.items()}
    try:
        tower = hf_vision_to_ours(vision)
        cfg = vision_config_from_hf(config) if config is not None else vision_config_from_state(tower)
    except (KeyError, ValueError) as e:
        raise ParamError("safety_checker", f"{weights.name}: {e}") from None
    if cfg.projection_dim != tower["proj"].shape[1]:
        raise ParamError("safety_checker", f"{weights.name}: its projection has {tower['proj'].shape[1]} outputs, "
                                           f"the config says {cfg.projection_dim}")
    check_finite({**tower, **own}, f"the safety checker {weights.name}")
    checker = SafetyChecker(cfg, concepts=own["concept_embeds"].shape[0], special=own["special_care_embeds"].shape[0])
    state = {f"vision_model.{k}": v for k, v in tower.items()} | own
    try:
        checker.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{weights.name}: the weights do not fit the safety checker ({e})") from None
    return checker.to(device=device, dtype=dtype).eval().requires_grad_(False)
