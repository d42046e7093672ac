"""Text encoders against transformers and open_clip on the same random weights (fp32)."""

import pytest
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from open_clip.transformer import TextTransformer
from transformers import CLIPTextConfig, CLIPTextModelWithProjection
from transformers import CLIPTextModel as HFCLIPTextModel

from sfumato.checkpoint.convert_text import hf_text_sd, hf_to_openclip, openclip_to_hf
from sfumato.models.clip import (
    CLIP_L,
    OPENCLIP_BIGG,
    OPENCLIP_H,
    CLIPTextModel,
    OpenCLIPTextModel,
    TextEncoderConfig,
    build_text_encoder,
)

BOS, EOS = 49406, 49407


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape
    assert rel_err(ours, ref) <= 1e-4


@torch.no_grad()
def perturb(model: torch.nn.Module) -> None:
    """Random init leaves biases at 0 and norms at 1; make every parameter matter."""
    for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.02)


def tokens(lengths: list[int], pad: int, length: int = 77) -> torch.Tensor:
    """BOS, random ids, EOS, then padding; the EOS sits mid-sequence."""
    rows = []
    for n in lengths:
        body = torch.randint(0, BOS, (n,)).tolist()
        rows.append([BOS, *body, EOS] + [pad] * (length - n - 2))
    return torch.tensor(rows)


def hf_config(**kw) -> CLIPTextConfig:
    base = dict(
        hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=256,
        vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu",
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=EOS,
    )
    return CLIPTextConfig(**{**base, **kw})


def with_prefix(sd: dict) -> dict:
    """transformers 5 drops the ``text_model.`` prefix from a bare CLIPTextModel; files keep it."""
    return {k if k.startswith("text_model.") else "text_model." + k: v for k, v in sd.items()}


def check_against_hf(ref: HFCLIPTextModel, ours: CLIPTextModel, ids: torch.Tensor) -> None:
    with torch.no_grad():
        expected = ref(input_ids=ids, output_hidden_states=True)
        got = ours(ids)
    assert len(got.hidden_states) == len(expected.hidden_states) == ours.cfg.layers + 1
    for g, e in zip(got.hidden_states, expected.hidden_states):
        assert_close(g, e)
    assert_close(got.final, expected.last_hidden_state)
    assert_close(got.pooled, expected.pooler_output)


def test_hf_clip_matches_transformers():
    torch.manual_seed(0)
    ref = HFCLIPTextModel(hf_config()).eval()
    perturb(ref)
    cfg = TextEncoderConfig("hf", width=64, layers=3, heads=4)
    ours = build_text_encoder(cfg)
    assert isinstance(ours, CLIPTextModel)
    ours.load_state_dict(hf_text_sd(with_prefix(ref.state_dict())), strict=True)
    ids = tokens([5, 20], pad=EOS)
    check_against_hf(ref, ours, ids)

    full = ours(ids)
    for n in range(cfg.layers):
        cut = ours(ids, num_layers=n)
        assert len(cut.hidden_states) == n + 1 and cut.pooled is None
        for a, b in zip(cut.hidden_states, full.hidden_states):
            assert torch.equal(a, b)
        assert torch.equal(cut.final, ours.text_model.final_layer_norm(full.hidden_states[n]))
    with pytest.raises(ValueError, match="num_layers"):
        ours(ids, num_layers=cfg.layers + 1)


def test_hf_clip_has_no_persistent_position_ids():
    keys = CLIPTextModel(TextEncoderConfig("hf", width=64, layers=1, heads=4)).state_dict()
    assert not any("position_ids" in k for k in keys)
    assert hf_text_sd({"text_model.embeddings.position_ids": torch.arange(77), "a": torch.ones(1)}).keys() == {"a"}


def tiny_open_clip() -> CLIP:
    vision = CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=16)
    text = CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=4, layers=3)
    return CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text, quick_gelu=False).eval()


def test_openclip_matches_open_clip():
    torch.manual_seed(0)
    ref = tiny_open_clip()
    perturb(ref)
    cfg = TextEncoderConfig("openclip", width=64, layers=3, heads=4, activation="gelu", projection_dim=32, pad_id=0)
    ours = build_text_encoder(cfg)
    assert isinstance(ours, OpenCLIPTextModel)
    text_sd = {k: v for k, v in ref.state_dict().items() if not k.startswith("visual.")}
    ours.load_state_dict(text_sd, strict=True)

    ids = tokens([5, 20], pad=0)
    captured: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda m, i, o: captured.append(o)) for b in ref.transformer.resblocks]
    hooks.append(ref.ln_final.register_forward_hook(lambda m, i, o: captured.append(o)))
    with torch.no_grad():
        pooled = ref.encode_text(ids)
        embedded = ref.token_embedding(ids) + ref.positional_embedding
        got = ours(ids)
    for h in hooks:
        h.remove()
    for g, e in zip(got.hidden_states, [embedded, *captured[:-1]], strict=True):
        assert_close(g, e)
    assert_close(got.final, captured[-1])
    assert_close(got.pooled, pooled)

    cut = ours(ids, num_layers=2)
    assert cut.pooled is None and len(cut.hidden_states) == 3
    assert_close(cut.hidden_states[-1], captured[1])
    assert_close(cut.final, ours.ln_final(captured[1]))


def test_hf_with_projection_converts_to_openclip():
    torch.manual_seed(0)
    ref = CLIPTextModelWithProjection(hf_config(hidden_act="gelu", projection_dim=32)).eval()
    perturb(ref)
    sd = ref.state_dict()
    converted = hf_to_openclip(sd)
    ours = OpenCLIPTextModel(
        TextEncoderConfig("openclip", width=64, layers=3, heads=4, activation="gelu", projection_dim=32, pad_id=0)
    )
    ours.load_state_dict(converted, strict=True)

    ids = tokens([7, 30], pad=0)
    with torch.no_grad():
        expected = ref(input_ids=ids, output_hidden_states=True)
        got = ours(ids)
    for g, e in zip(got.hidden_states, expected.hidden_states, strict=True):
        assert_close(g, e)
    assert_close(got.final, expected.last_hidden_state)
    assert_close(got.pooled, expected.text_embeds)

    back = openclip_to_hf(converted)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_conversion_keeps_layer_count_and_rejects_unknown_keys():
    sd = with_prefix(HFCLIPTextModel(hf_config(num_hidden_layers=2)).state_dict())
    converted = hf_to_openclip(sd)
    assert "text_projection" not in converted
    assert {k.split(".")[2] for k in converted if k.startswith("transformer.")} == {"0", "1"}
    assert converted["logit_scale"].item() == pytest.approx(2.6592600)
    with pytest.raises(KeyError, match="surprise"):
        hf_to_openclip({**sd, "surprise": torch.zeros(1)})
    with pytest.raises(KeyError, match="k_proj"):
        hf_to_openclip({k: v for k, v in sd.items() if "layers.1.self_attn.k_proj.bias" not in k})
    with pytest.raises(KeyError, match="attn_mask"):
        openclip_to_hf({**converted, "attn_mask": torch.zeros(77, 77)})


@pytest.mark.slow
def test_clip_l_full_size_matches_transformers():
    torch.manual_seed(0)
    ref = HFCLIPTextModel(hf_config(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                    intermediate_size=3072)).eval()
    perturb(ref)
    ours = build_text_encoder(CLIP_L)
    ours.load_state_dict(hf_text_sd(with_prefix(ref.state_dict())), strict=True)
    check_against_hf(ref, ours, tokens([8, 40], pad=EOS))


def shapes(sd: dict) -> dict:
    return {k: tuple(v.shape) for k, v in sd.items()}


@pytest.mark.slow
@pytest.mark.parametrize(
    "cfg, millions",
    [(CLIP_L, 123), (OPENCLIP_H, 354), (OPENCLIP_BIGG, 695)],
    ids=["clip-l", "openclip-h", "openclip-bigg"],
)
def test_full_size_shapes_match_reference(cfg: TextEncoderConfig, millions: int):
    with torch.device("meta"):
        ours = build_text_encoder(cfg)
        if cfg.layout == "hf":
            ref = HFCLIPTextModel(hf_config(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                            intermediate_size=3072))
            expected = hf_text_sd(with_prefix(ref.state_dict()))
        else:
            ref = TextTransformer(width=cfg.width, heads=cfg.heads, layers=cfg.layers, output_dim=cfg.projection_dim)
            expected = {**ref.state_dict(), "logit_scale": torch.empty(())}
    assert shapes(ours.state_dict()) == shapes(expected)
    assert round(sum(p.numel() for p in ours.parameters()) / 1e6) == millions
