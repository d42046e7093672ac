"""8-bit UNet (``models.quant``): each int8 layer equals the int8 arithmetic written out here in
float64 / int64 (weights per output channel, activations per row or per image, integer products,
scaled back); against fp32 the error is small and measured; a batch's images stay independent; the
pipeline takes ``quant="int8"`` from every front end that loads a model and refuses what cannot work
with it (prompt-tag LoRAs, weights left on disk)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sfumato
from sfumato.cli import main
from sfumato.errors import ParamError
from sfumato.models.layers import Conv2d, Linear
from sfumato.models.quant import Int8Conv2d, Int8Linear, quantize_int8
from sfumato.models.unet import UNetConfig, UNetModel


def _q(a: np.ndarray, axis) -> tuple[np.ndarray, np.ndarray]:
    scale = np.abs(a).max(axis=axis, keepdims=True) / 127
    return np.round(a / scale).astype(np.int64), scale


def test_int8_linear_is_the_int8_arithmetic():
    g = torch.Generator().manual_seed(0)
    lin = Linear(40, 24).requires_grad_(False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(24, 40, generator=g))
        lin.bias.copy_(torch.randn(24, generator=g))
    x = torch.randn(3, 5, 40, generator=g)
    w = lin.weight.double().numpy()
    qw, sw = _q(w, axis=1)                                    # per output channel
    xs = x.double().numpy().reshape(-1, 40)
    qx, sx = _q(xs, axis=1)                                   # per token
    want = (qx @ qw.T) * sx * sw.T + lin.bias.double().numpy()
    got = Int8Linear(lin)(x)
    assert got.shape == (3, 5, 24)
    np.testing.assert_allclose(got.reshape(-1, 24).numpy(), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    ref = lin(x)
    assert float((got - ref).norm() / ref.norm()) < 0.02        # against fp32


@pytest.mark.parametrize("kernel, stride, padding, size", [(3, 1, 1, 12), (3, 2, 1, 12), (1, 1, 0, 9), (3, 1, 1, 5)])
def test_int8_conv_is_the_int8_arithmetic(kernel, stride, padding, size):
    g = torch.Generator().manual_seed(1)
    conv = Conv2d(16, 24, kernel, stride=stride, padding=padding).requires_grad_(False)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
        conv.bias.copy_(torch.randn(24, generator=g))
    x = torch.randn(2, 16, size, size, generator=g)
    qw, sw = _q(conv.weight.double().numpy().reshape(24, -1), axis=1)
    want = []
    for image in x.double().numpy():                          # one activation scale per image
        qx, sx = _q(image, axis=None)
        int_conv = F.conv2d(torch.from_numpy(qx.astype(np.float64))[None],
                            torch.from_numpy(qw.reshape(conv.weight.shape).astype(np.float64)),
                            stride=stride, padding=padding)[0].numpy()   # exact: integers below 2^53
        want.append(int_conv * sx * sw.reshape(24, 1, 1) + conv.bias.double().numpy().reshape(24, 1, 1))
    got = Int8Conv2d(conv)(x)
    np.testing.assert_allclose(got.numpy(), np.stack(want), rtol=1e-5, atol=1e-5 * np.abs(want).max())
    ref = conv(x)
    assert float((got - ref).norm() / ref.norm()) < 0.03
    if kernel == 1:   # the 1×1 convolution on tokens (channels last) is the same layer
        tokens = x.permute(0, 2, 3, 1)
        per_token = Int8Conv2d(conv).as_linear(tokens)
        assert float((per_token.permute(0, 3, 1, 2) - ref).norm() / ref.norm()) < 0.03


def test_quantized_unet_error_and_batch_independence():
    cfg = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(1, 1), num_heads=2,
                     context_dim=32)
    torch.manual_seed(0)
    unet = UNetModel(cfg).eval().requires_grad_(False)
    x, ctx = torch.randn(2, 4, 16, 16), torch.randn(2, 7, 32)
    t = torch.tensor([300.0, 700.0])
    with torch.no_grad():
        ref = unet(x, t, ctx)
        replaced = quantize_int8(unet)
        out = unet(x, t, ctx)
        one = unet(x[1:], t[1:], ctx[1:])
    kinds = {type(m).__name__ for m in unet.modules()}
    assert replaced > 10 and "Int8Conv2d" in kinds and "Int8Linear" in kinds
    assert isinstance(unet.input_blocks[0][0], Conv2d) and isinstance(unet.out[2], Conv2d)   # latents in and out
    err = float((out - ref).norm() / ref.norm())
    print(f"tiny UNet int8 vs fp32: relative error {err:.4f}")
    assert 0 < err < 0.05
    torch.testing.assert_close(out[1:], one, rtol=0, atol=0)   # per-row / per-image scales: batch-independent


def test_the_bundled_model_in_int8(tmp_path, capsys):
    plain = sfumato.load(dtype="fp32")
    q = sfumato.load(dtype="fp32", quant="int8")
    a = plain.txt2img("a red circle on a blue background", seed=3, steps=12, watermark=False).images[0]
    b = q.txt2img("a red circle on a blue background", seed=3, steps=12, watermark=False).images[0]
    diff = np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int))
    print(f"bundled model, int8 vs fp32: mean |Δ| {diff.mean():.2f} levels")
    assert 0 < diff.mean() < 4
    with pytest.raises(ParamError) as e:
        q.txt2img("a red circle <lora:any:1>", steps=1)
    assert e.value.field == "prompt" and "--lora" in e.value.message
    with pytest.raises(ParamError) as e:
        sfumato.load(quant="int8", by_stage=True)
    assert e.value.field == "quant"
    with pytest.raises(ParamError) as e:
        sfumato.load(quant="int4")
    assert e.value.field == "quant"
    out = tmp_path / "q.png"
    assert main(["txt2img", "a red circle on a blue background", "--quant", "int8", "--seed", "3", "--steps", "12",
                 "--dtype", "fp32", "--no-watermark", "-o", str(out)]) == 0
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(b.convert("RGB")))
