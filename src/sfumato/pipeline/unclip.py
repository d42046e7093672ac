"""Stable unCLIP's image conditioning: the request's image prompts as the UNet's ``y`` vector.

Each image is prepared as transformers' ``CLIPImageProcessor`` does (diffusers' StableUnCLIP
pipelines; shortest side to the tower's size, bicubic, centre crop, CLIP normalisation) and encoded to
its projected CLIP image embedding. The embeddings are summed by weight (ComfyUI's unCLIP mixing: a
single image of weight 1 is its embedding; two of weight 0.5 their mean), noise-augmented to the
request's level (``models/unclip.py``) and joined by the level's embedding. Without image prompts an
img2img request uses its init image (A1111's unCLIP img2img) and txt2img gets zeros (A1111).

The augmentation noise of image i is a standard normal drawn from a CPU generator seeded
``seed + i + 2**32``: per image, so item i of a batch equals a lone run with seed + i, and apart from
the seeds of the latent noise (which stay below 2**32).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..checkpoint.load import LoadedModel
from ..checkpoint.stream import resident
from .clip_image import preprocess_clip
from .params import GenerationParams

NOISE_SEED_OFFSET = 2**32


def image_prompts_of(p: GenerationParams) -> list[tuple]:
    """The (image, weight) pairs a request conditions on: its own, else its init image."""
    if p.unclip_images:
        return list(p.unclip_images)
    return [(p.init_image, 1.0)] if p.init_image is not None else []


@torch.no_grad()
def image_embeds(model: LoadedModel, images: list) -> Tensor:
    """[N, E] float32 projected CLIP image embeddings of PIL images, by the model's embedder."""
    tower = model.image_embedder
    w = tower.conv1.weight
    with resident(tower):
        pixels = preprocess_clip(images, model.spec.image_embedder.vision.image_size, "openai")
        return tower(pixels.to(w.device, w.dtype)).image_embeds.float().cpu()


@torch.no_grad()
def unclip_vectors(model: LoadedModel, p: GenerationParams, n: int) -> Tensor:
    """[n, 2E] the y vector of each of the request's n images (seeds p.seed + i)."""
    dim = model.spec.image_embedder.dim
    prompts = image_prompts_of(p)
    if not prompts:
        return torch.zeros(n, 2 * dim)
    embeds = image_embeds(model, [image for image, _ in prompts])
    weights = torch.tensor([float(w) for _, w in prompts])
    mixed = (weights[:, None] * embeds).sum(0, keepdim=True).expand(n, dim)
    noise = torch.stack([torch.randn(dim, generator=torch.Generator().manual_seed(p.seed + i + NOISE_SEED_OFFSET))
                         for i in range(n)])
    levels = torch.full((n,), p.unclip_noise_level, dtype=torch.long)
    return model.noise_augmentor(mixed, levels, noise)   # the loader keeps it on the CPU


def unclip_infotext(p: GenerationParams, spec) -> dict[str, object]:
    """Infotext fields of a run on a Stable unCLIP model: the embedding's noise level, and the image
    prompts' weights (their pixels are not text)."""
    if spec.image_embedder is None:
        return {}
    prompts = image_prompts_of(p)
    weights = ", ".join(format(float(w), "g") for _, w in p.unclip_images) if p.unclip_images else None
    return {"unCLIP noise level": p.unclip_noise_level if prompts else None, "unCLIP image weights": weights}
