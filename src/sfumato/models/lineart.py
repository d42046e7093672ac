"""The line-art network of ControlNet's lineart annotators (``sk_model.pth``, realistic, and
``sk_model2.pth``, coarse: the same architecture): a ResNet image-to-image generator — a 7×7 stem,
two stride-2 convolutions, three residual blocks at 256 channels, two transposed convolutions back up,
a 7×7 head and a sigmoid — with instance norm (no affine) and reflection padding. Attribute names are
the file's keys (``model0.1.weight``, ``model2.0.conv_block.1.weight``, …): the sequential indices
count the padding, norm and activation layers, which hold no weights."""

from __future__ import annotations

from torch import Tensor, nn


class ResidualBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv_block = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3), nn.InstanceNorm2d(c), nn.ReLU(),
                                        nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3), nn.InstanceNorm2d(c))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv_block(x)


class LineartNet(nn.Module):
    def __init__(self, blocks: int = 3) -> None:
        super().__init__()
        self.model0 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(3, 64, 7), nn.InstanceNorm2d(64), nn.ReLU())
        self.model1 = nn.Sequential(nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.InstanceNorm2d(128), nn.ReLU(),
                                    nn.Conv2d(128, 256, 3, stride=2, padding=1), nn.InstanceNorm2d(256), nn.ReLU())
        self.model2 = nn.Sequential(*[ResidualBlock(256) for _ in range(blocks)])
        self.model3 = nn.Sequential(
            nn.ConvTranspose2d(256, 128, 3, stride=2, padding=1, output_padding=1), nn.InstanceNorm2d(128), nn.ReLU(),
            nn.ConvTranspose2d(128, 64, 3, stride=2, padding=1, output_padding=1), nn.InstanceNorm2d(64), nn.ReLU())
        self.model4 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(64, 1, 7), nn.Sigmoid())

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, 3, H, W) RGB in [0, 1] → (B, 1, H, W) line density in [0, 1] (1 = paper)."""
        return self.model4(self.model3(self.model2(self.model1(self.model0(x)))))
