"""The CPU fast paths: each equals the plain computation (diffusers on the same weights where it
has one), bf16 stays within a stated error, tiled VAE passes equal untiled ones, and nothing
derived from the weights goes stale when they are patched in place. Timings live in bench/."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL as RefAutoencoderKL
from diffusers import UNet2DConditionModel

from test_unet import tiny_pair

from sfumato.api import resolve_dtype
from sfumato.checkpoint.convert_vae import diffusers_vae_to_ldm
from sfumato.models import layers
from sfumato.models.layers import Conv2d, bf16_is_fast, parse_cpuinfo, resolve_compute_dtype, upsample_conv
from sfumato.models import unet as unet_module
from sfumato.models.unet import GEGLU, FeedForward, UNetConfig, UNetModel
from sfumato.models.vae import AutoencoderKL, VAEConfig
from sfumato.pipeline import tiling

TINY_UNET = dict(
    block_out_channels=(32, 64), layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2, cross_attention_dim=32,
    norm_num_groups=8,
)
TINY_UNET_CFG = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(1, 0),
                           num_heads=2, context_dim=32, norm_groups=8)
TINY_VAE = VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, norm_groups=8)


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def unet_pair() -> tuple[UNet2DConditionModel, UNetModel]:
    return tiny_pair(TINY_UNET, TINY_UNET_CFG)


def vae_pair() -> tuple[RefAutoencoderKL, AutoencoderKL]:
    torch.manual_seed(0)
    ref = RefAutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 64, 64, 64), layers_per_block=1, norm_num_groups=8,
    ).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * (0.1 if p.ndim == 1 else 0.02))
    ours = AutoencoderKL(TINY_VAE).eval()
    ours.load_state_dict(diffusers_vae_to_ldm(ref.state_dict()), strict=True)
    return ref, ours


# -- single fast paths against their plain formula ---------------------------------------------


@pytest.mark.parametrize("phases", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("size", [(7, 5), (12, 16)])
def test_upsample_conv_equals_nearest_then_conv(size: tuple[int, int], channels_last: bool, phases: bool,
                                                monkeypatch) -> None:
    """Both routes: the phase kernels (forced by a zero size threshold) and the plain one small inputs take."""
    monkeypatch.setattr(layers, "UPSAMPLE_PHASES_MIN_PIXELS", 0 if phases else 10**9)
    torch.manual_seed(0)
    conv = Conv2d(6, 10, 3, padding=1)
    x = torch.randn(2, 6, *size)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), conv.weight, conv.bias, padding=1)
        got = upsample_conv(x, conv)
    assert got.shape == want.shape == (2, 10, 2 * size[0], 2 * size[1])
    assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernel,stride,padding,size", [
    (3, 1, 1, (8, 8)), (3, 2, 1, (9, 7)), (3, 2, 0, (9, 9)), (1, 1, 0, (5, 6)), (2, 1, 1, (4, 5)), ((3, 1), 1, (1, 0), (6, 6)),
])
def test_conv_as_matmul_equals_conv2d(kernel, stride, padding, size, weight_dtype, bias, monkeypatch) -> None:
    """Same weights, also stored in bf16 and cast a few output channels at a time (a 5-row chunk here)."""
    torch.manual_seed(0)
    conv = Conv2d(5, 7, kernel, stride=stride, padding=padding, bias=bias).to(weight_dtype)
    monkeypatch.setattr(layers, "MATMUL_CONV_CAST_CHUNK", 5 * conv.weight[0].numel())
    x = torch.randn(3, 5, *size)
    with torch.no_grad():
        b = None if conv.bias is None else conv.bias.float()
        want = F.conv2d(x, conv.weight.float(), b, conv.stride, conv.padding)
        got = layers.conv_as_matmul(x, conv.weight, b, conv.stride, conv.padding)
    assert got.shape == want.shape and got.is_contiguous()
    assert rel_err(got, want) <= 1e-5


def test_small_maps_take_the_matmul_route_and_give_the_same_unet(monkeypatch) -> None:
    """Under no_grad on the CPU in fp32 a conv whose output has at most MATMUL_CONV_MAX_ROWS pixels runs
    as unfold + matmul, larger ones, autograd and half precision through F.conv2d; a UNet's output does
    not depend on the route."""
    calls = []
    real = layers.conv_as_matmul
    monkeypatch.setattr(layers, "conv_as_matmul", lambda *a: calls.append(a[0].shape) or real(*a))
    conv, x = Conv2d(4, 4, 3, padding=1), torch.randn(2, 4, 16, 16)
    monkeypatch.setattr(layers, "MATMUL_CONV_MAX_ROWS", 512)
    with torch.no_grad():
        conv(x)
        conv(torch.randn(2, 4, 17, 16))         # 544 output pixels: convolution
        conv.to(torch.bfloat16)(x.bfloat16())   # not fp32: convolution
    conv.float()(x)                             # autograd: convolution
    assert calls == [(2, 4, 16, 16)]
    _, ours = unet_pair()
    x, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor([10.0, 900.0]), torch.randn(2, 7, 32)
    with torch.no_grad():
        monkeypatch.setattr(layers, "MATMUL_CONV_MAX_ROWS", 0)
        want = ours(x, t, ctx)
        monkeypatch.setattr(layers, "MATMUL_CONV_MAX_ROWS", 10**9)
        calls.clear()
        got = ours(x, t, ctx)
    assert len(calls) > 10
    assert rel_err(got, want) <= 1e-5


def test_feed_forward_in_chunks_equals_whole(monkeypatch) -> None:
    torch.manual_seed(0)
    ff, x = FeedForward(8), torch.randn(2, 37, 8)
    with torch.no_grad():
        want = ff.net(x)
        monkeypatch.setattr(unet_module, "FF_CHUNK_TOKENS", 10)   # 74 rows: 8 chunks, the last of 4
        got = ff(x)
    assert got.shape == want.shape
    assert rel_err(got, want) <= 1e-6


def test_geglu_and_1x1_conv_as_matrix_products() -> None:
    torch.manual_seed(0)
    geglu, x = GEGLU(8, 12), torch.randn(2, 5, 8)
    a, gate = F.linear(x, geglu.proj.weight, geglu.proj.bias).chunk(2, dim=-1)
    assert rel_err(geglu(x), a * F.gelu(gate)) <= 1e-5
    conv, img = Conv2d(8, 4, 1), torch.randn(2, 8, 3, 5)
    tokens = img.permute(0, 2, 3, 1)
    assert rel_err(conv.as_linear(tokens), conv(img).permute(0, 2, 3, 1)) <= 1e-5


def test_half_weights_compute_in_fp32_exactly_like_rounded_fp32_weights(monkeypatch) -> None:
    """bf16 storage with fp32 arithmetic (the default on CPUs without fast bf16) is the fp32 model
    with its weights rounded to bf16, up to summation order; the scratch-buffer casts included."""
    monkeypatch.setattr(layers, "_SCRATCH_MIN", 16)  # route every weight through the scratch buffer
    _, ours = unet_pair()
    rounded = UNetModel(TINY_UNET_CFG).eval()
    rounded.load_state_dict({k: v.bfloat16().float() for k, v in ours.state_dict().items()})
    ours.to(torch.bfloat16).dtype_override = torch.float32
    x, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor([10.0, 900.0]), torch.randn(2, 7, 32)
    with torch.no_grad():
        got, want = ours(x, t, ctx), rounded(x, t, ctx)
    assert got.dtype == torch.float32
    assert rel_err(got, want) <= 1e-5


# -- precision ---------------------------------------------------------------------------------


def test_bf16_error_against_diffusers_fp32() -> None:
    ref, ours = unet_pair()
    x, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor([10.0, 900.0]), torch.randn(2, 7, 32)
    with torch.no_grad():
        want = ref(x, t, ctx).sample
        assert rel_err(ours(x, t, ctx), want) <= 1e-4
        ours.to(torch.bfloat16)
        ours.dtype_override = torch.float32
        storage_only = ours(x, t, ctx)            # bf16 weights, fp32 arithmetic
        ours.dtype_override = torch.bfloat16
        native = ours(x.bfloat16(), t, ctx.bfloat16())  # bf16 weights and arithmetic
    assert native.dtype == torch.bfloat16
    assert rel_err(storage_only, want) <= 0.02
    assert rel_err(native, want) <= 0.05


def test_compute_dtype_choice(monkeypatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setattr(layers, "cpu_has_fast_bf16", lambda: False)
    assert resolve_compute_dtype(torch.bfloat16, cpu) == torch.float32
    assert resolve_compute_dtype(torch.float16, cpu) == torch.float32
    assert resolve_compute_dtype(torch.bfloat16, cpu, torch.bfloat16) == torch.bfloat16
    assert resolve_dtype("auto") == torch.float32
    monkeypatch.setattr(layers, "cpu_has_fast_bf16", lambda: True)
    assert resolve_compute_dtype(torch.bfloat16, cpu) == torch.bfloat16
    assert resolve_compute_dtype(torch.float16, cpu) == torch.float32
    assert resolve_dtype("auto") == torch.bfloat16 and resolve_dtype(None, "cuda") == torch.float16
    assert resolve_dtype("fp32") == torch.float32


def test_fast_bf16_from_cpu_flags() -> None:
    def info(vendor: str, flags: str) -> str:
        return f"processor\t: 0\nvendor_id\t: {vendor}\nflags\t\t: fpu avx2 {flags}\n\nprocessor\t: 1\nflags\t: fpu\n"

    assert parse_cpuinfo(info("AuthenticAMD", "avx512_bf16")) == ({"fpu", "avx2", "avx512_bf16"}, "AuthenticAMD")
    assert bf16_is_fast(*parse_cpuinfo(info("AuthenticAMD", "avx512f avx512_bf16")))
    assert bf16_is_fast(*parse_cpuinfo(info("GenuineIntel", "avx512_bf16 amx_tile amx_bf16")))
    assert not bf16_is_fast(*parse_cpuinfo(info("GenuineIntel", "avx512f avx512_bf16")))
    assert not bf16_is_fast(*parse_cpuinfo(info("AuthenticAMD", "avx512f")))
    assert parse_cpuinfo("") == (set(), "")


def test_gradients_match_diffusers() -> None:
    """The in-place shortcuts are taken only without autograd: training gets diffusers' gradients."""
    ref, ours = unet_pair()
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([300.0]), torch.randn(1, 5, 32)
    grads = []
    for model, fn in ((ref, lambda xx: ref(xx, t, ctx).sample), (ours, lambda xx: ours(xx, t, ctx))):
        model.requires_grad_(True)
        xx = x.clone().requires_grad_(True)
        fn(xx).square().mean().backward()
        grads.append((xx.grad, model.conv_in.weight.grad if model is ref else model.input_blocks[0][0].weight.grad))
    assert rel_err(grads[1][0], grads[0][0]) <= 1e-4
    assert rel_err(grads[1][1], grads[0][1]) <= 1e-4


# -- weights patched in place (LoRA) -----------------------------------------------------------


def test_in_place_weight_changes_are_seen(monkeypatch) -> None:
    """Nothing derived from the weights (upcasts, combined upsampling kernels, GEGLU halves) is kept
    between calls: after patching parameters in place, the model equals a fresh one built from the
    patched weights."""
    monkeypatch.setattr(layers, "_SCRATCH_MIN", 16)
    _, ours = unet_pair()
    ours.to(torch.bfloat16).dtype_override = torch.float32
    x, t, ctx = torch.randn(1, 4, 16, 16), torch.tensor([500.0]), torch.randn(1, 7, 32)
    with torch.no_grad():
        before = ours(x, t, ctx)
        g = torch.Generator().manual_seed(1)
        for name, p in ours.named_parameters():
            delta = 0.1 * torch.randn(p.shape, generator=g)
            if "ff.net.0.proj" in name or "conv" in name:
                p.data = (p.data.float() + delta).to(p.dtype)   # as adapters.lora patches
            else:
                p.add_(delta.to(p.dtype))
        after = ours(x, t, ctx)
    fresh = UNetModel(TINY_UNET_CFG).eval()
    fresh.load_state_dict(ours.state_dict())
    fresh.to(torch.bfloat16).dtype_override = torch.float32
    with torch.no_grad():
        want = fresh(x, t, ctx)
    assert rel_err(after, before) > 0.01
    assert torch.equal(after, want)


# -- tiled VAE ---------------------------------------------------------------------------------


def test_tiled_decode_equals_full_decode_with_exact_statistics() -> None:
    """Statistics from the whole latent (it fits `stats_size`): every pixel, seams included, equals
    diffusers' untiled decode; tiles 8 and 12 cut a 26×20 latent unevenly."""
    ref, ours = vae_pair()
    z = torch.randn(1, 4, 26, 20)
    with torch.no_grad():
        want = ref.decode(z).sample
        for tile in (8, 12):
            assert rel_err(tiling.tiled_decode(ours, z, tile=tile, stats_size=32), want) <= 1e-5


def test_tiled_decode_with_sampled_statistics_is_close() -> None:
    """With statistics from a mosaic of crops (the latent exceeds `stats_size`), the difference is a
    small, even shift rather than seams: bounded everywhere, and no larger at tile borders."""
    ref, ours = vae_pair()
    z = torch.randn(1, 4, 32, 32)
    with torch.no_grad():
        want = ref.decode(z).sample
        got = tiling.tiled_decode(ours, z, tile=8, stats_size=16)
    diff = (got - want).abs()
    scale = want.abs().max()
    assert diff.max() <= 0.2 * scale     # measured 0.12
    assert diff.mean() <= 0.03 * scale   # measured 0.016
    seams = [diff[..., s - 4:s + 4, :].mean() for s in (64, 128, 192)]  # rows around the tile borders
    assert max(seams) <= 2 * diff.mean()


def test_tiled_encode_equals_full_encode_with_exact_statistics() -> None:
    ref, ours = vae_pair()
    x = torch.rand(1, 3, 200, 136) * 2 - 1
    with torch.no_grad():
        want = ref.encode(x).latent_dist
        got = tiling.tiled_encode(ours, x, tile=8, stats_size=32)
    assert got.mean.shape == want.mean.shape == (1, 4, 25, 17)
    assert rel_err(got.mean, want.mean) <= 1e-5
    assert rel_err(got.logvar, want.logvar) <= 1e-5


def test_tiled_decode_memory_does_not_grow_with_area() -> None:
    """The largest activation entering a full-resolution layer is set by the tile and the statistics
    pass, not by the image."""
    torch.manual_seed(0)
    ours = AutoencoderKL(VAEConfig(ch=16, ch_mult=(1, 1, 1), num_res_blocks=1, norm_groups=8)).eval()
    largest = []
    hooks = [m.register_forward_pre_hook(lambda m, args: largest.append(args[0].numel()))
             for m in ours.decoder.up.modules() if isinstance(m, Conv2d)]
    peaks = []
    for side in (24, 40):  # 3 and 5 tiles a side: both have interior tiles, haloed on every side
        largest.clear()
        with torch.no_grad():
            tiling.tiled_decode(ours, torch.randn(1, 4, side, side), tile=8, stats_size=16)
        peaks.append(max(largest))
    for h in hooks:
        h.remove()
    assert peaks[1] <= peaks[0]


def test_auto_tiling_and_bad_arguments(monkeypatch) -> None:
    _, ours = vae_pair()
    with pytest.raises(ValueError, match="tile"):
        tiling.tiled_decode(ours, torch.randn(1, 4, 8, 8), tile=4)
    with pytest.raises(ValueError, match="multiples of 8"):
        tiling.tiled_encode(ours, torch.randn(1, 3, 60, 64))
    calls = []
    monkeypatch.setattr(tiling, "tiled_decode", lambda vae, z, **kw: calls.append(kw) or vae.decode(z))
    monkeypatch.setattr(tiling, "AUTO_TILE_LATENT_PIXELS", 8 * 8)
    with torch.no_grad():
        tiling.decode(ours, torch.randn(1, 4, 8, 8))
        assert calls == []
        tiling.decode(ours, torch.randn(1, 4, 8, 9), stats_size=8)
        assert len(calls) == 1
        tiling.decode(ours, torch.randn(1, 4, 8, 9), stats_size=8, tiled=False)
        tiling.decode(ours, torch.randn(1, 4, 16, 16), tiled=True)   # fits the default statistics size: whole
        assert len(calls) == 1
        tiling.decode(ours, torch.randn(1, 4, 8, 16), stats_size=8, tiled=True)
        assert len(calls) == 2


# -- torch.compile -----------------------------------------------------------------------------


@pytest.mark.slow
def test_compiled_unet_gives_the_same_images(tiny_model) -> None:
    """``compile=True`` runs the UNet through torch.compile (its compiled call is installed and used)
    and changes the image by rounding at most; streamed weights refuse it."""
    from torch._dynamo.utils import counters

    import sfumato
    from sfumato.pipeline.params import ParamError

    # fp32 (auto is bf16 on CPUs with fast bf16, where compiled kernels round differently from eager ones)
    eager, compiled = sfumato.load(tiny_model, dtype="fp32"), sfumato.load(tiny_model, dtype="fp32", compile=True)
    unet = compiled.model.unet
    assert unet._compiled_call_impl is not None
    settings = dict(width=64, height=64, steps=2, seed=3, watermark=False)
    want = np.asarray(eager.txt2img("a red circle", **settings).images[0]).astype(int)
    counters.clear()
    got = np.asarray(compiled.txt2img("a red circle", **settings).images[0]).astype(int)
    assert counters["stats"]["unique_graphs"] >= 1
    assert np.abs(got - want).max() <= 1
    for option in ("by_stage", "low_memory"):
        with pytest.raises(ParamError, match="compile"):
            sfumato.load(tiny_model, compile=True, **{option: True})
