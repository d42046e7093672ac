"""ControlNet glue: load a ControlNet file, weight-free preprocessors, and the controlled UNet.

``controlled_unet(unet, units)`` gives a function ``fn(x, t, context, y, fraction=…)`` that runs the
UNet with the residuals of every unit active at ``fraction`` (the caller's step fraction, 0 → 1)
summed into its skip connections and middle block — a wrapper, so samplers never learn about it.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ..checkpoint.convert_controlnet import (
    complete_config, controlnet_config_from_diffusers, diffusers_controlnet_to_ldm, diffusers_shape_config,
    is_diffusers_controlnet, original_state_dict, shape_config,
)
from ..checkpoint.diffusers import find_weights
from ..checkpoint.io import check_finite, load_file
from ..errors import CheckpointError
from ..models.controlnet import ControlNet, ControlNetConfig
from ..models.unet import UNetConfig, UNetModel
from ..errors import ParamError

log = logging.getLogger(__name__)

ImageLike = Image.Image | np.ndarray | Tensor


# -- loading ------------------------------------------------------------------------------------------


def _diffusers_config(path: Path) -> ControlNetConfig | None:
    """The config.json of a diffusers ControlNet folder, or next to a diffusers weights file."""
    cfg_path = path / "config.json" if path.is_dir() else path.with_name("config.json")
    if not cfg_path.is_file():
        return None
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {cfg_path}: {e}") from None
    if config.get("_class_name", "ControlNetModel") != "ControlNetModel":
        return None
    return controlnet_config_from_diffusers(config)


def read_controlnet(path: str | Path) -> tuple[dict[str, Tensor], ControlNetConfig | None]:
    """Original-layout keys of a ControlNet file or diffusers folder, and the diffusers config when one
    came with it (None: the configuration is to be read from shapes)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"ControlNet file not found: {path}")
    sd, _ = load_file(find_weights(path) if path.is_dir() else path)
    check_finite(sd, f"the weights of ControlNet {path.name}")
    if not is_diffusers_controlnet(sd):
        if path.is_dir():
            raise CheckpointError(f"{path}: the weights are not a diffusers ControlNetModel")
        return original_state_dict(sd), None
    cfg = _diffusers_config(path)
    return diffusers_controlnet_to_ldm(sd, cfg or diffusers_shape_config(sd)), cfg


def load_controlnet(
    path: str | Path, base: UNetConfig | None = None, *, dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> ControlNet:
    """A ready ControlNet from an original file (``control_model.`` keys or bare), a diffusers
    ControlNetModel file or folder. `base`, the UNet config of the model it will steer, supplies what
    shapes cannot tell (attention heads) and is checked against the ControlNet's encoder."""
    path = Path(path)
    sd, cfg = read_controlnet(path)
    if cfg is None or base is not None:
        cfg, family = complete_config(cfg or shape_config(sd), base)
        log.info("ControlNet %s: %s layout", path.name, family)
    with torch.device("meta"):
        model = ControlNet(cfg)
    sd = {k: v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device) for k, v in sd.items()}
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [k for k in expected if k in sd and sd[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        parts = [f"{name} {len(keys)} (e.g. {', '.join(keys[:3])})"
                 for name, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
        raise CheckpointError(f"{path.name}: ControlNet weights do not match the detected layout: {'; '.join(parts)}")
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval().requires_grad_(False)


# -- preprocessors: image in, uint8 (H, W, 3) control image out --------------------------------------------


def _array(image: Image.Image | np.ndarray) -> np.ndarray:
    """uint8 (H, W, C) with C = 1 or 3."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("L" if image.mode in ("L", "I", "I;16", "F") else "RGB"))
    a = np.asarray(image)
    if a.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {a.dtype}")
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise ValueError(f"image must be (H, W), (H, W, 3) or (H, W, 4), got {a.shape}")
    return a[:, :, :3]


def _gray(image: Image.Image | np.ndarray) -> np.ndarray:
    a = _array(image)
    return a[:, :, 0] if a.shape[2] == 1 else np.asarray(Image.fromarray(a).convert("L"))


def _rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, None], 3, axis=2)


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a uint8 (H, W, C) array, in integers: a kernel of ±3σ quantised to
    1/256 (rounding errors carried from the tails inwards, the centre tap taking the remainder so the
    taps sum to one), mirrored borders, one rounding at the end. Equals ``cv2.GaussianBlur(img, (0, 0), σ)``."""
    radius = int(round(sigma * 6 + 1)) // 2
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k /= k.sum()
    taps = np.zeros(2 * radius + 1, np.int64)
    carry = 0.0
    for i in range(radius):
        v = k[i] * 256 + carry
        taps[i] = taps[-1 - i] = round(v)
        carry = v - taps[i]
    taps[radius] = 256 - 2 * taps[:radius].sum()
    a = np.pad(image.astype(np.int64), ((radius, radius), (radius, radius), (0, 0)), mode="reflect")
    h, w = image.shape[:2]
    rows = sum(taps[i] * a[:, i:i + w] for i in range(len(taps)))
    both = sum(taps[i] * rows[i:i + h] for i in range(len(taps)))
    return ((both + (1 << 15)) >> 16).astype(np.uint8)


def _sobel(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """3×3 Sobel derivatives (x right, y down) of (H, W, C) values, replicated borders."""
    p = np.pad(a.astype(np.int32), ((1, 1), (1, 1), (0, 0)), mode="edge")
    dx = (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2])
    dy = (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:])
    return dx, dy


_TAN_22_5 = round(math.tan(math.radians(22.5)) * (1 << 15))  # tan(22.5°) in 1.15 fixed point


def _non_maximum(mag: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Where the gradient magnitude is a maximum across the edge, along the quantised gradient
    direction (horizontal, vertical or one of the diagonals); outside the image counts as 0."""
    m = np.pad(mag, 1)
    c = mag
    ax, ay = np.abs(dx).astype(np.int64), np.abs(dy).astype(np.int64) << 15
    tg22 = ax * _TAN_22_5
    horizontal = ay < tg22
    vertical = ~horizontal & (ay > tg22 + (ax << 16))
    opposite = (dx ^ dy) < 0  # gradient along the anti-diagonal (up-right / down-left)
    h, w = mag.shape
    at = lambda dy_, dx_: m[1 + dy_:1 + dy_ + h, 1 + dx_:1 + dx_ + w]  # noqa: E731
    keep_h = (c > at(0, -1)) & (c >= at(0, 1))
    keep_v = (c > at(-1, 0)) & (c >= at(1, 0))
    keep_d = np.where(opposite, (c > at(-1, 1)) & (c > at(1, -1)), (c > at(-1, -1)) & (c > at(1, 1)))
    return np.where(horizontal, keep_h, np.where(vertical, keep_v, keep_d))


def _hysteresis(strong: np.ndarray, weak: np.ndarray) -> np.ndarray:
    """Strong pixels and the weak ones 8-connected to them (breadth-first from the strong ones)."""
    h, w = strong.shape
    edge = np.pad(strong, 1).ravel()
    weak = np.pad(weak, 1).ravel()
    row = w + 2
    offsets = np.array([-row - 1, -row, -row + 1, -1, 1, row - 1, row, row + 1])
    frontier = np.flatnonzero(edge)
    while frontier.size:
        nb = (frontier[:, None] + offsets).ravel()
        nb = np.unique(nb[weak[nb] & ~edge[nb]])
        edge[nb] = True
        frontier = nb
    return edge.reshape(h + 2, w + 2)[1:-1, 1:-1]


def canny(image: Image.Image | np.ndarray, low: float = 100, high: float = 200, blur_sigma: float = 0.0) -> np.ndarray:
    """Canny edges (white on black): optional Gaussian blur, Sobel gradients with |gx|+|gy| magnitude
    (per pixel the colour channel with the strongest gradient), non-maximum suppression, and
    hysteresis between `low` and `high`. Without blur it follows OpenCV's ``cv2.Canny(img, low, high)``,
    the annotator the released Canny ControlNets were trained with."""
    if not 0 <= low <= high:
        raise ValueError(f"canny thresholds need 0 <= low <= high, got low={low}, high={high}")
    a = _array(image)
    if blur_sigma > 0:
        a = gaussian_blur(a, blur_sigma)
    dx, dy = _sobel(a)
    mag = np.abs(dx) + np.abs(dy)
    pick = np.argmax(mag, axis=2)[:, :, None]  # first channel on ties
    mag, dx, dy = (np.take_along_axis(v, pick, axis=2)[:, :, 0] for v in (mag, dx, dy))
    candidate = (mag > math.floor(low)) & _non_maximum(mag, dx, dy)
    strong = candidate & (mag > math.floor(high))
    return _rgb(_hysteresis(strong, candidate & ~strong).astype(np.uint8) * 255)


def threshold(image: Image.Image | np.ndarray, level: int = 127, invert: bool = False) -> np.ndarray:
    """White where the grey value is above `level` (below it when `invert`), black elsewhere."""
    g = _gray(image)
    mask = g <= level if invert else g > level
    return _rgb(mask.astype(np.uint8) * 255)


def scribble(image: Image.Image | np.ndarray, level: int = 127) -> np.ndarray:
    """A drawing of dark lines on a light background → the white-on-black lines scribble models expect."""
    return threshold(image, level, invert=True)


def depth_map(image: Image.Image | np.ndarray) -> np.ndarray:
    """Use an image as the depth map (near = bright): its grey values stretched to 0…255, three channels.
    A constant image carries no depth and gives black."""
    g = _gray(image).astype(np.float32)
    lo, hi = float(g.min()), float(g.max())
    if hi == lo:
        return _rgb(np.zeros(g.shape, np.uint8))
    return _rgb(np.rint((g - lo) * (255 / (hi - lo))).astype(np.uint8))


def as_rgb(image: Image.Image | np.ndarray) -> np.ndarray:
    """The image itself as a control image (for already-prepared edge, depth or pose maps)."""
    a = _array(image)
    return a if a.shape[2] == 3 else _rgb(a[:, :, 0])


PREPROCESSORS: dict[str, Callable[..., np.ndarray]] = {
    "none": as_rgb,
    "canny": canny,
    "threshold": threshold,
    "scribble": scribble,
    "depth": depth_map,
}


# -- control units and the controlled UNet ----------------------------------------------------------------


def hint_tensor(image: ImageLike) -> Tensor:
    """A control image as a float32 (N, C, H, W) tensor in [0, 1]: from PIL / uint8 (H, W[, C]) arrays,
    or a tensor already in that form ((C, H, W) is given a batch axis)."""
    if isinstance(image, Tensor):
        t = image.float()
        t = t[None] if t.ndim == 3 else t
        if t.ndim != 4:
            raise ParamError("image", f"a control image tensor must be (C, H, W) or (N, C, H, W), "
                                      f"got {tuple(image.shape)}")
        return t
    try:
        a = _array(image)
    except ValueError as e:
        raise ParamError("image", str(e)) from None
    return torch.tensor(a).permute(2, 0, 1)[None].float() / 255


@dataclass
class ControlUnit:
    """One ControlNet with its control image, strength and active span of the sampling run
    (``start`` ≤ step fraction ≤ ``end``, fractions of the run from 0 to 1)."""

    model: ControlNet
    image: ImageLike
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0
    mode: str = "balanced"   # "prompt": soft injection; "control": soft injection, no control on the uncond rows
    hint: Tensor = field(init=False, repr=False)  # the image as (N, C, H, W) in [0, 1]
    _sized: dict[tuple, Tensor] = field(default_factory=dict, init=False, repr=False)  # the last size asked for

    def __post_init__(self) -> None:
        if not math.isfinite(self.strength):
            raise ParamError("strength", f"must be a finite number, got {self.strength}")
        for name in ("start", "end"):
            if not 0 <= getattr(self, name) <= 1:
                raise ParamError(name, f"must be within [0, 1], got {getattr(self, name)}")
        if self.start > self.end:
            raise ParamError("start", f"must not exceed end ({self.start} > {self.end})")
        if self.mode not in ("balanced", "prompt", "control"):
            raise ParamError("mode", f"must be balanced, prompt or control, got {self.mode!r}")
        self.hint = hint_tensor(self.image)
        if self.hint.shape[1] == 1 and self.model.cfg.hint_channels == 3:  # a grey image
            self.hint = self.hint.expand(-1, 3, -1, -1)
        if self.hint.shape[1] != self.model.cfg.hint_channels:
            raise ParamError(
                "image", f"has {self.hint.shape[1]} channels, the ControlNet takes {self.model.cfg.hint_channels}"
            )

    def active(self, fraction: float) -> bool:
        return self.start <= fraction <= self.end

    def hint_for(self, x: Tensor) -> Tensor:
        """The control image at the size of latent `x` times the hint scale (resized when it differs:
        better preprocess at that size), batched like `x`, on its device; cached per size."""
        s = self.model.cfg.hint_scale
        size = (x.shape[-2] * s, x.shape[-1] * s)
        key = (size, x.shape[0], x.device)
        if key not in self._sized:
            h = self.hint
            if tuple(h.shape[-2:]) != size:
                h = F.interpolate(h, size=size, mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
            if h.shape[0] not in (1, x.shape[0]):
                raise ParamError("image", f"{h.shape[0]} control images for a batch of {x.shape[0]}")
            self._sized = {key: h.expand(x.shape[0], -1, -1, -1).to(x.device)}
        return self._sized[key]

    def residuals(self, x: Tensor, t: Tensor, context: Tensor, y: Tensor | None, uncond_rows: int = 0) -> list[Tensor]:
        """The residuals for rows ``x``; in the "prompt" and "control" modes (sd-webui-controlnet's soft
        injection) residual i of n is scaled 0.825^(n−1−i), and in "control" the first ``uncond_rows``
        rows (the unconditional ones) get none."""
        c_in = self.model.cfg.unet.in_channels
        res = self.model(x[:, :c_in], self.hint_for(x), t, context, y, strength=self.strength)
        if self.mode == "balanced":
            return res
        res = [r * 0.825 ** (len(res) - 1 - i) for i, r in enumerate(res)]
        if self.mode == "control" and uncond_rows:
            keep = torch.ones(x.shape[0], 1, 1, 1, dtype=res[0].dtype, device=res[0].device)
            keep[:uncond_rows] = 0
            res = [r * keep for r in res]
        return res


def controlled_unet(unet: UNetModel, units: Sequence[ControlUnit]) -> Callable[..., Tensor]:
    """`fn(x, t, context, y=None, *, fraction, uncond_rows=0)`: the UNet with the summed residuals of
    the units active at step fraction `fraction` (computed by the caller; the first `uncond_rows` rows
    are unconditional, for the "control" mode); the plain UNet when none is."""
    for unit in units:
        cn = unit.model.cfg.unet
        if (cn.model_channels, cn.channel_mult, cn.num_res_blocks) != (
            unet.cfg.model_channels, unet.cfg.channel_mult, unet.cfg.num_res_blocks
        ):
            raise ValueError("a ControlNet's encoder does not match the UNet (model_channels, channel_mult, "
                             "num_res_blocks): it was made for another model family")

    def fn(x: Tensor, t: Tensor, context: Tensor, y: Tensor | None = None, *, fraction: float,
           uncond_rows: int = 0) -> Tensor:
        control: list[Tensor] | None = None
        for unit in units:
            if unit.active(fraction):
                res = unit.residuals(x, t, context, y, uncond_rows)
                control = res if control is None else [a + b.to(a.dtype) for a, b in zip(control, res)]
        if control is None:
            return unet(x, t, context, y)
        return unet(x, t, context, y, control=control)

    return fn

