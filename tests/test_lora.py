"""LoRA-family files merged into tiny random SD1 / SDXL models.

Oracles: per-key references built here from the test's own name tables and formulas; diffusers'
kohya loader and PEFT's LoRA / LoHa / LoKr layers on the diffusers UNet and transformers CLIP
models holding the same random weights; files written by diffusers' and PEFT's own savers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin
from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
from safetensors.torch import load_file
from peft import LoHaConfig, LoKrConfig, LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from transformers import CLIPTextConfig
from transformers import CLIPTextModel as HFCLIPTextModel

from reference import hf_text_state, randomize_
from sfumato.adapters import apply_loras, find_lora, parse_lora_prompt, remove_loras
from sfumato.checkpoint.convert_text import hf_text_sd, hf_to_openclip
from sfumato.checkpoint.convert_unet import diffusers_unet_to_ldm
from sfumato.checkpoint.io import save_file
from sfumato.checkpoint.load import LoadedModel
from sfumato.checkpoint.specs import ModelSpec, TextSlot
from sfumato.errors import SfumatoError
from sfumato.models.clip import TextEncoderConfig, build_text_encoder
from sfumato.models.unet import UNetConfig, UNetModel, timestep_embedding
from sfumato.models.vae import VAEConfig

TINY_SD1 = dict(
    block_out_channels=(32, 64), layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2, cross_attention_dim=32,
    norm_num_groups=8,
)
TINY_SD1_CFG = UNetConfig(
    model_channels=32, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(1, 0), num_heads=2,
    context_dim=32, norm_groups=8,
)
TIME_DIM, TEXT_DIM = 8, 16
TINY_SDXL = dict(
    block_out_channels=(32, 64), layers_per_block=2, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(4, 8), transformer_layers_per_block=(1, 2),
    cross_attention_dim=64, use_linear_projection=True, norm_num_groups=8, addition_embed_type="text_time",
    addition_time_embed_dim=TIME_DIM, projection_class_embeddings_input_dim=TEXT_DIM + 6 * TIME_DIM,
)
TINY_SDXL_CFG = UNetConfig(
    model_channels=32, channel_mult=(1, 2), transformer_depth=(0, 2), transformer_depth_middle=2,
    num_head_channels=8, context_dim=64, use_linear_in_transformer=True, adm_in_channels=TEXT_DIM + 6 * TIME_DIM,
    norm_groups=8,
)
HF_TEXT = dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
               max_position_embeddings=77, bos_token_id=998, eos_token_id=999, pad_token_id=999)
TE_HF = TextEncoderConfig("hf", 32, 2, 2, vocab_size=1000, mlp_ratio=2.0)
TE_OPENCLIP = TextEncoderConfig("openclip", 32, 2, 2, vocab_size=1000, mlp_ratio=2.0, activation="gelu",
                                pad_id=0)

# The test's own name table: (kohya name, diffusers name, component, weight, q/k/v third of in_proj).
SD1_NAMES = [
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
     "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
     "unet", "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight", None),
    ("lora_unet_down_blocks_0_attentions_0_proj_in", "unet.down_blocks.0.attentions.0.proj_in",
     "unet", "input_blocks.1.1.proj_in.weight", None),
    ("lora_unet_down_blocks_0_resnets_0_conv1", "unet.down_blocks.0.resnets.0.conv1",
     "unet", "input_blocks.1.0.in_layers.2.weight", None),
    ("lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_ff_net_0_proj",
     "unet.up_blocks.1.attentions.1.transformer_blocks.0.ff.net.0.proj",
     "unet", "output_blocks.3.1.transformer_blocks.0.ff.net.0.proj.weight", None),
    ("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k",
     "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k",
     "unet", "middle_block.1.transformer_blocks.0.attn2.to_k.weight", None),
    ("lora_unet_up_blocks_0_upsamplers_0_conv", "unet.up_blocks.0.upsamplers.0.conv",
     "unet", "output_blocks.1.1.conv.weight", None),
    ("lora_unet_down_blocks_1_resnets_0_time_emb_proj", "unet.down_blocks.1.resnets.0.time_emb_proj",
     "unet", "input_blocks.3.0.emb_layers.1.weight", None),
    ("lora_unet_conv_in", "unet.conv_in", "unet", "input_blocks.0.0.weight", None),
    # kohya names may also be the LDM module path
    ("lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_v",
     "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v",
     "unet", "input_blocks.1.1.transformer_blocks.0.attn2.to_v.weight", None),
    ("lora_te_text_model_encoder_layers_0_self_attn_q_proj",
     "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
     "te1", "text_model.encoder.layers.0.self_attn.q_proj.weight", None),
    ("lora_te_text_model_encoder_layers_1_mlp_fc2", "text_encoder.text_model.encoder.layers.1.mlp.fc2",
     "te1", "text_model.encoder.layers.1.mlp.fc2.weight", None),
]
SDXL_NAMES = [
    ("lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q",
     "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q",
     "unet", "input_blocks.4.1.transformer_blocks.1.attn1.to_q.weight", None),
    ("lora_unet_input_blocks_4_1_proj_in", "unet.down_blocks.1.attentions.0.proj_in",
     "unet", "input_blocks.4.1.proj_in.weight", None),
    ("lora_unet_input_blocks_1_0_in_layers_2", "unet.down_blocks.0.resnets.0.conv1",
     "unet", "input_blocks.1.0.in_layers.2.weight", None),
    ("lora_unet_output_blocks_2_2_conv", "unet.up_blocks.0.upsamplers.0.conv",
     "unet", "output_blocks.2.2.conv.weight", None),
    ("lora_unet_middle_block_1_transformer_blocks_0_ff_net_2",
     "unet.mid_block.attentions.0.transformer_blocks.0.ff.net.2",
     "unet", "middle_block.1.transformer_blocks.0.ff.net.2.weight", None),
    ("lora_unet_label_emb_0_0", "unet.add_embedding.linear_1", "unet", "label_emb.0.0.weight", None),
    ("lora_unet_output_blocks_3_0_skip_connection", "unet.up_blocks.1.resnets.0.conv_shortcut",
     "unet", "output_blocks.3.0.skip_connection.weight", None),
    # kohya names may also be diffusers module paths
    ("lora_unet_down_blocks_1_attentions_1_transformer_blocks_0_attn2_to_out_0",
     "unet.down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_out.0",
     "unet", "input_blocks.5.1.transformer_blocks.0.attn2.to_out.0.weight", None),
    ("lora_te1_text_model_encoder_layers_0_self_attn_k_proj",
     "text_encoder.text_model.encoder.layers.0.self_attn.k_proj",
     "te1", "text_model.encoder.layers.0.self_attn.k_proj.weight", None),
    # OpenCLIP tower, transformers names: q/k/v are thirds of the fused in_proj_weight
    ("lora_te2_text_model_encoder_layers_1_self_attn_q_proj",
     "text_encoder_2.text_model.encoder.layers.1.self_attn.q_proj",
     "te2", "transformer.resblocks.1.attn.in_proj_weight", slice(0, 32)),
    ("lora_te2_text_model_encoder_layers_1_self_attn_v_proj",
     "text_encoder_2.text_model.encoder.layers.1.self_attn.v_proj",
     "te2", "transformer.resblocks.1.attn.in_proj_weight", slice(64, 96)),
    ("lora_te2_text_model_encoder_layers_0_self_attn_out_proj",
     "text_encoder_2.text_model.encoder.layers.0.self_attn.out_proj",
     "te2", "transformer.resblocks.0.attn.out_proj.weight", None),
    ("lora_te2_text_model_encoder_layers_0_mlp_fc1", "text_encoder_2.text_model.encoder.layers.0.mlp.fc1",
     "te2", "transformer.resblocks.0.mlp.c_fc.weight", None),
]
NAMES = {"sd1": SD1_NAMES, "sdxl": SDXL_NAMES}
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "time_emb_proj", "conv", "conv_in", "conv_out", "linear_1", "linear_2"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


@dataclass
class Pair:
    """Our model and the reference modules holding the same weights."""

    model: LoadedModel
    unet: UNet2DConditionModel
    text: list[HFCLIPTextModel]


def build(family: str) -> Pair:
    kwargs, cfg = (TINY_SD1, TINY_SD1_CFG) if family == "sd1" else (TINY_SDXL, TINY_SDXL_CFG)
    ref_unet = randomize_(UNet2DConditionModel(sample_size=16, **kwargs), seed=1).eval()
    unet = UNetModel(cfg).eval().requires_grad_(False)
    unet.load_state_dict(diffusers_unet_to_ldm(ref_unet.state_dict(), cfg))
    refs = [randomize_(HFCLIPTextModel(CLIPTextConfig(**HF_TEXT)), seed=2).eval()]
    encoders = [build_text_encoder(TE_HF)]
    encoders[0].load_state_dict(hf_text_sd(hf_text_state(refs[0])))
    if family == "sd1":
        slots = (TextSlot("cond_stage_model.transformer.", TE_HF),)
    else:
        refs.append(randomize_(HFCLIPTextModel(CLIPTextConfig(**HF_TEXT, hidden_act="gelu")), seed=3).eval())
        encoders.append(build_text_encoder(TE_OPENCLIP))
        encoders[1].load_state_dict(hf_to_openclip(hf_text_state(refs[1])))
        slots = (TextSlot("conditioner.embedders.0.transformer.", TE_HF),
                 TextSlot("conditioner.embedders.1.model.", TE_OPENCLIP, pooled=True))
    spec = ModelSpec(family, cfg, VAEConfig(), slots, conditioning="sd" if family == "sd1" else "sdxl")
    for e in encoders:
        e.eval().requires_grad_(False)
    model = LoadedModel(spec, unet, None, encoders, torch.ones(1000), "test", Path(family))
    return Pair(model, ref_unet, refs)


def modules(model: LoadedModel) -> dict[str, torch.nn.Module]:
    return {"unet": model.unet, **{f"te{i + 1}": e for i, e in enumerate(model.text_encoders)}}


def weights(model: LoadedModel) -> dict[tuple[str, str], torch.Tensor]:
    return {(c, n): p.detach().clone() for c, m in modules(model).items() for n, p in m.named_parameters()}


# -- factors and their reference updates ΔW (scale α/rank included), written out independently ---


def rnd(g: torch.Generator, *shape: int, std: float = 0.1) -> torch.Tensor:
    return torch.randn(shape, generator=g) * std


def cp(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """Σ_ij t[i,j,k,l]·wa[i,out]·wb[j,in] as matrix products per kernel position."""
    return (wa.T @ t.permute(2, 3, 0, 1) @ wb).permute(2, 3, 0, 1)


def kron(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Kronecker product of a 2-D `a` with a 2-D or 4-D `b` (kernel dims kept), by broadcasting."""
    if b.ndim == 2:
        return (a[:, None, :, None] * b[None, :, None, :]).reshape(a.shape[0] * b.shape[0], -1)
    out = a[:, None, :, None, None, None] * b[None, :, None, :, :, :]
    return out.reshape(a.shape[0] * b.shape[0], a.shape[1] * b.shape[1], *b.shape[2:])


def factors(fmt: str, shape: torch.Size, text: bool, g: torch.Generator) -> tuple[dict, torch.Tensor]:
    """File entries (by key suffix) and the reference ΔW for a weight of `shape`."""
    out, inn, *k = shape
    r, alpha = 4, 3.0

    def big(*s: int) -> torch.Tensor:  # LoHa / LoKr multiply small factors: std 0.3 keeps ΔW visible
        return rnd(g, *s, std=0.3)

    if fmt in ("lora", "peft", "diffusers_old") or (fmt == "locon_cp" and k != [3, 3]):
        down, up = rnd(g, r, inn, *k), rnd(g, out, r, *[1] * len(k))
        delta = (up.reshape(out, r) @ down.reshape(r, -1)).reshape(shape)
        if fmt == "diffusers_old":  # no alpha in the file: α = rank
            return {"down": down, "up": up}, delta
        return {"down": down, "up": up, "alpha": torch.tensor(alpha)}, delta * alpha / r
    if fmt == "locon_cp":  # 3x3 conv as the chain 1x1 down -> 3x3 mid (r -> r) -> 1x1 up
        down, mid, up = rnd(g, r, inn, 1, 1), rnd(g, r, r, 3, 3), rnd(g, out, r, 1, 1)
        delta = cp(mid, up.reshape(out, r).T, down.reshape(r, inn))
        return {"lora_down.weight": down, "lora_mid.weight": mid, "lora_up.weight": up,
                "alpha": torch.tensor(alpha)}, delta * alpha / r
    if fmt == "loha":
        if k == [3, 3]:  # Tucker form
            f = {"hada_t1": big(r, r, 3, 3), "hada_w1_a": big(r, out), "hada_w1_b": big(r, inn),
                 "hada_t2": big(r, r, 3, 3), "hada_w2_a": big(r, out), "hada_w2_b": big(r, inn)}
            delta = cp(f["hada_t1"], f["hada_w1_a"], f["hada_w1_b"]) * cp(f["hada_t2"], f["hada_w2_a"], f["hada_w2_b"])
        else:
            n = inn * math.prod(k)
            f = {"hada_w1_a": big(out, r), "hada_w1_b": big(r, n), "hada_w2_a": big(out, r), "hada_w2_b": big(r, n)}
            delta = ((f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"])).reshape(shape)
        return f | {"alpha": torch.tensor(alpha)}, delta * alpha / r
    assert fmt == "lokr"
    a, b = 2, 2
    c, d = out // a, inn // b
    if text:  # two full factors: no rank, so scale 1 whatever alpha says
        f = {"lokr_w1": big(a, b), "lokr_w2": big(c, d)}
        return f | {"alpha": torch.tensor(alpha)}, kron(f["lokr_w1"], f["lokr_w2"])
    if not k:  # full w1, factored w2
        f = {"lokr_w1": big(a, b), "lokr_w2_a": big(c, r), "lokr_w2_b": big(r, d)}
        w1, w2 = f["lokr_w1"], f["lokr_w2_a"] @ f["lokr_w2_b"]
    elif k == [3, 3]:  # full w1, Tucker w2
        f = {"lokr_w1": big(a, b), "lokr_t2": big(r, r, 3, 3), "lokr_w2_a": big(r, c), "lokr_w2_b": big(r, d)}
        w1, w2 = f["lokr_w1"], cp(f["lokr_t2"], f["lokr_w2_a"], f["lokr_w2_b"])
    else:  # factored w1, full 4-D w2
        f = {"lokr_w1_a": big(a, r), "lokr_w1_b": big(r, b), "lokr_w2": big(c, d, *k)}
        w1, w2 = f["lokr_w1_a"] @ f["lokr_w1_b"], f["lokr_w2"]
    return f | {"alpha": torch.tensor(alpha)}, kron(w1, w2).reshape(shape) * alpha / r


def file_keys(fmt: str, kohya: str, diffusers: str, f: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Name the factors as each format does."""
    if fmt == "peft":
        return {f"{diffusers}.lora_A.weight": f["down"], f"{diffusers}.lora_B.weight": f["up"],
                f"{diffusers}.alpha": f["alpha"]}
    if fmt == "diffusers_old":
        leaf = diffusers.rsplit(".", 2 if diffusers.endswith("to_out.0") else 1)
        attn = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out",
                "q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "out_proj": "to_out"}.get(leaf[1])
        if attn:  # attention processors: attn1.processor.to_q_lora.down.weight, self_attn.to_q_lora.down.weight
            base = leaf[0] + (".processor" if diffusers.startswith("unet.") else "") + f".{attn}_lora"
            return {f"{base}.down.weight": f["down"], f"{base}.up.weight": f["up"]}
        layer = "lora_linear_layer" if ".mlp." in diffusers else "lora"
        return {f"{diffusers}.{layer}.down.weight": f["down"], f"{diffusers}.{layer}.up.weight": f["up"]}
    if "down" in f:
        f = {"lora_down.weight": f["down"], "lora_up.weight": f["up"], "alpha": f["alpha"]}
    return {f"{kohya}.{s}": v for s, v in f.items()}


def make_lora(pair: Pair, fmt: str, seed: int = 0, skip=lambda kohya: False):
    """A LoRA file's tensors and the reference ΔW per (component, weight, rows)."""
    g = torch.Generator().manual_seed(seed)
    sd, deltas = {}, []
    mods = modules(pair.model)
    for kohya, diffusers, comp, param, rows in NAMES[pair.model.family]:
        if skip(kohya):
            continue
        w = mods[comp].get_parameter(param)
        shape = w[rows].shape if rows else w.shape
        f, delta = factors(fmt, shape, comp != "unet", g)
        sd.update(file_keys(fmt, kohya, diffusers, f))
        deltas.append((comp, param, rows, delta))
    return sd, deltas


def expected(before, deltas, te_w: float, unet_w: float):
    out = {k: v.clone() for k, v in before.items()}
    for comp, param, rows, delta in deltas:
        w = out[comp, param]
        w[rows if rows else slice(None)] += delta * (unet_w if comp == "unet" else te_w)
    return out


def assert_weights(model: LoadedModel, want: dict, changed: set) -> None:
    for key, got in weights(model).items():
        if key in changed:
            torch.testing.assert_close(got, want[key], rtol=1e-5, atol=1e-6, msg=f"{key}")
        else:
            assert torch.equal(got, want[key]), key


# -- 1. every format against the per-key reference ------------------------------------------------


@pytest.mark.parametrize("fmt", ["lora", "locon_cp", "loha", "lokr", "peft", "diffusers_old"])
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_formats_match_reference(family: str, fmt: str, tmp_path: Path) -> None:
    pair = build(family)
    sd, deltas = make_lora(pair, fmt)
    if fmt == "loha":  # the pickle form goes through the allow-list loader
        path = tmp_path / "x.pt"
        torch.save(sd, path)
    else:
        path = tmp_path / "x.safetensors"
        save_file(sd, path)
    before = weights(pair.model)
    report = apply_loras(pair.model, [(path, (0.7, 1.3))])
    assert report.unmatched == {}
    assert len(report.files[0].matched) == len(deltas)
    want = expected(before, deltas, 0.7, 1.3)
    changed = {(c, p) for c, p, _, _ in deltas}
    for key in changed:
        assert (want[key] - before[key]).abs().max() > 1e-3, key  # the update is visible
    assert_weights(pair.model, want, changed)


# -- 2. diffusers and PEFT as oracles on the UNet / text encoder outputs -------------------------


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@torch.no_grad()
def unet_outputs(pair: Pair, reference: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(ours, diffusers') UNet outputs on one fixed input."""
    g = torch.Generator().manual_seed(5)
    cfg = pair.model.unet.cfg
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 5, cfg.context_dim, generator=g)
    t = torch.tensor([300.0])
    if cfg.adm_in_channels is None:
        return pair.model.unet(x, t, ctx), (pair.unet(x, t, ctx).sample if reference else None)
    text, time_ids = torch.randn(1, TEXT_DIM, generator=g), torch.tensor([[64.0, 48, 8, 4, 64, 64]])
    y = torch.cat([text, timestep_embedding(time_ids.flatten(), TIME_DIM).reshape(1, -1)], dim=-1)
    ours = pair.model.unet(x, t, ctx, y)
    if not reference:
        return ours, None
    return ours, pair.unet(x, t, ctx, added_cond_kwargs={"text_embeds": text, "time_ids": time_ids}).sample


@torch.no_grad()
def text_outputs(pair: Pair) -> list[tuple[torch.Tensor, torch.Tensor]]:
    tokens = torch.randint(1, 1000, (2, 12), generator=torch.Generator().manual_seed(6))
    pairs = zip(pair.model.text_encoders, pair.text)
    return [(ours(tokens).final, ref(tokens).last_hidden_state) for ours, ref in pairs]


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_kohya_file_matches_diffusers_loader(family: str) -> None:
    pair = build(family)
    # diffusers reads the UNet names kohya writes for each family (diffusers' for SD1, LDM's for SDXL)
    # and drops the other kind when a file mixes them, so the oracle file keeps one kind
    other = ("input_blocks", "middle_block", "output_blocks") if family == "sd1" else ("_blocks_", "mid_block")
    sd, _ = make_lora(pair, "lora", skip=lambda kohya: not kohya.startswith("lora_unet_") or any(
        s in kohya for s in other))
    base, _ = unet_outputs(pair, reference=False)
    mixin = StableDiffusionLoraLoaderMixin if family == "sd1" else StableDiffusionXLLoraLoaderMixin
    converted, alphas = mixin.lora_state_dict(dict(sd), unet_config=pair.unet.config)
    pair.unet.load_lora_adapter(converted, prefix="unet", network_alphas=alphas)
    apply_loras(pair.model, [(sd, 1.0)])
    ours, ref = unet_outputs(pair)
    assert rel_err(ours, base) > 1e-2  # the LoRA changes the output
    assert rel_err(ours, ref) <= 1e-4


def peft_unet(pair: Pair, config) -> dict[str, torch.Tensor]:
    inject_adapter_in_model(config, pair.unet)
    return get_peft_model_state_dict(pair.unet)


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_lycoris_matches_peft(kind: str) -> None:
    """PEFT's LoHa / LoKr layers (LyCORIS' maths, Tucker convs included) as the oracle; the factors are
    written under kohya names with an alpha, as LyCORIS saves them."""
    pair = build("sd1")
    base, _ = unet_outputs(pair, reference=False)
    targets = ["to_q", "to_v", "proj_in", "conv1", "conv", "time_emb_proj", "ff.net.2"]
    if kind == "loha":
        config = LoHaConfig(r=4, alpha=6, target_modules=targets, use_effective_conv2d=True, init_weights=False)
    else:
        config = LoKrConfig(r=2, alpha=3, target_modules=targets, use_effective_conv2d=True, init_weights=False)
    sd = peft_unet(pair, config)
    kohya = {}
    for key, value in sd.items():
        module, factor = key.rsplit(".", 1)
        kohya[f"lora_unet_{module.replace('.', '_')}.{factor}"] = value
        kohya[f"lora_unet_{module.replace('.', '_')}.alpha"] = torch.tensor(float(config.alpha))
    if kind == "lokr":  # PEFT scales by alpha/r even where LyCORIS (two full factors, no rank) would not
        assert all(f"{m}.lokr_w1_b" in kohya or f"{m}.lokr_w2_b" in kohya for m in {k.split(".")[0] for k in kohya})
    report = apply_loras(pair.model, [(kohya, 1.0)])
    assert report.unmatched == {}
    ours, ref = unet_outputs(pair)
    assert rel_err(ours, base) > 1e-2
    assert rel_err(ours, ref) <= 1e-4


# -- 3. files written by diffusers' / PEFT's own savers ----------------------------------------


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_diffusers_saved_files(family: str, tmp_path: Path) -> None:
    pair = build(family)
    base = unet_outputs(pair, reference=False)[0], [o for o, _ in text_outputs(pair)]
    unet_cfg = LoraConfig(r=4, lora_alpha=6, target_modules=UNET_TARGETS, init_lora_weights=False,
                          alpha_pattern={"to_q": 2})
    text_cfg = LoraConfig(r=2, lora_alpha=3, target_modules=TEXT_TARGETS, init_lora_weights=False)
    layers = {"unet_lora_layers": peft_unet(pair, unet_cfg), "unet_lora_adapter_metadata": unet_cfg.to_dict()}
    for i, te in enumerate(pair.text):
        name = "text_encoder" if i == 0 else "text_encoder_2"
        inject_adapter_in_model(text_cfg, te)
        layers[f"{name}_lora_layers"] = get_peft_model_state_dict(te)
        layers[f"{name}_lora_adapter_metadata"] = text_cfg.to_dict()
    pipeline = StableDiffusionPipeline if family == "sd1" else StableDiffusionXLPipeline
    pipeline.save_lora_weights(tmp_path, **layers)
    path = tmp_path / "pytorch_lora_weights.safetensors"

    report = apply_loras(pair.model, [(path, 1.0)])
    assert report.unmatched == {}
    assert len(report.files[0].matched) == sum(k.endswith(".lora_A.weight") for k in load_file(path))
    ours, ref = unet_outputs(pair)
    assert rel_err(ours, base[0]) > 1e-2
    assert rel_err(ours, ref) <= 1e-4
    for (ours, ref), before in zip(text_outputs(pair), base[1]):
        assert rel_err(ours, before) > 1e-2
        assert rel_err(ours, ref) <= 1e-4

    # the UNet LoRA converted to kohya's format by diffusers, which writes alpha = rank: a weight of
    # lora_alpha / r gives PEFT's scale back (to_q, with its own alpha, is left out of both sides)
    remove_loras(pair.model)
    prefixed = {f"unet.{k}": v for k, v in layers["unet_lora_layers"].items() if ".to_q." not in k}
    kohya = convert_state_dict_to_kohya(prefixed)
    assert kohya and all(k.startswith("lora_unet_") for k in kohya)
    report = apply_loras(pair.model, [(kohya, 6 / 4)])
    assert report.unmatched == {}
    for name, m in pair.unet.named_modules():
        if name.endswith(".to_q"):
            m.scaling["default"] = 0.0
    ours, ref = unet_outputs(pair)
    assert rel_err(ours, ref) <= 1e-4


def test_unmatched_keys_are_reported(tmp_path: Path) -> None:
    pair = build("sd1")
    sd, _ = make_lora(pair, "lora")
    bogus = {
        "lora_unet_no_such_block_to_q.lora_down.weight": torch.zeros(4, 32),
        "lora_unet_no_such_block_to_q.lora_up.weight": torch.zeros(32, 4),
        "lora_unet_down_blocks_0_attentions_0_proj_out.dora_scale": torch.zeros(1, 32),
        "lora_unet_down_blocks_0_attentions_0_proj_out.lora_down.weight": torch.zeros(4, 32, 1, 1),  # no up
        "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 32),  # SD1 has no te2
        "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(64, 4),
        "something_else": torch.zeros(1),
    }
    save_file(sd | bogus, tmp_path / "bogus.safetensors")
    report = apply_loras(pair.model, [(tmp_path / "bogus.safetensors", 1.0)])
    assert report.unmatched == {"bogus": sorted(bogus)}
    assert len(report.files[0].matched) == len(SD1_NAMES)

    remove_loras(pair.model)
    before = weights(pair.model)
    with pytest.raises(SfumatoError, match="no key matches"):
        apply_loras(pair.model, [(bogus, 1.0)])
    # a LoRA made for another shape fails before any weight changes, even after a good file
    wrong = {"lora_unet_conv_in.lora_down.weight": torch.zeros(4, 9, 3, 3),
             "lora_unet_conv_in.lora_up.weight": torch.zeros(32, 4, 1, 1)}
    with pytest.raises(SfumatoError, match=r"lora_unet_conv_in.*\(32, 4, 3, 3\)"):
        apply_loras(pair.model, [(sd, 1.0), (wrong, 1.0)])
    with pytest.raises(SfumatoError, match="not found"):
        apply_loras(pair.model, [(tmp_path / "missing.safetensors", 1.0)])
    assert_weights(pair.model, before, set())


# -- 4. several files, removal, prompt syntax, file lookup ----------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sum_of_two_and_exact_removal(dtype: torch.dtype) -> None:
    pair = build("sdxl")
    for m in modules(pair.model).values():
        m.to(dtype)
    before = weights(pair.model)
    sd_a, deltas_a = make_lora(pair, "lora", seed=1)
    sd_b, deltas_b = make_lora(pair, "loha", seed=2)
    report = apply_loras(pair.model, [(sd_a, 0.8), (sd_b, -0.5)])
    assert [len(f.matched) for f in report.files] == [len(SDXL_NAMES)] * 2
    want = expected({k: v.float() for k, v in before.items()}, deltas_a, 0.8, 0.8)
    want = expected(want, deltas_b, -0.5, -0.5)
    changed = {(c, p) for c, p, _, _ in deltas_a + deltas_b}
    for key, got in weights(pair.model).items():
        assert got.dtype == dtype
        if key in changed:  # ΔW in fp32, rounded into the weight's dtype
            tol = 1e-5 if dtype == torch.float32 else 1e-3
            torch.testing.assert_close(got.float(), want[key], rtol=tol, atol=tol * 0.1, msg=f"{key}")
    assert remove_loras(pair.model) == len(changed)
    assert_weights(pair.model, before, set())
    assert remove_loras(pair.model) == 0


@pytest.mark.parametrize(
    "prompt, clean, loras",
    [
        ("a cat <lora:foo:0.8>", "a cat ", [("foo", 0.8)]),
        ("<lora:foo>, a dog", ", a dog", [("foo", 1.0)]),
        ("<lora:foo:0.5:1.2> x", " x", [("foo", (0.5, 1.2))]),
        ("<lora:foo:1:1>", "", [("foo", 1.0)]),
        ("<lora:foo:te=0.3:unet=0.7>", "", [("foo", (0.3, 0.7))]),
        ("<lora:foo:unet=0.25>", "", [("foo", (1.0, 0.25))]),
        ("<lyco:bar:0.4> a <lora:baz v2:-1>", " a ", [("bar", 0.4), ("baz v2", -1.0)]),
        ("a (cat:1.2) <hypernet:h:1>", "a (cat:1.2) <hypernet:h:1>", []),
    ],
)
def test_parse_lora_prompt(prompt: str, clean: str, loras: list) -> None:
    assert parse_lora_prompt(prompt) == (clean, loras)


@pytest.mark.parametrize("prompt", ["<lora:foo:abc>", "<lora::1>", "<lora:foo:1:2:3>", "<lora:foo:dyn=4>",
                                    "<lora:foo:inf>"])
def test_parse_lora_prompt_errors(prompt: str) -> None:
    with pytest.raises(SfumatoError, match="prompt tag"):
        parse_lora_prompt(prompt)


def test_find_lora(tmp_path: Path) -> None:
    folder = tmp_path / "loras"
    (folder / "sub").mkdir(parents=True)
    for name in ("a.safetensors", "sub/b.pt", "c.ckpt", "c.safetensors", "notes.txt"):
        (folder / name).write_bytes(b"x")
    (tmp_path / "outside.safetensors").write_bytes(b"x")
    assert find_lora("a", folder) == folder / "a.safetensors"
    assert find_lora("a.safetensors", folder) == folder / "a.safetensors"
    assert find_lora("b", folder) == folder / "sub" / "b.pt"
    assert find_lora("sub/b", folder) == folder / "sub" / "b.pt"
    for name, message in [("../outside", "plain name"), (str(tmp_path / "outside"), "plain name"),
                          ("..\\outside", "plain name"), ("sub/../a", "plain name"), ("notes", "not found"),
                          ("notes.txt", "not found"), ("c", "ambiguous"), ("", "plain name")]:
        with pytest.raises(SfumatoError, match=message):
            find_lora(name, folder)
