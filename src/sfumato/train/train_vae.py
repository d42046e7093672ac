"""Stage 1: the KL autoencoder — L1 + L2 reconstruction, an edge (image-gradient) L1 term and a
small KL pull towards N(0, 1). No perceptual or adversarial loss: flat-coloured shapes do not need one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.vae import AutoencoderKL, VAEConfig
from .loop import Batch, Task


class VAETask(Task):
    def __init__(self, cfg: VAEConfig, dataset, kl_weight: float = 1e-4, edge_weight: float = 0.5):
        super().__init__()
        self.vae = AutoencoderKL(cfg)
        self.data = dataset
        self.dataset_size = len(dataset)
        self.kl_weight, self.edge_weight = kl_weight, edge_weight

    def forward(self, batch: Batch) -> Tensor:
        x = torch.stack([self.data[i][0] for i in batch.indices])
        posterior = self.vae.encode(x)
        noise = torch.cat([torch.randn(posterior.mean.shape[1:], generator=batch.generator(i))[None]
                           for i in range(len(batch.indices))])
        y = self.vae.decode(posterior.mean + posterior.std * noise)
        rec = (y - x).abs().mean() + (y - x).pow(2).mean()
        kl = 0.5 * (posterior.mean.pow(2) + posterior.logvar.exp() - 1 - posterior.logvar).mean()
        return rec + self.edge_weight * edge_loss(y, x) + self.kl_weight * kl


def edge_loss(y: Tensor, x: Tensor) -> Tensor:
    """L1 between horizontal and vertical finite differences: keeps shape outlines sharp."""
    dx = F.l1_loss(y[..., :, 1:] - y[..., :, :-1], x[..., :, 1:] - x[..., :, :-1])
    dy = F.l1_loss(y[..., 1:, :] - y[..., :-1, :], x[..., 1:, :] - x[..., :-1, :])
    return dx + dy


@torch.no_grad()
def encode_moments(vae: AutoencoderKL, dataset, batch_size: int = 64) -> tuple[Tensor, list[str]]:
    """The posterior (mean, std) of every dataset image, stacked as [N, 2·z, h, w], and the captions."""
    moments, captions = [], []
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        posterior = vae.encode(torch.stack([image for image, _ in items]))
        moments.append(torch.cat([posterior.mean, posterior.std], dim=1))
        captions += [text for _, text in items]
    return torch.cat(moments), captions


def latent_scale(moments: Tensor, n: int = 4096, seed: int = 0) -> float:
    """1 / std of posterior samples over the first ``n`` images (LDM's scale-factor rule)."""
    mean, std = moments[:n].chunk(2, dim=1)
    g = torch.Generator().manual_seed(seed)
    z = mean + std * torch.randn(mean.shape, generator=g)
    return float(1.0 / z.flatten().std())
