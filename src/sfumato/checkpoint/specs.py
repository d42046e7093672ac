"""Model families as typed data: which components a checkpoint holds and how they are configured.

A ``ModelSpec`` names the UNet, VAE and text-encoder configurations of one family, where each
component lives in the original single-file layout, and how the text encoders' hidden states
become the UNet's conditioning. The presets below are the families detection can name.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, replace
from typing import Any

from ..models.clip import CLIP_L, OPENCLIP_BIGG, OPENCLIP_H, TextEncoderConfig
from ..models.clip_vision import VIT_H14, VIT_L14, VisionConfig
from ..models.unet import SD1_UNET, SD2_UNET, SDXL_REFINER_UNET, SDXL_UNET, UNetConfig
from ..models.vae import SD_VAE, SDXL_VAE, VAEConfig
from ..diffusion.schedule import BETA_END, BETA_START

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."


@dataclass(frozen=True)
class TextSlot:
    """One text encoder of a model and how its output is used.

    ``layer`` indexes the encoder's hidden states from the end (−1: last layer, −2: penultimate);
    ``final_norm`` applies the encoder's final LayerNorm to that layer; ``pooled`` marks the
    encoder whose pooled, projected output feeds SDXL's ``label_emb``.
    """

    prefix: str
    config: TextEncoderConfig
    layer: int = -1
    final_norm: bool = True
    pooled: bool = False


@dataclass(frozen=True)
class NoiseAugmentation:
    """The x4 upscaler's low-res input: the image is noised to a chosen level (its class label) on
    this DDPM schedule (scaled-linear β in diffusers' terms, LDM's "linear") before it is
    concatenated to the latent. ldm's x4-upscaling.yaml: 0.0001 → 0.02 over 1000 steps, at most 350."""

    beta_start: float = 0.0001
    beta_end: float = 0.02
    timesteps: int = 1000
    max_noise_level: int = 350


@dataclass(frozen=True)
class ImageEmbedder:
    """Stable unCLIP's image conditioning: a CLIP image tower under ``prefix`` whose projected
    embedding (width ``vision.projection_dim``) is noise-augmented (``models/unclip.py``, its keys
    under ``noise_augmentor.``) and, with its noise level's embedding, fed to ``label_emb``."""

    vision: VisionConfig
    prefix: str = "embedder.model.visual."
    timesteps: int = 1000            # the augmentation's DDPM schedule (squaredcos_cap_v2)
    max_noise_level: int = 1000      # levels 0 … max_noise_level − 1

    @property
    def dim(self) -> int:
        return self.vision.projection_dim


@dataclass(frozen=True)
class ModelSpec:
    family: str
    unet: UNetConfig
    vae: VAEConfig
    text: tuple[TextSlot, ...]
    prediction: str = "eps"   # "eps" or "v"; for SD 2.x decided at load time (see detect.py)
    resolution: int = 512     # native image size
    conditioning: str = "sd"  # "sd" (context only), "sdxl" (size/crop ids), "sdxl-refiner" (aesthetic score)
    betas: tuple[float, float] = (BETA_START, BETA_END)  # training schedule (scaled linear) unless the file has one
    low_res: NoiseAugmentation | None = None  # set for the x4 upscaler: its low-res image input
    image_embedder: ImageEmbedder | None = None  # set for Stable unCLIP: its CLIP image conditioning

    @property
    def is_sdxl(self) -> bool:
        return self.conditioning != "sd"

    @property
    def is_depth(self) -> bool:
        """SD 2's depth model (depth2img): one extra input channel, the depth map."""
        return self.unet.in_channels == self.unet.out_channels + 1

    @property
    def is_upscaler(self) -> bool:
        return self.low_res is not None

    @property
    def is_unclip(self) -> bool:
        return self.image_embedder is not None


_SD1_TEXT = (TextSlot("cond_stage_model.transformer.", CLIP_L),)
_SD2_TEXT = (TextSlot("cond_stage_model.model.", OPENCLIP_H, layer=-2, final_norm=True),)
_SDXL_TEXT = (
    TextSlot("conditioner.embedders.0.transformer.", CLIP_L, layer=-2, final_norm=False),
    TextSlot("conditioner.embedders.1.model.", OPENCLIP_BIGG, layer=-2, final_norm=False, pooled=True),
)
_REFINER_TEXT = (TextSlot("conditioner.embedders.0.model.", OPENCLIP_BIGG, layer=-2, final_norm=False, pooled=True),)


def _inpaint(unet: UNetConfig) -> UNetConfig:
    return replace(unet, in_channels=9)


# stabilityai/stable-diffusion-x4-upscaler (ldm's x4-upscaling.yaml): latent + low-res RGB in, the
# noise level as a class label, attn1 attending to the text on the first three levels
X4_UNET = UNetConfig(
    in_channels=7, model_channels=256, channel_mult=(1, 2, 2, 4), transformer_depth=(0, 1, 1, 1), num_heads=8,
    context_dim=1024, use_linear_in_transformer=True, num_classes=1000,
    disable_self_attentions=(True, True, True, False),
)
X4_VAE = VAEConfig(ch_mult=(1, 2, 4), scale_factor=0.08333)   # downsamples by 4


PRESETS: dict[str, ModelSpec] = {
    "sd1": ModelSpec("sd1", SD1_UNET, SD_VAE, _SD1_TEXT),
    "sd1-inpaint": ModelSpec("sd1-inpaint", _inpaint(SD1_UNET), SD_VAE, _SD1_TEXT),
    "sd2": ModelSpec("sd2", SD2_UNET, SD_VAE, _SD2_TEXT, resolution=512),
    "sd2-v": ModelSpec("sd2-v", SD2_UNET, SD_VAE, _SD2_TEXT, prediction="v", resolution=768),
    "sd2-inpaint": ModelSpec("sd2-inpaint", _inpaint(SD2_UNET), SD_VAE, _SD2_TEXT),
    "sd2-depth": ModelSpec("sd2-depth", replace(SD2_UNET, in_channels=5), SD_VAE, _SD2_TEXT),
    "sd-x4-upscaler": ModelSpec("sd-x4-upscaler", X4_UNET, X4_VAE, _SD2_TEXT, prediction="v", resolution=512,
                                betas=(0.0001, 0.02), low_res=NoiseAugmentation()),
    # Stable unCLIP 2.1 (v2-1-stable-unclip-{l,h}-inference.yaml): SD 2.1-768 with a CLIP image embedding and
    # its noise level's embedding (768 + 768, 1024 + 1024) as label_emb's input
    "sd2-unclip-l": ModelSpec("sd2-unclip-l", replace(SD2_UNET, adm_in_channels=1536), SD_VAE, _SD2_TEXT,
                              prediction="v", resolution=768, image_embedder=ImageEmbedder(VIT_L14)),
    "sd2-unclip-h": ModelSpec("sd2-unclip-h", replace(SD2_UNET, adm_in_channels=2048), SD_VAE, _SD2_TEXT,
                              prediction="v", resolution=768, image_embedder=ImageEmbedder(VIT_H14)),
    "sdxl": ModelSpec("sdxl", SDXL_UNET, SDXL_VAE, _SDXL_TEXT, resolution=1024, conditioning="sdxl"),
    "sdxl-inpaint": ModelSpec("sdxl-inpaint", _inpaint(SDXL_UNET), SDXL_VAE, _SDXL_TEXT, resolution=1024, conditioning="sdxl"),
    "sdxl-refiner": ModelSpec(
        "sdxl-refiner", SDXL_REFINER_UNET, SDXL_VAE, _REFINER_TEXT, resolution=1024, conditioning="sdxl-refiner"
    ),
}


# -- specs carried in a file's metadata (the bundled model, custom small models) ------------------

SPEC_METADATA_KEY = "sfumato.spec"
BASE_KEY = "sfumato.base"                # an overlay file: the base file's name, in the same folder …
BASE_SHA256_KEY = "sfumato.base_sha256"  # … and its sha256


def spec_to_json(spec: ModelSpec) -> str:
    d = dataclasses.asdict(spec)
    if d["image_embedder"] is None:   # absent, as in every file written before unCLIP existed
        del d["image_embedder"]
    return json.dumps(d, sort_keys=True)


def spec_from_json(text: str) -> ModelSpec:
    """Rebuild a spec from ``spec_to_json`` output; unknown or missing fields raise ValueError."""
    try:
        d: dict[str, Any] = json.loads(text)
        text_slots = tuple(
            TextSlot(**{**slot, "config": TextEncoderConfig(**slot["config"])}) for slot in d.pop("text")
        )
        unet = UNetConfig(**_tuples(d.pop("unet")))
        vae = VAEConfig(**_tuples(d.pop("vae")))
        low_res = d.pop("low_res", None)
        embedder = d.pop("image_embedder", None)
        if embedder is not None:
            embedder = ImageEmbedder(**{**embedder, "vision": VisionConfig(**embedder["vision"])})
        return ModelSpec(unet=unet, vae=vae, text=text_slots, **_tuples(d),
                         low_res=NoiseAugmentation(**low_res) if low_res is not None else None,
                         image_embedder=embedder)
    except (TypeError, KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"invalid {SPEC_METADATA_KEY} metadata: {e}") from None


def _tuples(d: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
