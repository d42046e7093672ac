"""Textual inversion embeddings on tiny random CLIP models.

Oracles: transformers' CLIP text models run from token embeddings in which the test itself puts the
vectors (open_clip's tokenizer for the ids, A1111's emphasis written out); diffusers'
``load_textual_inversion`` and ``encode_prompt`` for the files we write; every file format is
written here the way its tool writes it (torch.save, safetensors, PNG text chunks, A1111's pixel
encoding written out from its description)."""

from __future__ import annotations

import base64
import json
import zlib
from dataclasses import replace
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import TINY_SPEC
from open_clip.tokenizer import SimpleTokenizer
from PIL import Image, ImageDraw, PngImagePlugin
from reference import randomize_, write_hf_clip_tokenizer
from transformers import CLIPTextConfig, CLIPTextModelWithProjection
from transformers import CLIPTextModel as HFCLIPTextModel

from sfumato.adapters.embeddings import (
    Embedding, EmbeddingError, EmbeddingSet, load_embeddings, read_embedding, save_embedding,
)
from sfumato.checkpoint.convert_text import hf_text_sd, hf_to_openclip
from sfumato.checkpoint.specs import TextSlot
from sfumato.models.clip import TextEncoderConfig, build_text_encoder
from sfumato.text.conditioner import Conditioner, SizeConditioning, build_schedule
from sfumato.text.prompt import chunk_prompt
from sfumato.text.tokenizer import get_tokenizer

BOS, EOS, COMMA = 49406, 49407, 267
WIDTH, BIG, LAYERS, HEADS, PROJ = 32, 48, 3, 2, 16
HF_CFG = TextEncoderConfig("hf", WIDTH, LAYERS, HEADS)
OC_CFG = TextEncoderConfig("openclip", BIG, LAYERS, HEADS, activation="gelu", projection_dim=PROJ, pad_id=0)
SD1 = replace(TINY_SPEC, text=(TextSlot("cond_stage_model.transformer.", HF_CFG),))
SDXL = replace(
    TINY_SPEC,
    text=(
        TextSlot("conditioner.embedders.0.transformer.", HF_CFG, layer=-2, final_norm=False),
        TextSlot("conditioner.embedders.1.model.", OC_CFG, layer=-2, final_norm=False, pooled=True),
    ),
    conditioning="sdxl",
)
SIZE = SizeConditioning(original=(64, 64), target=(64, 64))


def hf_model(cls, width: int, seed: int, **kw):
    cfg = CLIPTextConfig(
        hidden_size=width, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=4 * width,
        vocab_size=49408, max_position_embeddings=77, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=EOS, **kw,
    )
    return randomize_(cls(cfg), seed).eval()


@pytest.fixture(scope="module")
def models():
    """transformers CLIP-L-like and bigG-like models, and sfumato encoders holding the same weights."""
    clip = hf_model(HFCLIPTextModel, WIDTH, 0, hidden_act="quick_gelu")
    big = hf_model(CLIPTextModelWithProjection, BIG, 1, hidden_act="gelu", projection_dim=PROJ)
    ours_clip = build_text_encoder(HF_CFG)
    ours_clip.load_state_dict(hf_text_sd({"text_model." + k: v for k, v in clip.state_dict().items()}), strict=True)
    ours_big = build_text_encoder(OC_CFG)
    ours_big.load_state_dict(hf_to_openclip(big.state_dict()), strict=True)
    return clip, big, ours_clip.eval(), ours_big.eval()


def vectors(n: int, width: int, seed: int) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed)) * 0.5


# --- the reference: transformers run from token embeddings holding the vectors --------------------


@cache
def simple_tokenizer() -> SimpleTokenizer:
    return SimpleTokenizer()


def ref_chunk(parts: list[tuple[str | torch.Tensor, float]], pad: int):
    """(ids, multipliers, {position: vectors}) of one 77-token chunk; a part is text or vectors."""
    ids, mults, subs = [BOS], [1.0], {}
    for part, weight in parts:
        if isinstance(part, torch.Tensor):
            subs[len(ids)] = part
            new = [0] * part.shape[0]
        else:
            new = simple_tokenizer().encode(part)
        ids += new
        mults += [weight] * len(new)
    fill = 77 - len(ids)
    return ids + [EOS] + [pad] * (fill - 1), mults + [1.0] * fill, subs


@torch.no_grad()
def ref_encode(model, chunks, *, layer: int, final_norm: bool):
    """A1111's hstack of emphasised chunks, each run from ``inputs_embeds`` with the vectors in place;
    the projected pooled output of the first chunk for a model with a projection."""
    with_projection = isinstance(model, CLIPTextModelWithProjection)
    tm = model.text_model if with_projection else model
    zs, pooled = [], None
    for i, (ids, mults, subs) in enumerate(chunks):
        embeds = tm.embeddings.token_embedding(torch.tensor([ids])).clone()
        for pos, vec in subs.items():
            embeds[0, pos : pos + vec.shape[0]] = vec
        states = [tm.embeddings(inputs_embeds=embeds)]
        for block in tm.encoder.layers:
            states.append(block(states[-1], None, is_causal=True))
        z = tm.final_layer_norm(states[layer]) if final_norm else states[layer]
        mean = z.mean()
        z = z * torch.tensor(mults)[None, :, None]
        zs.append(z * (mean / z.mean()))
        if i == 0 and with_projection:
            pooled = model.text_projection(tm.final_layer_norm(states[-1])[:, ids.index(EOS)])
    return torch.cat(zs, dim=1), pooled


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def test_reference_path_equals_transformers_forward(models):
    clip = models[0]
    ids, mults, _ = ref_chunk([("a photo of a cat", 1.0)], EOS)
    ref, _ = ref_encode(clip, [(ids, mults, {})], layer=-1, final_norm=True)
    torch.testing.assert_close(ref, clip(input_ids=torch.tensor([ids])).last_hidden_state)


# --- the acceptance test: SD1 conditioning with an embedding ----------------------------------------

NAME = "sfumato-test"
VEC = vectors(2, WIDTH, 7)


def write_a1111_pt(folder: Path, stem: str, vec: torch.Tensor, internal_name: str = "internal") -> Path:
    path = folder / f"{stem}.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vec.clone().requires_grad_()},
                "name": internal_name, "step": 1000, "sd_checkpoint": "abcdef12", "sd_checkpoint_name": "x"}, path)
    return path


@pytest.fixture(scope="module")
def sd1(models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("emb")
    write_a1111_pt(folder, NAME, VEC)
    return Conditioner(SD1, [models[2]], load_embeddings(folder))


@pytest.mark.parametrize("prompt, parts", [
    (f"a photo of {NAME}", [("a photo of", 1.0), (VEC, 1.0)]),
    (f"a (photo of {NAME}:1.3), cat", [("a", 1.0), ("photo of", 1.3), (VEC, 1.3), (", cat", 1.0)]),
    (f"{NAME},[{NAME}]", [(VEC, 1.0), (",", 1.0), (VEC, 1 / 1.1)]),
])
def test_conditioning_equals_reference_with_vectors_substituted(models, sd1, prompt, parts):
    ref, _ = ref_encode(models[0], [ref_chunk(parts, EOS)], layer=-1, final_norm=True)
    got = sd1([prompt]).context
    assert got.shape == (1, 77, WIDTH)
    assert rel_err(got, ref) <= 1e-4
    without, _ = ref_encode(models[0], [ref_chunk([(prompt, 1.0)], EOS)], layer=-1, final_norm=True)
    assert rel_err(got, without) > 1e-2       # the name's own tokens would give something else


def test_negative_prompts_use_embeddings(models, sd1):
    ref, _ = ref_encode(models[0], [ref_chunk([("ugly", 1.0), (VEC, 1.0)], EOS)], layer=-1, final_norm=True)
    uncond = build_schedule(sd1, [f"ugly {NAME}"], 4, negative=True).at(0)[0]
    assert rel_err(uncond.context, ref) <= 1e-4


@pytest.mark.parametrize("cats, chunks", [(73, 1), (74, 2)])
def test_embedding_never_straddles_a_chunk(models, sd1, cats, chunks):
    prompt = "cat " * cats + NAME
    if chunks == 1:
        ref_chunks = [ref_chunk([("cat " * cats, 1.0), (VEC, 1.0)], EOS)]
    else:   # 74 + 2 > 75: the embedding starts the next chunk
        ref_chunks = [ref_chunk([("cat " * cats, 1.0)], EOS), ref_chunk([(VEC, 1.0)], EOS)]
    ref, _ = ref_encode(models[0], ref_chunks, layer=-1, final_norm=True)
    got = sd1([prompt]).context
    assert got.shape == (1, 77 * chunks, WIDTH)
    assert rel_err(got, ref) <= 1e-4


def test_without_names_chunks_equal_chunk_prompt(sd1):
    encode = get_tokenizer().encode
    text = "a ((red)) fox, " + "cat dog, " * 40 + "[tree] BREAK (moon:1.2)"
    ours = sd1.embeddings.chunk(text, encode, COMMA)
    assert [(c.tokens, c.weights) for c in ours] == [(c.tokens, c.weights) for c in chunk_prompt(text, encode, COMMA)]
    assert len(ours) == 3 and all(not c.fixes for c in ours)
    assert sd1.embeddings.names_in(f"x, [{NAME}], y {NAME}") == [NAME]


def test_sdxl_dual_embedding(models, tmp_path):
    clip, big, ours_clip, ours_big = models
    vec_l, vec_g = vectors(2, WIDTH, 3), vectors(2, BIG, 4)
    safetensors.torch.save_file({"clip_l": vec_l, "clip_g": vec_g}, tmp_path / "dual.safetensors")
    safetensors.torch.save_file({"emb_params": vectors(1, WIDTH, 5)}, tmp_path / "single.safetensors")
    sdxl = Conditioner(SDXL, [ours_clip, ours_big], load_embeddings(tmp_path))
    assert list(sdxl.embeddings.embeddings) == ["dual"]
    assert "2 text encoders" in sdxl.embeddings.skipped["single"]

    def parts(vec):
        return [("a", 1.0), (vec, 1.2), ("on a hill", 1.0)]

    ref_l, _ = ref_encode(clip, [ref_chunk(parts(vec_l), EOS)], layer=-2, final_norm=False)
    ref_g, pooled = ref_encode(big, [ref_chunk(parts(vec_g), 0)], layer=-2, final_norm=False)
    got = sdxl(["a (dual:1.2) on a hill"], size=SIZE)
    assert got.context.shape == (1, 77, WIDTH + BIG)
    assert rel_err(got.context, torch.cat([ref_l, ref_g], dim=-1)) <= 1e-4
    assert rel_err(got.y[:, :PROJ], pooled) <= 1e-4


def test_width_mismatch_is_skipped_with_reason(models, tmp_path):
    safetensors.torch.save_file({"emb_params": vectors(2, 768, 1)}, tmp_path / "wide.safetensors")
    xl = {"clip_l": vectors(1, WIDTH, 1), "clip_g": vectors(1, BIG, 2)}
    safetensors.torch.save_file(xl, tmp_path / "xl.safetensors")
    cond = Conditioner(SD1, [models[2]], load_embeddings(tmp_path))
    assert len(cond.embeddings) == 0
    assert "768" in cond.embeddings.skipped["wide"] and "32" in cond.embeddings.skipped["wide"]
    assert "clip_l/clip_g" in cond.embeddings.skipped["xl"]
    plain = Conditioner(SD1, [models[2]])
    torch.testing.assert_close(cond(["a wide xl"]).context, plain(["a wide xl"]).context, rtol=0, atol=0)


# --- file formats --------------------------------------------------------------------------------


def tensor_json(obj):
    if isinstance(obj, torch.Tensor):
        return {"TORCHTENSOR": obj.detach().numpy().tolist()}
    raise TypeError(type(obj))


def a1111_data(vec: torch.Tensor, name: str) -> dict:
    return {"string_to_token": {"*": 265}, "string_to_param": {"*": vec}, "name": name, "step": 500,
            "sd_checkpoint": "abcdef12", "sd_checkpoint_name": "model"}


def lcg_values(n: int) -> np.ndarray:
    out, x = [], 0
    for _ in range(n):
        x = (1664525 * x + 1013904223) % 2**32
        out.append(x % 255)
    return np.array(out).astype(np.uint8)


def pixel_embedding_image(data: dict, picture: Image.Image) -> Image.Image:
    """A1111's image embedding, from its description: zlib(JSON) split into low and high nibbles, each
    laid out [h, w, 3], decorated with dots in the high nibble, XORed with an LCG stream in the low
    nibble, and pasted left and right of the picture with a black column between."""
    packed = np.frombuffer(zlib.compress(json.dumps(data, default=tensor_json).encode(), level=9), np.uint8)
    h = picture.height
    size = len(packed) + (h - len(packed) % h)
    size += h * 3 - size % (h * 3)
    first = np.abs(next(iter(data["string_to_param"].values())).numpy()[0][:1024])
    shades = (first / first.max() * 255).astype(np.uint8)
    blocks = []
    for nibbles, sequence in ((packed & 0x0F, shades), (packed >> 4, shades[::-1])):
        block = np.resize(nibbles, size).reshape(h, -1, 3)
        dots = Image.new("RGB", (block.shape[1], h))
        draw, i = ImageDraw.Draw(dots), 0
        for x in range(-6, block.shape[1], 8):
            for row, y in enumerate(range(-6, h, 8)):
                shift = 4 if row % 2 == 0 else 0
                s = int(sequence[i % len(sequence)])
                i += 1
                draw.ellipse((x + shift, y, x + 6 + shift, y + 6), fill=(s, s, s))
        block = block ^ (np.asarray(dots) & 0xF0)
        blocks.append(block ^ (lcg_values(block.size).reshape(block.shape) & 0x0F))
    low, high = (Image.fromarray(b.astype(np.uint8), "RGB") for b in blocks)
    canvas = Image.new("RGB", (low.width + picture.width + high.width + 2, h))
    canvas.paste(low, (0, 0))
    canvas.paste(picture, (low.width + 1, 0))
    canvas.paste(high, (low.width + 1 + picture.width + 1, 0))
    return canvas


def write_png_text(folder: Path, vec: torch.Tensor) -> Path:
    info = PngImagePlugin.PngInfo()
    text = json.dumps(a1111_data(vec, "from-text"), default=tensor_json)
    info.add_text("sd-ti-embedding", base64.b64encode(text.encode()))
    path = folder / "some-file.png"
    Image.new("RGB", (32, 32), (200, 120, 40)).save(path, pnginfo=info)
    return path


def write_png_pixels(folder: Path, vec: torch.Tensor) -> Path:
    path = folder / "captioned.png"
    pixel_embedding_image(a1111_data(vec, "from-pixels"), Image.new("RGB", (64, 64), (128, 96, 200))).save(path)
    return path


V1, V2, V3 = vectors(1, WIDTH, 11), vectors(3, WIDTH, 12), vectors(2, BIG, 13)
FORMATS = {   # writer, file name → (expected name, expected vectors)
    "a1111-pt": (lambda d: write_a1111_pt(d, "from-stem", V2), "from-stem", {"*": V2}),
    "a1111-safetensors": (lambda d: safetensors.torch.save_file({"emb_params": V2}, d / "kohya.safetensors"),
                          "kohya", {"*": V2}),
    "diffusers-safetensors": (
        lambda d: safetensors.torch.save_file({"<cat-toy>": V1[0]}, d / "learned_embeds.safetensors"),
        "learned_embeds", {"*": V1},
    ),
    "diffusers-bin": (lambda d: torch.save({"<cat-toy>": V2}, d / "cat.bin"), "cat", {"*": V2}),
    "sdxl": (lambda d: safetensors.torch.save_file({"clip_g": V3, "clip_l": V2[:2]}, d / "xl.safetensors"),
             "xl", {"clip_l": V2[:2], "clip_g": V3}),
    "png-text": (lambda d: write_png_text(d, V2), "from-text", {"*": V2}),
    "png-pixels": (lambda d: write_png_pixels(d, V2), "from-pixels", {"*": V2}),
}


@pytest.mark.parametrize("fmt", FORMATS)
def test_file_formats(fmt, tmp_path):
    write, name, expected = FORMATS[fmt]
    write(tmp_path)
    found = load_embeddings(tmp_path)
    assert found.skipped == {}
    assert list(found.embeddings) == [name]
    emb = found.embeddings[name]
    assert emb.vectors.keys() == expected.keys()
    for key, vec in expected.items():
        assert emb.vectors[key].dtype == torch.float32
        torch.testing.assert_close(emb.vectors[key], vec, rtol=0, atol=0)


def test_plain_images_and_previews_are_ignored(tmp_path):
    Image.new("RGB", (16, 16), (10, 200, 30)).save(tmp_path / "photo.png")
    write_png_text(tmp_path, V2).rename(tmp_path / "x.preview.png")
    (tmp_path / "notes.txt").write_text("hello")
    assert len(load_embeddings(tmp_path)) == 0 and load_embeddings(tmp_path).skipped == {}


def test_an_empty_embedding_file_is_reported_not_ignored(tmp_path):
    """A zero-byte .pt is a broken download, not "no embedding": it is skipped with the reason, so a
    prompt that names it is told why instead of reading the name as plain words."""
    (tmp_path / "empty.pt").write_bytes(b"")
    found = load_embeddings(tmp_path)
    assert len(found) == 0 and "is empty" in found.skipped["empty"]


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            import os

            return os.system, (f"touch {marker}",)

    torch.save({"string_to_param": {"*": Payload()}}, tmp_path / "evil.pt")
    write_a1111_pt(tmp_path, "good", V2)
    found = load_embeddings(tmp_path)
    assert list(found.embeddings) == ["good"]
    assert "allow-list" in found.skipped["evil"] and "system" in found.skipped["evil"]
    assert not marker.exists()


def test_bad_files_are_skipped_with_reasons(tmp_path):
    safetensors.torch.save_file({"a": V2, "b": V2.clone()}, tmp_path / "two.safetensors")
    safetensors.torch.save_file({"clip_l": V2, "clip_g": V3[:1]}, tmp_path / "uneven.safetensors")
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint at all")
    safetensors.torch.save_file({"emb_params": V1}, tmp_path / "dup.safetensors")
    (tmp_path / "sub").mkdir()
    write_a1111_pt(tmp_path / "sub", "dup", V2)
    found = load_embeddings(tmp_path)
    assert list(found.embeddings) == ["dup"] and found.embeddings["dup"].path.name == "dup.safetensors"
    assert "same name" in found.skipped["dup"]
    assert "not a textual inversion embedding" in found.skipped["two"]
    assert "different numbers of vectors" in found.skipped["uneven"]
    assert "junk.bin" in found.skipped["junk"]
    with pytest.raises(EmbeddingError, match="directory not found"):
        load_embeddings(tmp_path / "missing")


# --- files we write ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTokenizer

    folder = tmp_path_factory.mktemp("tok")
    write_hf_clip_tokenizer(folder)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=WIDTH, attention_head_dim=2,
    )
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4)
    return lambda text_encoder: StableDiffusionPipeline(   # a fresh tokenizer: loading adds tokens to it
        vae=vae, text_encoder=text_encoder, unet=unet, scheduler=EulerDiscreteScheduler(steps_offset=1),
        tokenizer=CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>",
                                model_max_length=77),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


@pytest.mark.parametrize("fmt", ["a1111-safetensors", "diffusers"])
def test_written_files_load_in_diffusers(models, pipe, fmt, tmp_path):
    name = "sfumatotok"
    vec = vectors(2, WIDTH, 21)
    path = save_embedding(tmp_path / f"{name}.safetensors", name, vec, format=fmt)
    reference = pipe(hf_model(HFCLIPTextModel, WIDTH, 0, hidden_act="quick_gelu"))
    # diffusers names the tokens after the file's single key; kohya's "emb_params" needs the token given
    reference.load_textual_inversion(str(path), token=name if fmt == "a1111-safetensors" else None)
    ids = reference.tokenizer.convert_tokens_to_ids([name, f"{name}_1"])
    rows = reference.text_encoder.get_input_embeddings().weight[ids]
    ours = read_embedding(path)
    assert ours.name == name
    torch.testing.assert_close(rows, ours.vectors["*"], rtol=0, atol=0)
    torch.testing.assert_close(rows, vec)

    prompt = f"a photo of {name} on a hill"
    expected, _ = reference.encode_prompt(prompt, "cpu", 1, False)
    got = Conditioner(SD1, [models[2]], EmbeddingSet([ours]))([prompt]).context
    assert rel_err(got, expected) <= 1e-4


def test_save_embedding_sdxl_and_errors(tmp_path):
    path = save_embedding(tmp_path / "xl.safetensors", "xl", {"clip_l": V2[:2], "clip_g": V3})
    assert set(safetensors.torch.load_file(path)) == {"clip_l", "clip_g"}
    assert safetensors.safe_open(path, "pt").metadata() == {"name": "xl"}
    loaded = read_embedding(path)
    torch.testing.assert_close(loaded.vectors["clip_g"], V3, rtol=0, atol=0)
    with pytest.raises(EmbeddingError, match="diffusers files hold one text encoder"):
        save_embedding(tmp_path / "x.safetensors", "x", {"clip_l": V2, "clip_g": V3[:1].repeat(3, 1)},
                       format="diffusers")
    with pytest.raises(EmbeddingError, match="format"):
        save_embedding(tmp_path / "x.safetensors", "x", V2, format="pt")
    with pytest.raises(EmbeddingError, match="name"):
        save_embedding(tmp_path / "x.safetensors", " ", V2)
    with pytest.raises(EmbeddingError, match=r"\[2, 3, 4\]"):
        save_embedding(tmp_path / "x.safetensors", "x", torch.zeros(2, 3, 4))


def test_embedding_objects_check_slots():
    emb = Embedding("e", {"*": V2})
    assert emb.num_vectors == 3
    assert emb.for_slots(SD1.text)[0] is emb.vectors["*"]
    with pytest.raises(EmbeddingError, match="2 text encoders"):
        emb.for_slots(SDXL.text)
