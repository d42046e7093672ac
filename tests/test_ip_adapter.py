"""IP-Adapter (image prompts): the decoupled cross-attention equals diffusers' UNet2DConditionModel with
``_load_ip_adapter_weights`` / ``IPAdapterAttnProcessor2_0`` on the same random weights and image embeds
(base and plus, one and two adapters, scale ≠ 1); the CLIP image embeds equal transformers'; whole tiny
runs (scale 0 and empty spans change nothing; the files are loaded once); mismatched adapters and missing
encoders are ParamErrors naming the field; the CLI flags and the infotext."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

import sfumato.pipeline.image_prompt as image_prompt_module
from reference import TINY_HF_TEXT, materialize, write_ldm_sd1
from sfumato.adapters.ip_adapter import (
    ImagePrompt, cross_attention_layers, image_prompts_applied, ip_adapter_config, load_ip_adapter,
)
from sfumato.api import IPAdapterSpec, load
from sfumato.checkpoint.convert_unet import diffusers_unet_to_ldm
from sfumato.checkpoint.image_encoder import load_image_encoder
from sfumato.checkpoint.io import save_file
from sfumato.cli import main
from sfumato.errors import CheckpointError
from sfumato.models.unet import UNetConfig
from sfumato.pipeline.clip_image import preprocess_clip
from sfumato.pipeline.params import ParamError

TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                 cross_attention_dim=32, attention_head_dim=2)
TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, sample_size=64,
                block_out_channels=(32, 32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4)
UNET_CFG = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(1, 0),
                      num_heads=2, context_dim=32)
VISION = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, image_size=28,
              patch_size=7, projection_dim=24, hidden_act="gelu")
PROMPT = "a red circle"


def base_state(inner: list[int], seed: int, cross: int = 32, clip: int = 24, tokens: int = 4) -> dict:
    """A random base IP-Adapter in the published flat layout (``image_proj.``, ``ip_adapter.N.``)."""
    g = torch.Generator().manual_seed(seed)
    sd = {"image_proj.proj.weight": torch.randn(tokens * cross, clip, generator=g) / clip ** 0.5,
          "image_proj.proj.bias": 0.1 * torch.randn(tokens * cross, generator=g),
          "image_proj.norm.weight": 1 + 0.1 * torch.randn(cross, generator=g),
          "image_proj.norm.bias": 0.1 * torch.randn(cross, generator=g)}
    for i, n in enumerate(inner):
        for which in ("to_k_ip", "to_v_ip"):
            sd[f"ip_adapter.{2 * i + 1}.{which}.weight"] = torch.randn(n, cross, generator=g) / cross ** 0.5
    return sd


def plus_state(inner: list[int], seed: int, cross: int = 32, embed: int = 48, dim: int = 128, queries: int = 6,
               depth: int = 4) -> dict:
    """A random plus IP-Adapter (the reference Resampler's keys; heads = to_q width / 64)."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape):
        return torch.randn(*shape, generator=g) / shape[-1] ** 0.5

    def norm(prefix, n):
        return {f"{prefix}.weight": 1 + 0.1 * torch.randn(n, generator=g), f"{prefix}.bias": 0.1 * torch.randn(n, generator=g)}

    sd = {"image_proj.latents": torch.randn(1, queries, dim, generator=g) / dim ** 0.5,
          "image_proj.proj_in.weight": w(dim, embed), "image_proj.proj_in.bias": 0.1 * torch.randn(dim, generator=g),
          "image_proj.proj_out.weight": w(cross, dim), "image_proj.proj_out.bias": 0.1 * torch.randn(cross, generator=g),
          **norm("image_proj.norm_out", cross)}
    for layer in range(depth):
        p = f"image_proj.layers.{layer}"
        sd |= norm(f"{p}.0.norm1", dim) | norm(f"{p}.0.norm2", dim) | norm(f"{p}.1.0", dim)
        sd |= {f"{p}.0.to_q.weight": w(dim, dim), f"{p}.0.to_kv.weight": w(2 * dim, dim),
               f"{p}.0.to_out.weight": w(dim, dim), f"{p}.1.1.weight": w(4 * dim, dim), f"{p}.1.3.weight": w(dim, 4 * dim)}
    for i, n in enumerate(inner):
        for which in ("to_k_ip", "to_v_ip"):
            sd[f"ip_adapter.{2 * i + 1}.{which}.weight"] = w(n, cross)
    return sd


def nested(sd: dict) -> dict:
    """The ``.bin`` layout: {"image_proj": {...}, "ip_adapter": {...}}."""
    out: dict = {"image_proj": {}, "ip_adapter": {}}
    for k, v in sd.items():
        head, _, rest = k.partition(".")
        out[head][rest] = v
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny SD1-style checkpoint written from diffusers / transformers modules, a tiny CLIP image encoder
    folder (transformers' save_pretrained) beside the adapters, and adapter files of every layout."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    root = tmp_path_factory.mktemp("ip-world")
    unet = materialize(lambda: UNet2DConditionModel(**TINY_UNET), 31)
    vae = materialize(lambda: AutoencoderKL(**TINY_VAE), 32)
    text = materialize(lambda: CLIPTextModel(CLIPTextConfig(**TINY_HF_TEXT)), 33)
    model_path = write_ldm_sd1(root / "tiny.safetensors", unet, vae, text, UNET_CFG)
    encoder = materialize(lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(**VISION)), 34)
    models = root / "models"
    encoder.save_pretrained(models / "image_encoder")
    inner = [m.to_k.out_features for name, m in unet.named_modules() if name.endswith("attn2")]
    states = {"a": base_state(inner, 1), "b": base_state(inner, 2), "plus": plus_state(inner, 3)}
    paths = {}
    for name, state in states.items():
        paths[name] = models / f"ip-{name}.safetensors"
        save_file(state, paths[name])
    paths["a.bin"] = models / "ip-a.bin"
    torch.save(nested(states["a"]), paths["a.bin"])
    bad = root / "bad"
    bad.mkdir()
    save_file(base_state(inner, 4, cross=64), bad / "wide.safetensors")
    save_file(base_state(inner[:3], 5), bad / "short.safetensors")
    save_file(base_state(inner, 6, clip=16), bad / "clip16.safetensors")
    nan = base_state(inner, 7)
    nan["ip_adapter.3.to_v_ip.weight"][0, 0] = float("nan")
    save_file(nan, bad / "nan.safetensors")
    pipe = load(model_path, dtype="fp32", device="cpu")
    return dict(root=root, model=model_path, pipe=pipe, unet=unet, text=text, encoder=encoder, states=states,
                paths=paths, inner=inner, bad=bad, encoder_dir=models / "image_encoder")


def smooth_image(seed: int, size: int = 40) -> Image.Image:
    g = np.random.default_rng(seed)
    a = g.integers(0, 256, (size // 8, size // 8, 3)).astype(np.uint8)
    return Image.fromarray(a).resize((size, size), Image.BICUBIC)


# -- (a) the attention equals diffusers' ---------------------------------------------------------------


def _diffusers_with(world, states: list[dict], scales: list[float]):
    unet = copy.deepcopy(world["unet"])
    unet._load_ip_adapter_weights([nested(s) for s in states])
    for proc in unet.attn_processors.values():
        if hasattr(proc, "to_k_ip"):
            proc.scale = list(scales)
    return unet


@pytest.mark.parametrize("names, scales", [(["a"], [1.0]), (["a"], [0.6]), (["a", "b"], [0.6, 1.3]),
                                           (["plus"], [0.8]), (["a", "plus"], [1.0, 0.5])])
def test_unet_matches_diffusers(world, names, scales):
    ours_unet = world["pipe"].model.unet
    torch.manual_seed(0)
    x, ctx = torch.randn(3, 4, 8, 8), torch.randn(3, 7, 32)
    t = torch.tensor([901.0, 901.0, 901.0])
    ref_embeds, prompts = [], []
    for name, scale in zip(names, scales):
        adapter = load_ip_adapter(world["paths"][name])
        if name == "plus":
            feats = torch.randn(2, 5, 48)                       # cond, uncond hidden states
            ref_embeds.append(torch.stack([feats[1], feats[0], feats[0]])[:, None])   # [3, 1, 5, 48]
        else:
            e = torch.randn(1, 24)
            feats = torch.cat([e, torch.zeros_like(e)])
            ref_embeds.append(torch.cat([torch.zeros_like(e), e, e])[:, None])       # [3, 1, 24]
        with torch.no_grad():
            tokens = adapter.tokens(feats)
        prompts.append(ImagePrompt(adapter, tokens[0], tokens[1], scale))
    ref = _diffusers_with(world, [world["states"][n] for n in names], scales)
    with torch.no_grad():
        expected = ref(x, t, ctx, added_cond_kwargs={"image_embeds": ref_embeds}).sample
        plain = world["unet"](x, t, ctx).sample
        with image_prompts_applied(ours_unet, prompts):
            got = ours_unet(x, t, ctx)
        after, again = ours_unet(x, t, ctx), ours_unet(x, t, ctx)
    err = (got - expected).abs().max().item()
    print(f"IP-Adapter {names} scales {scales}: max abs diff {err:.2e} (output max {expected.abs().max():.2f})")
    assert err <= 1e-4
    assert (expected - plain).abs().max() > 1e-2          # the adapter changed the output
    assert torch.equal(after, again)                      # detached: the plain UNet again
    assert (after - plain).abs().max() <= 1e-4


from test_unet import TEXT_DIM, TIME_DIM, TINY_SDXL, TINY_SDXL_CFG  # noqa: E402 — the UNet parity tests' SDXL layout


def test_sdxl_layout_matches_diffusers():
    """SDXL's layout (transformer depth 2 in the blocks and the middle, no attention at the first level):
    the layer numbering and the attention equal diffusers' with a plus and a base adapter."""
    from diffusers import UNet2DConditionModel

    from sfumato.adapters.ip_adapter import IPAdapter
    from sfumato.models.unet import UNetModel, timestep_embedding

    ref = materialize(lambda: UNet2DConditionModel(sample_size=8, **TINY_SDXL), 41)
    ours = UNetModel(TINY_SDXL_CFG).eval()
    ours.load_state_dict(diffusers_unet_to_ldm(ref.state_dict(), TINY_SDXL_CFG), strict=True)
    inner = [m.to_k.out_features for name, m in ref.named_modules() if name.endswith("attn2")]
    assert len(inner) == len(cross_attention_layers(ours)) == 2 * 2 + 3 * 2 + 2
    states = [plus_state(inner, 8, cross=64, embed=48), base_state(inner, 9, cross=64)]
    adapters = []
    for sd in states:
        adapter = IPAdapter(ip_adapter_config(sd)).eval()
        adapter.load_state_dict(sd, strict=True)
        adapters.append(adapter)
    b = 2
    x, ctx = torch.randn(b, 4, 8, 8), torch.randn(b, 9, 64)
    text_embeds = torch.randn(b, TEXT_DIM)
    time_ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * b)
    y = torch.cat([text_embeds, timestep_embedding(time_ids.flatten(), TIME_DIM).reshape(b, -1)], dim=-1)
    t = torch.tensor([300.0, 300.0])
    hidden, e = torch.randn(2, 5, 48), torch.randn(1, 24)
    with torch.no_grad():
        tp, tb = adapters[0].tokens(hidden), adapters[1].tokens(torch.cat([e, torch.zeros_like(e)]))
        prompts = [ImagePrompt(adapters[0], tp[0], tp[1], 0.7), ImagePrompt(adapters[1], tb[0], tb[1], 1.2)]
        embeds = [torch.stack([hidden[1], hidden[0]])[:, None], torch.cat([torch.zeros_like(e), e])[:, None]]
        ref._load_ip_adapter_weights([nested(sd) for sd in states])
        for proc in ref.attn_processors.values():
            if hasattr(proc, "to_k_ip"):
                proc.scale = [0.7, 1.2]
        expected = ref(x, t, ctx, added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids,
                                                     "image_embeds": embeds}).sample
        with image_prompts_applied(ours, prompts):
            got = ours(x, t, ctx, y)
    err = (got - expected).abs().max().item()
    print(f"IP-Adapter SDXL layout, plus + base: max abs diff {err:.2e} (output max {expected.abs().max():.2f})")
    assert err <= 1e-4


def test_layer_order_is_diffusers(world):
    layers = cross_attention_layers(world["pipe"].model.unet)
    assert [a.to_k.out_features for a in layers] == world["inner"] == [32, 32, 32, 64]


def test_bin_and_safetensors_load_the_same(world):
    a, b = load_ip_adapter(world["paths"]["a"]), load_ip_adapter(world["paths"]["a.bin"])
    assert a.cfg == b.cfg and a.cfg.kind == "base" and a.cfg.tokens == 4
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    plus = ip_adapter_config(world["states"]["plus"])
    assert (plus.kind, plus.tokens, plus.clip_dim, plus.resampler) == ("plus", 6, 48, (128, 4, 64, 2))


def test_image_embeds_match_transformers(world):
    tower = load_image_encoder(world["encoder_dir"])
    pixels = preprocess_clip([smooth_image(1)], 28, "openai")
    with torch.no_grad():
        ours = tower(pixels, output_hidden_states=True)
        ref = world["encoder"](pixel_values=pixels, output_hidden_states=True)
    assert (ours.image_embeds - ref.image_embeds).abs().max() <= 1e-5
    assert (ours.hidden_states[-2] - ref.hidden_states[-2]).abs().max() <= 1e-5


# -- (b) whole runs -------------------------------------------------------------------------------------


@torch.no_grad()
def reference_latents(w, units, *, steps=4, cfg=5.0, seed=7, batch=2):
    """k-diffusion's Euler over a CFG denoiser calling diffusers' UNet with the adapters loaded by
    ``_load_ip_adapter_weights``; image embeds from transformers' CLIPVisionModelWithProjection on
    CLIPImageProcessorPil's pixels (zeros for the uncond row, a zero image's hidden states for plus).
    units: (adapter name, image, scale, start, end); a unit steers step i of N when start ≤ i/N ≤ end."""
    import k_diffusion as K
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from reference import reference_tokens, scaled_linear_alphas_cumprod

    processor = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    unets = {}

    def unet_for(active):   # diffusers' UNet with the active units' adapters and scales
        key = tuple(u[0] for u in active)
        if key not in unets:
            unets[key] = _diffusers_with(w, [w["states"][u[0]] for u in active], [u[2] for u in active]) \
                if active else w["unet"]
        return unets[key]

    embeds = {}
    for name, image, *_ in units:
        pixels = processor(images=[image], return_tensors="pt")["pixel_values"]
        if name == "plus":
            cond, uncond = (w["encoder"](pixel_values=p, output_hidden_states=True).hidden_states[-2]
                            for p in (pixels, torch.zeros_like(pixels)))
        else:
            cond = w["encoder"](pixel_values=pixels).image_embeds
            uncond = torch.zeros_like(cond)
        embeds[name] = torch.cat([uncond, cond])[:, None]

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("alphas_cumprod", scaled_linear_alphas_cumprod())

        def apply_model(self, x, t, cond, active):
            kwargs = {"added_cond_kwargs": {"image_embeds": [embeds[u[0]] for u in active]}} if active else {}
            return unet_for(active)(x, t, encoder_hidden_states=cond, **kwargs).sample

    den = K.external.CompVisDenoiser(Wrapped())
    sigmas = den.get_sigmas(steps)
    c = w["text"](reference_tokens([PROMPT])).last_hidden_state
    uc = w["text"](reference_tokens([""])).last_hidden_state

    def model(x, sigma):
        i = int((sigmas == sigma[0]).nonzero().item())
        active = [u for u in units if u[3] <= i / steps <= u[4]]
        outs = []
        for b in range(len(x)):
            out = den(torch.cat([x[b:b + 1]] * 2), torch.cat([sigma[b:b + 1]] * 2), cond=torch.cat([uc, c]),
                      active=active)
            u, co = out.chunk(2)
            outs.append(u + (co - u) * cfg)
        return torch.cat(outs)

    noise = torch.stack([torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(seed + i)) for i in range(batch)])
    return K.sampling.sample_euler(model, noise * sigmas[0], sigmas, disable=True)


@pytest.mark.parametrize("units", [[("a", 2, 0.8, 0.0, 1.0)], [("a", 2, 0.6, 0.0, 0.5), ("plus", 3, 1.1, 0.25, 1.0)]],
                         ids=["base", "base+plus-spans"])
def test_txt2img_equals_reference(world, units):
    units = [(name, smooth_image(seed), scale, start, end) for name, seed, scale, start, end in units]
    specs = [IPAdapterSpec(world["paths"][name], image, scale, start, end) for name, image, scale, start, end in units]
    got = world["pipe"].generator.run(world["pipe"].params(prompt=PROMPT, steps=4, cfg_scale=5.0, sampler="euler",
                                                           seed=7, batch_size=2, width=64, height=64,
                                                           ip_adapters=specs)).latents
    ref = reference_latents(world, units)
    plain = reference_latents(world, [])
    assert (ref - plain).abs().max() / plain.abs().max() > 0.02
    err = ((got - ref).abs().max() / ref.abs().max()).item()
    print(f"whole run {[u[0] for u in units]}: max relative diff {err:.2e}")
    assert err <= 2e-4


def _run(world, *specs, **kw):
    settings = dict(steps=3, cfg_scale=5.0, seed=7, width=64, height=64, watermark=False) | kw
    return world["pipe"].txt2img(PROMPT, ip_adapters=list(specs), **settings)


def test_runs(world):
    image = smooth_image(2)
    plain = _run(world)
    steered = _run(world, IPAdapterSpec(world["paths"]["a"], image, 0.8))
    assert (steered.latents - plain.latents).abs().max() > 1e-3
    assert torch.equal(_run(world, IPAdapterSpec(world["paths"]["a"], image, 0.0)).latents, plain.latents)
    for start, end in ((0.0, 0.0), (0.5, 0.5), (1.0, 1.0)):
        same = _run(world, IPAdapterSpec(world["paths"]["a"], image, 0.8, start, end))
        assert torch.equal(same.latents, plain.latents), (start, end)
    late = _run(world, IPAdapterSpec(world["paths"]["a"], image, 0.8, 0.5, 1.0)).latents
    assert (late - plain.latents).abs().max() > 1e-4 and (late - steered.latents).abs().max() > 1e-4
    two = _run(world, IPAdapterSpec(world["paths"]["a"], image, 0.8),
               IPAdapterSpec(world["paths"]["plus"], smooth_image(3), 0.5, 0.0, 0.6))
    assert (two.latents - steered.latents).abs().max() > 1e-4
    assert 'ControlNet 0: "Module: ip-adapter_clip_sd15, Model: ip-a, Weight: 0.8' in two.items[0].infotext
    assert 'ControlNet 1: "Module: ip-adapter_clip_sd15, Model: ip-plus, Weight: 0.5, Guidance Start: 0, ' \
           'Guidance End: 0.6"' in two.items[0].infotext
    # the hooks are gone after the run, and after a failed one
    assert torch.equal(_run(world).latents, plain.latents)

    def fail(progress):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        _run(world, IPAdapterSpec(world["paths"]["a"], image, 0.8), callback=fail)
    layers = cross_attention_layers(world["pipe"].model.unet)
    assert not any(a.to_q._forward_hooks or a.to_out[0]._forward_pre_hooks for a in layers)
    assert torch.equal(_run(world).latents, plain.latents)


@pytest.mark.parametrize("mode", ["by_stage", "low_memory"])
def test_streamed_weights(world, mode):
    """By-stage and low-memory loading (the UNet read from the file as it runs) steer the same way."""
    spec = IPAdapterSpec(world["paths"]["a"], smooth_image(2), 0.8, 0.0, 0.7)
    pipe = load(world["model"], dtype="fp32", device="cpu", **{mode: True})
    settings = dict(steps=2, cfg_scale=5.0, seed=7, width=64, height=64, watermark=False)
    got = pipe.txt2img(PROMPT, ip_adapters=[spec], **settings).latents
    expected = world["pipe"].txt2img(PROMPT, ip_adapters=[spec], **settings).latents
    assert (got - expected).abs().max() <= 1e-5


def test_half_precision(world):
    """bf16 weights (the adapter, the encoder and the UNet in bf16): the same steering, to bf16's precision."""
    spec = IPAdapterSpec(world["paths"]["plus"], smooth_image(2), 0.8)
    settings = dict(steps=2, cfg_scale=5.0, seed=7, width=64, height=64, watermark=False)
    pipe = load(world["model"], dtype="bf16", device="cpu")
    pipe.model.unet.dtype_override = torch.bfloat16
    got, plain = (pipe.txt2img(PROMPT, ip_adapters=s, **settings).latents for s in ([spec], []))
    expected = world["pipe"].txt2img(PROMPT, ip_adapters=[spec], **settings).latents
    change = (expected - world["pipe"].txt2img(PROMPT, **settings).latents).abs().max()
    assert torch.isfinite(got).all() and (got - plain).abs().max() > change / 4
    assert (got - expected).abs().max() < change / 4


def test_each_file_is_loaded_once(world, monkeypatch):
    calls = []
    for name in ("load_ip_adapter", "load_image_encoder"):
        real = getattr(image_prompt_module, name)

        def counting(path, *args, _real=real, **kwargs):
            calls.append(path)
            return _real(path, *args, **kwargs)

        monkeypatch.setattr(image_prompt_module, name, counting)
    world["pipe"].generator.image_prompts = image_prompt_module.ImagePrompts()
    spec = IPAdapterSpec(world["paths"]["a"], smooth_image(2), image_encoder=world["encoder_dir"])
    for _ in range(2):
        _run(world, spec, steps=2)
    assert len(calls) == 2   # one adapter, one encoder


def test_with_a_controlnet_and_hires(world):
    from diffusers import ControlNetModel

    from sfumato.api import ControlSpec
    from sfumato.checkpoint.convert_controlnet import controlnet_config_from_diffusers, diffusers_controlnet_to_ldm

    blocks = {k: TINY_UNET[k] for k in ("block_out_channels", "layers_per_block", "down_block_types",
                                        "cross_attention_dim", "attention_head_dim")}
    cn = materialize(lambda: ControlNetModel(**blocks), 35)
    path = world["root"] / "control.safetensors"
    ldm = diffusers_controlnet_to_ldm(cn.state_dict(), controlnet_config_from_diffusers(cn.config))
    save_file({"control_model." + k: v.contiguous() for k, v in ldm.items()}, path)
    control = [ControlSpec(path, smooth_image(4, 64))]
    ip = IPAdapterSpec(world["paths"]["a"], smooth_image(2), 0.7)
    both = _run(world, ip, control=control, steps=2, hires_scale=1.5, hires_steps=1)
    only_cn = _run(world, control=control, steps=2, hires_scale=1.5, hires_steps=1)
    assert (both.latents - only_cn.latents).abs().max() > 1e-4
    assert 'ControlNet 1: "Module: ip-adapter_clip_sd15' in both.items[0].infotext


# -- (c) mismatches -------------------------------------------------------------------------------------


@pytest.mark.parametrize("file, field, message", [
    ("wide.safetensors", "ip_adapters[0].model", "width 64"),
    ("short.safetensors", "ip_adapters[0].model", "steers 3 cross-attention layers, this model has 4"),
    ("clip16.safetensors", "ip_adapters[0].image_encoder", "image embeds of width 24"),
    ("nan.safetensors", "ip_adapters[0].model", "NaN"),
])
def test_mismatched_adapters(world, file, field, message):
    spec = IPAdapterSpec(world["bad"] / file, smooth_image(2), image_encoder=world["encoder_dir"])
    with pytest.raises(ParamError) as e:
        _run(world, spec)
    assert e.value.field == field and message in e.value.message


def test_missing_or_wrong_encoder(world, tmp_path):
    image = smooth_image(2)
    with pytest.raises(ParamError) as e:   # no encoder given and none beside the adapter
        _run(world, IPAdapterSpec(world["bad"] / "wide.safetensors", image))
    assert e.value.field == "ip_adapters[0].image_encoder" and "image_encoder" in e.value.message
    with pytest.raises(ParamError) as e:
        _run(world, IPAdapterSpec(world["paths"]["a"], image), IPAdapterSpec(world["paths"]["a"], image,
                                                                              image_encoder=tmp_path / "none"))
    assert e.value.field == "ip_adapters[1].image_encoder"
    with pytest.raises(ParamError) as e:   # a folder without weights
        _run(world, IPAdapterSpec(world["paths"]["a"], image, image_encoder=tmp_path))
    assert e.value.field == "ip_adapters[0].image_encoder"
    for kw, field in ((dict(scale=3.0), "scale"), (dict(start=0.6, end=0.5), "start"), (dict(end=1.5), "end")):
        with pytest.raises(ParamError) as e:
            _run(world, IPAdapterSpec(world["paths"]["a"], image, **kw))
        assert e.value.field == f"ip_adapters[0].{field}"
    with pytest.raises(ParamError) as e:
        _run(world, IPAdapterSpec(world["paths"]["a"], "not an image"))
    assert e.value.field == "ip_adapters[0].image"
    with pytest.raises(CheckpointError):
        load_ip_adapter(world["model"])   # a checkpoint, not an adapter


def test_crafted_files_are_refused(world, tmp_path):
    plus = plus_state(world["inner"], 3)
    crafted = [
        plus | {"image_proj.layers.x.0.norm1.weight": torch.ones(128)},                     # a non-numeric layer
        {k: v for k, v in plus.items() if k != "image_proj.layers.0.0.to_q.weight"},       # a missing key
        base_state(world["inner"], 1) | {"ip_adapter.3.to_v_ip.weight": torch.ones(5, 32)},  # k and v disagree
        base_state(world["inner"], 1) | {"ip_adapter.1.to_k_ip.weight": torch.ones(32, 0)},  # zero width
        {k: v for k, v in base_state(world["inner"], 1).items() if "ip_adapter.3." not in k},  # a gap: 1, 5, 7
        base_state(world["inner"], 1) | {"ip_adapter.1.to_k_lora.down.weight": torch.ones(4, 32)},
    ]
    for i, sd in enumerate(crafted):
        save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / f"c{i}.safetensors")
        with pytest.raises(CheckpointError):
            load_ip_adapter(tmp_path / f"c{i}.safetensors")
    with pytest.raises(ParamError) as e:
        _run(world, IPAdapterSpec(tmp_path / "c0.safetensors", smooth_image(2), image_encoder=world["encoder_dir"]))
    assert e.value.field == "ip_adapters[0].model" and "known layout" in e.value.public


# -- (d) the command line -------------------------------------------------------------------------------


def cli(args, capsys):
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _txt2img(world, out, *extra):
    return ["txt2img", PROMPT, "--model", world["model"], "--steps", "2", "--seed", "5", "--width", "64",
            "--height", "64", "--dtype", "fp32", "--no-watermark", "-o", out, *extra]


def test_cli_runs_an_ip_adapter(world, tmp_path, capsys):
    smooth_image(2).save(tmp_path / "ip.png")
    args = _txt2img(world, tmp_path / "ip-out.png", "--ip-adapter", world["paths"]["a"], "--ip-image", tmp_path / "ip.png",
                    "--ip-scale", "0.6", "--ip-end", "0.9", "--ip-image-encoder", world["encoder_dir"])
    assert cli(args, capsys)[0] == 0
    text = Image.open(tmp_path / "ip-out.png").info["parameters"]
    assert 'ControlNet 0: "Module: ip-adapter_clip_sd15, Model: ip-a, Weight: 0.6, Guidance Start: 0, ' \
           'Guidance End: 0.9"' in text
    same = _run(world, IPAdapterSpec(world["paths"]["a"], Image.open(tmp_path / "ip.png"), 0.6, 0.0, 0.9),
                steps=2, seed=5, cfg_scale=7.0).images[0]
    assert np.array_equal(np.asarray(same), np.asarray(Image.open(tmp_path / "ip-out.png")))


@pytest.mark.parametrize("extra, message", [
    (["--ip-adapter", "A", "--ip-adapter", "A", "--ip-image", "I"], "--ip-image: given 1 times for 2 --ip-adapter"),
    (["--ip-adapter", "A", "--ip-image", "I", "--ip-scale", "1", "--ip-scale", "2"],
     "--ip-scale: given 2 times for 1 --ip-adapter"),
    (["--ip-scale", "0.5"], "--ip-scale: given without --ip-adapter"),
    (["--ip-adapter", "missing.safetensors", "--ip-image", "I"], "--ip-adapter: file not found"),
    (["--ip-adapter", "A", "--ip-image", "missing.png"], "--ip-image: cannot read image"),
    (["--ip-adapter", "A", "--ip-image", "I", "--ip-start", "2"], "ip_adapters[0].start"),
    (["--ip-adapter", "WIDE", "--ip-image", "I"], "ip_adapters[0].image_encoder"),
    (["--ip-adapter", "WIDE", "--ip-image", "I", "--ip-image-encoder", "E"], "ip_adapters[0].model"),
])
def test_cli_bad_ip_input(world, tmp_path, capsys, extra, message):
    smooth_image(2).save(tmp_path / "i.png")
    names = {"A": world["paths"]["a"], "I": tmp_path / "i.png", "WIDE": world["bad"] / "wide.safetensors",
             "E": world["encoder_dir"]}
    out = tmp_path / "out"
    out.mkdir()
    code, _, err = cli(_txt2img(world, out / "x.png", *[names.get(e, e) for e in extra]), capsys)
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not any(out.iterdir())
