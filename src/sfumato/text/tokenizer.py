"""The CLIP byte-level BPE tokenizer, exact to OpenAI CLIP / open_clip / transformers.

Text is cleaned (ftfy, HTML entities, whitespace, lower case), split by CLIP's pre-tokeniser
pattern, each piece's UTF-8 bytes are mapped to printable characters, and BPE merges are applied
by rank with ``</w>`` marking the end of a word. The vocabulary (``bpe_simple_vocab_16e6.txt.gz``,
MIT, OpenAI; see ``LICENSE-CLIP-BPE.txt``) ships with the package.
"""

from __future__ import annotations

import gzip
import html
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import ftfy
import regex
import torch

BOS_ID = 49406
EOS_ID = 49407
VOCAB_SIZE = 49408
MAX_LENGTH = 77

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # the merges CLIP uses: vocabulary = 2 * 256 bytes + 48894 merges + 2 specials
END_OF_WORD = "</w>"

# CLIP's pre-tokeniser: the specials, English contractions, letter runs, single digits, other runs.
_PATTERN = regex.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
    regex.IGNORECASE,
)


def _byte_alphabet() -> dict[int, str]:
    """Byte → printable character, in CLIP's vocabulary order: printable Latin-1 bytes map to
    themselves and come first; the rest (controls, space, NBSP, soft hyphen) follow as 256, 257, …"""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


BYTE_ALPHABET = _byte_alphabet()
BYTE_TO_CHAR = [BYTE_ALPHABET[b] for b in range(256)]
CHAR_TO_BYTE = {c: b for b, c in BYTE_ALPHABET.items()}


@dataclass(frozen=True)
class _Vocab:
    encoder: dict[str, int]
    decoder: list[str]
    ranks: dict[tuple[str, str], int]


@lru_cache(maxsize=1)
def _load_vocab() -> _Vocab:
    """Parse the bundled BPE file once per process: bytes, bytes + ``</w>``, merges, specials."""
    with resources.files(__package__).joinpath(VOCAB_FILE).open("rb") as f:
        lines = gzip.decompress(f.read()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]  # line 0 is a header
    alphabet = list(BYTE_ALPHABET.values())
    tokens = [*alphabet, *(c + END_OF_WORD for c in alphabet), *("".join(m) for m in merges)]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    if len(tokens) != VOCAB_SIZE:
        raise RuntimeError(f"{VOCAB_FILE} gave {len(tokens)} tokens, expected {VOCAB_SIZE}")
    return _Vocab(
        encoder={t: i for i, t in enumerate(tokens)},
        decoder=tokens,
        ranks={m: i for i, m in enumerate(merges)},
    )


@lru_cache(maxsize=65536)
def _bpe(word: str) -> tuple[str, ...]:
    """Merge the characters of one byte-mapped word, lowest merge rank first, until none applies."""
    if word in (BOS_TOKEN, EOS_TOKEN):
        return (word,)
    ranks = _load_vocab().ranks
    parts = [*word[:-1], word[-1] + END_OF_WORD]
    while len(parts) > 1:
        pairs = {(a, b) for a, b in zip(parts, parts[1:]) if (a, b) in ranks}
        if not pairs:
            break
        first, second = min(pairs, key=ranks.__getitem__)
        merged, i = [], 0
        while i < len(parts):  # merge every occurrence, left to right, without overlap
            if i + 1 < len(parts) and parts[i] == first and parts[i + 1] == second:
                merged.append(first + second)
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return tuple(parts)


def clean(text: str) -> str:
    """CLIP's text clean-up: ftfy, HTML entities (twice), collapsed whitespace, lower case."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


class CLIPTokenizer:
    """Text → CLIP token ids. ``__call__`` gives the padded ``[B, max_length]`` batch encoders eat.

    SD 1.x pads with ``<|endoftext|>`` (49407); OpenCLIP encoders (SD 2.x, SDXL's second) pad with 0.
    """

    def __init__(self, pad_id: int = EOS_ID, max_length: int = MAX_LENGTH):
        if not 0 <= pad_id < VOCAB_SIZE:
            raise ValueError(f"pad_id must be in [0, {VOCAB_SIZE}), got {pad_id}")
        if max_length < 2:
            raise ValueError(f"max_length must leave room for BOS and EOS, got {max_length}")
        self.pad_id = pad_id
        self.max_length = max_length
        self._vocab = _load_vocab()

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text``: no BOS/EOS, no truncation, no padding."""
        encoder = self._vocab.encoder
        ids: list[int] = []
        for piece in _PATTERN.findall(clean(text)):
            word = "".join(BYTE_TO_CHAR[b] for b in piece.encode("utf-8"))
            ids.extend(encoder[t] for t in _bpe(word))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; word ends become spaces, invalid UTF-8 becomes U+FFFD, ends are stripped."""
        chars = "".join(self._vocab.decoder[int(i)] for i in ids)  # specials are plain ASCII
        text = bytes(CHAR_TO_BYTE[c] for c in chars).decode("utf-8", errors="replace")
        return text.replace(END_OF_WORD, " ").strip()

    def token_id(self, token: str) -> int | None:
        """Id of a vocabulary entry such as ``"cat</w>"``, or None if absent."""
        return self._vocab.encoder.get(token)

    def __call__(self, texts: str | Sequence[str]) -> torch.LongTensor:
        """``[B, max_length]`` ids: BOS + ids[:max_length - 2] + EOS, then ``pad_id``."""
        if isinstance(texts, str):
            texts = [texts]
        out = torch.full((len(texts), self.max_length), self.pad_id, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [BOS_ID, *self.encode(text)[: self.max_length - 2], EOS_ID]
            out[row, : len(ids)] = torch.tensor(ids)
        return out


@lru_cache(maxsize=None)
def get_tokenizer(pad_id: int = EOS_ID) -> CLIPTokenizer:
    """The shared tokenizer for ``pad_id``; all share one parsed vocabulary."""
    return CLIPTokenizer(pad_id)
