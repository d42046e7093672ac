"""Prompts → UNet conditioning. The SD 1.x / SD 2.x / SDXL differences live only here.

* SD 1.x: CLIP ViT-L/14, last layer through the final LayerNorm (clip skip walks back from it).
* SD 2.x: OpenCLIP ViT-H/14, penultimate layer through ``ln_final``.
* SDXL: CLIP-L and OpenCLIP bigG penultimate layers (no final norm) concatenated; bigG's pooled,
  projected output plus Fourier embeddings of the original size, crop and target size form the
  ``y`` vector (the refiner has bigG only and an aesthetic score instead of the target size).
  An all-empty negative prompt is encoded as zeros, as the reference SDXL pipelines do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..checkpoint.specs import ModelSpec
from ..models.unet import timestep_embedding
from .tokenizer import get_tokenizer

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


@dataclass(frozen=True)
class SizeConditioning:
    """SDXL micro-conditioning, in pixels; the refiner uses ``aesthetic_score`` instead of target size."""

    original: tuple[int, int]           # (height, width)
    target: tuple[int, int]             # (height, width)
    crop_top_left: tuple[int, int] = (0, 0)
    aesthetic_score: float = 6.0


class Conditioner:
    def __init__(self, spec: ModelSpec, encoders: list[nn.Module]):
        if len(encoders) != len(spec.text):
            raise ValueError(f"{spec.family} needs {len(spec.text)} text encoders, got {len(encoders)}")
        self.spec = spec
        self.encoders = encoders
        self.tokenizers = [get_tokenizer(slot.config.pad_id) for slot in spec.text]

    @torch.no_grad()
    def __call__(
        self,
        prompts: list[str],
        *,
        clip_skip: int = 1,
        size: SizeConditioning | None = None,
        zero_if_empty: bool = False,
    ) -> Cond:
        if clip_skip < 1:
            raise ValueError(f"clip_skip must be ≥ 1, got {clip_skip}")
        contexts, pooled = [], None
        for slot, encoder, tokenizer in zip(self.spec.text, self.encoders, self.tokenizers):
            device = next(encoder.parameters()).device
            tokens = tokenizer(prompts).to(device)
            layer = slot.layer - (clip_skip - 1)                 # index from the end of hidden states
            depth = slot.config.layers + 1 + layer              # layers to run (hidden_states[0] = embeddings)
            if depth < 1:
                raise ValueError(f"clip_skip {clip_skip} is deeper than the text encoder ({slot.config.layers} layers)")
            full = slot.pooled
            out = encoder(tokens, num_layers=None if full else depth)
            hidden = out.hidden_states[depth]
            if slot.final_norm:
                hidden = _final_norm(encoder)(hidden)
            contexts.append(hidden)
            if slot.pooled:
                pooled = out.pooled
        context = torch.cat(contexts, dim=-1)
        empty = zero_if_empty and self.spec.is_sdxl and all(p == "" for p in prompts)
        if empty:
            context = torch.zeros_like(context)
            pooled = torch.zeros_like(pooled) if pooled is not None else None
        if not self.spec.is_sdxl:
            return Cond(context)
        if size is None:
            raise ValueError("SDXL conditioning needs the image size (SizeConditioning)")
        return Cond(context, self._y(pooled, size, len(prompts)))

    def _y(self, pooled: Tensor, size: SizeConditioning, batch: int) -> Tensor:
        values: list[float] = [*size.original, *size.crop_top_left]
        values += [size.aesthetic_score] if self.spec.conditioning == "sdxl-refiner" else [*size.target]
        scalars = torch.tensor(values, dtype=torch.float32)
        emb = timestep_embedding(scalars, SIZE_EMBED_DIM).reshape(1, -1).repeat(batch, 1)
        return torch.cat([pooled.float(), emb], dim=-1).to(pooled.dtype)


def _final_norm(encoder: nn.Module) -> nn.Module:
    if hasattr(encoder, "text_model"):
        return encoder.text_model.final_layer_norm
    return encoder.ln_final
