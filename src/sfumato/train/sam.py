"""``sfumato train sam``: a small Segment Anything (the same architecture at 64 px) learns the shapes
world's objects, to show the SAM tools on the bundled model's images (random SAM weights segment
nothing). Not shipped: the published SAM files are what users bring.

Each sample is a scene and one of its objects; the object's true mask is its own rendering alone.
The prompt is a positive point inside the object (sometimes with a negative point on the background,
sometimes a box around it instead). As in SAM's training, the loss is the best of the three multimask
outputs' focal-free BCE + dice, plus the single-mask output's, plus the IoU head's squared error
against the masks' actual IoUs. ``evaluate_sam`` scores the best-scoring mask of one centre point on
``n`` held-out scenes (another seed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ..checkpoint.io import save_file
from ..models.sam import PIXEL_MEAN, PIXEL_STD, SAM, SAMConfig
from .loop import Batch, LoopConfig, Task, mix, train
from .shapes import Obj, Scene, render, sample_scene

SHAPES_SAM = SAMConfig(width=64, depth=4, heads=4, global_blocks=(1, 3), image_size=64, patch_size=4, window=8,
                       prompt_dim=32, mask_in_chans=8, decoder_heads=8, decoder_mlp=128, iou_hidden=32)


@dataclass(frozen=True)
class SamRecipe:
    seed: int = 0
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(steps=1500, batch_size=32, lr=1e-3, warmup=100,
                                                                decay_start=750, checkpoint_every=250))
    dataset_size: int = 50_000


def object_mask(scene: Scene, k: int, size: int = 64) -> np.ndarray:
    """Object k's own pixels: the object drawn white alone on black, thresholded at half."""
    o = scene.objects[k]
    alone = Scene((Obj(o.shape, "white", o.cx, o.cy, o.size),), "black")
    return render(alone, size)[..., 0] > 127


def sam_input(images: np.ndarray) -> Tensor:
    """uint8 [B, H, W, 3] 64 px scenes → normalised input (the Segmenter's, without resize or padding)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    return (x - torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1)) / torch.tensor(PIXEL_STD).view(1, 3, 1, 1)


def sample(rng: np.random.Generator):
    """(image uint8 [64, 64, 3], mask bool [64, 64], points [(x, y, label)], box or None)."""
    scene = sample_scene(rng, p_two=0.5, allow_held_out=True)
    image = render(scene, 64, rng)
    k = int(rng.integers(len(scene.objects)))
    mask = object_mask(scene, k)
    ys, xs = np.nonzero(mask)
    j = int(rng.integers(len(xs)))
    points, box = [(float(xs[j]), float(ys[j]), 1)], None
    r = rng.random()
    if r < 0.3:
        by, bx = np.nonzero(~mask)
        i = int(rng.integers(len(bx)))
        points.append((float(bx[i]), float(by[i]), 0))
    elif r < 0.5:
        jitter = rng.uniform(-2, 2, 4)
        box = (max(0.0, xs.min() + jitter[0]), max(0.0, ys.min() + jitter[1]),
               min(64.0, xs.max() + 1 + jitter[2]), min(64.0, ys.max() + 1 + jitter[3]))
        points = [] if rng.random() < 0.5 else points
    return image, mask, points, box


class SamTask(Task):
    def __init__(self, recipe: SamRecipe):
        super().__init__()
        self.sam = SAM(SHAPES_SAM)
        self.recipe, self.dataset_size = recipe, recipe.dataset_size

    def forward(self, batch: Batch) -> Tensor:
        losses = []
        samples = [sample(np.random.default_rng([self.recipe.seed, 31, i])) for i in batch.indices]
        embeddings = self.sam.image_encoder(sam_input(np.stack([s[0] for s in samples])))
        for (image, mask, points, box), emb in zip(samples, embeddings):
            pts = None
            if points:
                pts = (torch.tensor([[p[:2] for p in points]], dtype=torch.float32),
                       torch.tensor([[p[2] for p in points]], dtype=torch.float32))
            boxes = torch.tensor([box], dtype=torch.float32) if box is not None else None
            sparse, dense = self.sam.prompt_encoder(pts, boxes, None)
            logits, iou = self.sam.mask_decoder(emb[None], self.sam.prompt_encoder.dense_pe(), sparse, dense)
            target = torch.from_numpy(mask).float()[None].expand(logits.shape[1], -1, -1)
            bce = F.binary_cross_entropy_with_logits(logits[0], target, reduction="none").mean((1, 2))
            p = logits[0].sigmoid()
            dice = 1 - (2 * (p * target).sum((1, 2)) + 1) / (p.sum((1, 2)) + target.sum((1, 2)) + 1)
            per_mask = bce + dice
            with torch.no_grad():
                hard = logits[0] > 0
                inter = (hard & (target > 0.5)).sum((1, 2)).float()
                union = (hard | (target > 0.5)).sum((1, 2)).float().clamp(min=1)
                actual = inter / union
            losses.append(per_mask[1:].min() + per_mask[0] + F.mse_loss(iou[0], actual))
        return torch.stack(losses).mean()


def train_sam(recipe: SamRecipe, out: str | Path) -> Path:
    out = Path(out)
    final = out / "sam_shapes.safetensors"
    if not final.exists():
        torch.manual_seed(mix(recipe.seed, 30))
        task, _ = train(SamTask(recipe), recipe.loop, out / "sam", "sam")
        save_file({k: v.contiguous() for k, v in task.sam.state_dict().items()}, final)
    return final


@torch.no_grad()
def evaluate_sam(path: str | Path, n: int = 100, seed: int = 1) -> dict:
    """Mean IoU (and the fraction ≥ 0.9) of the best-scoring mask for one point at each held-out scene's
    first object's centre."""
    from ..checkpoint.sam import load_sam
    from ..pipeline.segment import Segmenter

    seg = Segmenter(load_sam(path))
    ious = []
    for k in range(n):
        rng = np.random.default_rng([seed, 32, k])
        scene = sample_scene(rng, p_two=0.5, allow_held_out=True)
        seg.set_image(Image.fromarray(render(scene, 64, rng)))
        o = scene.objects[0]
        cy = o.cy * 64 + (o.size * 64 / 6 if o.shape == "triangle" else 0)   # a triangle's mass sits low
        mask = seg.predict([(o.cx * 64, cy, 1)]).best
        truth = object_mask(scene, 0)
        ious.append((mask & truth).sum() / max((mask | truth).sum(), 1))
    ious = np.array(ious)
    return {"n": n, "mean_iou": float(ious.mean()), "iou_at_least_0.9": float((ious >= 0.9).mean())}


DEMO = (  # (prompt, replacement prompt for the first object)
    ("a red circle to the left of a blue square on a yellow background",
     "a green triangle to the left of a blue square on a yellow background"),
    ("a white triangle on a purple background", "a orange circle on a purple background"),
    ("a black square to the left of a orange circle on a white background",
     "a red triangle to the left of a orange circle on a white background"),
    ("a yellow circle on a green background", "a blue square on a green background"),
)


def demo_sheet(sam_path: str | Path, out: str | Path, seed: int = 3) -> None:
    """Inpaint Anything and the detail pass on the bundled model, a row per scene: its image, the
    clicked object's mask (SAM, a point at the object's detected centre), the object replaced by
    inpainting with another prompt, removed (masked content "fill", the background's colour as the
    prompt), and a detail pass on the object's box refined by SAM (the replacement object alone as its
    prompt, strength 0.75: the region is cropped with 16 px of context and redrawn at 64 px)."""
    from ..api import load
    from ..checkpoint.sam import load_sam
    from ..pipeline.masks import dilate
    from ..pipeline.params import DetailSpec
    from ..pipeline.segment import Segmenter
    from ..server.segment import views
    from .judge import detect

    pipe = load(None, dtype="fp32", device="cpu")
    seg = Segmenter(load_sam(sam_path))
    rows = []
    for k, (prompt, replacement) in enumerate(DEMO):
        image = pipe.txt2img(prompt, seed=seed + k, watermark=False).images[0]
        first = detect(np.asarray(image)).objects[0]
        seg.set_image(image)
        mask = dilate(seg.predict([(first.cx * 64, first.cy * 64, 1)]).best, 3)
        blended = views(image, mask)[0]
        m = Image.fromarray((mask * 255).astype(np.uint8))
        replaced = pipe.inpaint(replacement, image, m, strength=1.0, mask_blur=0, masked_content="latent noise",
                                seed=seed + k, watermark=False).images[0]
        background = prompt.rsplit(" on ", 1)[1]          # "a yellow background"
        removed = pipe.inpaint(background, image, m, strength=0.9, mask_blur=2, masked_content="fill",
                               seed=seed + k, watermark=False).images[0]
        ys, xs = np.nonzero(mask)
        box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
        alone = f"{replacement.split(' to the left of ')[0].split(' on ')[0]} on {background}"   # the region's own
        detailed = pipe.txt2img(prompt, seed=seed + k, watermark=False, detail=[DetailSpec(   # caption
            "box", boxes=[box], sam=sam_path, prompt=alone, strength=0.75, padding=16)]).images[0]
        rows.append((image, blended, replaced, removed, detailed))
    write_sheet(rows, out)


def write_sheet(rows, out: str | Path, cell: int = 64, gap: int = 8) -> None:
    """Rows of 64 px images on white, 8 px apart, doubled (nearest), written atomically as a PNG."""
    cols = len(rows[0])
    sheet = Image.new("RGB", (cols * cell + (cols - 1) * gap, len(rows) * cell + (len(rows) - 1) * gap),
                      (255, 255, 255))
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            sheet.paste(im.convert("RGB"), (c * (cell + gap), r * (cell + gap)))
    sheet = sheet.resize((sheet.width * 2, sheet.height * 2), Image.NEAREST)
    out = Path(out)
    tmp = out.with_suffix(".tmp.png")
    sheet.save(tmp)
    tmp.replace(out)
