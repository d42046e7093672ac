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


# the OpenPose parts' published file names (any of .pth, .pt, .safetensors) in a folder given as the annotator
OPENPOSE_FILES = {"openpose": "body_pose_model", "openpose_hand": "hand_pose_model", "openpose_face": "facenet"}


def annotator_network(source, kind: str, field: str, device: str | torch.device = "cpu") -> nn.Module:
    """A loaded annotator network of ``kind``: ``source`` is one already, or its weights file (loaded
    once per file version and device; errors name ``field``). The OpenPose kinds with hands or a face
    (``openpose+hand``, ``openpose+face``, ``openpose+hand+face``) take the files of every network they
    run: a list of them, or a folder holding them under their published names; they give an
    ``OpenPoseNets``."""
    from pathlib import Path

    if isinstance(source, nn.Module):
        from ..models.openpose import OpenPoseNets

        for part in kind.split("+")[1:]:   # a loaded set must hold the networks the preprocessor runs
            if not isinstance(source, OpenPoseNets) or getattr(source, part) is None:
                raise ParamError(field, f"{kind.replace('+', ' with ')} needs the {part} network "
                                        f"({OPENPOSE_FILES['openpose_' + part]}.pth) in an OpenPoseNets")
        return source
    if kind.startswith("openpose"):
        several = "+" in kind or isinstance(source, (list, tuple)) or Path(source).is_dir()
        return _openpose_nets(source, kind, field, device) if several else _load_one(source, kind, field, device)
    if isinstance(source, (list, tuple)):
        raise ParamError(field, f"a {kind} annotator is one weights file, got a list")
    return _load_one(source, kind, field, device)


def _openpose_nets(source, kind: str, field: str, device) -> nn.Module:
    from pathlib import Path

    from ..checkpoint.annotators import KINDS
    from ..models.openpose import FACE_CHANNELS, HAND_CHANNELS, BodyPoseNet, KeypointNet, OpenPoseNets

    needed = ["openpose"] + [f"openpose_{part}" for part in kind.split("+")[1:]]
    nets: dict[str, nn.Module] = {}
    if isinstance(source, (list, tuple)):
        for item in source:
            net = _load_one(item, None, field, device)   # any kind; told from the network it is
            found = "openpose" if isinstance(net, BodyPoseNet) else \
                {HAND_CHANNELS: "openpose_hand", FACE_CHANNELS: "openpose_face"}.get(net.channels) if isinstance(net, KeypointNet) else None
            if found is None:
                raise ParamError(field, f"{Path(item).name} is not an OpenPose body, hand or face model")
            nets[found] = net
    else:
        folder = Path(source) if Path(source).is_dir() else None
        for part in needed:
            hits = [Path(source)] if folder is None and part == "openpose" else \
                sorted(p for p in folder.iterdir() if p.stem == OPENPOSE_FILES[part] and
                       p.suffix in (".pth", ".pt", ".safetensors")) if folder is not None else []
            if hits:
                nets[part] = _load_one(hits[0], part, field, device)
    missing = [part for part in needed if part not in nets]
    if missing:
        names = ", ".join(f"{OPENPOSE_FILES[part]}.pth ({KINDS[part].split(' (')[0]})" for part in missing)
        raise ParamError(field, f"{kind.replace('+', ' with ')} needs {names}: give a folder with the files "
                                f"under their published names, or a list of the files")
    return OpenPoseNets(nets["openpose"], nets.get("openpose_hand"), nets.get("openpose_face"))


def _load_one(source, kind: str | None, field: str, device) -> nn.Module:
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


def detect_poses(net: nn.Module, image: ImageLike, hands: bool = False, face: bool = False) -> Pose:
    """The OpenPose poses in an image (the body at one scale, as the ControlNet annotator runs it):
    each person's body and, with ``hands`` / ``face``, its hands and face, found in boxes placed by
    the body's wrists, elbows and shoulders / nose, eyes and ears (``net``: an ``OpenPoseNets`` holding
    those networks, or the body network alone)."""
    from ..models.openpose import OpenPoseNets

    nets = net if isinstance(net, OpenPoseNets) else OpenPoseNets(net)
    for wanted, part, name in ((hands, nets.hand, "hand"), (face, nets.face, "face")):
        if wanted and part is None:
            raise ValueError(f"OpenPose {name}s need the {name} network ({OPENPOSE_FILES['openpose_' + name]}.pth)")
    rgb = rgb_array(image)
    h, w = rgb.shape[:2]
    bgr = rgb[:, :, ::-1].copy()
    heat, paf = _network_maps(nets.body, bgr)
    peaks = _peaks(heat)
    candidate = np.array([p for part in peaks for p in part], dtype=np.float64).reshape(-1, 4)
    people = [[None if idx == -1 else (candidate[idx][0], candidate[idx][1]) for idx in row[:18].astype(int)]
              for row in _people(candidate, _connections(peaks, paf, h))]
    found_hands = tuple(_hands(nets.hand, person, bgr) for person in people) if hands else ()
    found_faces = tuple(_face(nets.face, person, bgr) for person in people) if face else ()
    return Pose(w, h, tuple(tuple(None if p is None else (p[0] / float(w), p[1] / float(h)) for p in person)
                            for person in people), found_hands, found_faces)


def openpose(net: nn.Module, image: ImageLike, hands: bool = False, face: bool = False,
             body: bool = True) -> np.ndarray:
    """The ``openpose`` control image (``openpose_hand``, ``_face``, ``_faceonly``, ``_full`` with the
    flags): the detected poses drawn on black at the image's size."""
    return render_pose(detect_poses(net, image, hands, face), body=body)


# -- OpenPose hands and face ---------------------------------------------------------------------------

_HAND_SCALES, _HAND_GRID, _HAND_THRESHOLD, _FACE_SIZE, _FACE_THRESHOLD = (0.5, 1.0, 1.5, 2.0), 128, 0.05, 384, 0.05


def _normalised(peaks: np.ndarray, x0: int, y0: int, w: int, h: int) -> tuple:
    """Crop pixel peaks → image fractions in float32 (as controlnet_aux keeps them; None: not found)."""
    peaks = peaks.astype(np.float32)
    xs = np.where(peaks[:, 0] < 1e-6, -1, peaks[:, 0] + x0) / float(w)
    ys = np.where(peaks[:, 1] < 1e-6, -1, peaks[:, 1] + y0) / float(h)
    return tuple(None if x < 0 or y < 0 else (x, y) for x, y in zip(xs, ys))


def _hand_boxes(person: list, w: int, h: int) -> list[tuple[int, int, int, bool]]:
    """OpenPose's hand boxes (x, y, side, is left): centred a third of the forearm past the wrist, 1.5×
    the longer of the forearm and 0.9× the upper arm wide, clipped to the image, at least 20 px."""
    boxes = []
    for shoulder, elbow, wrist, left in ((5, 6, 7, True), (2, 3, 4, False)):
        if person[shoulder] is None or person[elbow] is None or person[wrist] is None:
            continue
        (x1, y1), (x2, y2), (x3, y3) = person[shoulder], person[elbow], person[wrist]
        x, y = x3 + 0.33 * (x3 - x2), y3 + 0.33 * (y3 - y2)
        side = 1.5 * max(math.sqrt((x3 - x2) ** 2 + (y3 - y2) ** 2), 0.9 * math.sqrt((x2 - x1) ** 2 + (y2 - y1) ** 2))
        x, y = max(x - side / 2, 0), max(y - side / 2, 0)
        side = min(w - x if x + side > w else side, h - y if y + side > h else side)
        if side >= 20:
            boxes.append((int(x), int(y), int(side), left))
    return boxes


def _hands(net: nn.Module, person: list, bgr: np.ndarray) -> tuple:
    """(left, right) hand keypoints of one person (None where its box is not found)."""
    h, w = bgr.shape[:2]
    found = [None, None]
    for x, y, side, left in _hand_boxes(person, w, h):
        found[0 if left else 1] = _normalised(_hand_peaks(net, bgr[y:y + side, x:x + side]), x, y, w, h)
    return tuple(found)


def _hand_peaks(net: nn.Module, crop: np.ndarray) -> np.ndarray:
    """21 (x, y) crop pixels: the heat maps of four scales (368 px × 0.5…2) averaged on a 128² grid; per
    joint, the strongest 8-connected blob above 0.05 after a σ = 3 Gaussian, and its peak (0, 0: none)."""
    import cv2
    from scipy.ndimage import gaussian_filter, label

    hr, wr = crop.shape[:2]
    blurred = cv2.GaussianBlur(crop, (0, 0), 0.8)
    avg = np.zeros((_HAND_GRID, _HAND_GRID, 22))
    for scale in _HAND_SCALES:
        side = scale * _BOX
        small = _smart_resize(blurred, side, side)
        sh, sw = small.shape[:2]
        ph, pw = (-sh) % _STRIDE, (-sw) % _STRIDE
        padded = np.pad(small, ((0, ph), (0, pw), (0, 0)), constant_values=_PAD_VALUE)
        x = np.ascontiguousarray(np.transpose(np.float32(padded[:, :, :, None]), (3, 2, 0, 1)) / 256 - 0.5)
        with torch.no_grad():
            out = net(torch.from_numpy(x).float().to(_device(net))).cpu().numpy()
        m = np.transpose(np.squeeze(out), (1, 2, 0))
        m = _smart_resize(m, m.shape[0] * _STRIDE, m.shape[1] * _STRIDE)
        m = m[:padded.shape[0] - ph, :padded.shape[1] - pw, :]
        avg += _smart_resize(m, _HAND_GRID, _HAND_GRID) / len(_HAND_SCALES)
    peaks = []
    for part in range(21):
        raw = avg[:, :, part]
        blobs, n = label(gaussian_filter(raw, sigma=3) > _HAND_THRESHOLD, structure=np.ones((3, 3)))
        if n == 0:
            peaks.append([0, 0])
            continue
        best = int(np.argmax([raw[blobs == i].sum() for i in range(1, n + 1)])) + 1
        kept = np.where(blobs == best, raw, 0.0)
        y, x = np.unravel_index(int(np.argmax(kept)), kept.shape)
        peaks.append([int(float(x) * float(wr) / float(_HAND_GRID)), int(float(y) * float(hr) / float(_HAND_GRID))])
    return np.array(peaks)


def _face_box(person: list, w: int, h: int) -> tuple[int, int, int] | None:
    """The face box (x, y, side) around the nose: 3× its farthest eye, 1.5× its farthest ear (Chebyshev
    distances) each way, clipped, at least 20 px; None without the nose or any eye or ear."""
    nose = person[0]
    if nose is None or all(person[k] is None for k in (14, 15, 16, 17)):
        return None
    half = 0.0
    for k, factor in ((14, 3.0), (15, 3.0), (16, 1.5), (17, 1.5)):
        if person[k] is not None:
            half = max(half, factor * max(abs(nose[0] - person[k][0]), abs(nose[1] - person[k][1])))
    x, y = max(nose[0] - half, 0), max(nose[1] - half, 0)
    side = min(w - x if x + half > w else half * 2, h - y if y + half > h else half * 2)
    return (int(x), int(y), int(side)) if side >= 20 else None


def _face(net: nn.Module, person: list, bgr: np.ndarray) -> tuple | None:
    """One person's face landmarks: the crop at 384², the last stage's maps grown (bilinear, corners
    aligned) to the crop, and per map its strongest point above 0.05 (maps with none are skipped)."""
    import torch.nn.functional as F

    h, w = bgr.shape[:2]
    box = _face_box(person, w, h)
    if box is None:
        return None
    x0, y0, side = box
    crop = bgr[y0:y0 + side, x0:x0 + side]
    x = torch.from_numpy(_smart_resize(crop, _FACE_SIZE, _FACE_SIZE)).permute(2, 0, 1) / 256.0 - 0.5
    with torch.no_grad():
        maps = F.interpolate(net(x[None].to(_device(net))), crop.shape[:2], mode="bilinear",
                             align_corners=True).cpu().numpy()[0]
    peaks = []
    for m in maps:
        ys, xs = np.nonzero(m > _FACE_THRESHOLD)
        if len(ys):
            i = int(np.argmax(m[ys, xs]))
            peaks.append([xs[i], ys[i]])
    return _normalised(np.array(peaks), x0, y0, w, h) if peaks else None


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
        x = (torch.from_numpy(rgb.copy()).float().to(_device(net)) / 255.0).permute(2, 0, 1)[None]
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
        t = (torch.from_numpy(x.copy()).float().to(_device(net)) / 127.5 - 1.0).permute(2, 0, 1)[None]
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
    "openpose_hand": ("openpose+hand", lambda nets, image: openpose(nets, image, hands=True)),
    "openpose_face": ("openpose+face", lambda nets, image: openpose(nets, image, face=True)),
    "openpose_faceonly": ("openpose+face", lambda nets, image: openpose(nets, image, face=True, body=False)),
    "openpose_full": ("openpose+hand+face", lambda nets, image: openpose(nets, image, hands=True, face=True)),
    "softedge_hed": ("hed", hed_edges),
    "softedge_hedsafe": ("hed", lambda net, image: hed_edges(net, image, safe=True)),
    "scribble_hed": ("hed", hed_scribble),
    "lineart_realistic": ("lineart", lineart),
    "lineart_coarse": ("lineart", lineart),
    "depth_midas": ("midas", midas_depth),
}
