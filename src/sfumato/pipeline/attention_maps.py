"""Attention maps (DAAM, Tang et al. 2022): where in the image each prompt word was looked at.

Forward hooks on the UNet's cross-attention modules (``attn2`` of every transformer block)
recompute softmax(q·kᵀ/√d) from the module's own ``to_q`` / ``to_k`` weights for the conditional
rows of each UNet call (under CFG a call holds one image's uncond row first, then its cond rows,
one per ``AND`` part). The probabilities are averaged over heads and over layers (each upsampled
bilinearly to the latent size) and over the UNet calls of a run, giving per context position a
heat map that sums to 1 over positions at every pixel. As DAAM leaves out SD's coarsest maps (the
8×8 middle block), the layers at a UNet's coarsest attention resolution are left out whenever it
attends at more than one (the bundled model: its 4×4 maps, 16-pixel cells, are left out; its 8×8
maps are kept).

A word's map is its share of the attention given to the prompt's tokens at each pixel (DAAM's
``normalize``): its positions' probabilities (a word of several BPE tokens sums them) divided by
those of all the prompt's tokens, BOS, EOS and padding excluded. This takes out the attention
sink: models park most attention on tokens without a word (SD on BOS, the bundled model on the
padding), and how much a pixel parks varies over the image (object against background). The share
is upsampled to the image and scaled to [0, 1] between its minimum and maximum, as DAAM does before
thresholding; a map without contrast (a one-word prompt) is 1 everywhere.

Not covered: prompt editing / alternation (a position's word changes over the steps), textual
inversion embeddings named in the prompt, and the SDXL refiner's steps (its UNet is not hooked).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from ..adapters.hypernetwork import parse_hypernet_prompt
from ..adapters.lora import parse_lora_prompt
from ..models.unet import BasicTransformerBlock
from ..text.prompt import chunk_prompt, prompt_schedule, split_and
from ..text.tokenizer import MAX_LENGTH, clean, get_tokenizer
from .images import save_png

if TYPE_CHECKING:
    from ..adapters.embeddings import EmbeddingSet
    from ..api import GenerationResult, Pipeline

_NOT_WORD = re.compile(r"[^\w]+")


def attention_probs(attn: nn.Module, x: Tensor, context: Tensor) -> Tensor:
    """softmax(q·kᵀ/√d) of an ``Attention`` module for inputs ``x [B, N, C]``, ``context [B, L, D]``:
    ``[B, heads, N, L]`` in fp32."""
    b, heads = x.shape[0], attn.heads
    q = attn.to_q(x).float().view(b, x.shape[1], heads, -1).transpose(1, 2)
    k = attn.to_k(context).float().view(b, context.shape[1], heads, -1).transpose(1, 2)
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)


def _grid(tokens: int, height: int, width: int) -> tuple[int, int]:
    """The feature-map size with ``tokens`` pixels reached from a ``height × width`` latent by
    stride-2 downsamplings (each rounds up)."""
    h, w = height, width
    while h * w > tokens:
        h, w = -(-h // 2), -(-w // 2)
    if h * w != tokens:
        raise RuntimeError(f"attention maps: {tokens} tokens do not match a {height}x{width} latent")
    return h, w


class AttentionMaps:
    """Cross-attention heat collected by ``collect_attention``: per image of the batch and per latent
    size, the summed ``[rows, L, H, W]`` maps (rows = the image's cond rows, L = context positions)."""

    def __init__(self, batch_size: int, embeddings: EmbeddingSet | None = None) -> None:
        self.batch_size = batch_size
        self.embeddings = embeddings
        self._sums: dict[tuple[int, int, int], Tensor] = {}   # (image, H, W) → sum over calls
        self._counts: dict[tuple[int, int, int], int] = {}
        self._calls = 0
        self._latent: tuple[int, int] | None = None
        self._layers: list[tuple[int, Tensor]] = []   # (tokens of the layer's map, map at the latent size)

    # -- hooks -------------------------------------------------------------------------------------

    def _unet_start(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs["x"]
        self._latent = (x.shape[-2], x.shape[-1])
        self._layers = []

    def _cross_attention(self, module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> None:
        x = args[0] if args else kwargs["x"]
        context = args[1] if len(args) > 1 else kwargs["context"]
        if x.shape[0] < 2:
            raise RuntimeError("attention maps: a UNet call without conditional rows (expected uncond + cond)")
        with torch.no_grad():
            probs = attention_probs(module, x[1:], context[1:]).mean(dim=1)       # [rows, N, L]
            h, w = _grid(probs.shape[1], *self._latent)
            maps = probs.transpose(1, 2).reshape(probs.shape[0], probs.shape[2], h, w)
            self._layers.append((probs.shape[1], F.interpolate(maps, size=self._latent, mode="bilinear",
                                                                align_corners=False)))

    def _unet_end(self, module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> None:
        if not self._layers:
            return
        key = (self._calls % self.batch_size, *self._latent)
        coarsest = min(n for n, _ in self._layers)
        kept = [m for n, m in self._layers if n > coarsest] or [m for _, m in self._layers]
        heat = torch.stack(kept).mean(dim=0).cpu()
        self._sums[key] = self._sums[key] + heat if key in self._sums else heat
        self._counts[key] = self._counts.get(key, 0) + 1
        self._calls += 1
        self._layers = []

    # -- results -----------------------------------------------------------------------------------

    def token_heat(self, size: tuple[int, int], image: int = 0) -> Tensor:
        """``[rows, L, height, width]``: the mean attention probability of every context position
        over all UNet calls of ``image`` (each latent size upsampled to ``size``, weighted by its calls;
        the coarsest attention resolution left out, see the module docstring)."""
        keys = [k for k in self._sums if k[0] == image]
        if not keys:
            raise ValueError(f"attention maps: nothing was collected for image {image}")
        total = sum(self._counts[k] for k in keys)
        return sum(
            F.interpolate(self._sums[k], size=size, mode="bilinear", align_corners=False) / total for k in keys
        )

    def word_maps(self, prompt: str, size: tuple[int, int], image: int = 0) -> dict[str, np.ndarray]:
        """``{word: heat [height, width] float32 in [0, 1]}`` in prompt order for the prompt the maps
        were collected with; ``size`` = (height, width) of the image."""
        text, _ = parse_hypernet_prompt(parse_lora_prompt(prompt)[0])   # the tags the run removed
        if self.embeddings is not None and self.embeddings.names_in(text):
            raise ValueError("attention maps: prompts naming textual inversion embeddings are not supported")
        heat = self.token_heat(size, image)
        parts = [part for part, _ in split_and(text)]
        if len(parts) != heat.shape[0]:
            raise ValueError(f"attention maps: the prompt has {len(parts)} AND parts but {heat.shape[0]} "
                             "conditional rows were collected")
        words: dict[str, Tensor] = {}
        for row, part in enumerate(parts):
            if len(prompt_schedule(part, 1000)) > 1:
                raise ValueError("attention maps: prompt editing and alternation are not supported")
            tokens = [(p, word) for p, word in prompt_tokens(part) if p < heat.shape[1]]
            prompt_mass = heat[row, [p for p, _ in tokens]].sum(dim=0).clamp_min(1e-12)
            for word in dict.fromkeys(word for _, word in tokens if word is not None):
                share = heat[row, [p for p, w in tokens if w == word]].sum(dim=0) / prompt_mass
                words[word] = words[word] + share if word in words else share
        return {word: _min_max(m).numpy().astype(np.float32) for word, m in words.items()}


def _min_max(m: Tensor) -> Tensor:
    lo, hi = m.min(), m.max()
    return (m - lo) / (hi - lo) if hi - lo > 1e-6 * hi.abs().clamp_min(1e-12) else torch.ones_like(m)


def prompt_tokens(text: str) -> list[tuple[int, str | None]]:
    """``(context position, word)`` of each token of one prompt part, in order, as the conditioner
    encodes it (A1111 emphasis, BREAK and 75-token chunks: chunk c, token t sits at ``c·77 + 1 + t``);
    the word is None for punctuation. BOS, EOS and padding are not tokens of the prompt."""
    tokenizer = get_tokenizer()
    labels: list[str | None] = []

    def encode(run: str) -> list[int]:
        ids = []
        for piece in clean(run).split():
            word = _NOT_WORD.sub("", piece)
            for token in tokenizer.encode(piece):
                ids.append(token)
                labels.append(word if word and _NOT_WORD.sub("", tokenizer.decode([token])) else None)
        return ids

    chunks = chunk_prompt(text, encode, tokenizer.token_id(",</w>"))
    positions = [c * MAX_LENGTH + 1 + t for c, chunk in enumerate(chunks) for t in range(len(chunk.tokens))]
    return list(zip(positions, labels, strict=True))


def word_positions(text: str) -> dict[str, list[int]]:
    """Context positions of each word of one prompt part (see ``prompt_tokens``); punctuation is skipped."""
    positions: dict[str, list[int]] = {}
    for p, word in prompt_tokens(text):
        if word is not None:
            positions.setdefault(word, []).append(p)
    return positions


@contextmanager
def collect_attention(pipe: Pipeline, batch_size: int = 1) -> Iterator[AttentionMaps]:
    """Hook ``pipe``'s UNet for the duration of the block; runs inside it (with ``batch_size`` images
    each) add to the returned maps. The hooks are removed on exit, also after an error."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    maps = AttentionMaps(batch_size, pipe.embeddings)
    with attention_hooks(pipe.model.unet, maps):
        yield maps


@contextmanager
def attention_hooks(unet: nn.Module, maps: AttentionMaps) -> Iterator[None]:
    """``maps`` collects from ``unet``'s cross-attention within the block (a patch of the run loop)."""
    blocks = [m for m in unet.modules() if isinstance(m, BasicTransformerBlock)]
    handles = [unet.register_forward_pre_hook(maps._unet_start, with_kwargs=True),
               unet.register_forward_hook(maps._unet_end, with_kwargs=True)]
    try:
        handles += [b.attn2.register_forward_hook(maps._cross_attention, with_kwargs=True) for b in blocks]
        unet.reads_uncond_row = True   # the run loop evaluates the uncond rows even at CFG 1
        yield
    finally:
        unet.__dict__.pop("reads_uncond_row", None)
        for handle in handles:
            handle.remove()


def generate_with_maps(pipe: Pipeline, prompt: str, **settings) -> tuple[GenerationResult, list[dict[str, np.ndarray]]]:
    """``pipe.txt2img(prompt, **settings)`` and, per image of the batch, its ``word_maps``: the hooks
    are a patch of that run (attached by the run loop, removed after it)."""
    n = settings.get("batch_size", 1)
    maps = AttentionMaps(n if isinstance(n, int) and n >= 1 else 1, pipe.embeddings)   # bad n: txt2img's ParamError
    result = pipe.txt2img(prompt, patches=[lambda: attention_hooks(pipe.model.unet, maps)], **settings)
    size = (result.images[0].height, result.images[0].width)
    return result, [maps.word_maps(prompt, size, i) for i in range(len(result.images))]


def _jet(heat: np.ndarray) -> np.ndarray:
    """A jet-like colour map: [H, W] in [0, 1] → uint8 [H, W, 3] (blue → cyan → yellow → red)."""
    x = np.clip(heat, 0, 1)[..., None] * 4
    rgb = np.clip(1.5 - np.abs(x - np.array([3.0, 2.0, 1.0])), 0, 1)
    return (rgb * 255).round().astype(np.uint8)


def overlay(image: Image.Image, heat: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """``heat`` ([H, W] in [0, 1], the image's size) coloured and blended over ``image``."""
    if heat.shape != (image.height, image.width):
        raise ValueError(f"heat: shape {heat.shape} does not match the image ({image.height}, {image.width})")
    return Image.blend(image.convert("RGB"), Image.fromarray(_jet(heat)), alpha)


def save_overlays(image: Image.Image, maps: dict[str, np.ndarray], directory: str | Path) -> list[Path]:
    """Write ``directory/{index:02d}-{word}.png`` per word of ``maps`` (atomically); returns the paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return [save_png(overlay(image, heat), directory / f"{i:02d}-{word}.png")
            for i, (word, heat) in enumerate(maps.items())]
