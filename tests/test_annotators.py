"""Annotators against controlnet_aux on the same weights: the OpenPose body network (random weights)
and its keypoint search and people assembly (on synthetic heat maps and part affinity fields with two
people in them, which random weights cannot give), HED soft edges (plain, safe, scribble) and line
art, each through controlnet_aux's own detector call at the image's resolution; the published files
load through the allow-list and a file of another kind is refused by name."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from sfumato.checkpoint.annotators import load_annotator
from sfumato.errors import CheckpointError
from sfumato.models.hed import HEDNet
from sfumato.models.lineart import LineartNet
from sfumato.models.openpose import BodyPoseNet
from sfumato.pipeline.annotate import (detect_poses, estimate_depth, hed_edges, hed_scribble, lineart, midas_depth,
                                        openpose)
from sfumato.pipeline.pose import LIMBS

warnings.filterwarnings("ignore", module="controlnet_aux")
warnings.filterwarnings("ignore", module="timm")


def photo(w: int = 128, h: int = 192, seed: int = 0) -> np.ndarray:
    """A smooth random colour image (noise blurred), so edges and lines are not all noise."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC))


def scaled_(model: torch.nn.Module, seed: int, gain: float = 1.0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            fan_in = p[0].numel() if p.ndim > 1 else 1
            p.copy_(torch.randn(p.shape, generator=g) * (gain / fan_in ** 0.5 if p.ndim > 1 else 0.05))
    return model.eval()


def test_openpose_network_matches_reference():
    from controlnet_aux.open_pose import util
    from controlnet_aux.open_pose.model import bodypose_model

    ours = scaled_(BodyPoseNet(), 1, gain=1.4)
    ref = bodypose_model().eval()
    ref.load_state_dict(util.transfer(ref, ours.state_dict()))
    x = torch.rand(1, 3, 48, 64) - 0.5
    with torch.no_grad():
        for a, b in zip(ours(x), ref(x)):
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# two people, as (x, y) in a 128×192 image
PEOPLE = [
    [(40, 30), (40, 50), (28, 50), (24, 72), (22, 92), (52, 50), (56, 72), (58, 92), (32, 100), (30, 130), (30, 160),
     (48, 100), (50, 130), (50, 160), (36, 26), (44, 26), (32, 28), (48, 28)],
    [(95, 40), (95, 58), (84, 58), (80, 80), None, (106, 58), (110, 80), (112, 100), (88, 108), (86, 138), (86, 168),
     (102, 108), (104, 138), (104, 168), (91, 36), (99, 36), None, (103, 38)],
]
PAF_OF_LIMB = {(1, 2): (12, 13), (1, 5): (20, 21), (2, 3): (14, 15), (3, 4): (16, 17), (5, 6): (22, 23),
               (6, 7): (24, 25), (1, 8): (0, 1), (8, 9): (2, 3), (9, 10): (4, 5), (1, 11): (6, 7), (11, 12): (8, 9),
               (12, 13): (10, 11), (1, 0): (28, 29), (0, 14): (30, 31), (14, 16): (34, 35), (0, 15): (32, 33),
               (15, 17): (36, 37)}


class FakePoseNet(torch.nn.Module):
    """Returns fixed maps at the network's output grid (1/8 of the padded input): a Gaussian bump per
    keypoint, unit vectors along each limb within 1 cell of it."""

    def __init__(self, people, width: int, height: int):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.people, self.size = people, (width, height)

    def forward(self, x):
        _, _, hp, wp = x.shape
        scale = hp / self.size[1] * 8 / 8   # input pixels per image pixel
        gy, gx = np.mgrid[0:hp // 8, 0:wp // 8].astype(np.float64)
        heat = np.zeros((19, hp // 8, wp // 8))
        paf = np.zeros((38, hp // 8, wp // 8))
        for person in self.people:
            pts = [None if p is None else (p[0] * scale / 8, p[1] * scale / 8) for p in person]
            for k, p in enumerate(pts):
                if p is not None:
                    heat[k] = np.maximum(heat[k], np.exp(-((gx - p[0]) ** 2 + (gy - p[1]) ** 2) / 2.0))
            for (a, b), (cx, cy) in PAF_OF_LIMB.items():
                if pts[a] is None or pts[b] is None:
                    continue
                d = np.subtract(pts[b], pts[a])
                n = np.linalg.norm(d)
                u = d / n
                rx, ry = gx - pts[a][0], gy - pts[a][1]
                along, across = rx * u[0] + ry * u[1], np.abs(-rx * u[1] + ry * u[0])
                band = (along >= -1) & (along <= n + 1) & (across <= 1.0)
                paf[cx][band], paf[cy][band] = u[0], u[1]
        heat[18] = 1 - heat[:18].max(0)
        return torch.from_numpy(paf[None]).float(), torch.from_numpy(heat[None]).float()


def test_openpose_detection_matches_controlnet_aux_on_two_people():
    from controlnet_aux.open_pose import Body, OpenposeDetector

    w, h = 128, 192
    fake = FakePoseNet(PEOPLE, w, h)
    image = photo(w, h)
    pose = detect_poses(fake, image)
    # the two people come back, each keypoint within one cell of the network's 8 px output grid
    assert len(pose.people) == 2
    found = sorted(pose.people, key=lambda p: p[1][0])
    for truth, person in zip(PEOPLE, found):
        for t, p in zip(truth, person):
            assert (t is None) == (p is None)
            if t is not None:
                assert abs(p[0] * w - t[0]) <= 8 and abs(p[1] * h - t[1]) <= 8
    body = Body.__new__(Body)
    body.model = fake
    detector = OpenposeDetector(body)
    ref_poses = detector.detect_poses(image)
    assert len(ref_poses) == len(pose.people)
    for ref, ours in zip(ref_poses, pose.people):
        for r, o in zip(ref.body.keypoints, ours):
            assert (r is None) == (o is None)
            if r is not None:
                assert (r.x, r.y) == o
    ref_map = detector(image, detect_resolution=min(w, h), image_resolution=min(w, h), output_type="np")
    ours_map = openpose(fake, image)
    assert ours_map.any() and np.array_equal(ours_map, ref_map)


@pytest.mark.parametrize("mode", ["plain", "safe", "scribble"])
def test_hed_matches_controlnet_aux(mode):
    from controlnet_aux.hed import ControlNetHED_Apache2, HEDdetector

    ours = scaled_(HEDNet(), 2, gain=1.4)
    with torch.no_grad():
        ours.norm.copy_(torch.tensor([120.0, 115.0, 100.0]).view(1, 3, 1, 1))
    ref = ControlNetHED_Apache2().float().eval()
    ref.load_state_dict(ours.state_dict())
    image = photo(128, 192, seed=1)
    got = {"plain": hed_edges(ours, image), "safe": hed_edges(ours, image, safe=True),
           "scribble": hed_scribble(ours, image)}[mode]
    want = HEDdetector(ref)(image, detect_resolution=128, image_resolution=128, output_type="np",
                            safe=mode == "safe", scribble=mode == "scribble")
    assert got.shape == want.shape == (192, 128, 3) and got.dtype == np.uint8
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    assert (got == want).mean() >= 0.999
    assert got.std() > 2, "a flat map: the test weights saturate"


def test_lineart_matches_controlnet_aux():
    from controlnet_aux.lineart import Generator, LineartDetector

    ours = scaled_(LineartNet(), 3)
    ref = Generator(3, 1, 3).eval()
    ref.load_state_dict(ours.state_dict())
    image = photo(128, 192, seed=2)
    got = lineart(ours, image)
    want = LineartDetector(ref, ref)(image, detect_resolution=128, image_resolution=128, output_type="np")
    assert got.shape == want.shape == (192, 128, 3)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1 and (got == want).mean() >= 0.999
    assert got.std() > 2


def test_published_files_load_and_wrong_kinds_are_named(tmp_path):
    nets = {"body_pose_model.pth": scaled_(BodyPoseNet(), 4), "ControlNetHED.pth": scaled_(HEDNet(), 5),
            "sk_model.pth": scaled_(LineartNet(), 6)}
    for name, net in nets.items():
        torch.save(net.state_dict(), tmp_path / name)
    x = photo(64, 64)
    for name, kind, fn in (("body_pose_model.pth", "openpose", detect_poses), ("ControlNetHED.pth", "hed", hed_edges),
                           ("sk_model.pth", "lineart", lineart)):
        loaded = load_annotator(tmp_path / name, kind)
        a, b = fn(loaded, x), fn(nets[name], x)
        assert a == b if kind == "openpose" else np.array_equal(a, b)
    with pytest.raises(CheckpointError, match="is a HED edge model"):
        load_annotator(tmp_path / "ControlNetHED.pth", "openpose")
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not an annotator"):
        load_annotator(tmp_path / "other.pth")


def reference_dpt(backbone: str, device: str = "cpu"):
    from controlnet_aux.midas.midas.dpt_depth import DPTDepthModel

    with torch.device(device):
        return DPTDepthModel(path=None, backbone=backbone, non_negative=True).eval()


@pytest.mark.parametrize("backbone", ["vitb_rn50_384", "vitb16_384"])
def test_midas_matches_controlnet_aux(backbone, tmp_path):
    """DPT-Hybrid (the published annotator) and DPT-Base through controlnet_aux's MidasDetector, on the
    reference's random weights saved as a file and loaded by sfumato; then depth2img's estimate."""
    from controlnet_aux.midas import MidasDetector

    torch.manual_seed(0)
    ref = reference_dpt(backbone)
    with torch.no_grad():   # timm zero-initialises the class token and position embedding; make them count
        ref.pretrained.model.pos_embed.normal_(0, 0.2)
        ref.pretrained.model.cls_token.normal_(0, 0.2)
    torch.save(ref.state_dict(), tmp_path / "dpt.pt")
    ours = load_annotator(tmp_path / "dpt.pt", "midas")
    image = photo(128, 192, seed=4)
    x = torch.from_numpy(image).float().permute(2, 0, 1)[None] / 127.5 - 1
    with torch.no_grad():
        a, b = ours(x), ref(x)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))
    got = midas_depth(ours, image)
    want = MidasDetector(ref)(image, detect_resolution=128, image_resolution=128, output_type="np")
    assert got.shape == want.shape == (192, 128, 3)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1 and got.std() > 2
    # depth2img: MiDaS' own transform (keep aspect, 384 on the side that changes least, multiples of 32)
    from controlnet_aux.midas.api import load_midas_transform

    transform = load_midas_transform("dpt_hybrid")
    sample = transform({"image": image.astype(np.float32) / 255.0})["image"]
    with torch.no_grad():
        want_depth = ref(torch.from_numpy(sample)[None])[0].numpy()
    got_depth = np.asarray(estimate_depth(ours, image))
    assert got_depth.shape == want_depth.shape == (384, 256)
    np.testing.assert_allclose(got_depth, want_depth, rtol=1e-4, atol=1e-4 * float(np.abs(want_depth).max()))


def test_midas_large_layout_matches_reference_keys():
    """DPT-Large (ViT-L/16, 24 blocks): the same keys and shapes as the reference (built without memory)."""
    from sfumato.models.midas import midas_from_state

    ref = {k: v for k, v in reference_dpt("vitl16_384", "meta").state_dict().items()
           if not k.startswith("pretrained.model.head.")}
    ours = midas_from_state(ref).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in ref.items()}
