"""Training-free accelerations: ToMe token merging, DeepCache and the TAESD-compatible tiny decoder.

Tiny random UNets check the mechanics (exactness when off, restoration, call counts, per-call
caches); the bundled model checks that the opt-in speed-ups change the images little (bounds in
mean absolute difference per 0–255 channel value over a few prompts); diffusers' AutoencoderTiny
is the oracle for the tiny decoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sfumato.adapters.tome import bipartite_merge, destination_mask, token_merging, transformer_levels
from sfumato.diffusion.deepcache import DeepCache, deep_cache
from sfumato.checkpoint.taesd import convert_diffusers_decoder, load_tiny_decoder
from sfumato.models.taesd import TinyDecoder
from sfumato.models.unet import UNetConfig, UNetModel
from sfumato.pipeline.params import GenerationParams, ParamError

TINY = UNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, transformer_depth=(1, 1, 0),
                  transformer_depth_middle=1, num_heads=2, context_dim=16, norm_groups=8)


def tiny_unet(seed: int = 0) -> UNetModel:
    torch.manual_seed(seed)
    unet = UNetModel(TINY).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return unet


def inputs(batch: int = 2, size: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, size, size, generator=g), torch.full((batch,), 500.0),
            torch.randn(batch, 5, 16, generator=g))


# -- ToMe ----------------------------------------------------------------------------------------

def test_destination_mask_one_per_window_leftovers_are_sources():
    mask = destination_mask(5, 7, torch.Generator().manual_seed(3)).view(5, 7)
    windows = mask[:4, :6].reshape(2, 2, 3, 2).sum(dim=(1, 3))
    assert torch.equal(windows, torch.ones(2, 3, dtype=torch.long))
    assert not mask[4].any() and not mask[:, 6].any()


def test_merge_unmerge_of_identical_tokens_is_exact():
    x = torch.randn(2, 1, 8).expand(2, 36, 8).contiguous()
    merge, unmerge = bipartite_merge(x, 6, 6, 18, torch.Generator().manual_seed(0))
    merged = merge(x)
    assert merged.shape == (2, 18, 8)
    assert torch.equal(unmerge(merged), x)


def test_merge_averages_each_source_into_its_most_similar_destination():
    """Against a brute-force loop: the r sources whose best cosine match is highest are averaged
    with their destination; unmerge gives every token its group's value."""
    torch.manual_seed(0)
    h = w = 4
    x = torch.randn(1, h * w, 6)
    r = 5
    dst = destination_mask(h, w, torch.Generator().manual_seed(1))
    merge, unmerge = bipartite_merge(x, h, w, r, torch.Generator().manual_seed(1))
    restored = unmerge(merge(x))[0]

    tokens = x[0]
    dst_pos = [i for i in range(h * w) if dst[i]]
    src_pos = [i for i in range(h * w) if not dst[i]]
    best = {}
    for s in src_pos:
        sims = [float(torch.nn.functional.cosine_similarity(tokens[s], tokens[d], dim=0)) for d in dst_pos]
        k = int(np.argmax(sims))
        best[s] = (sims[k], dst_pos[k])
    merged = sorted(src_pos, key=lambda s: -best[s][0])[:r]
    groups = {d: [d] + [s for s in merged if best[s][1] == d] for d in dst_pos}
    expected = tokens.clone()
    for d, members in groups.items():
        mean = tokens[members].mean(0)
        for m in members:
            expected[m] = mean
    assert torch.allclose(restored, expected, atol=1e-6)
    assert len(merge(x)[0]) == h * w - r


def test_tome_ratio_zero_is_plain_and_patches_are_restored():
    unet = tiny_unet()
    x, t, ctx = inputs()
    with torch.no_grad():
        plain = unet(x, t, ctx)
        with token_merging(unet, 0.0) as patched:
            assert patched == []
            same = unet(x, t, ctx)
        with token_merging(unet, 0.5, merge_ff=True) as patched:
            assert len(patched) == 3          # level 0: one input and two output transformer blocks
            merged = unet(x, t, ctx)
        after = unet(x, t, ctx)
    assert torch.equal(same, plain) and torch.equal(after, plain)
    assert merged.shape == plain.shape and torch.isfinite(merged).all()
    assert not torch.equal(merged, plain)
    assert all("forward" not in vars(m) for m in unet.modules()) and not unet._forward_pre_hooks


def test_tome_is_deterministic_and_reduces_self_attention_tokens():
    unet = tiny_unet()
    x, t, ctx = inputs(size=8)
    seen = []
    finest = [tr for tr, level in transformer_levels(unet) if level == 0]
    handles = [tr.transformer_blocks[0].attn1.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
               for tr in finest]
    with torch.no_grad(), token_merging(unet, 0.5, seed=7):
        a = unet(x, t, ctx)
        b = unet(x, t, ctx)
    for handle in handles:
        handle.remove()
    assert torch.equal(a, b)
    assert seen == [32] * 6                  # 3 blocks × 2 calls; 64 tokens of the 8×8 map, half merged


# -- DeepCache -----------------------------------------------------------------------------------

def test_deepcache_interval_one_is_plain_exactly():
    unet = tiny_unet()
    x, t, ctx = inputs()
    with torch.no_grad():
        plain = [unet(x * k, t * k, ctx) for k in (1.0, 0.5)]
        with deep_cache(unet, 1) as cache:
            run = cache.wrap(lambda xx, s: unet(xx, t * s, ctx))
            cached = [run(x * k, torch.tensor(k)) for k in (1.0, 0.5)]
    assert all(torch.equal(a, b) for a, b in zip(plain, cached))
    assert cache.full_passes == 2 and cache.cached_passes == 0
    assert "forward" not in vars(unet)


def test_deepcache_runs_the_deep_blocks_every_n_evaluations_and_keeps_a_cache_per_call():
    unet = tiny_unet()
    x, t, ctx = inputs()
    counts = {"middle": 0, "shallow": 0}
    unet.middle_block.register_forward_hook(lambda *a: counts.__setitem__("middle", counts["middle"] + 1))
    unet.input_blocks[0].register_forward_hook(lambda *a: counts.__setitem__("shallow", counts["shallow"] + 1))
    outputs = []

    def denoise(xx, s):      # two UNet calls per evaluation, like per-image CFG with two images
        return torch.stack([unet(xx[:1], t[:1], ctx[:1]), unet(xx[1:], t[1:], ctx[1:])])

    with torch.no_grad(), deep_cache(unet, 3) as cache:
        run = cache.wrap(denoise)
        for _ in range(7):
            outputs.append(run(x, torch.tensor(1.0)))
    assert counts == {"middle": 3 * 2, "shallow": 7 * 2}        # evaluations 0, 3, 6 in full
    assert cache.full_passes == 6 and cache.cached_passes == 8
    # the same inputs again: each call's cached deep features are its own, so nothing changes;
    # a cache shared between the two calls would give the first image the second's features
    for out in outputs[1:]:
        assert torch.allclose(out, outputs[0], atol=1e-5)
    assert not torch.allclose(outputs[0][0], outputs[0][1], atol=1e-3)


def test_deepcache_cached_evaluations_differ_from_full_ones_and_errors_are_loud():
    unet = tiny_unet()
    x, t, ctx = inputs()
    with torch.no_grad(), deep_cache(unet, 2) as cache:
        with pytest.raises(RuntimeError, match="outside an evaluation"):
            unet(x, t, ctx)
        run = cache.wrap(lambda xx, s: unet(xx, t * s, ctx))
        run(x, torch.tensor(1.0))
        cached = run(x, torch.tensor(0.5))
        full = UNetModel.forward(unet, x, t * 0.5, ctx)
    assert cached.shape == full.shape and not torch.equal(cached, full)
    with pytest.raises(ValueError, match="branch"):
        DeepCache(unet, 2, branch=0)


def test_deepcache_cached_evaluation_equals_a_full_pass_with_the_earlier_deep_features():
    """Independent reference: a plain forward at the new inputs whose deep part is overridden by a hook
    with the feature map the earlier full pass fed into ``output_blocks[branch]``."""
    unet = tiny_unet()
    x, t, ctx = inputs()
    x2, t2 = x * 0.7 + 0.1, t * 0.5
    deep = unet.output_blocks[len(unet.output_blocks) - 3]   # its output enters output_blocks[branch]
    with torch.no_grad():
        saved = []
        handle = deep.register_forward_hook(lambda m, a, out: saved.append(out))
        unet(x, t, ctx)
        handle.remove()
        handle = deep.register_forward_hook(lambda m, a, out: saved[0])
        expected = unet(x2, t2, ctx)
        handle.remove()
        plain = unet(x2, t2, ctx)
        with deep_cache(unet, 2) as cache:
            run = cache.wrap(lambda xx, s: unet(xx, t * s, ctx))
            run(x, torch.tensor(1.0))
            got = run(x2, torch.tensor(0.5))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-4)   # the cache is used


def test_params_validate_acceleration_fields():
    with pytest.raises(ParamError) as e:
        GenerationParams("x", tome_ratio=0.9).validated()
    assert e.value.field == "tome_ratio"
    with pytest.raises(ParamError) as e:
        GenerationParams("x", deepcache_interval=0).validated()
    assert e.value.field == "deepcache_interval"


# -- the bundled model ---------------------------------------------------------------------------

PROMPTS = ("a red circle on a green background", "a blue square on a yellow background",
           "a white triangle on a black background")


@pytest.fixture(scope="module")
def bundled():
    from sfumato.api import load
    from sfumato.train.bundled import BUNDLED_PATH

    return load(BUNDLED_PATH)


@pytest.fixture(scope="module")
def bundled_plain(bundled):
    return _images(bundled)


def _images(pipe, **settings) -> np.ndarray:
    return np.stack([np.asarray(pipe.txt2img(p, steps=20, seed=k, watermark=False, **settings).images[0].convert("RGB"))
                     for k, p in enumerate(PROMPTS)]).astype(np.float64)


@pytest.mark.parametrize("settings, bound", [
    ({"tome_ratio": 0.5}, 10.0),
    ({"deepcache_interval": 2}, 6.0),
])
def test_accelerations_change_the_bundled_model_little(bundled, bundled_plain, settings, bound):
    """Mean |Δ| per 0–255 channel value from the plain images, measured on these three prompts:
    ToMe 0.5 5.1, DeepCache 2 2.8 (DeepCache 3, which costs eval accuracy: 9.2; the same prompts
    with other seeds: 34.6). Over the 128 eval prompts: ToMe 0.5 2.9, DeepCache 2 3.4."""
    plain = bundled_plain
    fast = _images(bundled, **settings)
    diff = np.abs(fast - plain).mean()
    assert 0 < diff < bound
    unet = bundled.model.unet
    assert "forward" not in vars(unet) and all("forward" not in vars(m) for m in unet.modules())
    assert np.array_equal(_images(bundled)[:1], plain[:1])       # restored after the run


def test_bundled_model_merges_its_finest_attention_level(bundled):
    unet = bundled.model.unet
    levels = transformer_levels(unet)
    finest = min(level for _, level in levels)
    seen = []
    handles = [tr.transformer_blocks[0].attn1.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
               for tr, level in levels if level == finest]
    try:
        bundled.txt2img(PROMPTS[0], steps=2, seed=0, watermark=False, tome_ratio=0.5)
    finally:
        for handle in handles:
            handle.remove()
    assert finest == 1 and seen and set(seen) == {32}        # the 8×8 map's 64 tokens, halved


# -- TAESD-compatible tiny decoder ---------------------------------------------------------------

def test_tiny_decoder_matches_diffusers_autoencoder_tiny(tmp_path):
    from diffusers import AutoencoderTiny

    from sfumato.checkpoint.io import save_file

    torch.manual_seed(0)
    ref = AutoencoderTiny(decoder_block_out_channels=(16, 16, 16, 16), encoder_block_out_channels=(16, 16, 16, 16),
                          num_decoder_blocks=(2, 1, 1, 1), num_encoder_blocks=(1, 1, 1, 1)).eval()
    z = torch.randn(1, 4, 6, 5)
    with torch.no_grad():
        expected = (ref.decode(z).sample + 1) / 2
        path = tmp_path / "diffusion_pytorch_model.safetensors"
        save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, path)
        decoder = load_tiny_decoder(str(path))
        got = decoder(z)
    assert decoder.cfg.blocks == (2, 1, 1, 1) and decoder.cfg.channels == 16
    assert got.shape == (1, 3, 48, 40)
    assert torch.allclose(got, expected, atol=1e-5)
    taesd_keys = convert_diffusers_decoder(ref.state_dict())
    assert "1.weight" in taesd_keys and "3.conv.0.weight" in taesd_keys     # TAESD's own file layout
    assert set(TinyDecoder(decoder.cfg).state_dict()) == set(taesd_keys)


def test_cli_tiny_decoder_and_acceleration_flags(tiny_model, tmp_path, capsys):
    from sfumato.checkpoint.io import save_file
    from sfumato.cli import main
    from sfumato.models.taesd import TinyDecoderConfig

    torch.manual_seed(0)
    decoder = TinyDecoder(TinyDecoderConfig(channels=8, blocks=(1, 1, 1, 1)))
    path = tmp_path / "taesd_decoder.safetensors"
    save_file({k: v.contiguous() for k, v in decoder.state_dict().items()}, path)
    base = ["txt2img", "a blue square", "--model", str(tiny_model), "--steps", "3", "--seed", "5",
            "--width", "64", "--height", "64", "--no-watermark"]
    assert main([*base, "-o", str(tmp_path / "vae.png")]) == 0
    assert main([*base, "-o", str(tmp_path / "tiny.png"), "--vae-decoder", f"taesd:{path}",
                 "--tome", "0.5", "--deepcache", "2"]) == 0
    vae, tiny = (np.asarray(Image.open(tmp_path / n)) for n in ("vae.png", "tiny.png"))
    assert tiny.shape == vae.shape == (64, 64, 3) and not np.array_equal(tiny, vae)
    capsys.readouterr()
    assert main([*base, "-o", str(tmp_path / "x.png"), "--vae-decoder", str(path)]) == 2
    assert "--vae-decoder: expected taesd:PATH" in capsys.readouterr().err


def test_previews_go_through_the_tiny_decoder(tiny_model):
    from sfumato.api import load
    from sfumato.models.taesd import TinyDecoderConfig

    pipe = load(tiny_model)
    shapes = []
    pipe.txt2img("a square", steps=2, width=64, height=64, watermark=False,
                 callback=lambda rec: shapes.append(rec.preview().shape))
    pipe.generator.tiny_decoder = TinyDecoder(TinyDecoderConfig(channels=8, blocks=(1, 1, 1, 1)))
    pipe.txt2img("a square", steps=2, width=64, height=64, watermark=False,
                 callback=lambda rec: shapes.append(rec.preview().shape))
    assert shapes == [(1, 8, 8, 3)] * 2 + [(1, 64, 64, 3)] * 2


def test_accelerated_batch_item_equals_single_run_with_its_seed(tiny_model):
    """Per-image caches and seed-independent merge choices keep A1111's batch rule."""
    from sfumato.api import load

    pipe = load(tiny_model)
    fast = {"tome_ratio": 0.5, "deepcache_interval": 2, "steps": 4, "width": 64, "height": 64, "watermark": False}
    batch = pipe.txt2img("a square", seed=5, batch_size=2, **fast).images
    single = pipe.txt2img("a square", seed=6, **fast).images
    plain = pipe.txt2img("a square", seed=6, steps=4, width=64, height=64, watermark=False).images
    assert np.array_equal(np.asarray(batch[1]), np.asarray(single[0]))
    assert not np.array_equal(np.asarray(single[0]), np.asarray(plain[0]))
