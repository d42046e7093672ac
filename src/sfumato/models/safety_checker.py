"""The Stable Diffusion safety checker, as published with SD 1.x (and used by the original
scripts through diffusers' ``StableDiffusionSafetyChecker``): a CLIP ViT-L/14 image tower with its
projection, 17 concept embeddings and 3 "special care" embeddings, each with a threshold.

An image's score for a concept is its projected CLIP embedding's cosine similarity to the concept
minus the concept's threshold, rounded to 3 decimals. The special-care concepts are checked first,
in order; once one scores above 0, every later score (special and concept) gets 0.01 added: the
filter gets stricter for that image. The image is flagged when any concept scores above 0. These
rules, the rounding and their order are the reference's, so the same weights flag the same images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .clip_vision import CLIPVisionTower, VisionConfig

ADJUSTMENT = 0.01   # what a special-care hit adds to every later score of the image


@dataclass
class SafetyResult:
    """Per image: the special-care and concept scores (cosine − threshold, rounded), and the flag."""

    special_scores: list[list[float]]
    concept_scores: list[list[float]]
    flagged: list[bool]


class SafetyChecker(nn.Module):
    """The checker's weights: ``vision_model`` (the image tower, its ``proj`` the checker's visual
    projection) and the concept and special-care embeddings with their thresholds."""

    def __init__(self, vision: VisionConfig, concepts: int = 17, special: int = 3):
        super().__init__()
        if vision.projection_dim is None:
            raise ValueError("the safety checker's image tower needs a projection")
        self.vision_model = CLIPVisionTower(vision)
        dim = vision.projection_dim
        self.concept_embeds = nn.Parameter(torch.ones(concepts, dim), requires_grad=False)
        self.special_care_embeds = nn.Parameter(torch.ones(special, dim), requires_grad=False)
        self.concept_embeds_weights = nn.Parameter(torch.ones(concepts), requires_grad=False)
        self.special_care_embeds_weights = nn.Parameter(torch.ones(special), requires_grad=False)

    @torch.no_grad()
    def forward(self, pixel_values: Tensor) -> SafetyResult:
        """``pixel_values``: [B, 3, 224, 224], CLIP-preprocessed."""
        embeds = self.vision_model(pixel_values.to(self.concept_embeds.dtype)).image_embeds
        special = _cosine(embeds, self.special_care_embeds)
        concept = _cosine(embeds, self.concept_embeds)
        return score(special, concept, [w.item() for w in self.special_care_embeds_weights],
                     [w.item() for w in self.concept_embeds_weights])


def _cosine(a: Tensor, b: Tensor) -> np.ndarray:
    return (F.normalize(a) @ F.normalize(b).t()).cpu().float().numpy()


def score(special: np.ndarray, concept: np.ndarray, special_thresholds: list[float],
          concept_thresholds: list[float]) -> SafetyResult:
    """The reference's scoring of cosine similarities ([B, S] and [B, C], float32) against the
    thresholds: the same arithmetic (a float32 similarity minus a Python float), the same rounding
    and order."""
    out = SafetyResult([], [], [])
    for i in range(special.shape[0]):
        adjustment = 0.0
        special_scores, concept_scores = [], []
        for j, threshold in enumerate(special_thresholds):
            value = round(special[i][j] - threshold + adjustment, 3)
            special_scores.append(float(value))
            if value > 0:
                adjustment = ADJUSTMENT
        for j, threshold in enumerate(concept_thresholds):
            concept_scores.append(float(round(concept[i][j] - threshold + adjustment, 3)))
        out.special_scores.append(special_scores)
        out.concept_scores.append(concept_scores)
        out.flagged.append(any(s > 0 for s in concept_scores))
    return out
