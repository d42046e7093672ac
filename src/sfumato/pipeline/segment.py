"""Segment Anything on an image: points (positive / negative) and a box in, masks and scores out.

As the reference predictor (``SamPredictor``): the image's longest side is resized to the model's
input size (PIL bilinear, the other side rounded), normalised by SAM's pixel mean and std and
zero-padded at the bottom and right to a square; prompts are scaled into that frame; each mask's
logits are upscaled (bilinear) to the input size, cropped to the resized image, resized to the
original size and thresholded at 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ..errors import ParamError
from ..models.sam import PIXEL_MEAN, PIXEL_STD, SAM

Point = tuple[float, float, int]   # x, y, label (1 positive, 0 negative)


@dataclass
class Segmentation:
    masks: np.ndarray        # bool [C, H, W], the image's size
    scores: np.ndarray       # float [C]: the model's predicted IoU of each mask
    logits: Tensor           # [C, g·4, g·4] low-res logits (a mask prompt for a next call)

    @property
    def best(self) -> np.ndarray:
        return self.masks[int(self.scores.argmax())]


def resized_size(h: int, w: int, side: int) -> tuple[int, int]:
    """The reference's ``get_preprocess_shape``: the longest side to ``side``, rounded half up."""
    scale = side * 1.0 / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


class Segmenter:
    """One SAM and the embedding of the image last given to ``set_image``."""

    def __init__(self, model: SAM):
        self.model = model
        self.embedding: Tensor | None = None
        self.size: tuple[int, int] = (0, 0)        # original (h, w)
        self.resized: tuple[int, int] = (0, 0)     # (h, w) inside the padded input

    @torch.no_grad()
    def set_image(self, image: Image.Image) -> None:
        rgb = image.convert("RGB")
        side = self.model.cfg.image_size
        h, w = rgb.height, rgb.width
        nh, nw = resized_size(h, w, side)
        pixels = torch.from_numpy(np.asarray(rgb.resize((nw, nh), Image.BILINEAR)).copy()).permute(2, 0, 1)[None]
        p = self.model.image_encoder.patch_embed.proj.weight
        x = (pixels.float() - torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1)) / torch.tensor(PIXEL_STD).view(1, 3, 1, 1)
        x = F.pad(x, (0, side - nw, 0, side - nh))
        self.embedding = self.model.image_encoder(x.to(p.device, p.dtype))
        self.size, self.resized = (h, w), (nh, nw)

    @torch.no_grad()
    def predict(self, points: list[Point] | None = None, box: tuple[float, float, float, float] | None = None,
                mask_logits: Tensor | None = None, multimask: bool = True) -> Segmentation:
        """Masks for the prompts (image pixel coordinates); ParamErrors name ``points`` / ``box``."""
        if self.embedding is None:
            raise RuntimeError("set_image first")
        h, w = self.size
        if not points and box is None and mask_logits is None:
            raise ParamError("points", "give at least one point or a box")
        for i, (x, y, label) in enumerate(points or []):
            if not (0 <= x < w and 0 <= y < h):
                raise ParamError(f"points[{i}]", f"({x:g}, {y:g}) lies outside the {w}x{h} image")
            if label not in (0, 1):
                raise ParamError(f"points[{i}]", f"label must be 1 (positive) or 0 (negative), got {label!r}")
        if box is not None:
            x0, y0, x1, y1 = box
            if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
                raise ParamError("box", f"({x0:g}, {y0:g}, {x1:g}, {y1:g}) is not a box inside the {w}x{h} image")
        nh, nw = self.resized
        scale = torch.tensor([nw / w, nh / h], dtype=torch.float64)
        dtype, device = self.embedding.dtype, self.embedding.device
        prompt_points = None
        if points:
            coords = (torch.tensor([[x, y] for x, y, _ in points], dtype=torch.float64) * scale).float()[None]
            labels = torch.tensor([[label for *_, label in points]], dtype=torch.float32)
            prompt_points = (coords.to(device), labels.to(device))
        boxes = None
        if box is not None:
            boxes = (torch.tensor(box, dtype=torch.float64).view(2, 2) * scale).float().view(1, 4).to(device)
        masks = mask_logits[None, None].to(device, dtype) if mask_logits is not None else None
        logits, scores = self.model.decode(self.embedding, prompt_points, boxes, masks, multimask)
        side = self.model.cfg.image_size
        up = F.interpolate(logits.float(), (side, side), mode="bilinear", align_corners=False)[..., :nh, :nw]
        full = F.interpolate(up, (h, w), mode="bilinear", align_corners=False)
        return Segmentation((full[0] > 0).cpu().numpy(), scores[0].float().cpu().numpy(), logits[0].float().cpu())
