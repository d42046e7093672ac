"""Prompts → UNet conditioning. The SD 1.x / SD 2.x / SDXL differences live only here.

* SD 1.x: CLIP ViT-L/14, last layer through the final LayerNorm (clip skip walks back from it).
* SD 2.x: OpenCLIP ViT-H/14, penultimate layer through ``ln_final``.
* SDXL: CLIP-L and OpenCLIP bigG penultimate layers (no final norm) concatenated; bigG's pooled,
  projected output plus Fourier embeddings of the original size, crop and target size form the
  ``y`` vector (the refiner has bigG only and an aesthetic score instead of the target size).
  An all-empty negative prompt is encoded as zeros, as the reference SDXL pipelines do.

Prompts are encoded the AUTOMATIC1111 way: emphasis weights, chunks of 75 tokens (each encoded as
BOS + 75 + EOS and concatenated, so the context has 77·k tokens), ``BREAK``. ``build_schedule``
adds prompt editing, alternation and ``AND`` for the sampling loop.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from itertools import accumulate
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..checkpoint.specs import ModelSpec, TextSlot
from ..models.unet import timestep_embedding
from .prompt import Chunk, chunk_prompt, prompt_schedule, split_and
from .tokenizer import BOS_ID, EOS_ID, CLIPTokenizer, get_tokenizer

if TYPE_CHECKING:
    from ..adapters.embeddings import EmbeddingSet

SIZE_EMBED_DIM = 256  # each SDXL size/crop/score scalar gets a 256-d Fourier embedding


@dataclass
class Cond:
    """What the UNet is conditioned on: cross-attention context and (SDXL) the ``y`` vector."""

    context: Tensor
    y: Tensor | None = None

    @staticmethod
    def cat(conds: list["Cond"]) -> "Cond":
        y = torch.cat([c.y for c in conds]) if conds[0].y is not None else None
        return Cond(torch.cat([c.context for c in conds]), y)

    def rows(self, index: Tensor) -> "Cond":
        return Cond(self.context[index], self.y[index] if self.y is not None else None)

    @property
    def tokens(self) -> int:
        return self.context.shape[1]

    def pad_to(self, tokens: int, empty: "Cond") -> "Cond":
        """Append ``empty``'s context (an encoded empty prompt: one chunk) until there are ``tokens`` tokens."""
        missing = tokens - self.tokens
        repeats, rest = divmod(missing, empty.tokens)
        if missing < 0 or rest:
            raise ValueError(f"cannot pad a {self.tokens}-token context to {tokens} with {empty.tokens}-token chunks")
        if missing == 0:
            return self
        pad = empty.context[:1].to(self.context).repeat(self.context.shape[0], repeats, 1)
        return Cond(torch.cat([self.context, pad], dim=1), self.y)


@dataclass(frozen=True)
class SizeConditioning:
    """SDXL micro-conditioning, in pixels; the refiner uses ``aesthetic_score`` instead of target size."""

    original: tuple[int, int]           # (height, width)
    target: tuple[int, int]             # (height, width)
    crop_top_left: tuple[int, int] = (0, 0)
    aesthetic_score: float = 6.0


class Conditioner:
    """``embeddings``: textual inversion embeddings whose names in prompts stand for their vectors
    (bound to ``spec`` here; those that do not fit its text encoders end up in ``.skipped``)."""

    def __init__(self, spec: ModelSpec, encoders: list[nn.Module], embeddings: EmbeddingSet | None = None):
        if len(encoders) != len(spec.text):
            raise ValueError(f"{spec.family} needs {len(spec.text)} text encoders, got {len(encoders)}")
        self.spec = spec
        self.encoders = encoders
        self.tokenizers = [get_tokenizer(slot.config.pad_id) for slot in spec.text]
        self.comma_id = self.tokenizers[0].token_id(",</w>")
        self.embeddings = embeddings.for_spec(spec) if embeddings is not None else None

    @torch.no_grad()
    def __call__(
        self,
        prompts: list[str],
        *,
        clip_skip: int = 1,
        size: SizeConditioning | None = None,
        zero_if_empty: bool = False,
    ) -> Cond:
        """Each prompt's ``encode``; shorter contexts are padded with encoded empty chunks."""
        zero = zero_if_empty and self.spec.is_sdxl and all(p == "" for p in prompts)
        unique = list(dict.fromkeys(prompts))
        encoded = dict(zip(unique, self.encode(unique, clip_skip=clip_skip, size=size, zero=zero)))
        tokens = max(c.tokens for c in encoded.values())
        if any(c.tokens < tokens for c in encoded.values()):
            empty = self.encode([""], clip_skip=clip_skip, size=size)[0]
            encoded = {p: c.pad_to(tokens, empty) for p, c in encoded.items()}
        return Cond.cat([encoded[p] for p in prompts])

    def encode(
        self,
        texts: list[str],
        *,
        clip_skip: int = 1,
        size: SizeConditioning | None = None,
        zero: bool = False,
        grad: bool = False,
    ) -> list[Cond]:
        """One ``Cond`` per text, batch 1, context ``[1, 77·k, D]`` for its k chunks; emphasis
        applied per chunk; SDXL's pooled vector from the first chunk. ``zero``: zeros instead of
        the text encoders' outputs (SDXL's empty negative prompt); the size embeddings remain.
        ``grad``: differentiable in the encoders and the embeddings' vectors (for training, which
        thereby sees the inference path); by default computed without autograd."""
        with torch.set_grad_enabled(grad):
            return self._encode(texts, clip_skip, size, zero)

    def _encode(self, texts: list[str], clip_skip: int, size: SizeConditioning | None, zero: bool) -> list[Cond]:
        if clip_skip < 1:
            raise ValueError(f"clip_skip must be ≥ 1, got {clip_skip}")
        if self.spec.is_sdxl and size is None:
            raise ValueError("SDXL conditioning needs the image size (SizeConditioning)")
        encode_ids = self.tokenizers[0].encode
        chunker = self.embeddings.chunk if self.embeddings is not None else chunk_prompt
        per_text = [chunker(t, encode_ids, self.comma_id) for t in texts]
        chunks = [c for cs in per_text for c in cs]
        starts = list(accumulate((len(cs) for cs in per_text), initial=0))
        contexts, pooled = [], None
        for i, (slot, encoder, tokenizer) in enumerate(zip(self.spec.text, self.encoders, self.tokenizers)):
            with self.embeddings.substitute(encoder, chunks, i) if self.embeddings is not None else nullcontext():
                hidden, slot_pooled = _encode_chunks(slot, encoder, tokenizer, chunks, clip_skip)
            contexts.append(hidden)
            if slot.pooled:
                pooled = slot_pooled[starts[:-1]]  # emphasis never touches the pooled output
        context = torch.cat(contexts, dim=-1)
        if zero:
            context = torch.zeros_like(context)
            pooled = torch.zeros_like(pooled) if pooled is not None else None
        out = []
        for i, (start, end) in enumerate(zip(starts, starts[1:])):
            ctx = context[start:end].reshape(1, -1, context.shape[-1])
            out.append(Cond(ctx, self._y(pooled[i : i + 1], size, 1) if self.spec.is_sdxl else None))
        return out

    def _y(self, pooled: Tensor, size: SizeConditioning, batch: int) -> Tensor:
        values: list[float] = [*size.original, *size.crop_top_left]
        values += [size.aesthetic_score] if self.spec.conditioning == "sdxl-refiner" else [*size.target]
        scalars = torch.tensor(values, dtype=torch.float32)
        emb = timestep_embedding(scalars, SIZE_EMBED_DIM).reshape(1, -1).repeat(batch, 1)
        return torch.cat([pooled.float(), emb.to(pooled.device)], dim=-1).to(pooled.dtype)


def _encode_chunks(
    slot: TextSlot, encoder: nn.Module, tokenizer: CLIPTokenizer, chunks: list[Chunk], clip_skip: int
) -> tuple[Tensor, Tensor | None]:
    """``[M, 77, D]`` emphasised hidden states of M chunks (BOS + ids + EOS + padding) and the pooled output."""
    device = next(encoder.parameters()).device
    width = tokenizer.max_length - 2
    ids = [[BOS_ID, *c.tokens, EOS_ID] + [tokenizer.pad_id] * (width - len(c.tokens)) for c in chunks]
    weights = [[1.0, *c.weights] + [1.0] * (width + 1 - len(c.tokens)) for c in chunks]
    layer = slot.layer - (clip_skip - 1)                 # index from the end of hidden states
    depth = slot.config.layers + 1 + layer              # layers to run (hidden_states[0] = embeddings)
    if depth < 1:
        raise ValueError(f"clip_skip {clip_skip} is deeper than the text encoder ({slot.config.layers} layers)")
    out = encoder(torch.tensor(ids, device=device), num_layers=None if slot.pooled else depth)
    hidden = out.hidden_states[depth]
    if slot.final_norm:
        hidden = _final_norm(encoder)(hidden)
    return _emphasize(hidden, torch.tensor(weights, device=device)), out.pooled


def _emphasize(z: Tensor, weights: Tensor) -> Tensor:
    """A1111's emphasis: scale each token's state by its weight, then rescale the chunk so its mean
    (over all tokens and channels) is what it was. Chunks without emphasis are returned untouched."""
    emphasized = (weights != 1).any(dim=1)
    if not emphasized.any():
        return z
    zf = z.float()
    original_mean = zf.mean(dim=(1, 2), keepdim=True)
    scaled = zf * weights[:, :, None]
    scaled = scaled * (original_mean / scaled.mean(dim=(1, 2), keepdim=True))
    return torch.where(emphasized[:, None, None], scaled.to(z.dtype), z)


def _final_norm(encoder: nn.Module) -> nn.Module:
    if hasattr(encoder, "text_model"):
        return encoder.text_model.final_layer_norm
    return encoder.ln_final


# --- per-step conditioning for the sampling loop --------------------------------------------------


class ConditioningSchedule:
    """Conditioning for a batch across sampling steps.

    Row j of every ``at(step)`` belongs to image ``owner[j]`` (evaluate it on that image's latent);
    ``weights[i, j]`` is row j's contribution to image i (zero unless ``owner[j] == i``). Guidance
    then reads x̂0_i = uncond_i + scale · Σ_j weights[i, j] · (cond_j − uncond_i). Tensors live on
    the text encoders' device.
    """

    def __init__(self, steps: int, rows: list[list[tuple[int, Cond]]], weights: Tensor, owner: Tensor, empty: Cond):
        self.steps = steps
        self.weights = weights
        self.owner = owner
        self.empty = empty  # one encoded empty chunk, the padding
        self.tokens = max(c.tokens for row in rows for _, c in row)
        self._rows = rows
        self._cache: dict[tuple[int, ...], Cond] = {}
        self.vectors: Tensor | None = None

    def set_vectors(self, vectors: Tensor) -> None:
        """Give every row of image i the ``y`` vector ``vectors[i]`` (Stable unCLIP's image conditioning)."""
        self.vectors = vectors
        self._cache.clear()

    def pad_to(self, tokens: int) -> None:
        """Pad every context to ``tokens`` tokens (a multiple of 77) with the empty chunk."""
        if tokens < self.tokens:
            raise ValueError(f"cannot shorten a {self.tokens}-token schedule to {tokens}")
        self.tokens = tokens
        self._cache.clear()

    def at(self, step: int) -> tuple[Cond, Tensor]:
        """Conditioning rows ``[N, …]`` and ``weights [B, N]`` for 0-based sampling step ``step``:
        each row uses the first text whose ``end_at_step`` ≥ step + 1 (schedules count from 1)."""
        if not 0 <= step < self.steps:
            raise ValueError(f"step {step} is outside 0..{self.steps - 1}")
        picks = tuple(next(i for i, (end, _) in enumerate(row) if end > step) for row in self._rows)
        if picks not in self._cache:
            conds = [row[i][1].pad_to(self.tokens, self.empty) for row, i in zip(self._rows, picks)]
            cond = Cond.cat(conds)
            if self.vectors is not None:
                cond = Cond(cond.context, self.vectors[self.owner.cpu()].to(cond.context.device))
            self._cache[picks] = cond
        return self._cache[picks], self.weights


@torch.no_grad()
def build_schedule(
    conditioner: Conditioner,
    prompts: list[str],
    steps: int,
    *,
    clip_skip: int = 1,
    size: SizeConditioning | None = None,
    negative: bool = False,
) -> ConditioningSchedule:
    """Resolve a batch's prompts for ``steps`` sampling steps; every distinct text is encoded once.

    Positive prompts split on ``AND`` into weighted parts (one row each); negative prompts keep
    ``AND`` as text (one row per image, identity weights), and for SDXL a negative prompt whose
    texts are all empty is encoded as zeros.
    """
    rows: list[list[tuple[int, tuple[str, bool]]]] = []
    owner: list[int] = []
    part_weights: list[float] = []
    for image, prompt in enumerate(prompts):
        for text, weight in [(prompt, 1.0)] if negative else split_and(prompt):
            schedule = prompt_schedule(text, steps)
            zero = negative and conditioner.spec.is_sdxl and all(t == "" for _, t in schedule)
            rows.append([(end, (t, zero)) for end, t in schedule])
            owner.append(image)
            part_weights.append(weight)
    keys = list(dict.fromkeys([("", False), *(key for row in rows for _, key in row)]))
    encoded: dict[tuple[str, bool], Cond] = {}
    for zero in (False, True):
        texts = [text for text, z in keys if z == zero]
        if texts:
            conds = conditioner.encode(texts, clip_skip=clip_skip, size=size, zero=zero)
            encoded.update({(text, zero): c for text, c in zip(texts, conds)})
    empty = encoded[("", False)]
    device = empty.context.device
    weights = torch.zeros(len(prompts), len(rows), device=device)
    weights[owner, range(len(rows))] = torch.tensor(part_weights, device=device)
    conds = [[(end, encoded[key]) for end, key in row] for row in rows]
    return ConditioningSchedule(steps, conds, weights, torch.tensor(owner, device=device), empty)


def match_lengths(a: ConditioningSchedule, b: ConditioningSchedule) -> None:
    """Pad both schedules to the longer one's token length with the empty prompt's encoding."""
    tokens = max(a.tokens, b.tokens)
    a.pad_to(tokens)
    b.pad_to(tokens)
