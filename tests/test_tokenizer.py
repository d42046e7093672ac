"""CLIP BPE tokenizer parity: open_clip, OpenAI CLIP (clip-anytorch) and transformers are the oracles."""

from __future__ import annotations

import html
from importlib import resources

import pytest
import torch
from reference import write_hf_clip_tokenizer

from sfumato.text.tokenizer import BOS_ID, EOS_ID, MAX_LENGTH, VOCAB_SIZE, CLIPTokenizer, get_tokenizer

CORPUS = [
    "",
    "\n",
    "a photo of a cat",
    "A Photo Of A CAT",
    "Hello, world! How's it going?",
    "don't stop: it's what we're doing, they've I'm you'll he'd",
    "DON'T SHOUT, IT'S LOUD",
    "ends with apostrophe' and 'starts",
    "pi is 3.14 and a grand is 1,000 (or 1000.00), 2024-05-17 at 10:30pm",
    "x2 4k 8k uhd 1girl 16:9 #1 100%",
    "1234567890",
    "I have 3 cats & 2 dogs; price: $9.99 (50% off!)",
    "multiple   spaces\tand\ttabs\nand\nnew\r\nlines  ",
    "   leading and trailing whitespace   ",
    "tab\tonly",
    "\u00a0non\u00a0breaking\u2003em space\u200bzero width",
    "soft\u00adhyphen and control\x07char",
    "!!! ??? ... --- ___ *** ~~~ ^^^ ``` |||",
    "a_b-c/d\\e|f@g#h$i%j^k&l*m+n=o",
    "e-mail: someone@example.com, url: https://example.com/a?b=c&d=e",
    "(masterpiece:1.2), [bad], \\(escaped\\), ((best quality)), {{{x}}}",
    "<lora:add_detail:0.8> embedding:easynegative BREAK AND [cat:dog:0.5] [a|b]",
    "photorealistic, highly detailed, octane render, unreal engine 5, trending on artstation",
    "tom &amp; jerry &lt;3 &gt; &quot;hi&quot; &#39;x&#39; &amp;amp; &nbsp;",
    "café naïve résumé jalapeño Ångström façade",
    "ÀÉÎÕÜ ÇÑ",
    "e\u0301 decomposed accent",
    "STRASSE straße İstanbul ΣΊΣΥΦΟΣ",
    "Привет мир, Γειά σου κόσμε",
    "東京の夜景、美しい写真",
    "一只猫坐在窗台上",
    "고양이 사진",
    "مرحبا بالعالم",
    "नमस्ते दुनिया",
    "emoji 😀🐱🔥 cat",
    "family 👨‍👩‍👧‍👦 and 🏳️‍🌈 and 👍🏽",
    "flags 🇫🇷🇯🇵🇺🇸",
    "curly ‘quotes’ and “double” — dash – and … ellipsis",
    "mojibake cafÃ© and Ã¼ber",
    "fullwidth ＡＢＣ１２３ and ligature ﬁsh",
    "math ∑ ∞ ≈ ± × ÷ √ ° µ ² ³ ½",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "the quick brown fox jumps over the lazy dog " * 12,
    "a" * 300,
]
# open_clip renamed its specials to <start_of_text>/<end_of_text>, so it BPE-splits CLIP's special
# strings when they appear in text; OpenAI CLIP and transformers keep them whole, as we do.
SPECIALS_TEXT = "<|startoftext|> and <|endoftext|> as text"
# transformers' CLIPTokenizer normalises with NFC + lowercase instead of ftfy + html.unescape, so
# it differs from CLIP on HTML entities, curly quotes, mojibake, fullwidth forms, soft hyphens and
# some case mappings: compare it on the ASCII strings without entities only.
HF_CORPUS = [t for t in CORPUS + [SPECIALS_TEXT] if t.isascii() and html.unescape(t) == t]


@pytest.fixture(scope="module")
def open_clip_tok():
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


@pytest.fixture(scope="module")
def openai_clip_tok():
    simple_tokenizer = pytest.importorskip("clip.simple_tokenizer")
    return simple_tokenizer.SimpleTokenizer()


def test_vocab_file_is_clips():
    from open_clip.tokenizer import default_bpe

    ours = resources.files("sfumato.text").joinpath("bpe_simple_vocab_16e6.txt.gz").read_bytes()
    with open(default_bpe(), "rb") as f:
        assert ours == f.read()


def test_encode_matches_open_clip(open_clip_tok):
    tok = get_tokenizer()
    for text in CORPUS:
        assert tok.encode(text) == open_clip_tok.encode(text), repr(text)


def test_encode_matches_openai_clip(openai_clip_tok):
    tok = get_tokenizer()
    for text in CORPUS + [SPECIALS_TEXT]:
        assert tok.encode(text) == openai_clip_tok.encode(text), repr(text)
    assert tok.encode(SPECIALS_TEXT)[0] == BOS_ID


def test_batch_matches_open_clip_tokenize():
    import open_clip

    ours = CLIPTokenizer(pad_id=0)(CORPUS)
    assert ours.dtype == torch.long and ours.shape == (len(CORPUS), MAX_LENGTH)
    assert torch.equal(ours, open_clip.tokenize(CORPUS))


def test_batch_matches_transformers(tmp_path):
    from transformers import CLIPTokenizer as HFCLIPTokenizer  # in transformers 5 this is the fast one

    write_hf_clip_tokenizer(tmp_path)
    hf = HFCLIPTokenizer.from_pretrained(tmp_path, pad_token="<|endoftext|>")
    ref = hf(HF_CORPUS, padding="max_length", max_length=MAX_LENGTH, truncation=True).input_ids
    assert len(HF_CORPUS) >= 25
    assert CLIPTokenizer()(HF_CORPUS).tolist() == ref


def test_truncation_and_padding():
    long, short = CORPUS[-2], "a cat"
    ids = get_tokenizer().encode(long)
    assert len(ids) > MAX_LENGTH
    for pad in (EOS_ID, 0):
        rows = get_tokenizer(pad)([long, short])
        assert rows[0].tolist() == [BOS_ID, *ids[: MAX_LENGTH - 2], EOS_ID]
        n = len(get_tokenizer().encode(short)) + 2
        assert rows[1, n - 1] == EOS_ID and (rows[1, n:] == pad).all()
    assert CLIPTokenizer(max_length=5)(long).shape == (1, 5)


def test_decode(open_clip_tok, openai_clip_tok):
    tok = get_tokenizer()
    for text in CORPUS:
        assert tok.decode(tok.encode(text)) == open_clip_tok.decode(open_clip_tok.encode(text)).strip()
    row = tok(["a cat sits"])[0, :8]
    assert tok.decode(row) == openai_clip_tok.decode(row.tolist()).strip()
    for text in ["a photo of a cat", "lowercase words only", "masterpiece best quality ultra detailed"]:
        assert tok.decode(tok.encode(text)) == text


def test_token_id_and_cache(open_clip_tok):
    tok = get_tokenizer()
    assert tok.token_id("cat</w>") == open_clip_tok.encoder["cat</w>"]
    assert tok.token_id("<|startoftext|>") == BOS_ID and tok.token_id("<|endoftext|>") == EOS_ID
    assert tok.token_id("not a token") is None
    assert len(tok._vocab.encoder) == VOCAB_SIZE
    assert get_tokenizer() is tok and get_tokenizer(0) is not tok
    assert get_tokenizer(0)._vocab is tok._vocab is CLIPTokenizer()._vocab
    assert (get_tokenizer(0).pad_id, tok.pad_id, tok.max_length) == (0, EOS_ID, MAX_LENGTH)
    with pytest.raises(ValueError, match="pad_id"):
        CLIPTokenizer(pad_id=VOCAB_SIZE)
