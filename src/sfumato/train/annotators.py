"""``sfumato train annotator``: the ControlNet annotators' published architectures (HED soft edges, line
art, MiDaS DPT-Hybrid) learn the shapes world, to show the annotator preprocessors on the bundled
model's images (random weights draw noise, and the published files cannot be fetched here). Not
shipped: users bring the published files, which load through the same code.

A scene's truth comes from its objects' own masks: the visible label map (later objects in front),
its edges (pixels whose 4-neighbour has another label: two pixels wide across a boundary), and a
depth (near = 1: the front object 1.0, the one behind it 0.7, the background a floor from 0.1 at the
top to 0.4 at the bottom). Training images are renders, blurred a little (σ ≤ 1 px) like the VAE's
decodes. The losses: HED, each of its five side outputs and their mean against the edges (BCE,
edges weighted 4×); line art, its dark-lines-on-white output against the inverted edges (BCE, the
same weighting); MiDaS, its relative inverse depth against 10 × the depth (L1).

``evaluate_annotators`` runs each preprocessor exactly as a request would (``pipeline.annotate``) on
``n`` unseen scenes (drawn from another seed): edge F1 (edges: the map above 127) with a 1-pixel tolerance and
exact for HED and line art, the Pearson correlation of the depth map with the truth for MiDaS.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from torch import Tensor

from ..checkpoint.io import save_file
from .loop import Batch, LoopConfig, Task, mix, train
from .sam import object_mask
from .shapes import Scene, render, sample_scene

# kind → the published file name the preprocessors look for (models-dir/annotators/<stem>.*)
FILES = {"hed": "ControlNetHED", "lineart": "sk_model", "midas": "dpt_hybrid-midas-501f0c75"}
EDGE_WEIGHT = 4.0


@dataclass(frozen=True)
class AnnotatorRecipe:
    kind: str = "hed"
    seed: int = 0
    loop: LoopConfig | None = None
    dataset_size: int = 50_000

    def loop_config(self) -> LoopConfig:
        if self.loop is not None:
            return self.loop
        if self.kind == "midas":   # 122 M parameters: a smaller rate, fewer steps
            return LoopConfig(steps=500, batch_size=8, lr=1e-4, warmup=50, decay_start=250, checkpoint_every=250)
        return LoopConfig(steps=800, batch_size=8, lr=5e-4, warmup=50, decay_start=400, checkpoint_every=400)


def truth(scene: Scene, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(edges bool [size, size], depth float32 [size, size] in [0, 1], near = 1)."""
    labels = np.zeros((size, size), dtype=np.int32)
    for k in range(len(scene.objects)):
        labels[object_mask(scene, k, size)] = k + 1
    edges = np.zeros((size, size), dtype=bool)
    edges[1:] |= labels[1:] != labels[:-1]
    edges[:-1] |= labels[1:] != labels[:-1]
    edges[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edges[:, :-1] |= labels[:, 1:] != labels[:, :-1]
    n = len(scene.objects)
    depth = np.repeat(np.linspace(0.1, 0.4, size, dtype=np.float32)[:, None], size, axis=1)
    for k in range(n):
        depth[labels == k + 1] = 1.0 - 0.3 * (n - 1 - k)
    return edges, depth


def sample(rng: np.random.Generator, size: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image uint8 [size, size, 3], edges, depth) of a random scene."""
    scene = sample_scene(rng, p_two=0.5, allow_held_out=True)
    image = Image.fromarray(render(scene, size, rng))
    image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.0, 1.0))))
    edges, depth = truth(scene, size)
    return np.asarray(image), edges, depth


def build(kind: str) -> torch.nn.Module:
    if kind == "hed":
        from ..models.hed import HEDNet
        return HEDNet()
    if kind == "lineart":
        from ..models.lineart import LineartNet
        return LineartNet(3)
    if kind == "midas":
        from ..models.midas import HYBRID, MidasDPT
        return MidasDPT(HYBRID)
    raise ValueError(f"kind must be one of {', '.join(FILES)}, got {kind!r}")


def network_input(kind: str, images: np.ndarray) -> Tensor:
    """uint8 [B, H, W, 3] → the input the preprocessor gives the network (pipeline.annotate)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    return {"hed": x, "lineart": x / 255.0, "midas": x / 127.5 - 1.0}[kind]


class AnnotatorTask(Task):
    def __init__(self, recipe: AnnotatorRecipe):
        super().__init__()
        self.net = build(recipe.kind)
        if recipe.kind == "hed":   # the published file's ImageNet-ish mean, so inputs are centred as there
            with torch.no_grad():
                self.net.norm.copy_(torch.tensor([104.0, 117.0, 123.0]).view(1, 3, 1, 1))
        self.recipe, self.dataset_size = recipe, recipe.dataset_size

    def forward(self, batch: Batch) -> Tensor:
        samples = [sample(np.random.default_rng([self.recipe.seed, 41, i])) for i in batch.indices]
        x = network_input(self.recipe.kind, np.stack([s[0] for s in samples]))
        edges = torch.from_numpy(np.stack([s[1] for s in samples])).float()[:, None]
        weight = 1.0 + (EDGE_WEIGHT - 1.0) * edges
        if self.recipe.kind == "hed":
            maps = [F.interpolate(m, edges.shape[-2:], mode="bilinear", align_corners=False) for m in self.net(x)]
            fused = torch.stack(maps).mean(0)
            return sum(F.binary_cross_entropy_with_logits(m, edges, weight=weight) for m in [*maps, fused]) / 6
        if self.recipe.kind == "lineart":
            out = self.net(x).clamp(1e-6, 1 - 1e-6)
            return F.binary_cross_entropy(out, 1.0 - edges, weight=weight)
        depth = torch.from_numpy(np.stack([s[2] for s in samples]))
        return F.l1_loss(self.net(x), 10.0 * depth)


def train_annotator(recipe: AnnotatorRecipe, out: str | Path) -> Path:
    out = Path(out)
    final = out / f"{FILES[recipe.kind]}.safetensors"
    if final.exists():
        print(f"{final} exists: kept (delete it to train again)")
    else:
        torch.manual_seed(mix(recipe.seed, 40))
        task, _ = train(AnnotatorTask(recipe), recipe.loop_config(), out / recipe.kind, recipe.kind)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in task.net.state_dict().items()}, final)
    return final


def _edge_f1(pred: np.ndarray, edges: np.ndarray, tolerance: int = 1) -> float:
    from scipy.ndimage import binary_dilation

    grow = (lambda m: binary_dilation(m, iterations=tolerance)) if tolerance else (lambda m: m)
    near_truth, near_pred = grow(edges), grow(pred)
    precision = (pred & near_truth).sum() / max(pred.sum(), 1)
    recall = (edges & near_pred).sum() / max(edges.sum(), 1)
    return float(2 * precision * recall / max(precision + recall, 1e-9))


@torch.no_grad()
def evaluate_annotators(files: dict[str, str | Path], n: int = 100, seed: int = 1) -> dict:
    """Per given kind, its score on ``n`` unseen scenes through the preprocessor a request runs."""
    from ..checkpoint.annotators import load_annotator
    from ..pipeline.annotate import hed_edges, lineart, midas_depth

    nets = {kind: load_annotator(path, kind) for kind, path in files.items()}
    scores: dict[str, list[float]] = {kind: [] for kind in nets}
    exact: dict[str, list[float]] = {kind: [] for kind in nets}
    for k in range(n):
        rng = np.random.default_rng([seed, 42, k])
        scene = sample_scene(rng, p_two=0.5, allow_held_out=True)
        image = render(scene, 64, rng)
        edges, depth = truth(scene)
        for kind, net in nets.items():
            if kind == "midas":
                got = midas_depth(net, image)[..., 0].astype(np.float64)
                scores[kind].append(float(np.corrcoef(got.ravel(), depth.ravel())[0, 1]))
            else:
                got = (hed_edges(net, image) if kind == "hed" else lineart(net, image))[..., 0]
                scores[kind].append(_edge_f1(got > 127, edges))
                exact[kind].append(_edge_f1(got > 127, edges, tolerance=0))
    metric = {"hed": "edge_f1", "lineart": "edge_f1", "midas": "depth_correlation"}
    out = {kind: {"n": n, metric[kind]: float(np.mean(v))} for kind, v in scores.items()}
    for kind in ("hed", "lineart"):
        if kind in out:
            out[kind]["edge_f1_exact"] = float(np.mean(exact[kind]))
    return out


def demo_sheet(files: dict[str, str | Path], out: str | Path, seed: int = 3) -> None:
    """The annotators on the bundled model's images, a row per scene: the image, then each given
    preprocessor's control image (softedge_hed, lineart_realistic, depth_midas) at the image's size,
    as a generation runs them."""
    from ..api import load
    from ..checkpoint.annotators import load_annotator
    from ..pipeline.annotate import hed_edges, lineart, midas_depth
    from .sam import DEMO, write_sheet

    pipe = load(None, dtype="fp32", device="cpu")
    nets = {kind: load_annotator(path, kind) for kind, path in files.items()}
    columns = []
    if "hed" in nets:   # (not scribble_hed: its non-maximum suppression keeps no line of a 64 px image)
        columns.append(lambda im: hed_edges(nets["hed"], im))
    if "lineart" in nets:
        columns.append(lambda im: lineart(nets["lineart"], im))
    if "midas" in nets:
        columns.append(lambda im: midas_depth(nets["midas"], im))
    rows = []
    for k, (prompt, _) in enumerate(DEMO):
        image = pipe.txt2img(prompt, seed=seed + k, watermark=False).images[0]
        rows.append([image] + [Image.fromarray(fn(image)) for fn in columns])
    write_sheet(rows, out)
