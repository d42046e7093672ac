"""Personalization: teach a model a new concept from a few captioned images.

Four trainers share one loss (ε-prediction MSE at random discrete timesteps on the model's
``alphas_cumprod``, as in ``train_unet``) and write the files other tools read:

* ``train_lora``: low-rank updates of the UNet's transformer Linears (optionally the text
  encoder's), saved as kohya LoRA (``lora_unet_<diffusers name>``, ``lora_te_<name>``, ``.alpha``);
* ``train_ti``: textual inversion, new token vectors only, saved as A1111 safetensors;
* ``train_dreambooth``: the whole UNet (optionally the text encoder) with prior preservation on
  images the base model draws for class prompts, saved as a full single-file checkpoint;
* ``train_hypernetwork``: A1111's hypernetwork (a residual MLP on the cross-attention context
  before ``to_k`` / ``to_v``), saved as its ``.pt`` dict.

Images come from a folder (``read_images``: each picture with an optional same-named ``.txt``
caption). The demo concept of the shapes world is a *diamond* (a square turned 45°), a shape the
bundled model never saw: ``concept_images`` draws it, ``is_diamond`` finds it in generated images.
A frozen UNet cannot learn to draw it, so textual inversion's concepts are elsewhere: a new colour
(teal, reachable only as far as the VAE reproduces it) and a token for a colour-and-shape pair
(see ``concepts``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils.checkpoint import checkpoint

from ..adapters.embeddings import Embedding, EmbeddingSet, save_embedding
from ..adapters.hypernetwork import Hypernetwork, hypernetworks_applied
from ..api import Pipeline
from ..checkpoint.convert_unet import ldm_unet_to_diffusers
from ..checkpoint.io import load_file, save_file
from ..checkpoint.load import LoadedModel
from ..checkpoint.specs import UNET_PREFIX
from ..errors import SfumatoError
from ..safe_image import open_image
from ..text.conditioner import Conditioner
from ..text.tokenizer import get_tokenizer
from .judge import MIN_OBJECT, _components
from .shapes import COLOURS, JITTER, MARGIN, PALETTE, SINGLE_SIZE, SUPERSAMPLE

log = logging.getLogger(__name__)

TOKEN = "sks"
TEMPLATE = "a {colour} {token} on a {background} background"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


# --- the demo concept: a diamond -------------------------------------------------------------------


def render_diamond(colour: str, background: str, cx: float, cy: float, size: float, px: int = 64,
                   rng: np.random.Generator | None = None) -> np.ndarray:
    """A ``colour`` diamond (corners up, down, left, right; ``size`` = its diagonal, a fraction of
    the side) on ``background``, drawn like ``shapes.render``: supersampled, ±8 colour jitter with ``rng``."""

    def rgb(name: str) -> tuple[int, ...]:
        c = np.array(PALETTE[name])
        if rng is not None:
            c = np.clip(c + rng.integers(-JITTER, JITTER + 1, 3), 0, 255)
        return tuple(int(v) for v in c)

    n = px * SUPERSAMPLE
    img = Image.new("RGB", (n, n), rgb(background))
    x, y, h = cx * n, cy * n, size * n / 2
    ImageDraw.Draw(img).polygon(((x, y - h), (x + h, y), (x, y + h), (x - h, y)), fill=rgb(colour))
    return np.array(img.reduce(SUPERSAMPLE))


def concept_images(n: int = 16, seed: int = 0, token: str = TOKEN, px: int = 64) -> list[tuple[np.ndarray, str]]:
    """``n`` diamonds of random palette colours on other random backgrounds, captioned with ``TEMPLATE``."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        colour, background = rng.choice(COLOURS, 2, replace=False)
        size = rng.uniform(*SINGLE_SIZE) * 1.15  # a diamond's diagonal; its area is half the square's
        lo, hi = MARGIN + size / 2, 1 - MARGIN - size / 2
        image = render_diamond(colour, background, rng.uniform(lo, hi), rng.uniform(lo, hi), size, px, rng)
        out.append((image, TEMPLATE.format(colour=colour, token=token, background=background)))
    return out


def write_images(directory: str | Path, items: Sequence[tuple[np.ndarray, str]]) -> Path:
    """Write ``items`` as ``NNN.png`` with ``NNN.txt`` captions (the layout ``read_images`` reads)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for i, (image, text) in enumerate(items):
        Image.fromarray(image).save(directory / f"{i:03d}.png")
        (directory / f"{i:03d}.txt").write_text(text + "\n")
    return directory


def _object_masks(image: np.ndarray) -> list[np.ndarray]:
    """Masks of the significant objects: 4-connected regions far from the border's median colour."""
    img = np.asarray(image, dtype=np.float32)[..., :3]
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    bg = np.median(border, axis=0)
    rgb = np.array(list(PALETTE.values()), dtype=np.float32)
    nearest = rgb[np.argmin(np.linalg.norm(rgb - bg, axis=1))]  # the background's palette colour
    gaps = np.linalg.norm(rgb - nearest, axis=1)
    threshold = 0.45 * gaps[gaps > 0].min()  # as the judge: halfway-ish to the closest other colour
    mask = np.linalg.norm(img - bg, axis=-1) > threshold
    labels = _components(mask)
    ids, counts = np.unique(labels[mask], return_counts=True)
    h, w = mask.shape
    return [labels == i for i in ids[counts >= MIN_OBJECT * h * w]]


def diamond_score(mask: np.ndarray) -> tuple[float, float, float]:
    """(fill, row peak, column peak) of an object mask: its area over its bounding box (diamond ½,
    circle π/4, square 1, triangle ½), and where its widest row / tallest column lies, as a fraction
    of its height / width (0.5 for a diamond or circle; 1 for an upward triangle's widest row)."""
    ys, xs = np.nonzero(mask)
    crop = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1].astype(np.float64)
    fill = crop.sum() / crop.size

    def peak(profile: np.ndarray) -> float:
        at = np.nonzero(profile >= 0.9 * profile.max())[0]
        return float((at.mean() + 0.5) / len(profile))

    return float(fill), peak(crop.sum(1)), peak(crop.sum(0))


def is_diamond(mask: np.ndarray) -> bool:
    """A diamond: about half its bounding box filled, widest in the middle both ways, about as tall as wide."""
    ys, xs = np.nonzero(mask)
    aspect = (np.ptp(ys) + 1) / (np.ptp(xs) + 1)
    fill, row, col = diamond_score(mask)
    return 0.35 <= fill <= 0.68 and abs(row - 0.5) <= 0.2 and abs(col - 0.5) <= 0.2 and 0.7 <= aspect <= 1.4


def concept_present(image: np.ndarray) -> bool:
    """Whether a generated image shows the demo concept: some significant object is a diamond."""
    return any(is_diamond(m) for m in _object_masks(image))


# --- data ------------------------------------------------------------------------------------------


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


class _Data:
    """Training latents (VAE posterior modes, scaled; horizontal flips added) and their captions."""

    def __init__(self, pipe: Pipeline, items: Sequence[tuple[np.ndarray, str]]):
        px = pipe.model.spec.resolution
        images = [im if im.shape[:2] == (px, px) else
                  np.asarray(Image.fromarray(im).resize((px, px), Image.Resampling.LANCZOS)) for im, _ in items]
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
        x = torch.cat([x, x.flip(-1)])
        self.latents = pipe.generator.base.encode(x)
        self.captions = [t for _, t in items] * 2

    def sample(self, g: torch.Generator, n: int) -> tuple[Tensor, list[str]]:
        idx = torch.randint(0, len(self.captions), (n,), generator=g).tolist()
        return self.latents[idx], [self.captions[i] for i in idx]


def eps_loss(unet: nn.Module, z0: Tensor, context: Tensor, alphas_cumprod: Tensor, g: torch.Generator) -> Tensor:
    """ε-prediction MSE at uniformly random discrete timesteps (the bundled model's training loss)."""
    noise = torch.randn(z0.shape, generator=g)
    t = torch.randint(0, len(alphas_cumprod), (z0.shape[0],), generator=g)
    ac = alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = ac.sqrt() * z0 + (1 - ac).sqrt() * noise
    return F.mse_loss(unet(x_t, t, context).float(), noise)


def text_context(conditioner: Conditioner, texts: list[str], grad: bool = True) -> Tensor:
    """``Conditioner.encode``'s contexts; with ``grad``, differentiable in the encoder and the
    embeddings, so training sees the inference path (chunks, emphasis, embedding substitution)."""
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


def _fit(params: list[Tensor], loss_fn: Callable[[torch.Generator], Tensor], cfg: TrainConfig,
         device: torch.device, what: str) -> list[float]:
    """AdamW on ``params`` for ``cfg.steps`` steps of ``loss_fn`` (given the step's generator)."""
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    bf16 = _use_bf16(cfg, device)
    losses = []
    for step in range(cfg.steps):
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            loss = loss_fn(g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if cfg.log_every and (step + 1) % cfg.log_every == 0:
            log.info("%s step %d/%d loss %.4f", what, step + 1, cfg.steps, np.mean(losses[-cfg.log_every:]))
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


# --- LoRA ------------------------------------------------------------------------------------------


class _Delta(nn.Module):
    """A weight parametrization ``W + up @ down · scale`` (reshaped to W's shape: 1×1 convs too)."""

    def __init__(self, down: nn.Parameter, up: nn.Parameter, scale: float):
        super().__init__()
        self.down, self.up, self.scale = down, up, scale

    def forward(self, weight: Tensor) -> Tensor:
        return weight + (self.up @ self.down).view(weight.shape).to(weight.dtype) * self.scale


class LoRA(nn.Module):
    """Rank-``rank`` updates ``W += up @ down · alpha / rank`` of Linear (and 1×1 conv) weights, put in
    as weight parametrizations, so every use of the weight sees them (also ``F.linear`` on slices)."""

    def __init__(self, layers: dict[str, nn.Linear | nn.Conv2d], rank: int, alpha: float):
        super().__init__()
        if rank < 1:
            raise SfumatoError(f"rank: must be ≥ 1, got {rank}")
        self.names = list(layers)
        self.layers = layers
        self.rank, self.alpha, self.scale = rank, float(alpha), alpha / rank
        self.down = nn.ParameterList(nn.Parameter(torch.empty(rank, m.weight[0].numel())) for m in layers.values())
        self.up = nn.ParameterList(nn.Parameter(torch.zeros(m.weight.shape[0], rank)) for m in layers.values())
        for d in self.down:
            nn.init.kaiming_uniform_(d, a=math.sqrt(5))

    @contextmanager
    def applied(self) -> Iterator[None]:
        modules = list(self.layers.values())
        for module, down, up in zip(modules, self.down, self.up):
            parametrize.register_parametrization(module, "weight", _Delta(down, up, self.scale))
        try:
            yield
        finally:
            for module in modules:
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)

    def state_dict_kohya(self, dtype: torch.dtype = torch.float16) -> dict[str, Tensor]:
        """kohya's keys; a 1×1 conv's factors get its trailing ``[1, 1]`` dimensions."""
        sd = {}
        for (name, module), down, up in zip(self.layers.items(), self.down, self.up):
            tail = module.weight.shape[2:]
            sd[f"{name}.lora_down.weight"] = down.detach().reshape(self.rank, -1, *tail).to(dtype).contiguous()
            sd[f"{name}.lora_up.weight"] = up.detach().reshape(-1, self.rank, *tail).to(dtype).contiguous()
            sd[f"{name}.alpha"] = torch.tensor(self.alpha, dtype=dtype)
        return sd


def lora_targets(model: LoadedModel, text_encoder: bool = False) -> dict[str, nn.Linear | nn.Conv2d]:
    """kohya name → layer: every Linear inside the UNet's spatial transformers and their
    ``proj_in`` / ``proj_out`` (Linear or 1×1 conv), named as kohya names them (``lora_unet_`` + the
    diffusers module path, '.' → '_'); with ``text_encoder`` also every Linear of the
    (transformers-layout) text encoder's layers (``lora_te_`` + its path)."""
    unet = model.unet
    keys = list(unet.state_dict())
    to_diffusers = {ldm: d for d, ldm in ldm_unet_to_diffusers(dict(zip(keys, keys)), unet.cfg).items()}
    out: dict[str, nn.Linear | nn.Conv2d] = {}
    for name, module in unet.named_modules():
        if isinstance(module, nn.Linear) and ".transformer_blocks." in name or (
                isinstance(module, (nn.Linear, nn.Conv2d)) and name.endswith((".proj_in", ".proj_out"))):
            diffusers = to_diffusers[f"{name}.weight"].removesuffix(".weight")
            out["lora_unet_" + diffusers.replace(".", "_")] = module
    if text_encoder:
        if len(model.text_encoders) != 1 or model.spec.text[0].config.layout != "hf":
            raise SfumatoError("train_text_encoder: supported for one transformers-layout text encoder (SD 1.x)")
        for name, module in model.text_encoders[0].named_modules():
            if isinstance(module, nn.Linear) and ".layers." in name:
                out["lora_te_" + name.replace(".", "_")] = module
    return out


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
    data = _data(pipe, items)
    cond = pipe.generator.base.conditioner

    def loss_fn(g: torch.Generator) -> Tensor:
        z0, texts = data.sample(g, cfg.batch_size)
        return eps_loss(model.unet, z0, text_context(cond, texts, grad=text_encoder), model.alphas_cumprod, g)

    with lora.applied(), gradient_checkpointing(model.unet, cfg.gradient_checkpointing):
        losses = _fit(list(lora.parameters()), loss_fn, cfg, _device(model), "lora")
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(alpha),
                "ss_output_name": Path(out).stem, "ss_steps": str(cfg.steps), "ss_num_train_images": str(len(items)),
                "ss_base_model_version": "sd_v1", "ss_training_comment": "sfumato train lora"}
    save_file(lora.state_dict_kohya(), out, metadata)
    return TrainResult(out, losses, time.perf_counter() - start)


def _data(pipe: Pipeline, items: Sequence[tuple[np.ndarray, str]]) -> _Data:
    if not items:
        raise SfumatoError("images: no training images")
    return _Data(pipe, items)


# --- textual inversion -----------------------------------------------------------------------------


def train_ti(pipe: Pipeline, items: Sequence[tuple[np.ndarray, str]], out: str | Path, *, token: str = TOKEN,
             init_word: str = "square", num_vectors: int = 1,
             cfg: TrainConfig = TrainConfig(steps=400, lr=5e-3)) -> TrainResult:
    """Learn ``num_vectors`` vectors for ``token`` (captions must use it), starting from the token
    embedding of ``init_word``; the model stays frozen. Saved as A1111 safetensors named ``token``."""
    start = time.perf_counter()
    out = _output(out)
    model = pipe.model
    if len(model.text_encoders) != 1:
        raise SfumatoError("textual inversion training supports models with one text encoder")
    if not all(token in text for _, text in items):
        raise SfumatoError(f"token: every caption must contain {token!r}")
    _frozen(model)
    encoder = model.text_encoders[0]
    table = (encoder.text_model.embeddings.token_embedding if hasattr(encoder, "text_model")
             else encoder.token_embedding).weight
    ids = get_tokenizer().encode(init_word)
    if not ids:
        raise SfumatoError(f"init_word: {init_word!r} has no tokens")
    init = table[ids].detach().float().mean(0)
    vectors = nn.Parameter(init.repeat(num_vectors, 1).clone())
    embeddings = EmbeddingSet([Embedding(token, {"*": vectors})])
    cond = Conditioner(model.spec, model.text_encoders, embeddings)
    if token not in cond.embeddings:
        raise SfumatoError(f"token: {token!r} cannot be an embedding name ({cond.embeddings.skipped.get(token)})")
    data = _data(pipe, items)

    def loss_fn(g: torch.Generator) -> Tensor:
        z0, texts = data.sample(g, cfg.batch_size)
        return eps_loss(model.unet, z0, text_context(cond, texts), model.alphas_cumprod, g)

    with gradient_checkpointing(model.unet, cfg.gradient_checkpointing):
        losses = _fit([vectors], loss_fn, cfg, _device(model), "ti")
    save_embedding(out, token, vectors.detach().cpu())
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
    data = _data(pipe, items)
    prior = _data(pipe, class_items) if class_items else None
    cond = pipe.generator.base.conditioner

    def loss_fn(g: torch.Generator) -> Tensor:
        z0, texts = data.sample(g, cfg.batch_size)
        if prior is not None:
            pz, ptexts = prior.sample(g, cfg.batch_size)
            z0, texts = torch.cat([z0, pz]), texts + ptexts
        ctx = text_context(cond, texts, grad=text_encoder)
        if prior is None:
            return eps_loss(model.unet, z0, ctx, model.alphas_cumprod, g)
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, len(model.alphas_cumprod), (z0.shape[0],), generator=g)
        ac = model.alphas_cumprod[t].view(-1, 1, 1, 1)
        err = (model.unet(ac.sqrt() * z0 + (1 - ac).sqrt() * noise, t, ctx).float() - noise).pow(2).mean((1, 2, 3))
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
    data = _data(pipe, items)
    cond = pipe.generator.base.conditioner

    def loss_fn(g: torch.Generator) -> Tensor:
        z0, texts = data.sample(g, cfg.batch_size)
        return eps_loss(model.unet, z0, text_context(cond, texts, grad=False), model.alphas_cumprod, g)

    with hypernetworks_applied(model.unet, [(net, 1.0)]), \
            gradient_checkpointing(model.unet, cfg.gradient_checkpointing):
        losses = _fit(list(net.parameters()), loss_fn, cfg, _device(model), "hypernetwork")
    tmp = out.with_name(out.name + ".tmp")
    torch.save(net.a1111_dict(cfg.steps), tmp)
    tmp.replace(out)
    return TrainResult(out, losses, time.perf_counter() - start)


# --- measuring the demo concept --------------------------------------------------------------------


def eval_prompts(n: int = 20, seed: int = 1, token: str = TOKEN) -> list[str]:
    """``n`` prompts of ``TEMPLATE`` with random (colour, background) pairs (their own seed)."""
    rng = np.random.default_rng([seed, 7])
    return [TEMPLATE.format(colour=c, token=token, background=b)
            for c, b in (rng.choice(COLOURS, 2, replace=False) for _ in range(n))]


def concept_rate(pipe: Pipeline, prompts: Sequence[str], *, seed: int = 0, steps: int = 20,
                 cfg_scale: float = 7.0) -> float:
    """The fraction of images (prompt k with seed ``seed + k``) in which ``concept_present``."""
    hits = [concept_present(np.asarray(pipe.txt2img(p, steps=steps, cfg_scale=cfg_scale, seed=seed + k,
                                                    watermark=False).images[0].convert("RGB")))
            for k, p in enumerate(prompts)]
    return float(np.mean(hits))


def demo(method: str, out: str | Path, *, steps: int | None = None, lr: float | None = None, images: int = 16,
         eval_n: int = 20, control: bool = True, concept: str = "diamond") -> dict:
    """Train ``method`` on ``images`` scenes of ``concept`` (``diamond``: the new shape; ``teal``:
    the new colour; ``pair``: a token for a purple triangle; see ``concepts``) with the bundled model,
    then measure the concept rate over ``eval_n`` prompts for the trained model (and with
    ``control`` the base model)."""
    import sfumato

    from . import concepts

    out = Path(out)
    if concept == "diamond":
        items, prompts, rate_of = concept_images(images), eval_prompts(eval_n), concept_rate
    elif concept == "teal":
        items, prompts = concepts.colour_concept_images(images), concepts.colour_eval_prompts(eval_n)
        rate_of = concepts.colour_rate
    elif concept == "pair":
        items, prompts = concepts.pair_concept_images(images), concepts.pair_eval_prompts(eval_n)
        rate_of = concepts.pair_rate
    else:
        raise SfumatoError(f"concept: unknown {concept!r}; valid: diamond, teal, pair")
    write_images(out / "images", items)
    pipe = sfumato.load(dtype="fp32")
    base_rate = rate_of(pipe, prompts) if control else None
    defaults = {"lora": TrainConfig(steps=300, lr=2e-3), "ti": TrainConfig(steps=300, lr=5e-3),
                "dreambooth": TrainConfig(steps=200, lr=1e-4), "hypernetwork": TrainConfig(steps=200, lr=1e-3)}
    cfg = defaults[method]
    cfg = TrainConfig(steps=steps or cfg.steps, lr=lr or cfg.lr)
    if method == "lora":
        result = train_lora(pipe, items, out / "concept.safetensors", cfg=cfg)
        from ..adapters.lora import apply_loras

        trained = sfumato.load(dtype="fp32")
        unmatched = apply_loras(trained.model, [(result.path, 1.0)]).unmatched
        if unmatched:
            raise SfumatoError(f"the saved LoRA has unmatched keys: {unmatched}")
        rate = rate_of(trained, prompts)
    elif method == "ti":
        init_word = {"teal": "blue green", "pair": "square"}.get(concept, "square")
        result = train_ti(pipe, items, out / "embeddings" / f"{TOKEN}.safetensors", init_word=init_word, cfg=cfg)
        rate = rate_of(sfumato.load(dtype="fp32", embeddings_dir=out / "embeddings"), prompts)
    elif method == "dreambooth":
        prior_start = time.perf_counter()
        classes = class_images(pipe, [p.replace(TOKEN, "square") for p in eval_prompts(images, seed=2)])
        prior_seconds = time.perf_counter() - prior_start
        result = train_dreambooth(sfumato.load(dtype="fp32"), items, out / "dreambooth.safetensors",
                                  class_items=classes, cfg=cfg)
        result.seconds += prior_seconds
        rate = rate_of(sfumato.load(result.path), prompts)
    elif method == "hypernetwork":
        result = train_hypernetwork(pipe, items, out / "hypernetworks" / "concept.pt", cfg=cfg)
        hyper = sfumato.load(dtype="fp32", hypernet_dir=out / "hypernetworks")
        rate = rate_of(hyper, [f"{p} <hypernet:concept:1>" for p in prompts])
    else:
        raise SfumatoError(f"method: unknown {method!r}")
    report = {"method": method, "train_seconds": round(result.seconds, 1), "steps": cfg.steps, "lr": cfg.lr,
              "loss_first_50": float(np.mean(result.losses[:50])), "loss_last_50": float(np.mean(result.losses[-50:])),
              "concept_rate": rate, "base_concept_rate": base_rate, "prompts": len(prompts), "path": str(result.path)}
    return report


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description="train a demo concept (a diamond) on the bundled model and measure it")
    parser.add_argument("method", choices=("lora", "ti", "dreambooth", "hypernetwork"))
    parser.add_argument("--out", default="out/personalize")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-control", action="store_true", help="skip measuring the base model")
    parser.add_argument("--concept", choices=("diamond", "teal", "pair"), default="diamond")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    print(json.dumps(demo(args.method, Path(args.out) / f"{args.method}-{args.concept}", steps=args.steps,
                          lr=args.lr, control=not args.no_control, concept=args.concept), indent=2))
