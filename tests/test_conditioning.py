"""Emphasis, long prompts and per-step conditioning. The reference is A1111's method written out here
on transformers' CLIP models and open_clip's tokenizer (no sfumato code on the reference path),
run on the same random weights as sfumato's encoders."""

from __future__ import annotations

from dataclasses import replace
from functools import cache

import pytest
import torch
from conftest import TINY_SPEC
from open_clip.tokenizer import SimpleTokenizer
from reference import randomize_
from transformers import CLIPTextConfig, CLIPTextModelWithProjection
from transformers import CLIPTextModel as HFCLIPTextModel

from sfumato.checkpoint.convert_text import hf_text_sd, hf_to_openclip
from sfumato.checkpoint.specs import TextSlot
from sfumato.models.clip import TextEncoderConfig, build_text_encoder
from sfumato.text.conditioner import Cond, Conditioner, SizeConditioning, build_schedule, match_lengths
from sfumato.text.tokenizer import get_tokenizer

BOS, EOS, COMMA = 49406, 49407, 267
WIDTH, LAYERS, HEADS, PROJ = 32, 3, 2, 16
SIZE = SizeConditioning(original=(64, 64), target=(64, 64))

# --- models ---------------------------------------------------------------------------------------


def hf_model(cls, seed: int, **kw):
    cfg = CLIPTextConfig(
        hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=4 * WIDTH,
        vocab_size=49408, max_position_embeddings=77, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=EOS, **kw,
    )
    return randomize_(cls(cfg), seed).eval()


HF_CFG = TextEncoderConfig("hf", WIDTH, LAYERS, HEADS)
OC_CFG = TextEncoderConfig("openclip", WIDTH, LAYERS, HEADS, activation="gelu", projection_dim=PROJ, pad_id=0)
SD1 = replace(TINY_SPEC, text=(TextSlot("cond_stage_model.transformer.", HF_CFG),))
SDXL = replace(
    TINY_SPEC,
    text=(
        TextSlot("conditioner.embedders.0.transformer.", HF_CFG, layer=-2, final_norm=False),
        TextSlot("conditioner.embedders.1.model.", OC_CFG, layer=-2, final_norm=False, pooled=True),
    ),
    conditioning="sdxl",
)


@pytest.fixture(scope="module")
def models():
    """(transformers CLIP-L-like, transformers bigG-like with projection) and sfumato copies of them."""
    clip = hf_model(HFCLIPTextModel, 0, hidden_act="quick_gelu")
    big = hf_model(CLIPTextModelWithProjection, 1, hidden_act="gelu", projection_dim=PROJ)
    ours_clip = build_text_encoder(HF_CFG)
    ours_clip.load_state_dict(hf_text_sd({"text_model." + k: v for k, v in clip.state_dict().items()}), strict=True)
    ours_big = build_text_encoder(OC_CFG)
    ours_big.load_state_dict(hf_to_openclip(big.state_dict()), strict=True)
    return clip, big, Conditioner(SD1, [ours_clip.eval()]), Conditioner(SDXL, [ours_clip.eval(), ours_big.eval()])


# --- A1111's method, written out ------------------------------------------------------------------


@cache
def simple_tokenizer() -> SimpleTokenizer:
    return SimpleTokenizer()


def a1111_chunks(runs: list[tuple[str, float]], pad: int) -> list[tuple[list[int], list[float]]]:
    """Token ids and multipliers per 77-token chunk: 75-token chunks, BREAK, comma backtrack 20,
    EOS padding whose tail after the first EOS becomes ``pad``."""
    tok = simple_tokenizer()
    out: list[tuple[list[int], list[float]]] = []
    ids: list[int] = []
    mults: list[float] = []
    last_comma = -1

    def next_chunk():
        nonlocal ids, mults, last_comma
        fill = 75 - len(ids)
        row = [BOS] + ids + [EOS] * fill + [EOS]
        first_eos = row.index(EOS)
        row = row[: first_eos + 1] + [pad] * (len(row) - first_eos - 1)
        out.append((row, [1.0] + mults + [1.0] * fill + [1.0]))
        ids, mults, last_comma = [], [], -1

    for text, weight in runs:
        if text == "BREAK" and weight == -1:
            next_chunk()
            continue
        for t in tok.encode(text):
            if t == COMMA:
                last_comma = len(ids)
            elif len(ids) == 75 and last_comma != -1 and len(ids) - last_comma <= 20:
                moved_ids, moved_mults = ids[last_comma + 1 :], mults[last_comma + 1 :]
                ids, mults = ids[: last_comma + 1], mults[: last_comma + 1]
                next_chunk()
                ids, mults = moved_ids, moved_mults
            if len(ids) == 75:
                next_chunk()
            ids.append(t)
            mults.append(weight)
    if ids or not out:
        next_chunk()
    return out


@torch.no_grad()
def a1111_encode(model, chunks, layer: int, final_norm: bool):
    """hstack of per-chunk ``z * multipliers * (mean before / mean after)``; pooled from chunk 0."""
    zs, pooled = [], None
    for i, (ids, mults) in enumerate(chunks):
        out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
        z = out.hidden_states[layer]
        if final_norm:
            z = getattr(model, "text_model", model).final_layer_norm(z)
        original_mean = z.mean()
        z = z * torch.tensor(mults)[None, :, None]
        z = z * (original_mean / z.mean())
        zs.append(z)
        if i == 0:
            pooled = getattr(out, "text_embeds", None)
    return torch.cat(zs, dim=1), pooled


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


# A long prompt: emphasis, a comma 15 tokens before the end of chunk 1, a weighted span across the
# chunk boundary, de-emphasis, BREAK and an unclosed bracket. Every filler word is one token.
FILL = "cat dog tree house river moon sun star bird fish".split()


def words(n: int, start: int = 0) -> str:
    return " ".join(FILL[(start + i) % len(FILL)] for i in range(n))


W56, W30, W10, W6 = words(56), words(30, 3), words(10, 5), words(6, 7)
LONG = f"a ((red)) fox, {W56}, ({W30}:1.3) [{W10}] BREAK (({W6})"
LONG_RUNS = [
    ("a ", 1.0), ("red", 1.21), (f" fox, {W56}, ", 1.0), (W30, 1.3), (" ", 1.0), (W10, 1 / 1.1),
    ("", 1.0), ("BREAK", -1), ("", 1.0), (W6, 1.21),
]


def test_long_prompt_fixture_exercises_backtrack_and_break():
    from sfumato.text.prompt import parse_attention

    assert all(len(simple_tokenizer().encode(w)) == 1 for w in FILL)
    got = parse_attention(LONG)
    assert [t for t, _ in got] == [t for t, _ in LONG_RUNS]
    assert [w for _, w in got] == pytest.approx([w for _, w in LONG_RUNS])
    chunks = a1111_chunks(LONG_RUNS, pad=EOS)
    content = [ids.index(EOS) - 1 for ids, _ in chunks]
    assert content == [61, 40, 6]            # cut after the comma; BREAK after the bracketed words
    assert chunks[0][0][61] == COMMA


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_weighted_long_prompt_matches_a1111_sd1(models, clip_skip):
    clip, _, sd1, _ = models
    ref, _ = a1111_encode(clip, a1111_chunks(LONG_RUNS, pad=EOS), layer=-clip_skip, final_norm=True)
    got = sd1([LONG], clip_skip=clip_skip)
    assert got.context.shape == (1, 3 * 77, WIDTH) and got.y is None
    assert rel_err(got.context, ref) <= 1e-4


def test_weighted_long_prompt_matches_a1111_sdxl(models):
    clip, big, _, sdxl = models
    ref_l, _ = a1111_encode(clip, a1111_chunks(LONG_RUNS, pad=EOS), layer=-2, final_norm=False)
    ref_g, pooled = a1111_encode(big, a1111_chunks(LONG_RUNS, pad=0), layer=-2, final_norm=False)
    got = sdxl([LONG], size=SIZE)
    assert got.context.shape == (1, 3 * 77, 2 * WIDTH)
    assert rel_err(got.context, torch.cat([ref_l, ref_g], dim=-1)) <= 1e-4
    assert got.y.shape == (1, PROJ + 6 * 256)
    assert rel_err(got.y[:, :PROJ], pooled) <= 1e-4
    # the pooled vector ignores emphasis: same as the unweighted text of the first chunk
    plain_first = f"a red fox, {W56},"
    assert rel_err(got.y[:, :PROJ], sdxl([plain_first], size=SIZE).y[:, :PROJ]) <= 1e-5


@torch.no_grad()
def before(conditioner: Conditioner, prompts: list[str], clip_skip: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What ``Conditioner.__call__`` computed before emphasis existed: one truncated 77-token chunk."""
    contexts, pooled = [], None
    for slot, encoder in zip(conditioner.spec.text, conditioner.encoders):
        depth = slot.config.layers + 1 + slot.layer - (clip_skip - 1)
        out = encoder(get_tokenizer(slot.config.pad_id)(prompts), num_layers=None if slot.pooled else depth)
        hidden = out.hidden_states[depth]
        if slot.final_norm:
            hidden = encoder.text_model.final_layer_norm(hidden)
        contexts.append(hidden)
        pooled = out.pooled if slot.pooled else pooled
    return torch.cat(contexts, dim=-1), pooled


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_plain_prompts_unchanged(models, clip_skip):
    _, _, sd1, sdxl = models
    prompts = ["a photo of a cat", "", words(70)]
    context, _ = before(sd1, prompts, clip_skip)
    assert torch.equal(sd1(prompts, clip_skip=clip_skip).context, context)
    context, pooled = before(sdxl, prompts, clip_skip)
    got = sdxl(prompts, clip_skip=clip_skip, size=SIZE)
    assert torch.equal(got.context, context)
    assert torch.equal(got.y[:, :PROJ], pooled)


def test_batch_pads_short_prompts_with_empty_chunks(models):
    _, _, sd1, _ = models
    got = sd1([LONG, "a cat"]).context
    assert got.shape == (2, 3 * 77, WIDTH)
    empty = sd1([""]).context
    assert rel_err(got[1:, :77], sd1(["a cat"]).context) <= 1e-6
    for k in (1, 2):
        assert rel_err(got[1:, 77 * k : 77 * (k + 1)], empty) <= 1e-6
    assert rel_err(got[:1], sd1([LONG]).context) <= 1e-6


def test_schedule_switches_text_at_the_right_steps(models):
    _, _, sd1, _ = models
    schedule = build_schedule(sd1, ["a [cat:dog:3] [x|y]"], 6)
    # A1111 counts steps from 1: step s (0-based) uses the text for step s + 1
    expected = ["a cat x", "a cat y", "a cat x", "a dog y", "a dog x", "a dog y"]
    for step, text in enumerate(expected):
        cond, weights = schedule.at(step)
        assert rel_err(cond.context, sd1([text]).context) <= 1e-6
        assert weights.tolist() == [[1.0]]
    with pytest.raises(ValueError, match="step 6"):
        schedule.at(6)


def test_and_weights_land_in_the_weight_matrix(models):
    _, _, sd1, _ = models
    schedule = build_schedule(sd1, ["a AND b:0.5 AND c:0", "[d:e:2]"], 4)
    assert schedule.weights.tolist() == [[1.0, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
    assert schedule.owner.tolist() == [0, 0, 0, 1]
    for step, last in [(0, "d"), (1, "d"), (2, "e"), (3, "e")]:
        cond, _ = schedule.at(step)
        assert rel_err(cond.context, sd1(["a", "b", "c", last]).context) <= 1e-6


def test_negative_keeps_and_as_text(models):
    _, _, sd1, _ = models
    schedule = build_schedule(sd1, ["x AND y:2", "[p:q:2]"], 4, negative=True)
    assert schedule.weights.tolist() == [[1.0, 0.0], [0.0, 1.0]]
    assert schedule.owner.tolist() == [0, 1]
    cond, _ = schedule.at(3)
    assert rel_err(cond.context, sd1(["x AND y:2", "q"]).context) <= 1e-6


def test_sdxl_empty_negative_is_zeros(models):
    _, _, _, sdxl = models
    neg = build_schedule(sdxl, ["", "[:3]", "bad"], 4, size=SIZE, negative=True).at(0)[0]
    assert neg.context[:2].abs().sum() == 0 and neg.y[:2, :PROJ].abs().sum() == 0
    assert neg.context[2].abs().sum() > 0
    assert torch.equal(neg.y[:2, PROJ:], sdxl(["bad"], size=SIZE).y[:, PROJ:].expand(2, -1))
    pos = build_schedule(sdxl, [""], 4, size=SIZE).at(0)[0]
    assert pos.context.abs().sum() > 0
    assert torch.equal(sdxl([""], size=SIZE, zero_if_empty=True).context, torch.zeros(1, 77, 2 * WIDTH))


def test_match_lengths_pads_with_the_empty_prompt(models):
    _, _, sd1, _ = models
    cond = build_schedule(sd1, [f"{words(80)}"], 4)
    uncond = build_schedule(sd1, ["blurry"], 4, negative=True)
    assert (cond.tokens, uncond.tokens) == (154, 77)
    match_lengths(cond, uncond)
    assert cond.tokens == uncond.tokens == 154
    got = uncond.at(0)[0].context
    assert got.shape == (1, 154, WIDTH)
    assert rel_err(got[:, :77], sd1(["blurry"]).context) <= 1e-6
    assert rel_err(got[:, 77:], sd1([""]).context) <= 1e-6
    with pytest.raises(ValueError, match="shorten"):
        cond.pad_to(77)
    with pytest.raises(ValueError, match="pad"):
        Cond(got).pad_to(160, Cond(got[:, :77]))


def test_clip_skip_deeper_than_encoder_is_rejected(models):
    _, _, sd1, _ = models
    with pytest.raises(ValueError, match="clip_skip"):
        sd1(["a"], clip_skip=LAYERS + 1)
    with pytest.raises(ValueError, match="clip_skip"):
        sd1(["a"], clip_skip=0)
