"""The OpenPose body network (CMU's 18-keypoint COCO model as ControlNet's annotator ships it in
``body_pose_model.pth``): a VGG-19 front (to conv4_2) with two CPM layers, then six stages of two
branches — part affinity fields (38 channels, ``…_L1``) and keypoint heat maps (19 channels,
``…_L2``) — each stage after the first reading the previous stage's two outputs beside the features.

Attribute names are the file's keys (``conv1_1.weight`` … ``Mconv7_stage6_L2.bias``). As in the
network every ControlNet annotator runs, the last heat-map convolution keeps its ReLU (the
reference's list of layers without one names ``Mconv7_stage6_L1`` twice and ``…_L2`` not at all);
the heat maps are what the keypoints are read from, so the ReLU stays.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# (name, in, out, kernel); "pool" marks a 2×2 max pool
VGG = (("conv1_1", 3, 64, 3), ("conv1_2", 64, 64, 3), "pool", ("conv2_1", 64, 128, 3), ("conv2_2", 128, 128, 3),
       "pool", ("conv3_1", 128, 256, 3), ("conv3_2", 256, 256, 3), ("conv3_3", 256, 256, 3),
       ("conv3_4", 256, 256, 3), "pool", ("conv4_1", 256, 512, 3), ("conv4_2", 512, 512, 3),
       ("conv4_3_CPM", 512, 256, 3), ("conv4_4_CPM", 256, 128, 3))
PAF_CHANNELS, HEATMAP_CHANNELS = 38, 19


def _stage1(branch: int, out: int) -> list[tuple[str, int, int, int]]:
    return [(f"conv5_1_CPM_L{branch}", 128, 128, 3), (f"conv5_2_CPM_L{branch}", 128, 128, 3),
            (f"conv5_3_CPM_L{branch}", 128, 128, 3), (f"conv5_4_CPM_L{branch}", 128, 512, 1),
            (f"conv5_5_CPM_L{branch}", 512, out, 1)]


def _stage(i: int, branch: int, out: int) -> list[tuple[str, int, int, int]]:
    width = 128 + PAF_CHANNELS + HEATMAP_CHANNELS
    return [(f"Mconv1_stage{i}_L{branch}", width, 128, 7),
            *[(f"Mconv{k}_stage{i}_L{branch}", 128, 128, 7) for k in range(2, 6)],
            (f"Mconv6_stage{i}_L{branch}", 128, 128, 1), (f"Mconv7_stage{i}_L{branch}", 128, out, 1)]


class BodyPoseNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.branches = [[_stage1(1, PAF_CHANNELS), _stage1(2, HEATMAP_CHANNELS)]]
        self.branches += [[_stage(i, 1, PAF_CHANNELS), _stage(i, 2, HEATMAP_CHANNELS)] for i in range(2, 7)]
        for name, cin, cout, k in [v for v in VGG if v != "pool"] + \
                [layer for stage in self.branches for branch in stage for layer in branch]:
            setattr(self, name, nn.Conv2d(cin, cout, k, padding=k // 2))

    def _run(self, layers: list[tuple[str, int, int, int]], x: Tensor, last_relu: bool) -> Tensor:
        for j, (name, *_) in enumerate(layers):
            x = getattr(self, name)(x)
            if j < len(layers) - 1 or last_relu:
                x = F.relu(x)
        return x

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: (B, 3, H, W) BGR in [-0.5, 0.5) → (part affinity fields, heat maps) at 1/8 of the size."""
        for layer in VGG:
            x = F.max_pool2d(x, 2, 2) if layer == "pool" else F.relu(getattr(self, layer[0])(x))
        features, h = x, x
        for i, (paf_layers, heat_layers) in enumerate(self.branches):
            paf = self._run(paf_layers, h, last_relu=False)
            heat = self._run(heat_layers, h, last_relu=i == len(self.branches) - 1)
            h = torch.cat([paf, heat, features], 1)
        return paf, heat


# The hand (``hand_pose_model.pth``, 21 keypoints + background) and face (``facenet.pth``, 70 landmarks
# + background) networks, one architecture with two widths: a VGG-19 front to conv5_2, one CPM layer,
# then six stages of one heat-map branch (``conv6_*_CPM``, then ``Mconv1…7_stage2…6``), each later
# stage reading the previous stage's maps beside the features.
KEYPOINT_VGG = (("conv1_1", 3, 64), ("conv1_2", 64, 64), "pool", ("conv2_1", 64, 128), ("conv2_2", 128, 128),
                "pool", ("conv3_1", 128, 256), ("conv3_2", 256, 256), ("conv3_3", 256, 256), ("conv3_4", 256, 256),
                "pool", ("conv4_1", 256, 512), ("conv4_2", 512, 512), ("conv4_3", 512, 512), ("conv4_4", 512, 512),
                ("conv5_1", 512, 512), ("conv5_2", 512, 512), ("conv5_3_CPM", 512, 128))
HAND_CHANNELS, FACE_CHANNELS = 22, 71


class KeypointNet(nn.Module):
    """OpenPose's hand or face network: (B, 3, H, W) BGR in [-0.5, 0.5) → the last stage's heat maps
    (B, channels, H/8, W/8)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        for layer in KEYPOINT_VGG:
            if layer != "pool":
                name, cin, cout = layer
                setattr(self, name, nn.Conv2d(cin, cout, 3, padding=1))
        self.conv6_1_CPM = nn.Conv2d(128, 512, 1)
        self.conv6_2_CPM = nn.Conv2d(512, channels, 1)
        for i in range(2, 7):
            setattr(self, f"Mconv1_stage{i}", nn.Conv2d(128 + channels, 128, 7, padding=3))
            for k in range(2, 6):
                setattr(self, f"Mconv{k}_stage{i}", nn.Conv2d(128, 128, 7, padding=3))
            setattr(self, f"Mconv6_stage{i}", nn.Conv2d(128, 128, 1))
            setattr(self, f"Mconv7_stage{i}", nn.Conv2d(128, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        for layer in KEYPOINT_VGG:
            x = F.max_pool2d(x, 2, 2) if layer == "pool" else F.relu(getattr(self, layer[0])(x))
        features = x
        h = self.conv6_2_CPM(F.relu(self.conv6_1_CPM(features)))
        for i in range(2, 7):
            h = torch.cat([h, features], 1)
            for k in range(1, 7):
                h = F.relu(getattr(self, f"Mconv{k}_stage{i}")(h))
            h = getattr(self, f"Mconv7_stage{i}")(h)
        return h


class OpenPoseNets(nn.Module):
    """The networks of one OpenPose run: the body network and, where the preprocessor needs them, the
    hand and face networks (their boxes come from the body's keypoints)."""

    def __init__(self, body: nn.Module, hand: nn.Module | None = None, face: nn.Module | None = None) -> None:
        super().__init__()
        self.body, self.hand, self.face = body, hand, face

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.body(x)
