"""Personalization: teach a model a new concept from a few captioned images.

Four trainers share the model's own training loss (``Denoiser.loss``: ε or v, whichever the model
predicts, at uniformly random discrete timesteps of its schedule, with its full conditioning —
SDXL's pooled and size vector included) and the one training loop (``loop.train``), and write the
files other tools read:

* ``train_lora``: low-rank updates of the UNet's transformer Linears (optionally the text
  encoder's), saved as kohya LoRA (``lora_unet_<diffusers name>``, ``lora_te_<name>``, ``.alpha``);
* ``train_ti``: textual inversion, new token vectors only (both text encoders' for SDXL), saved
  as A1111 safetensors;
* ``train_dreambooth``: the whole UNet (optionally the text encoder) with prior preservation on
  images the base model draws for class prompts, saved as a full single-file checkpoint;
* ``train_hypernetwork``: A1111's hypernetwork (a residual MLP on the cross-attention context
  before ``to_k`` / ``to_v``), saved as its ``.pt`` dict.

Images come from a folder (``read_images``: each picture with an optional same-named ``.txt``
caption). The shapes world's demo concept and its measurement live in ``diamond``; the LoRA
module in ``lora_module``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..adapters.embeddings import DUAL, SINGLE, Embedding, EmbeddingSet, save_embedding
from ..adapters.hypernetwork import Hypernetwork, hypernetworks_applied
from ..api import Pipeline
from ..checkpoint.io import atomic_path, load_file, save_file
from ..checkpoint.load import LoadedModel
from ..checkpoint.specs import UNET_PREFIX
from ..errors import SfumatoError
from ..safe_image import open_image
from ..text.conditioner import Cond, Conditioner, SizeConditioning
from ..text.tokenizer import get_tokenizer
from .lora_module import LoRA, lora_targets
from .loop import Batch, LoopConfig, Task, train

TOKEN = "sks"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def read_images(directory: str | Path, default_caption: str | None = None, size: int | None = None
                ) -> list[tuple[np.ndarray, str]]:
    """Images (RGB uint8, resized to ``size`` if given) and captions from a folder: ``x.png`` is
    captioned by ``x.txt``, else by ``default_caption``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise SfumatoError(f"images: folder not found: {directory}")
    out = []
    for path in sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        text_file = path.with_suffix(".txt")
        text = text_file.read_text().strip() if text_file.is_file() else default_caption
        if text is None:
            raise SfumatoError(f"images: {path.name} has no caption file {text_file.name} (or pass --caption)")
        with open_image(path, "images") as im:
            im = im.convert("RGB")
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.LANCZOS)
            out.append((np.asarray(im), text))
    if not out:
        raise SfumatoError(f"images: no {'/'.join(IMAGE_SUFFIXES)} files in {directory}")
    return out


@dataclass
class TrainConfig:
    """Shared settings. ``bf16``: None = where the hardware computes it natively (CUDA with bf16, or a
    CPU with fast bf16 matrix units), else fp32; weights and optimizer state stay fp32 either way."""

    steps: int = 400
    lr: float = 1e-3
    batch_size: int = 4
    seed: int = 0
    gradient_checkpointing: bool = False
    bf16: bool | None = None
    log_every: int = 50


@dataclass
class TrainResult:
    path: Path
    losses: list[float]
    seconds: float


def _use_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    if cfg.bf16 is not None:
        return cfg.bf16
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    from ..models.layers import cpu_has_fast_bf16

    return cpu_has_fast_bf16()


class TrainingData:
    """Training latents (VAE posterior modes, scaled; horizontal flips added) and their captions."""

    def __init__(self, pipe: Pipeline, items: Sequence[tuple[np.ndarray, str]]):
        if not items:
            raise SfumatoError("images: no training images")
        px = pipe.model.spec.resolution
        images = [im if im.shape[:2] == (px, px) else
                  np.asarray(Image.fromarray(im).resize((px, px), Image.Resampling.LANCZOS)) for im, _ in items]
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
        x = torch.cat([x, x.flip(-1)])
        self.latents = pipe.engine.encode(x)
        self.captions = [t for _, t in items] * 2
        self.size = SizeConditioning(original=(px, px), target=(px, px))

    def sample(self, g: torch.Generator, n: int) -> tuple[Tensor, list[str]]:
        idx = torch.randint(0, len(self.captions), (n,), generator=g).tolist()
        return self.latents[idx], [self.captions[i] for i in idx]


def diffusion_loss(pipe: Pipeline, z0: Tensor, cond: Cond, g: torch.Generator) -> Tensor:
    """Per-sample ``Denoiser.loss`` of the model (its own target, ε or v) at uniformly random discrete
    timesteps of its schedule: noise and timesteps drawn from ``g``."""
    engine = pipe.engine
    noise = torch.randn(z0.shape, generator=g)
    t = torch.randint(0, len(engine.schedule.sigmas), (z0.shape[0],), generator=g)
    return engine.denoiser.loss(z0, noise, engine.schedule.sigmas[t], (cond, None))


def text_conditions(conditioner: Conditioner, texts: list[str], size: SizeConditioning, grad: bool = True) -> Cond:
    """``Conditioner.encode``'s conditioning of ``texts`` (SDXL: with its ``y``); with ``grad``,
    differentiable in the encoders and the embeddings, so training sees the inference path (chunks,
    emphasis, embedding substitution)."""
    return Cond.cat(conditioner.encode(texts, grad=grad, size=size))


def text_context(conditioner: Conditioner, texts: list[str], grad: bool = True) -> Tensor:
    """The cross-attention contexts of ``texts`` (see ``text_conditions``)."""
    return torch.cat([c.context for c in conditioner.encode(texts, grad=grad)])


@contextmanager
def gradient_checkpointing(unet: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Within the block, each UNet block recomputes its activations in the backward pass."""
    blocks = [*unet.input_blocks, unet.middle_block, *unet.output_blocks] if enabled else []
    for block in blocks:
        block.forward = partial(checkpoint, block.forward, use_reentrant=False)
    try:
        yield
    finally:
        for block in blocks:
            del block.forward


class _Objective(Task):
    """``loss_fn`` as a task of the training loop: step k draws from its own generator."""

    def __init__(self, params: list[Tensor], loss_fn: Callable[[torch.Generator], Tensor], seed: int):
        super().__init__()
        self.trained = nn.ParameterList(params)
        self.loss_fn, self.seed, self.dataset_size = loss_fn, seed, 1

    def forward(self, batch: Batch) -> Tensor:
        return self.loss_fn(torch.Generator().manual_seed(self.seed * 1_000_003 + batch.step))


def _fit(params: list[Tensor], loss_fn: Callable[[torch.Generator], Tensor], cfg: TrainConfig,
         device: torch.device, what: str) -> list[float]:
    """AdamW on ``params`` for ``cfg.steps`` steps of ``loss_fn``, in the training loop (in memory)."""
    losses: list[float] = []
    loop = LoopConfig(steps=cfg.steps, batch_size=1, lr=cfg.lr, seed=cfg.seed, weight_decay=0.0, grad_clip=1.0,
                      log_every=cfg.log_every or cfg.steps, progress=False, bf16=_use_bf16(cfg, device))
    train(_Objective(params, loss_fn, cfg.seed), loop, None, what, lambda step, loss: losses.append(loss))
    return losses


def _output(path: str | Path) -> Path:
    """The output file's path, its folder created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _frozen(model: LoadedModel) -> None:
    for module in (model.unet, model.vae, *model.text_encoders):
        module.requires_grad_(False)


def _device(model: LoadedModel) -> torch.device:
    return next(model.unet.parameters()).device


# --- the trainers ----------------------------------------------------------------------------------


def train_lora(pipe: Pipeline, items: Sequence[tuple[np.ndarray, str]], out: str | Path, *,
               rank: int = 4, alpha: float = 4.0, text_encoder: bool = False,
               cfg: TrainConfig = TrainConfig(steps=400, lr=2e-3)) -> TrainResult:
    """Train a LoRA on ``items`` and save it (kohya safetensors, fp16 factors, ``ss_*`` metadata)."""
    start = time.perf_counter()
    out = _output(out)
    model = pipe.model
    _frozen(model)
    torch.manual_seed(cfg.seed)
    lora = LoRA(lora_targets(model, text_encoder), rank, alpha)
    data = TrainingData(pipe, items)
    cond = pipe.engine.conditioner

    def loss_fn(g: torch.Generator) -> Tensor:
        z0, texts = data.sample(g, cfg.batch_size)
        return diffusion_loss(pipe, z0, text_conditions(cond, texts, data.size, grad=text_encoder), g).mean()

    with lora.applied(), gradient_checkpointing(model.unet, cfg.gradient_checkpointing):
        losses = _fit(list(lora.parameters()), loss_fn, cfg, _device(model), "lora")
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(alpha),
                "ss_output_name": Path(out).stem, "ss_steps": str(cfg.steps), "ss_num_train_images": str(len(items)),
                "ss_base_model_version": _base_version(model), "ss_training_comment": "sfumato train lora"}
    save_file(lora.state_dict_kohya(), out, metadata)
    return TrainResult(out, losses, time.perf_counter() - start)


def train_ti(pipe: Pipeline, items: Sequence[tuple[np.ndarray, str]], out: str | Path, *, token: str = TOKEN,
             init_word: str = "square", num_vectors: int = 1,
             cfg: TrainConfig = TrainConfig(steps=400, lr=5e-3)) -> TrainResult:
    """Learn ``num_vectors`` vectors for ``token`` (captions must use it) in each text encoder (SDXL:
    both), starting from the token embedding of ``init_word``; the model stays frozen. Saved as A1111
    safetensors named ``token`` (SDXL: ``clip_l`` and ``clip_g``)."""
    start = time.perf_counter()
    out = _output(out)
    model = pipe.model
    if not all(token in text for _, text in items):
        raise SfumatoError(f"token: every caption must contain {token!r}")
    if len(model.text_encoders) not in (1, 2):
        raise SfumatoError("textual inversion training supports models with one or two text encoders")
    _frozen(model)
    ids = get_tokenizer().encode(init_word)
    if not ids:
        raise SfumatoError(f"init_word: {init_word!r} has no tokens")
    keys = [SINGLE] if len(model.text_encoders) == 1 else list(DUAL)
    vectors = {}
    for key, encoder in zip(keys, model.text_encoders):
        table = (encoder.text_model.embeddings.token_embedding if hasattr(encoder, "text_model")
                 else encoder.token_embedding).weight
        vectors[key] = nn.Parameter(table[ids].detach().float().mean(0).repeat(num_vectors, 1).clone())
    embeddings = EmbeddingSet([Embedding(token, vectors)])
    cond = Conditioner(model.spec, model.text_encoders, embeddings)
    if token not in cond.embeddings:
        raise SfumatoError(f"token: {token!r} cannot be an embedding name ({cond.embeddings.skipped.get(token)})")
    data = TrainingData(pipe, items)

    def loss_fn(g: torch.Generator) -> Tensor:
        z0, texts = data.sample(g, cfg.batch_size)
        return diffusion_loss(pipe, z0, text_conditions(cond, texts, data.size), g).mean()

    with gradient_checkpointing(model.unet, cfg.gradient_checkpointing):
        losses = _fit(list(vectors.values()), loss_fn, cfg, _device(model), "ti")
    saved = {k: v.detach().cpu() for k, v in vectors.items()}
    save_embedding(out, token, saved[SINGLE] if keys == [SINGLE] else saved)
    return TrainResult(out, losses, time.perf_counter() - start)


# --- DreamBooth ------------------------------------------------------------------------------------


def class_images(pipe: Pipeline, prompts: Sequence[str], *, steps: int = 20, cfg_scale: float = 7.0,
                 seed: int = 10_000) -> list[tuple[np.ndarray, str]]:
    """Prior-preservation images: what the base model draws for each class prompt."""
    out = []
    for k, prompt in enumerate(prompts):
        image = pipe.txt2img(prompt, steps=steps, cfg_scale=cfg_scale, seed=seed + k, watermark=False).images[0]
        out.append((np.asarray(image.convert("RGB")), prompt))
    return out


def train_dreambooth(pipe: Pipeline, items: Sequence[tuple[np.ndarray, str]], out: str | Path, *,
                     class_items: Sequence[tuple[np.ndarray, str]] = (), prior_weight: float = 1.0,
                     text_encoder: bool = False, cfg: TrainConfig = TrainConfig(steps=300, lr=1e-4)) -> TrainResult:
    """Fine-tune the UNet (and with ``text_encoder`` the text encoder) on ``items``; each step also
    fits a batch of ``class_items`` (prior preservation) weighted ``prior_weight``. Writes the input
    checkpoint with the trained weights replaced, in its dtypes, with its metadata."""
    start = time.perf_counter()
    out = _output(out)
    model = pipe.model
    if not model.path.is_file():
        raise SfumatoError("model: DreamBooth writes a single-file checkpoint; the input must be one")
    _frozen(model)
    trained = [model.unet] + (list(model.text_encoders) if text_encoder else [])
    for m in trained:
        m.requires_grad_(True).train()
    data = TrainingData(pipe, items)
    prior = TrainingData(pipe, class_items) if class_items else None
    cond = pipe.engine.conditioner

    def loss_fn(g: torch.Generator) -> Tensor:
        z0, texts = data.sample(g, cfg.batch_size)
        if prior is not None:
            pz, ptexts = prior.sample(g, cfg.batch_size)
            z0, texts = torch.cat([z0, pz]), texts + ptexts
        err = diffusion_loss(pipe, z0, text_conditions(cond, texts, data.size, grad=text_encoder), g)
        if prior is None:
            return err.mean()
        n = cfg.batch_size
        return err[:n].mean() + prior_weight * err[n:].mean()

    params = [p for m in trained for p in m.parameters()]
    try:
        with gradient_checkpointing(model.unet, cfg.gradient_checkpointing):
            losses = _fit(params, loss_fn, cfg, _device(model), "dreambooth")
    finally:
        for m in trained:
            m.requires_grad_(False).eval()
    _save_checkpoint(model, out, text_encoder)
    return TrainResult(out, losses, time.perf_counter() - start)


def _save_checkpoint(model: LoadedModel, out: Path, text_encoder: bool) -> None:
    sd, metadata = load_file(model.path)
    parts = [(UNET_PREFIX, model.unet)]
    if text_encoder:
        parts += [(slot.prefix, enc) for slot, enc in zip(model.spec.text, model.text_encoders)]
    for prefix, module in parts:
        for k, v in module.state_dict().items():
            old = sd.get(prefix + k)
            if old is None:
                raise SfumatoError(f"model: {model.path.name} has no {prefix + k}; cannot write it back")
            sd[prefix + k] = v.detach().to(old.device, old.dtype).contiguous()
    save_file(sd, out, metadata)


# --- hypernetwork ----------------------------------------------------------------------------------


def train_hypernetwork(pipe: Pipeline, items: Sequence[tuple[np.ndarray, str]], out: str | Path, *,
                       structure: Sequence[float] = (1, 2, 1), activation: str = "linear",
                       cfg: TrainConfig = TrainConfig(steps=300, lr=1e-3)) -> TrainResult:
    """Train an A1111 hypernetwork for the UNet's context width on ``items`` (weights initialised
    N(0, 0.01), biases 0: A1111's "Normal"); saved with ``torch.save`` (A1111's ``.pt`` format)."""
    start = time.perf_counter()
    out = _output(out)
    model = pipe.model
    _frozen(model)
    torch.manual_seed(cfg.seed)
    net = Hypernetwork([model.spec.unet.context_dim], name=out.stem, structure=structure, activation=activation)
    for module in net.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.01)
            nn.init.zeros_(module.bias)
    data = TrainingData(pipe, items)
    cond = pipe.engine.conditioner

    def loss_fn(g: torch.Generator) -> Tensor:
        z0, texts = data.sample(g, cfg.batch_size)
        return diffusion_loss(pipe, z0, text_conditions(cond, texts, data.size, grad=False), g).mean()

    with hypernetworks_applied(model.unet, [(net, 1.0)]), \
            gradient_checkpointing(model.unet, cfg.gradient_checkpointing):
        losses = _fit(list(net.parameters()), loss_fn, cfg, _device(model), "hypernetwork")
    with atomic_path(out) as tmp:
        torch.save(net.a1111_dict(cfg.steps), tmp)
    return TrainResult(out, losses, time.perf_counter() - start)


def _base_version(model: LoadedModel) -> str:
    """kohya's ``ss_base_model_version`` of the model LoRA training ran on."""
    family = model.spec.family
    if family.startswith("sdxl"):
        return "sdxl_base_v1-0"
    if family.startswith("sd2"):
        return "sd_v2" if model.spec.prediction == "eps" else "sd_v2_768_v"
    return "sd_v1"

