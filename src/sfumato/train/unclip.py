"""The bundled model's image-conditioned variant: Stable unCLIP in miniature (``sfumato train unclip``).

Three stages on top of the bundled model, each in its own folder under ``out`` and skipped when its
result exists (so a killed run picks up where it stopped):

1. ``encoder``: a small CLIP ViT image tower (``BUNDLED_VISION``, 64 px, 8 px patches) learns to map a
   scene to the frozen bundled text encoder's pooled feature of its caption. The caption names the
   objects' colours and shapes, their left-to-right order and the background, never positions or
   sizes, so the embedding keeps what a variation should keep and drops the layout.
2. ``cache``: posterior moments of the UNet stage's scenes (bundled VAE), their image embeddings and,
   for two-object scenes, the "mix" embedding: the mean of the embeddings of each object drawn alone on
   the same background. The embedding statistics (the noise augmentor's ``data_mean`` / ``data_std``)
   are measured here.
3. ``unet``: the bundled UNet with a ``label_emb`` for the unCLIP vector is distilled from the
   bundled model: given the prompt "" and the noise-augmented embedding of a scene (level
   ``⌊1000·u²⌋``, u uniform), its ε must match the bundled model's ε given the scene's caption. The
   teacher's prediction carries the conditional signal without the noise of the ε target: trained on ε
   alone (3 × 10⁴ samples), the UNet's loss with the true vector was only 5–15% below that with
   another image's vector, and variations kept nothing of the image. The caption is kept for 20% of
   samples (else ""),
   the embedding replaced by the mix embedding for 30% of two-object scenes, and the whole vector
   zeroed for 10% (classifier-free guidance's uncond, as unCLIP's). ``label_emb`` starts at twice
   PyTorch's default initialisation, so the vector moves the time embedding by about a fifth of its
   size from the first step: from a zero start (the bundled model exactly) the UNet had learned to
   use the vector for almost nothing after 2250 steps (its output moved by 0.4%). Only ``label_emb``, the
   resblocks' time-embedding projections and the spatial transformers train: the export ships just
   those, so the variant adds under 4 MB (an overlay file naming the bundled model as its base).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoint.io import load_file, save_file, sha256_file
from ..checkpoint.specs import BASE_KEY, BASE_SHA256_KEY, SPEC_METADATA_KEY, UNET_PREFIX, ImageEmbedder, spec_to_json
from ..diffusion.denoiser import Denoiser
from ..diffusion.schedule import DiscreteSchedule
from ..models.clip_vision import CLIP_MEAN, CLIP_STD, CLIPVisionTower, VisionConfig
from ..models.unclip import NoiseAugmentor
from ..models.unet import ResBlock, SpatialTransformer, UNetModel
from ..text.conditioner import Conditioner
from ..text.tokenizer import get_tokenizer
from .loop import Batch, LoopConfig, Task, mix, train
from .shapes import Scene, ShapesDataset, caption, render, sample_scene

log = logging.getLogger(__name__)

LABEL_GAIN = 2.0   # label_emb's last layer starts at 2× PyTorch's default initialisation
BUNDLED_VISION = VisionConfig(image_size=64, patch_size=8, width=64, layers=4, heads=4, mlp_dim=256,
                              projection_dim=64, act="gelu")


@dataclass(frozen=True)
class UnCLIPRecipe:
    seed: int = 0
    dataset_size: int = 20_000
    encoder: LoopConfig = field(default_factory=lambda: LoopConfig(steps=1500, batch_size=64, lr=1e-3, warmup=100,
                                                                   decay_start=750, checkpoint_every=250))
    unet: LoopConfig = field(default_factory=lambda: LoopConfig(
        steps=8500, batch_size=32, lr=5e-4, warmup=100, decay_start=7500, ema_decay=0.998, checkpoint_every=250))
    caption_keep: float = 0.2
    embed_drop: float = 0.1
    mix_prob: float = 0.6

    def dataset(self, stage: int) -> ShapesDataset:
        return ShapesDataset(self.dataset_size, self.seed * 10 + stage)


def clip_pixels(images: Tensor) -> Tensor:
    """[-1, 1] 64 px scenes → the tower's input: what ``preprocess_clip`` gives for a 64 px image at
    size 64 (no resize, no crop; u8 / 255 normalised)."""
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return ((images + 1) / 2 - mean) / std


class EncoderTask(Task):
    """The image tower regressing the frozen text encoder's pooled caption feature."""

    def __init__(self, text_encoder: nn.Module, dataset: ShapesDataset):
        super().__init__()
        self.tower = CLIPVisionTower(BUNDLED_VISION)
        self.frozen = {"text": text_encoder.eval().requires_grad_(False)}
        self.tokenizer = get_tokenizer(text_encoder.cfg.pad_id)
        self.data, self.dataset_size = dataset, len(dataset)
        self._targets: dict[str, Tensor] = {}

    @torch.no_grad()
    def targets(self, texts: list[str]) -> Tensor:
        missing = sorted({t for t in texts if t not in self._targets})
        if missing:
            self._targets.update(zip(missing, self.frozen["text"](self.tokenizer(missing)).pooled))
        return torch.stack([self._targets[t] for t in texts])

    def forward(self, batch: Batch) -> Tensor:
        items = [self.data[i] for i in batch.indices]
        embeds = self.tower(clip_pixels(torch.stack([im for im, _ in items]))).image_embeds
        return F.mse_loss(embeds, self.targets([t for _, t in items]))


def alone(scene: Scene, k: int, rng: np.random.Generator) -> Scene:
    """Object ``k`` of ``scene`` alone on its background, at a new random size and position."""
    from .shapes import SceneSpec, place

    o = scene.objects[k]
    return place(SceneSpec(((o.colour, o.shape),), scene.background), rng)


@torch.no_grad()
def build_cache(recipe: UnCLIPRecipe, vae: nn.Module, tower: CLIPVisionTower, path: Path) -> None:
    """Moments, captions, embeddings, mix embeddings (NaN rows for one-object scenes) and the
    embedding statistics of the UNet stage's scenes, written to ``path``."""
    from .train_vae import encode_moments

    data = recipe.dataset(3)
    moments, captions = encode_moments(vae.eval(), data)
    embeds, mixes = [], []
    for start in range(0, len(data), 256):
        idx = range(start, min(start + 256, len(data)))
        images = torch.stack([data[i][0] for i in idx])
        embeds.append(tower(clip_pixels(images)).image_embeds)
        singles, owners = [], []
        for i in idx:
            rng = np.random.default_rng([data.seed, i])
            scene = sample_scene(rng, p_two=data.p_two)   # the same scene as data[i]
            if len(scene.objects) == 2:
                extra = np.random.default_rng([data.seed, i, 0xA1])
                for k in (0, 1):
                    singles.append(torch.from_numpy(render(alone(scene, k, extra), data.size, extra)))
                    owners.append(i - start)
        m = torch.full((len(idx), BUNDLED_VISION.projection_dim), float("nan"))
        if singles:
            px = torch.stack(singles).permute(0, 3, 1, 2).float() / 127.5 - 1
            e = tower(clip_pixels(px)).image_embeds
            m[owners[0::2]] = (e[0::2] + e[1::2]) / 2
        mixes.append(m)
    embeds, mixes = torch.cat(embeds), torch.cat(mixes)
    meta = {"captions": json.dumps(captions), "scale_factor": repr(_scale_factor())}
    save_file({"moments": moments.contiguous(), "embeds": embeds.contiguous(), "mixes": mixes.contiguous(),
               "data_mean": embeds.mean(0, keepdim=True), "data_std": embeds.std(0, keepdim=True)}, path, meta)


def _scale_factor() -> float:
    from ..checkpoint.load import load_model
    from ..data import BUNDLED_PATH

    return load_model(BUNDLED_PATH, device="meta").spec.vae.scale_factor


def trained_keys(unet: UNetModel) -> list[str]:
    """The UNet parameters this stage trains and the overlay ships: ``label_emb``, every resblock's
    ``emb_layers`` and every spatial transformer."""
    keys = [f"label_emb.{k}" for k, _ in unet.label_emb.named_parameters()]
    for name, module in unet.named_modules():
        if isinstance(module, ResBlock):
            keys += [f"{name}.emb_layers.{k}" for k, _ in module.emb_layers.named_parameters()]
        elif isinstance(module, SpatialTransformer):
            keys += [f"{name}.{k}" for k, _ in module.named_parameters()]
    return keys


class UnCLIPUNetTask(Task):
    def __init__(self, unet: UNetModel, teacher: nn.Module, conditioner: Conditioner, cache: dict[str, Tensor],
                 captions: list[str], scale_factor: float, alphas_cumprod: Tensor, recipe: UnCLIPRecipe):
        super().__init__()
        self.unet = unet
        keep = set(trained_keys(unet))
        for k, p in unet.named_parameters():
            p.requires_grad_(k in keep)
        self.augmentor = NoiseAugmentor(BUNDLED_VISION.projection_dim).requires_grad_(False)
        self.augmentor.data_mean.copy_(cache["data_mean"])
        self.augmentor.data_std.copy_(cache["data_std"])
        self.frozen = {"conditioner": conditioner, "teacher": teacher.eval().requires_grad_(False)}
        self.cache, self.captions, self.recipe = cache, captions, recipe
        self.dataset_size = len(captions)
        self.scale_factor = scale_factor
        self.register_buffer("alphas_cumprod", alphas_cumprod, persistent=False)
        self._context: dict[str, Tensor] = {}

    def context(self, texts: list[str]) -> Tensor:
        missing = sorted({t for t in texts if t not in self._context})
        if missing:
            with torch.no_grad():
                self._context.update(zip(missing, self.frozen["conditioner"](missing).context))
        return torch.stack([self._context[t] for t in texts])

    def forward(self, batch: Batch) -> Tensor:
        r = self.recipe
        z0, noise, t, texts, teacher_texts, ys = [], [], [], [], [], []
        for i, idx in enumerate(batch.indices):
            g = batch.generator(i)
            mean, std = self.cache["moments"][idx].chunk(2, dim=0)
            z0.append((mean + std * torch.randn(mean.shape, generator=g)) * self.scale_factor)
            noise.append(torch.randn(mean.shape, generator=g))
            t.append(int(torch.randint(0, len(self.alphas_cumprod), (1,), generator=g)))
            u = torch.rand(5, generator=g)
            texts.append(self.captions[idx] if u[0] < r.caption_keep else "")
            mixed = self.cache["mixes"][idx]
            e = mixed if u[1] < r.mix_prob and not torch.isnan(mixed).any() else self.cache["embeds"][idx]
            level = torch.tensor([int(self.augmentor.timesteps * float(u[2]) ** 2)])
            y = self.augmentor(e[None], level, torch.randn((1, e.shape[0]), generator=g))[0]
            dropped = bool(u[3] < r.embed_drop)
            ys.append(torch.zeros_like(y) if dropped else y)
            # the teacher sees the caption whenever the student has the image (or the caption) to go on
            teacher_texts.append(texts[-1] if dropped else self.captions[idx])
        z0, noise, t, y = torch.stack(z0), torch.stack(noise), torch.tensor(t), torch.stack(ys)
        schedule = DiscreteSchedule(self.alphas_cumprod)
        sigma = schedule.sigmas[t]
        s = sigma.reshape(-1, 1, 1, 1)
        x = (z0 + noise * s) / (s**2 + 1) ** 0.5
        ts = schedule.sigma_to_t(sigma)
        with torch.no_grad():
            target = self.frozen["teacher"](x, ts, self.context(teacher_texts))
        out = self.unet(x, ts, self.context(texts), y)
        return (out - target).pow(2).mean()


def _bundled():
    from ..checkpoint.load import load_model
    from ..data import BUNDLED_PATH

    return load_model(BUNDLED_PATH, dtype=torch.float32)


def train_unclip(recipe: UnCLIPRecipe, out: str | Path, export_path: str | Path | None = None) -> Path:
    """All three stages, then the overlay export (default ``out/bundled-unclip.safetensors``)."""
    out = Path(out)
    base = _bundled()
    tower_path = out / "encoder.safetensors"
    if not tower_path.exists():
        torch.manual_seed(mix(recipe.seed, 11))
        task, _ = train(EncoderTask(base.text_encoders[0], recipe.dataset(2)), recipe.encoder, out / "encoder",
                        "encoder")
        save_file({k: v.contiguous() for k, v in task.tower.state_dict().items()}, tower_path)
    tower = CLIPVisionTower(BUNDLED_VISION)
    tower.load_state_dict(load_file(tower_path)[0])
    tower.eval().requires_grad_(False)
    cache_path = out / "cache.safetensors"
    if not cache_path.exists():
        build_cache(recipe, base.vae, tower, cache_path)
    cache, meta = load_file(cache_path)
    unet_path = out / "unet.safetensors"
    cfg = replace(base.spec.unet, adm_in_channels=2 * BUNDLED_VISION.projection_dim)
    if not unet_path.exists():
        torch.manual_seed(mix(recipe.seed, 12))
        unet = UNetModel(cfg)
        missing, _ = unet.load_state_dict(base.unet.state_dict(), strict=False)
        assert all(k.startswith("label_emb.") for k in missing), missing
        with torch.no_grad():   # a strong start: the vector moves the time embedding by about half its size
            unet.label_emb[0][2].weight.mul_(LABEL_GAIN)
        conditioner = Conditioner(base.spec, base.text_encoders)
        task = UnCLIPUNetTask(unet, base.unet, conditioner, cache, json.loads(meta["captions"]), float(meta["scale_factor"]),
                              base.alphas_cumprod, recipe)
        task, ema = train(task, recipe.unet, out / "unet", "unet")
        unet = ema.copy_to(task).unet if ema is not None else task.unet
        save_file({k: unet.state_dict()[k].contiguous() for k in trained_keys(unet)}, unet_path)
    path = Path(export_path) if export_path is not None else out / "bundled-unclip.safetensors"
    export_overlay(path, base, cfg, load_file(unet_path)[0], tower, cache)
    return path


def export_overlay(path: Path, base, unet_cfg, unet_sd: dict[str, Tensor], tower: CLIPVisionTower,
                   cache: dict[str, Tensor]) -> None:
    """The variant as an overlay of the bundled file: its own spec, the trained UNet tensors, the
    image tower and the noise augmentor (fp16 weights; the augmentor's buffers in fp32)."""
    embedder = ImageEmbedder(BUNDLED_VISION)
    spec = replace(base.spec, family="bundled-unclip", unet=unet_cfg, image_embedder=embedder)
    sd = {UNET_PREFIX + k: v.half() for k, v in unet_sd.items()}
    sd.update({embedder.prefix + k: v.half().contiguous() for k, v in tower.state_dict().items()})
    augmentor = NoiseAugmentor(BUNDLED_VISION.projection_dim)
    augmentor.data_mean.copy_(cache["data_mean"])
    augmentor.data_std.copy_(cache["data_std"])
    sd.update({f"noise_augmentor.{k}": v.contiguous() for k, v in augmentor.state_dict().items()})
    metadata = {SPEC_METADATA_KEY: spec_to_json(spec), "sfumato.prediction": spec.prediction,
                BASE_KEY: base.path.name, BASE_SHA256_KEY: sha256_file(base.path)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, path, metadata)
