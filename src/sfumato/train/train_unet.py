"""Stage 3: the UNet — ε-prediction (``Denoiser.loss``) on SD's scaled-linear DDPM schedule, in the latent space of the
trained VAE (scaled by its measured factor), cross-attending to the frozen text encoder's last
hidden state after the final LayerNorm (SD 1.x conditioning, through the inference ``Conditioner``
so training and sampling see the same context). 10% of captions are dropped to "" for CFG.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..checkpoint.specs import ModelSpec
from ..diffusion.denoiser import Denoiser
from ..diffusion.schedule import DiscreteSchedule, scaled_linear_alphas_cumprod
from ..models.unet import UNetModel
from ..text.conditioner import Conditioner
from .loop import Batch, Task


class UNetTask(Task):
    """``moments``: [N, 2·z, h, w] posterior means and stds of the training images (from the frozen
    VAE); ``captions``: their captions. The text encoder is frozen and kept out of the state dict."""

    def __init__(self, spec: ModelSpec, text_encoder: nn.Module, moments: Tensor, captions: list[str],
                 scale_factor: float, caption_dropout: float = 0.1):
        super().__init__()
        self.unet = UNetModel(spec.unet)
        self.frozen = {"conditioner": Conditioner(spec, [text_encoder.eval().requires_grad_(False)])}
        self.moments, self.captions = moments, captions
        self.dataset_size = len(captions)
        self.scale_factor = scale_factor
        self.caption_dropout = caption_dropout
        self.register_buffer("alphas_cumprod", scaled_linear_alphas_cumprod(), persistent=False)
        self._context: dict[str, Tensor] = {}

    def context(self, texts: list[str]) -> Tensor:
        """The conditioning of each caption, cached (the encoder is frozen)."""
        missing = sorted({t for t in texts if t not in self._context})
        if missing:
            ctx = self.frozen["conditioner"](missing).context
            self._context.update(zip(missing, ctx))
        return torch.stack([self._context[t] for t in texts])

    def forward(self, batch: Batch) -> Tensor:
        z0, noise, t, texts = [], [], [], []
        for i, idx in enumerate(batch.indices):
            g = batch.generator(i)
            mean, std = self.moments[idx].chunk(2, dim=0)
            z0.append((mean + std * torch.randn(mean.shape, generator=g)) * self.scale_factor)
            noise.append(torch.randn(mean.shape, generator=g))
            t.append(int(torch.randint(0, len(self.alphas_cumprod), (1,), generator=g)))
            drop = float(torch.rand((), generator=g)) < self.caption_dropout
            texts.append("" if drop else self.captions[idx])
        z0, noise, t = torch.stack(z0), torch.stack(noise), torch.tensor(t)
        schedule = DiscreteSchedule(self.alphas_cumprod)
        denoiser = Denoiser(lambda x, ts, context: self.unet(x, ts, context), schedule, "eps")
        return denoiser.loss(z0, noise, schedule.sigmas[t], self.context(texts)).mean()
