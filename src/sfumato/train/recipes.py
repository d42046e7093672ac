"""The recipe that trains the bundled model: VAE, then CLIP (then frozen), then the UNet (with EMA).

Each stage runs the shared loop in its own folder under ``out`` and ends by writing its weights
(``vae.safetensors``, ``text_encoder.safetensors``, ``unet.safetensors`` — the UNet's EMA); a stage
whose weights exist is skipped, so ``train shapes`` can be re-run after a kill and picks up where it
stopped. The scale factor is measured on the UNet stage's latent cache and saved with it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..checkpoint.io import load_file, save_file
from ..errors import SfumatoError
from ..checkpoint.specs import ModelSpec
from ..models.clip import CLIPTextModel
from ..models.vae import AutoencoderKL
from .bundled import BUNDLED_SPEC, export
from .loop import LoopConfig, distributed, mix, train
from .shapes import ShapesDataset
from .train_clip import CLIPTask
from .train_unet import UNetTask
from .train_vae import VAETask, encode_moments, latent_scale

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recipe:
    spec: ModelSpec = BUNDLED_SPEC
    seed: int = 0
    dataset_size: int = 40_000          # distinct scenes; item i is a pure function of (seed, i)
    vae: LoopConfig = field(default_factory=lambda: LoopConfig(steps=2000, batch_size=8, lr=5e-4, warmup=100))
    clip: LoopConfig = field(default_factory=lambda: LoopConfig(steps=1200, batch_size=64, lr=5e-4, warmup=100))
    unet: LoopConfig = field(default_factory=lambda: LoopConfig(
        steps=14000, batch_size=32, lr=3e-4, warmup=200, decay_start=7000, ema_decay=0.999, checkpoint_every=250))
    kl_weight: float = 1e-4
    edge_weight: float = 0.5
    clip_negatives: int = 3
    caption_dropout: float = 0.1

    def dataset(self, stage: int) -> ShapesDataset:
        """The training scenes; each stage uses its own seed offset of the same world."""
        return ShapesDataset(self.dataset_size, self.seed * 10 + stage, size=self.spec.resolution)


def train_vae(recipe: Recipe, out: Path) -> AutoencoderKL:
    final = out / "vae.safetensors"
    if not final.exists():
        torch.manual_seed(mix(recipe.seed, 1))  # the initial weights
        task, _ = train(VAETask(recipe.spec.vae, recipe.dataset(1), recipe.kl_weight, recipe.edge_weight),
                        recipe.vae, out / "vae", "vae")
        _save_rank0(task.vae, final)
    return _load(AutoencoderKL(recipe.spec.vae), final)


def train_clip(recipe: Recipe, out: Path) -> CLIPTextModel:
    final = out / "text_encoder.safetensors"
    config = recipe.spec.text[0].config
    if not final.exists():
        torch.manual_seed(mix(recipe.seed, 2))
        task, _ = train(CLIPTask(config, recipe.dataset(2), negatives=recipe.clip_negatives), recipe.clip,
                        out / "clip", "clip")
        _save_rank0(task.text, final)
    return _load(CLIPTextModel(config), final)


def train_unet(recipe: Recipe, out: Path, vae: AutoencoderKL, text_encoder: nn.Module) -> tuple[nn.Module, float]:
    """The EMA UNet and the latent scale factor."""
    final = out / "unet.safetensors"
    moments, captions, scale = latent_cache(recipe, out, vae)
    if not final.exists():
        torch.manual_seed(mix(recipe.seed, 3))
        task = UNetTask(recipe.spec, text_encoder, moments, captions, scale, recipe.caption_dropout)
        task, ema = train(task, recipe.unet, out / "unet", "unet")
        unet = ema.copy_to(task).unet if ema is not None else task.unet
        _save_rank0(unet, final)
    from ..models.unet import UNetModel

    return _load(UNetModel(recipe.spec.unet), final), scale


def latent_cache(recipe: Recipe, out: Path, vae: AutoencoderKL):
    """Posterior moments and captions of the UNet stage's scenes, encoded once (rank 0) and kept on disk."""
    path = out / "latents.safetensors"
    rank, world = distributed()
    if rank == 0 and not path.exists():
        with torch.no_grad():
            moments, captions = encode_moments(vae.eval(), recipe.dataset(3))
        meta = {"captions": json.dumps(captions), "scale_factor": repr(latent_scale(moments))}
        save_file({"moments": moments.contiguous()}, path, meta)
    if world > 1:
        dist.barrier()
    tensors, meta = load_file(path)
    moments = tensors["moments"]
    return moments, json.loads(meta["captions"]), float(meta["scale_factor"])


def train_all(recipe: Recipe, out: str | Path, export_path: str | Path | None = None) -> Path:
    """All three stages, then the single-file export (default ``out/bundled.safetensors``)."""
    out = Path(out)
    vae = train_vae(recipe, out)
    text_encoder = train_clip(recipe, out)
    unet, scale = train_unet(recipe, out, vae, text_encoder)
    path = Path(export_path) if export_path is not None else out / "bundled.safetensors"
    if distributed()[0] == 0:
        spec = export(path, recipe.spec, unet, vae, text_encoder, scale)
        log.info("exported %s (scale factor %.4f, %d bytes)", path, spec.vae.scale_factor, path.stat().st_size)
    return path


def _save_rank0(module: nn.Module, path: Path) -> None:
    rank, world = distributed()
    if rank == 0:
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, path)
    if world > 1:
        dist.barrier()


def _load(module: nn.Module, path: Path) -> nn.Module:
    """A stage's weights from its run folder, through the checked loader; a file that does not fit
    the stage is a one-line SfumatoError."""
    sd, _ = load_file(path)
    try:
        module.load_state_dict(sd)
    except RuntimeError as e:
        raise SfumatoError(f"{path} does not hold this stage's weights ({str(e).splitlines()[0][:200]}); "
                           "remove it to train the stage again") from None
    return module.eval().requires_grad_(False)
