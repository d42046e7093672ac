"""Diffusers folders, converted at the import boundary to the original single-file layout.

A folder with ``model_index.json`` and ``unet/``, ``vae/``, ``text_encoder/`` (and for SDXL
``text_encoder_2/``) becomes one flat state dict with the same keys a single-file checkpoint has;
the scheduler's prediction type and β range travel as metadata / buffers.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import Tensor

from ..diffusion.schedule import BETA_END, BETA_START, scaled_linear_alphas_cumprod
from ..errors import CheckpointError
from .convert_text import hf_text_sd, hf_to_openclip
from .convert_unet import diffusers_unet_to_ldm, unet_config_from_diffusers
from .convert_vae import diffusers_vae_to_ldm
from .convert_vision import hf_vision_to_ours, vision_config_from_hf
from .io import load_file
from .detect import detect_spec
from .specs import SPEC_METADATA_KEY, UNET_PREFIX, VAE_PREFIX, ImageEmbedder, ModelSpec, NoiseAugmentation, TextSlot, spec_to_json
from ..models.clip import TextEncoderConfig
from ..models.vae import VAEConfig

_WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors", "model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors", "model.fp16.safetensors",
    "diffusion_pytorch_model.bin", "pytorch_model.bin",
    "diffusion_pytorch_model.fp16.bin", "pytorch_model.fp16.bin",
)


def find_weights(folder: Path) -> Path:
    for name in _WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"no weights file in {folder} (looked for {', '.join(_WEIGHT_NAMES[:2])}, …)")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None


def read_diffusers_folder(folder: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    if not (folder / "model_index.json").is_file():
        raise CheckpointError(f"{folder} is a directory but not a diffusers model folder (no model_index.json)")
    out: dict[str, Tensor] = {}
    metadata: dict[str, str] = {}

    unet_cfg = unet_config_from_diffusers(_read_json(folder / "unet" / "config.json"))
    unet_sd, _ = load_file(find_weights(folder / "unet"))
    out.update({UNET_PREFIX + k: v for k, v in diffusers_unet_to_ldm(unet_sd, unet_cfg).items()})

    vae_sd, _ = load_file(find_weights(folder / "vae"))
    out.update({VAE_PREFIX + k: v for k, v in diffusers_vae_to_ldm(vae_sd).items()})

    te1 = folder / "text_encoder"
    te2 = folder / "text_encoder_2"
    if te1.is_dir() and te2.is_dir():          # SDXL base: CLIP-L + OpenCLIP bigG
        out.update(_prefixed(hf_text_sd(load_file(find_weights(te1))[0]), "conditioner.embedders.0.transformer."))
        out.update(_prefixed(hf_to_openclip(load_file(find_weights(te2))[0]), "conditioner.embedders.1.model."))
    elif te2.is_dir():                          # SDXL refiner: bigG only
        out.update(_prefixed(hf_to_openclip(load_file(find_weights(te2))[0]), "conditioner.embedders.0.model."))
    elif te1.is_dir():
        te_cfg = _read_json(te1 / "config.json") if (te1 / "config.json").is_file() else {}
        sd = load_file(find_weights(te1))[0]
        if te_cfg.get("hidden_act") == "gelu":  # SD 2.x: OpenCLIP-H stored in the HF layout
            out.update(_prefixed(hf_to_openclip(sd), "cond_stage_model.model."))
        else:
            out.update(_prefixed(hf_text_sd(sd), "cond_stage_model.transformer."))
    else:
        raise CheckpointError(f"{folder} has no text_encoder/ folder")

    embedder = _unclip_parts(folder, out)
    sched_path = folder / "scheduler" / "scheduler_config.json"
    if sched_path.is_file():
        sched = _read_json(sched_path)
        if "prediction_type" in sched:
            metadata["modelspec.prediction_type"] = "v" if sched["prediction_type"] == "v_prediction" else "epsilon"
        if sched.get("beta_schedule", "scaled_linear") != "scaled_linear":
            raise CheckpointError(f"unsupported beta_schedule {sched['beta_schedule']!r} in {sched_path}")
        out["alphas_cumprod"] = scaled_linear_alphas_cumprod(
            sched.get("beta_start", 0.00085), sched.get("beta_end", 0.012), sched.get("num_train_timesteps", 1000)
        )
    try:
        detect_spec(out, metadata)
    except CheckpointError:  # not a known family's shape: carry the folder's own configuration
        metadata[SPEC_METADATA_KEY] = spec_to_json(_custom_spec(folder, unet_cfg, metadata, embedder))
    return out, metadata


def _unclip_parts(folder: Path, out: dict[str, Tensor]) -> ImageEmbedder | None:
    """A StableUnCLIPImg2Img folder's image side in the original layout: ``image_encoder/``
    (transformers ``CLIPVisionModelWithProjection``) under ``embedder.model.visual.``,
    ``image_normalizer/``'s mean and std as the noise augmentor's ``data_mean`` / ``data_std``; the
    ``image_noising_scheduler/`` must be the cosine (squaredcos_cap_v2) DDPM schedule."""
    encoder, normalizer = folder / "image_encoder", folder / "image_normalizer"
    if not encoder.is_dir():
        return None
    config = _read_json(encoder / "config.json")
    vision = vision_config_from_hf(config)
    out.update(_prefixed(hf_vision_to_ours(load_file(find_weights(encoder))[0]), "embedder.model.visual."))
    if normalizer.is_dir():
        stats, _ = load_file(find_weights(normalizer))
        if set(stats) != {"mean", "std"}:
            raise CheckpointError(f"{normalizer}: expected the tensors mean and std, got {sorted(stats)[:5]}")
        out["noise_augmentor.data_mean"], out["noise_augmentor.data_std"] = stats["mean"], stats["std"]
    sched_path = folder / "image_noising_scheduler" / "scheduler_config.json"
    sched = _read_json(sched_path) if sched_path.is_file() else {}
    if sched.get("beta_schedule", "squaredcos_cap_v2") != "squaredcos_cap_v2":
        raise CheckpointError(f"unsupported beta_schedule {sched['beta_schedule']!r} in {sched_path}")
    steps = sched.get("num_train_timesteps", 1000)
    return ImageEmbedder(vision, timesteps=steps, max_noise_level=steps)


def _custom_spec(folder: Path, unet_cfg, metadata: dict[str, str], embedder: ImageEmbedder | None = None
                 ) -> ModelSpec:
    """A spec for a model of no preset family (tiny test models, custom sizes), from its config files."""
    te1, te2 = folder / "text_encoder", folder / "text_encoder_2"
    if te2.is_dir():
        raise CheckpointError(f"{folder}: SDXL-style folder whose shapes match no SDXL preset")
    te_cfg = _read_json(te1 / "config.json")
    openclip = te_cfg.get("hidden_act") == "gelu"
    text_cfg = TextEncoderConfig(
        layout="openclip" if openclip else "hf",
        width=te_cfg["hidden_size"],
        layers=te_cfg["num_hidden_layers"],
        heads=te_cfg["num_attention_heads"],
        vocab_size=te_cfg.get("vocab_size", 49408),
        max_positions=te_cfg.get("max_position_embeddings", 77),
        mlp_ratio=te_cfg["intermediate_size"] / te_cfg["hidden_size"],
        activation="gelu" if openclip else "quick_gelu",
        projection_dim=te_cfg.get("projection_dim", te_cfg["hidden_size"]) if openclip else None,
        pad_id=0 if openclip else 49407,
    )
    prefix = "cond_stage_model.model." if openclip else "cond_stage_model.transformer."
    vae_cfg = _read_json(folder / "vae" / "config.json")
    boc = vae_cfg["block_out_channels"]
    vae = VAEConfig(
        in_channels=vae_cfg.get("in_channels", 3),
        out_channels=vae_cfg.get("out_channels", 3),
        z_channels=vae_cfg.get("latent_channels", 4),
        embed_dim=vae_cfg.get("latent_channels", 4),
        ch=boc[0],
        ch_mult=tuple(c // boc[0] for c in boc),
        num_res_blocks=vae_cfg.get("layers_per_block", 2),
        norm_groups=vae_cfg.get("norm_num_groups", 32),
        scale_factor=vae_cfg.get("scaling_factor", 0.18215),
    )
    prediction = "v" if metadata.get("modelspec.prediction_type") == "v" else "eps"
    sched_path = folder / "scheduler" / "scheduler_config.json"
    sched = _read_json(sched_path) if sched_path.is_file() else {}
    betas = (sched.get("beta_start", BETA_START), sched.get("beta_end", BETA_END))
    return ModelSpec("custom", unet_cfg, vae, (TextSlot(prefix, text_cfg),), prediction=prediction,
                     resolution=vae_cfg.get("sample_size", 512), betas=betas, low_res=_low_res(folder),
                     image_embedder=embedder)


def _low_res(folder: Path) -> NoiseAugmentation | None:
    """An upscale pipeline's low-res noise schedule (``low_res_scheduler/``) and maximum noise level."""
    path = folder / "low_res_scheduler" / "scheduler_config.json"
    if not path.is_file():
        return None
    cfg = _read_json(path)
    if cfg.get("beta_schedule", "scaled_linear") != "scaled_linear":
        raise CheckpointError(f"unsupported beta_schedule {cfg['beta_schedule']!r} in {path}")
    default = NoiseAugmentation()
    return NoiseAugmentation(
        beta_start=cfg.get("beta_start", default.beta_start), beta_end=cfg.get("beta_end", default.beta_end),
        timesteps=cfg.get("num_train_timesteps", default.timesteps),
        max_noise_level=_read_json(folder / "model_index.json").get("max_noise_level", default.max_noise_level),
    )


def _prefixed(sd: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {prefix + k: v for k, v in sd.items()}
