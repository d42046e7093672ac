"""Annotators: the ControlNet preprocessors that need a network — OpenPose body keypoints, HED soft
edges, line art (and MiDaS depth, in ``pipeline/depth_estimate.py``) — from an RGB image to the
control image, computed as controlnet_aux computes them (same resizing, same post-processing).

Each runs on the image at the size it is given: the generation pipeline hands it the control image
already fitted to the generation size (A1111's "pixel perfect"), so the map needs no resizing after.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..errors import CheckpointError, ParamError
from .pose import Pose, render_pose

ImageLike = Image.Image | np.ndarray
_LOADED: dict[tuple, nn.Module] = {}   # the annotators of recent requests, by file, kind and device
_KEEP = 4


def annotator_network(source, kind: str, field: str, device: str | torch.device = "cpu") -> nn.Module:
    """A loaded annotator network of ``kind``: ``source`` is one already, or its weights file (loaded
    once per file version and device; errors name ``field``)."""
    if isinstance(source, nn.Module):
        return source
    from pathlib import Path

    from ..checkpoint.annotators import load_annotator

    path = Path(source).resolve()
    try:
        key = (str(path), path.stat().st_mtime_ns, kind, str(device))
        if key not in _LOADED:
            net = load_annotator(path, kind, device=device)
            while len(_LOADED) >= _KEEP:
                _LOADED.pop(next(iter(_LOADED)))
            _LOADED[key] = net
    except (OSError, CheckpointError) as e:
        raise ParamError(field, str(e)) from None
    return _LOADED[key]


def rgb_array(image: ImageLike) -> np.ndarray:
    """uint8 (H, W, 3): greys repeated, alpha composited on white (controlnet_aux's HWC3)."""
    a = np.asarray(image.convert("RGBA") if isinstance(image, Image.Image) and image.mode not in ("RGB", "L")
                   else image)
    if a.dtype != np.uint8:
        raise ValueError(f"an annotator needs a uint8 image, got {a.dtype}")
    if a.ndim == 2:
        a = a[:, :, None]
    if a.shape[2] == 1:
        return np.concatenate([a, a, a], axis=2)
    if a.shape[2] == 4:
        color, alpha = a[:, :, :3].astype(np.float32), a[:, :, 3:4].astype(np.float32) / 255.0
        return (color * alpha + 255.0 * (1.0 - alpha)).clip(0, 255).astype(np.uint8)
    return np.ascontiguousarray(a[:, :, :3])


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# -- OpenPose body ------------------------------------------------------------------------------------

# limbs as keypoint index pairs (0-based) and the PAF channel pair of each, in OpenPose's search order
# (the last two, ear–shoulder, only join people already found)
_PAF_LIMBS = ((1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12),
              (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17), (2, 16), (5, 17))
_PAF_CHANNELS = ((12, 13), (20, 21), (14, 15), (16, 17), (22, 23), (24, 25), (0, 1), (2, 3), (4, 5), (6, 7),
                 (8, 9), (10, 11), (28, 29), (30, 31), (34, 35), (32, 33), (36, 37), (18, 19), (26, 27))
_BOX, _STRIDE, _PAD_VALUE, _PEAK_THRESHOLD, _PAF_THRESHOLD, _SAMPLES = 368, 8, 128, 0.1, 0.05, 10


def _smart_resize(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """OpenCV resize, area when shrinking and Lanczos when growing, a channel at a time past 3."""
    import cv2

    channels = 1 if x.ndim == 2 else x.shape[2]
    if channels not in (1, 3):
        return np.stack([_smart_resize(x[:, :, i], height, width) for i in range(channels)], axis=2)
    k = float(height + width) / float(x.shape[0] + x.shape[1])
    return cv2.resize(x, (int(width), int(height)), interpolation=cv2.INTER_AREA if k < 1 else cv2.INTER_LANCZOS4)


def _network_maps(net: nn.Module, bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Heat maps (H, W, 19) and part affinity fields (H, W, 38), float64, at the image's size: the
    image scaled to a 184 px height, padded right/down to the stride with grey, the outputs grown
    back ×8, unpadded and resized to the image."""
    h, w = bgr.shape[:2]
    scale = 0.5 * _BOX / h
    small = _smart_resize(bgr, h * scale, w * scale)
    sh, sw = small.shape[:2]
    ph, pw = (-sh) % _STRIDE, (-sw) % _STRIDE
    padded = np.pad(small, ((0, ph), (0, pw), (0, 0)), constant_values=_PAD_VALUE)
    x = np.ascontiguousarray(np.transpose(np.float32(padded[:, :, :, None]), (3, 2, 0, 1)) / 256 - 0.5)
    with torch.no_grad():
        paf, heat = net(torch.from_numpy(x).float().to(_device(net)))
    out = []
    for t in (heat, paf):
        m = np.transpose(t.cpu().numpy()[0], (1, 2, 0))
        m = _smart_resize(m, m.shape[0] * _STRIDE, m.shape[1] * _STRIDE)
        m = m[:padded.shape[0] - ph, :padded.shape[1] - pw, :]
        out.append(np.zeros((h, w, m.shape[2])) + _smart_resize(m, h, w))
    return out[0], out[1]


def _peaks(heat: np.ndarray) -> list[list[tuple[int, int, float, int]]]:
    """Per body part, its local maxima above the threshold after a σ = 3 Gaussian: (x, y, score, id)."""
    from scipy.ndimage import gaussian_filter

    found, next_id = [], 0
    for part in range(18):
        raw = heat[:, :, part]
        g = gaussian_filter(raw, sigma=3)
        ge = np.ones(g.shape, dtype=bool)
        for axis, sl_to, sl_from in ((0, np.s_[1:, :], np.s_[:-1, :]), (0, np.s_[:-1, :], np.s_[1:, :]),
                                     (1, np.s_[:, 1:], np.s_[:, :-1]), (1, np.s_[:, :-1], np.s_[:, 1:])):
            shifted = np.zeros(g.shape)
            shifted[sl_to] = g[sl_from]
            ge &= g >= shifted
        ys, xs = np.nonzero(ge & (g > _PEAK_THRESHOLD))
        found.append([(int(x), int(y), float(raw[y, x]), next_id + i) for i, (x, y) in enumerate(zip(xs, ys))])
        next_id += len(xs)
    return found


def _connections(peaks, paf: np.ndarray, height: int) -> list[np.ndarray | None]:
    """Per limb, the accepted (id A, id B, score, i, j) pairs: PAF line integrals over 10 samples, a
    distance prior, then greedy by score with each keypoint used once."""
    out = []
    for (a, b), (cx, cy) in zip(_PAF_LIMBS, _PAF_CHANNELS):
        cand_a, cand_b = peaks[a], peaks[b]
        if not cand_a or not cand_b:
            out.append(None)
            continue
        candidates = []
        for i, pa in enumerate(cand_a):
            for j, pb in enumerate(cand_b):
                vec = np.subtract(pb[:2], pa[:2])
                norm = max(0.001, math.sqrt(vec[0] * vec[0] + vec[1] * vec[1]))
                vec = np.divide(vec, norm)
                xs = np.linspace(pa[0], pb[0], num=_SAMPLES)
                ys = np.linspace(pa[1], pb[1], num=_SAMPLES)
                rows = [int(round(y)) for y in ys]
                cols = [int(round(x)) for x in xs]
                along = np.multiply(paf[rows, cols, cx], vec[0]) + np.multiply(paf[rows, cols, cy], vec[1])
                score = sum(along) / len(along) + min(0.5 * height / norm - 1, 0)
                if len(np.nonzero(along > _PAF_THRESHOLD)[0]) > 0.8 * len(along) and score > 0:
                    candidates.append((i, j, score))
        candidates = sorted(candidates, key=lambda c: c[2], reverse=True)
        accepted: list[list[float]] = []
        used_a, used_b = set(), set()
        for i, j, s in candidates:
            if i not in used_a and j not in used_b:
                accepted.append([cand_a[i][3], cand_b[j][3], s, i, j])
                used_a.add(i)
                used_b.add(j)
                if len(accepted) >= min(len(cand_a), len(cand_b)):
                    break
        out.append(np.array(accepted).reshape(-1, 5))
    return out


def _people(candidate: np.ndarray, connections) -> np.ndarray:
    """Limbs joined into people: rows of 18 candidate ids (−1: missing), the total score, the part count."""
    people = -1 * np.ones((0, 20))
    for k, ((a, b), limbs) in enumerate(zip(_PAF_LIMBS, connections)):
        if limbs is None:
            continue
        for ida, idb, score, *_ in limbs:
            owners = [r for r in range(len(people)) if people[r][a] == ida or people[r][b] == idb][:2]
            overlap = len(owners) == 2 and ((people[owners[0]] >= 0) & (people[owners[1]] >= 0))[:-2].any()
            if len(owners) == 1 or overlap:
                r = owners[0]
                if overlap or people[r][b] != idb:   # (two people sharing a part: the first takes B, always)
                    people[r][b] = idb
                    people[r][-1] += 1
                    people[r][-2] += candidate[int(idb), 2] + score
            elif len(owners) == 2:   # two disjoint partial people: merge them
                r1, r2 = owners
                people[r1][:-2] += people[r2][:-2] + 1
                people[r1][-2:] += people[r2][-2:]
                people[r1][-2] += score
                people = np.delete(people, r2, 0)
            elif k < 17:
                row = -1 * np.ones(20)
                row[a], row[b], row[-1] = ida, idb, 2
                row[-2] = sum(candidate[[int(ida), int(idb)], 2]) + score
                people = np.vstack([people, row])
    keep = [r for r in range(len(people)) if not (people[r][-1] < 4 or people[r][-2] / people[r][-1] < 0.4)]
    return people[keep]


def detect_poses(net: nn.Module, image: ImageLike) -> Pose:
    """The OpenPose body poses in an image (one scale, as the ControlNet annotator runs it)."""
    rgb = rgb_array(image)
    h, w = rgb.shape[:2]
    heat, paf = _network_maps(net, rgb[:, :, ::-1].copy())
    peaks = _peaks(heat)
    candidate = np.array([p for part in peaks for p in part], dtype=np.float64).reshape(-1, 4)
    people = _people(candidate, _connections(peaks, paf, h))
    return Pose(w, h, tuple(
        tuple(None if idx == -1 else (candidate[idx][0] / float(w), candidate[idx][1] / float(h))
              for idx in row[:18].astype(int))
        for row in people))


def openpose(net: nn.Module, image: ImageLike) -> np.ndarray:
    """The ``openpose`` control image: the detected bodies drawn on black at the image's size."""
    return render_pose(detect_poses(net, image))


# -- HED soft edges ---------------------------------------------------------------------------------------

def hed_edges(net: nn.Module, image: ImageLike, safe: bool = False) -> np.ndarray:
    """uint8 (H, W, 3): the mean of HED's five edge logit maps (each grown bilinearly to the image),
    through a sigmoid; ``safe`` quantises it to 3 levels ("softedge_hedsafe")."""
    import cv2

    rgb = rgb_array(image)
    h, w = rgb.shape[:2]
    with torch.no_grad():
        x = torch.from_numpy(rgb.copy()).float().to(_device(net)).permute(2, 0, 1)[None]
        maps = [m.cpu().numpy().astype(np.float32)[0, 0] for m in net(x)]
    maps = np.stack([cv2.resize(m, (w, h), interpolation=cv2.INTER_LINEAR) for m in maps], axis=2)
    edge = 1 / (1 + np.exp(-np.mean(maps, axis=2).astype(np.float64)))
    if safe:
        edge = (edge.astype(np.float32) * 3.0).astype(np.int32).astype(np.float32) / 2.0
    return rgb_array((edge * 255.0).clip(0, 255).astype(np.uint8))


def hed_scribble(net: nn.Module, image: ImageLike) -> np.ndarray:
    """``scribble_hed``: HED edges thinned (non-maximum suppression along 4 directions at 127), then
    blurred and thresholded into strokes."""
    import cv2

    edges = hed_edges(net, image)
    x = cv2.GaussianBlur(edges.astype(np.float32), (0, 0), 3.0)
    kernels = [np.array(k, dtype=np.uint8) for k in (
        [[0, 0, 0], [1, 1, 1], [0, 0, 0]], [[0, 1, 0], [0, 1, 0], [0, 1, 0]],
        [[1, 0, 0], [0, 1, 0], [0, 0, 1]], [[0, 0, 1], [0, 1, 0], [1, 0, 0]])]
    y = np.zeros_like(x)
    for kernel in kernels:
        np.putmask(y, cv2.dilate(x, kernel=kernel) == x, x)
    z = np.zeros_like(y, dtype=np.uint8)
    z[y > 127] = 255
    z = cv2.GaussianBlur(z, (0, 0), 3.0)
    z[z > 4] = 255
    z[z < 255] = 0
    return z


# -- line art -----------------------------------------------------------------------------------------------

def lineart(net: nn.Module, image: ImageLike) -> np.ndarray:
    """uint8 (H, W, 3): white lines on black (the network draws dark lines on white; inverted)."""
    rgb = rgb_array(image)
    with torch.no_grad():
        x = (torch.from_numpy(rgb).float().to(_device(net)) / 255.0).permute(2, 0, 1)[None]
        line = net(x)[0][0].cpu().numpy()
    return 255 - rgb_array((line * 255.0).clip(0, 255).astype(np.uint8))




# -- MiDaS depth ----------------------------------------------------------------------------------------------

def _round64(rgb: np.ndarray) -> np.ndarray:
    """controlnet_aux's resize_image at the image's own short side: each side rounded to a multiple
    of 64 (OpenCV, area when shrinking, Lanczos when growing); unchanged when they already are."""
    import cv2

    h, w = rgb.shape[:2]
    nh, nw = int(np.round(h / 64.0)) * 64, int(np.round(w / 64.0)) * 64
    if (nh, nw) == (h, w):
        return rgb
    return cv2.resize(rgb, (max(64, nw), max(64, nh)), interpolation=cv2.INTER_AREA)


def midas_depth(net: nn.Module, image: ImageLike) -> np.ndarray:
    """``depth_midas``: uint8 (H, W, 3), the relative inverse depth stretched to 0…255 (near = white),
    predicted at the image's size rounded to multiples of 64 and resized back bilinearly."""
    import cv2

    rgb = rgb_array(image)
    h, w = rgb.shape[:2]
    x = _round64(rgb)
    with torch.no_grad():
        t = (torch.from_numpy(x).float().to(_device(net)) / 127.5 - 1.0).permute(2, 0, 1)[None]
        depth = net(t)[0]
        depth = depth - torch.min(depth)
        depth = depth / torch.max(depth)
    out = rgb_array((depth.cpu().numpy() * 255.0).clip(0, 255).astype(np.uint8))
    return out if out.shape[:2] == (h, w) else cv2.resize(out, (w, h), interpolation=cv2.INTER_LINEAR)


def _midas_size(h: int, w: int, target: int = 384, multiple: int = 32) -> tuple[int, int]:
    """MiDaS' "minimal" resize: keep the aspect, scale the side that needs the smaller change to 384,
    round both sides to a multiple of 32."""
    sh, sw = target / h, target / w
    if abs(1 - sw) < abs(1 - sh):
        sh = sw
    else:
        sw = sh
    return int(np.round(sh * h / multiple) * multiple), int(np.round(sw * w / multiple) * multiple)


def estimate_depth(net: nn.Module, image: ImageLike) -> Image.Image:
    """SD 2 depth2img's depth map: the image in [0, 1] resized as MiDaS' DPT transform does (384, keep
    aspect, multiples of 32, bicubic), normalised to [−1, 1], the prediction as a float ("F") image;
    the depth conditioning then resizes it to the latent and stretches it to [−1, 1], as ldm does."""
    import cv2

    rgb = rgb_array(image).astype(np.float32) / 255.0
    h, w = _midas_size(*rgb.shape[:2])
    x = (cv2.resize(rgb, (w, h), interpolation=cv2.INTER_CUBIC) - 0.5) / 0.5
    with torch.no_grad():
        t = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))).float().to(_device(net))[None]
        depth = net(t)[0].float().cpu().numpy()
    return Image.fromarray(depth.astype(np.float32))   # mode "F"


# preprocessor name → (annotator kind, function of (network, image))
ANNOTATORS: dict[str, tuple[str, Callable[[nn.Module, ImageLike], np.ndarray]]] = {
    "openpose": ("openpose", openpose),
    "softedge_hed": ("hed", hed_edges),
    "softedge_hedsafe": ("hed", lambda net, image: hed_edges(net, image, safe=True)),
    "scribble_hed": ("hed", hed_scribble),
    "lineart_realistic": ("lineart", lineart),
    "lineart_coarse": ("lineart", lineart),
    "depth_midas": ("midas", midas_depth),
}
