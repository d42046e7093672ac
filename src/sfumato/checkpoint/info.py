"""``sfumato info``: what a checkpoint is, without generating anything."""

from __future__ import annotations

from pathlib import Path

from .io import sha256_file
from .load import LoadedModel, load_model


def describe(path: str | Path, *, prediction: str | None = None) -> dict:
    """Family, prediction type (and how it was decided), parameters per component, storage dtype, hash."""
    return describe_model(load_model(Path(path), prediction=prediction))


def describe_model(model: LoadedModel) -> dict:
    path = model.path
    params = {"unet": _count(model.unet), "vae": _count(model.vae)}
    for i, enc in enumerate(model.text_encoders):
        params[f"text_encoder{'' if i == 0 else '_' + str(i + 1)}"] = _count(enc)
    if model.image_embedder is not None:   # Stable unCLIP
        params["image_encoder"] = _count(model.image_embedder)
    digest = sha256_file(path) if path.is_file() else None
    return {
        "path": str(path),
        "family": model.family,
        "prediction": model.spec.prediction,
        "prediction_source": model.prediction_source,
        "parameters": params,
        "storage_dtype": model.storage_dtypes,
        "sha256": digest,
        "model_hash": digest[:10] if digest else None,
    }


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())
