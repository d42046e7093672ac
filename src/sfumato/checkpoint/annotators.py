"""Annotator weights as ControlNet's annotators publish them: ``body_pose_model.pth`` (OpenPose body),
``hand_pose_model.pth`` and ``facenet.pth`` (OpenPose hands and face),
``ControlNetHED.pth`` (HED soft edges), ``sk_model.pth`` / ``sk_model2.pth`` (line art, realistic and
coarse) and MiDaS ``dpt_hybrid-midas-501f0c75.pt`` / ``dpt_large-midas-2f21e586.pt`` — pickles read
through the allow-list — or their .safetensors conversions. Each is a flat state dict in the
original layout; the kind is told by its keys, so a file given for the wrong preprocessor is an
error naming what it is.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import CheckpointError
from .io import check_finite, load_file

KINDS = {"openpose": "an OpenPose body model (body_pose_model.pth)",
         "openpose_hand": "an OpenPose hand model (hand_pose_model.pth)",
         "openpose_face": "an OpenPose face model (facenet.pth)",
         "hed": "a HED edge model (ControlNetHED.pth)",
         "lineart": "a line-art model (sk_model.pth / sk_model2.pth)",
         "midas": "a MiDaS DPT depth model (dpt_hybrid / dpt_large)"}


def annotator_kind(sd: dict[str, Tensor]) -> str | None:
    """Which annotator a state dict is, from its keys (None: none of them)."""
    if "Mconv7_stage6_L2.weight" in sd and "conv5_5_CPM_L1.weight" in sd:
        return "openpose"
    if "Mconv7_stage6.weight" in sd and "conv6_2_CPM.weight" in sd:
        from ..models.openpose import FACE_CHANNELS, HAND_CHANNELS
        channels = sd["conv6_2_CPM.weight"].shape[0]
        return {HAND_CHANNELS: "openpose_hand", FACE_CHANNELS: "openpose_face"}.get(channels)
    if "norm" in sd and "block5.projection.weight" in sd:
        return "hed"
    if "model0.1.weight" in sd and "model4.1.weight" in sd and "model2.0.conv_block.1.weight" in sd:
        return "lineart"
    if any(k.startswith("scratch.output_conv.") for k in sd) and any(k.startswith("pretrained.model.") for k in sd):
        return "midas"
    return None


def _build(kind: str, sd: dict[str, Tensor]) -> nn.Module:
    if kind == "openpose":
        from ..models.openpose import BodyPoseNet
        return BodyPoseNet()
    if kind in ("openpose_hand", "openpose_face"):
        from ..models.openpose import KeypointNet
        return KeypointNet(sd["conv6_2_CPM.weight"].shape[0])
    if kind == "hed":
        from ..models.hed import HEDNet
        return HEDNet()
    if kind == "lineart":
        from ..models.lineart import LineartNet
        blocks = len({k.split(".")[1] for k in sd if k.startswith("model2.")})
        return LineartNet(blocks)
    if kind == "midas":
        from ..models.midas import midas_from_state
        return midas_from_state(sd)
    raise CheckpointError(f"{KINDS[kind]} is not supported")


def load_annotator(path: str | Path, kind: str | None = None, *, device: str | torch.device = "cpu") -> nn.Module:
    """An annotator network in eval mode, fp32, on ``device``. ``kind`` (``openpose``, ``openpose_hand``,
    ``openpose_face``, ``hed``, ``lineart``, ``midas``) is what the caller needs; a file of another kind
    is an error saying what it is."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"annotator file not found: {path}")
    sd, _ = load_file(path)
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    found = annotator_kind(sd)
    if found is None:
        raise CheckpointError(f"{path.name} is not an annotator model this version reads (OpenPose body, hand "
                              "or face, HED, line art, MiDaS DPT)")
    if kind is not None and found != kind:
        raise CheckpointError(f"{path.name} is {KINDS[found]}, not {KINDS[kind]}")
    if found == "midas":   # the ViT's ImageNet classifier: DPT never runs it
        sd = {k: v for k, v in sd.items() if not k.startswith("pretrained.model.head.")}
    check_finite(sd, path.name)
    model = _build(found, sd)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    unexpected = [k for k in unexpected if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise CheckpointError(f"{path.name} does not match {KINDS[found]}: "
                              f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.float().eval().requires_grad_(False).to(device)

