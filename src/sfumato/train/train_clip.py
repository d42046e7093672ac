"""Stage 2: a small CLIP — our text transformer (shipped) and a few-conv image tower (not shipped),
trained with the symmetric InfoNCE loss and a learnable temperature.

Each caption brings hard negatives into the batch: the same scene with the two objects swapped
(order), their colours or shapes swapped (binding), or one attribute changed. Only the image→text
direction sees them, so the text features must tell "a red circle to the left of a blue square"
from "a blue circle to the left of a red square" and from "a blue square to the left of a red circle".
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.clip import CLIPTextModel, TextEncoderConfig
from ..text.tokenizer import get_tokenizer
from .loop import Batch, Task
from .shapes import COLOURS, SHAPES, SceneSpec, caption, parse_caption

TRAIN_TOKENS = 32  # captions are < 20 tokens; causal attention makes the prefix exact


class ImageTower(nn.Module):
    """Four stride-2 convs to a 4×4 map, flattened (position matters) and projected."""

    def __init__(self, embed_dim: int, width: int = 64, size: int = 64):
        super().__init__()
        chans = [3, width // 2, width, width, width]
        layers: list[nn.Module] = []
        for a, b in zip(chans, chans[1:]):
            layers += [nn.Conv2d(a, b, 3, stride=2, padding=1), nn.GroupNorm(8, b), nn.SiLU()]
        self.convs = nn.Sequential(*layers)
        side = size // 16
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(width * side * side, 256), nn.SiLU(), nn.Linear(256, embed_dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.convs(x))


def hard_negatives(text: str) -> list[str]:
    """Captions of scenes that differ from ``text``'s in order, binding or one attribute."""
    spec = parse_caption(text)
    if spec is None:
        return []
    objs, bg = list(spec.objects), spec.background
    variants: list[SceneSpec] = []
    if len(objs) == 2:
        (c1, s1), (c2, s2) = objs
        variants += [SceneSpec(((c2, s2), (c1, s1)), bg), SceneSpec(((c2, s1), (c1, s2)), bg),
                     SceneSpec(((c1, s2), (c2, s1)), bg)]
    for k, (c, s) in enumerate(objs):
        for c_new in COLOURS:
            if c_new not in (c, bg):
                variants.append(SceneSpec(tuple((c_new, s) if j == k else o for j, o in enumerate(objs)), bg))
        for s_new in SHAPES:
            if s_new != s:
                variants.append(SceneSpec(tuple((c, s_new) if j == k else o for j, o in enumerate(objs)), bg))
    if len(objs) == 1:
        (c, s), = objs
        variants.append(SceneSpec(((bg, s),), c))  # object and background colours swapped
    out = {caption(v) for v in variants} - {text}
    return sorted(out)


class CLIPTask(Task):
    def __init__(self, text_cfg: TextEncoderConfig, dataset, embed_dim: int = 64, negatives: int = 3):
        super().__init__()
        self.text = CLIPTextModel(text_cfg)
        self.image = ImageTower(embed_dim, size=dataset.size)
        self.text_projection = nn.Linear(text_cfg.width, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.data = dataset
        self.dataset_size = len(dataset)
        self.negatives = negatives
        self.tokenizer = get_tokenizer(text_cfg.pad_id)

    def encode_text(self, texts: list[str]) -> Tensor:
        tokens = self.tokenizer(texts)[:, :TRAIN_TOKENS]
        return F.normalize(self.text_projection(self.text(tokens).pooled), dim=-1)

    def forward(self, batch: Batch) -> Tensor:
        items = [self.data[i] for i in batch.indices]
        texts = [text for _, text in items]
        extra = []
        for i, text in enumerate(texts):
            pool = hard_negatives(text)
            pick = torch.randperm(len(pool), generator=batch.generator(i))[: self.negatives].tolist()
            extra += [pool[j] for j in pick]
        img = F.normalize(self.image(torch.stack([image for image, _ in items])), dim=-1)
        txt = self.encode_text(texts + extra)
        scale = self.logit_scale.clamp(max=math.log(100)).exp()
        n = len(texts)
        target = torch.arange(n)
        all_texts = texts + extra
        # a caption that repeats in the batch is not a negative of its own images
        same = torch.tensor([[a == b for b in all_texts] for a in texts])
        same[target, target] = False
        logits = (scale * img @ txt.T).masked_fill(same, float("-inf"))
        image_to_text = F.cross_entropy(logits, target)
        text_to_image = F.cross_entropy((scale * txt[:n] @ img.T).masked_fill(same[:, :n].T, float("-inf")), target)
        return (image_to_text + text_to_image) / 2
