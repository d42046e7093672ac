"""8-bit inference for the UNet: int8 weights and dynamically quantized int8 activations.

``quantize_int8(unet)`` replaces the UNet's linear layers and convolutions (all but the first and the
last convolution, which see the latents themselves) by :class:`Int8Linear` / :class:`Int8Conv2d`:

- weights: symmetric int8 per output channel (scale = max |w| / 127), quantized once;
- activations: symmetric int8 per row — per token for a linear layer, per output pixel's input
  patch for a convolution — quantized at every call from that call's values (dynamic: no
  calibration data);
- the product: ``torch._int_mm`` (int8 × int8 → int32, VNNI / AMX where the CPU has them), then
  scaled back by the two scales in fp32, bias added in fp32.

A convolution is unfolded into patches (im2col) and run as one such product. The quality is
measured, not assumed: ``sfumato bench --only int8`` prints the UNet's relative error against fp32 on
SD 1.5-size random weights, and ``sfumato eval shapes --quant int8`` the bundled model's score.
LoRAs must be merged before quantizing (``load(loras=…, quant="int8")``): prompt tags that would patch
weights in place are refused by the pipeline.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import Conv2d, Linear, _conv_out_size

QMAX = 127.0
_MIN_ROWS_8 = 24   # torch._int_mm wants more than 16 rows, and sizes that are multiples of 8


def _quantize_weight(w: Tensor) -> tuple[Tensor, Tensor]:
    """[out, in] fp weight → int8 [in, out] (the product's right-hand side) and fp32 scales [out]."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / QMAX
    q = (w / scale[:, None]).round_().clamp_(-QMAX, QMAX).to(torch.int8)
    return q.t().contiguous(), scale


def _pad8(n: int) -> int:
    return (n + 7) // 8 * 8


def int8_matmul(x: Tensor, qweight: Tensor, wscale: Tensor) -> Tensor:
    """x [M, K] (float) times the int8 weight [K', N] (K' ≥ K, zero rows past K): x quantized per row
    to int8, the product in int32, scaled back → fp32 [M, N]."""
    x = x.float()
    m, k = x.shape
    scale = x.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / QMAX
    quantized = torch.div(x, scale).round_().clamp_(-QMAX, QMAX)
    rows = max(_pad8(m), _MIN_ROWS_8)
    if rows == m and k == qweight.shape[0]:
        q = quantized.to(torch.int8)
    else:   # padded with zeros to the sizes torch._int_mm takes
        q = torch.zeros(rows, qweight.shape[0], dtype=torch.int8, device=x.device)
        q[:m, :k] = quantized
    acc = torch._int_mm(q, qweight)[:m]
    return acc.float().mul_(scale).mul_(wscale)


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = _quantize_weight(linear.weight)
        self.register_buffer("qweight", _pad_rows(q), persistent=False)
        self.register_buffer("wscale", scale, persistent=False)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        y = int8_matmul(x.reshape(-1, self.in_features), self.qweight, self.wscale)
        if self.bias is not None:
            y += self.bias
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)


class Int8Conv2d(nn.Module):
    """A convolution as int8 products W[O, C·k²] · patches[C·k², pixels], one per image: the output comes
    out in NCHW order with no transposes; the activations are quantized per image (one scale for the
    image's input, so a batch's images stay independent of each other) before the patches are
    gathered, so the gather moves int8."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        if conv.groups != 1 or conv.dilation != (1, 1) or isinstance(conv.padding, str) or conv.padding_mode != "zeros":
            raise ValueError("Int8Conv2d: plain convolutions only (no groups, dilation or padding modes)")
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.out_channels = conv.out_channels
        q, scale = _quantize_weight(conv.weight.flatten(1))
        self.register_buffer("qweight_t", _pad_rows(q).t().contiguous(), persistent=False)   # [O, K']
        # [K', O] too for a 1×1 convolution, which also runs on tokens (``as_linear``)
        self.register_buffer("qweight", _pad_rows(q) if conv.kernel_size == (1, 1) else None, persistent=False)
        self.register_buffer("wscale", scale, persistent=False)
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().float(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        n, c = x.shape[:2]
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        oh, ow = _conv_out_size(x, self.kernel_size, self.stride, self.padding)
        xf = x.float()
        scale = xf.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12) / QMAX   # per image
        xq = torch.div(xf, scale).round_().to(torch.int8)
        if (kh, kw, sh, sw, ph, pw) == (1, 1, 1, 1, 0, 0):
            cols = xq.reshape(n, c, oh * ow)
        else:
            patches = F.pad(xq, (pw, pw, ph, ph)).unfold(2, kh, sh).unfold(3, kw, sw)   # [N, C, oh, ow, kh, kw]
            cols = patches.permute(0, 1, 4, 5, 2, 3).reshape(n, c * kh * kw, oh * ow)
        k, pixels = self.qweight_t.shape[1], oh * ow
        if cols.shape[1] != k or pixels % 8:   # sizes torch._int_mm takes: multiples of 8
            cols = F.pad(cols, (0, _pad8(pixels) - pixels, 0, k - cols.shape[1]))
        acc = torch.stack([torch._int_mm(self.qweight_t, cols[i]) for i in range(n)])[..., :pixels]
        y = acc.float().mul_(self.wscale[:, None]).mul_(scale.view(n, 1, 1))
        if self.bias is not None:
            y += self.bias[:, None]
        return y.view(n, self.out_channels, oh, ow).to(x.dtype)

    def as_linear(self, tokens: Tensor) -> Tensor:
        """A 1×1 convolution on tokens [..., C_in] (channels last), as ``layers.Conv2d.as_linear``."""
        if self.qweight is None:
            raise ValueError("as_linear: a 1×1 convolution only")
        y = int8_matmul(tokens.reshape(-1, tokens.shape[-1]), self.qweight, self.wscale)
        if self.bias is not None:
            y += self.bias
        return y.view(*tokens.shape[:-1], self.out_channels).to(tokens.dtype)


def _pad_rows(q: Tensor) -> Tensor:
    """The weight's K rows padded with zeros to a multiple of 8 (what torch._int_mm wants)."""
    k = q.shape[0]
    if k % 8 == 0:
        return q
    return torch.cat([q, q.new_zeros(_pad8(k) - k, q.shape[1])])


def quantize_int8(unet: nn.Module) -> int:
    """Replace ``unet``'s Linear and Conv2d layers by their int8 forms, in place, but for those that see
    the latents or the embeddings (``input_blocks.0.0``, ``out.2``, ``time_embed``, ``label_emb``: a
    fraction of a percent of the work); returns how many were replaced."""
    keep = ("input_blocks.0.0", "out.2", "time_embed.", "label_emb.")
    targets = [(name, m) for name, m in unet.named_modules()
               if isinstance(m, (Linear, Conv2d, nn.Linear, nn.Conv2d)) and not (name + ".").startswith(keep)]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = unet.get_submodule(parent_name) if parent_name else unet
        new = Int8Conv2d(module) if isinstance(module, nn.Conv2d) else Int8Linear(module)
        setattr(parent, child, new.to(module.weight.device))
    unet.quantized = "int8"
    return len(targets)
