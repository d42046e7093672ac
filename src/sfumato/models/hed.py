"""The HED edge network ControlNet's soft-edge annotator uses (``ControlNetHED.pth``, lllyasviel's
Apache-2.0 re-training of holistically-nested edge detection): five VGG-like blocks on RGB in
0…255 less a learnt mean (``norm``), each block's features projected to one edge logit map.
Attribute names are the file's keys (``block1.convs.0.weight``, ``block1.projection.weight``, …)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
import torch


class DoubleConvBlock(nn.Module):
    def __init__(self, cin: int, cout: int, layers: int):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1) for i in range(layers)])
        self.projection = nn.Conv2d(cout, 1, 1)

    def forward(self, x: Tensor, down: bool) -> tuple[Tensor, Tensor]:
        if down:
            x = F.max_pool2d(x, 2, 2)
        for conv in self.convs:
            x = F.relu(conv(x))
        return x, self.projection(x)


class HEDNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.Parameter(torch.zeros(1, 3, 1, 1))
        widths = ((3, 64, 2), (64, 128, 2), (128, 256, 3), (256, 512, 3), (512, 512, 3))
        for i, (cin, cout, layers) in enumerate(widths, 1):
            setattr(self, f"block{i}", DoubleConvBlock(cin, cout, layers))

    def forward(self, x: Tensor) -> list[Tensor]:
        """x: (B, 3, H, W) RGB in 0…255 → five edge logit maps at 1, 1/2, … 1/16 of the size."""
        h, out = x - self.norm, []
        for i in range(1, 6):
            h, p = getattr(self, f"block{i}")(h, down=i > 1)
            out.append(p)
        return out
