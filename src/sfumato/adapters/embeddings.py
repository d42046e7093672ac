"""Textual inversion embeddings: read the files people have, put their vectors into prompts.

Files are told apart by their content (pickles only through ``checkpoint.io``'s allow-list):

* A1111 ``.pt``: ``{"string_to_param": {"*": [n, dim]}, "name": …, "step": …}``;
* A1111 / kohya ``.safetensors``: ``{"emb_params": [n, dim]}``;
* diffusers ``learned_embeds.safetensors`` / ``.bin``: ``{token: [dim] or [n, dim]}``;
* SDXL: ``{"clip_l": [n, 768], "clip_g": [n, 1280]}``, one set of vectors per text encoder;
* A1111 embedding images (``.png``, ``.webp``): the ``.pt`` data as base64 JSON (tensors as
  ``{"TORCHTENSOR": nested lists}``) in an ``sd-ti-embedding`` text chunk, or that JSON
  zlib-compressed and hidden in the low nibbles of two pixel blocks either side of the picture.

As in A1111 an embedding is named by its file's stem, except an image, which carries its name.
In a prompt the tokens of an embedding's name (matched on the tokenized text of each emphasis
run, longest name first) become its n vectors, n tokens weighted like the text around them; an
embedding never straddles a 75-token chunk.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager, Literal

import numpy as np
import torch
from torch import Tensor, nn

from ..checkpoint.io import check_finite, load_file, save_file
from ..checkpoint.folders import ModelFolder
from ..checkpoint.specs import ModelSpec, TextSlot
from ..errors import EmbeddingError as EmbeddingError  # re-exported
from ..errors import SfumatoError
from ..safe_image import open_image
from ..text.prompt import CHUNK_LENGTH, COMMA_BACKTRACK, Chunk, chunk_prompt
from ..text.tokenizer import get_tokenizer

FILE_SUFFIXES = (".pt", ".bin", ".safetensors")
IMAGE_SUFFIXES = (".png", ".webp")
log = logging.getLogger(__name__)
PNG_KEY = "sd-ti-embedding"
SINGLE = "*"                 # the key of a one-encoder embedding's vectors
DUAL = ("clip_l", "clip_g")  # SDXL: CLIP ViT-L (transformers layout) and OpenCLIP bigG
PLACEHOLDER_ID = 0           # the id standing in for an embedding vector before substitution


@dataclass(frozen=True)
class Embedding:
    """One embedding: ``vectors`` maps ``"*"`` (one text encoder) or ``"clip_l"`` and ``"clip_g"``
    (SDXL) to float32 ``[n, dim]`` tensors with the same n."""

    name: str
    vectors: Mapping[str, Tensor]
    path: Path | None = None

    @property
    def num_vectors(self) -> int:
        return next(iter(self.vectors.values())).shape[0]

    def for_slots(self, slots: Sequence[TextSlot]) -> tuple[Tensor, ...]:
        """The vectors for each text encoder of a model; EmbeddingError (the reason) if they do not fit.

        One set of vectors fits a model with one text encoder; an SDXL pair fits a model with two,
        ``clip_l`` going to the transformers-layout encoder and ``clip_g`` to the OpenCLIP one (as in
        A1111, neither fits the other kind of model). Widths must match."""
        if SINGLE in self.vectors:
            if len(slots) != 1:
                raise EmbeddingError(
                    f"it has one set of vectors (width {self.vectors[SINGLE].shape[1]}); "
                    f"this model has {len(slots)} text encoders and needs clip_l/clip_g vectors"
                )
            keys = [SINGLE]
        else:
            keys = [DUAL[0] if slot.config.layout == "hf" else DUAL[1] for slot in slots]
            if sorted(keys) != sorted(DUAL):
                raise EmbeddingError(
                    f"it has clip_l/clip_g vectors for SDXL's two text encoders; this model has {len(slots)}"
                )
        out = []
        for key, slot in zip(keys, slots):
            width = self.vectors[key].shape[1]
            if width != slot.config.width:
                what = "its vectors have" if key == SINGLE else f"its {key} vectors have"
                raise EmbeddingError(
                    f"{what} width {width}, but this model's text encoder needs {slot.config.width}"
                )
            out.append(self.vectors[key])
        return tuple(out)


class EmbeddingSet:
    """Embeddings by name, and what was skipped (name → reason), like A1111's ``/embeddings``.

    ``for_spec`` binds the set to a model: embeddings whose vectors do not fit its text encoders
    move to ``skipped``; the rest can be found in prompts (``chunk``) and substituted (``substitute``).
    """

    def __init__(self, embeddings: Iterable[Embedding] = (), skipped: Mapping[str, str] | None = None):
        self.embeddings: dict[str, Embedding] = {e.name: e for e in embeddings}
        self.skipped: dict[str, str] = dict(skipped or {})
        self._vectors: dict[str, tuple[Tensor, ...]] | None = None   # per text encoder, once bound
        self._lookup: dict[int, list[tuple[tuple[int, ...], str]]] = {}

    def __len__(self) -> int:
        return len(self.embeddings)

    def __contains__(self, name: object) -> bool:
        return name in self.embeddings

    def for_spec(self, spec: ModelSpec) -> EmbeddingSet:
        """The embeddings that fit ``spec``'s text encoders, ready for prompts; misfits are skipped."""
        bound = EmbeddingSet(skipped=self.skipped)
        bound._vectors = {}
        encode = get_tokenizer().encode
        for name, emb in self.embeddings.items():
            try:
                vectors = emb.for_slots(spec.text)
                ids = tuple(encode(name))
                if not ids:
                    raise EmbeddingError("its name has no tokens")
                if emb.num_vectors > CHUNK_LENGTH:
                    raise EmbeddingError(f"it has {emb.num_vectors} vectors; a prompt chunk holds {CHUNK_LENGTH}")
            except EmbeddingError as e:
                bound.skipped[name] = str(e)
                continue
            bound.embeddings[name] = emb
            bound._vectors[name] = vectors
            bound._lookup.setdefault(ids[0], []).append((ids, name))
        for matches in bound._lookup.values():
            matches.sort(key=lambda m: len(m[0]), reverse=True)
        return bound

    def _require_bound(self) -> dict[str, tuple[Tensor, ...]]:
        if self._vectors is None:
            raise RuntimeError("bind the embeddings to a model first (EmbeddingSet.for_spec)")
        return self._vectors

    def _match(self, ids: list[int], at: int) -> tuple[str, int, int] | None:
        """The longest embedding name whose tokens start at ``ids[at]``: (name, its token count, its
        vector count) — ``chunk_prompt``'s matcher."""
        for name_ids, name in self._lookup.get(ids[at], ()):
            if tuple(ids[at : at + len(name_ids)]) == name_ids:
                return name, len(name_ids), self.embeddings[name].num_vectors
        return None

    def chunk(
        self,
        text: str,
        encode: Callable[[str], list[int]],
        comma_id: int,
        *,
        length: int = CHUNK_LENGTH,
        backtrack: int = COMMA_BACKTRACK,
    ) -> list[Chunk]:
        """``chunk_prompt`` with this set's names: each becomes n placeholders (one per vector)."""
        self._require_bound()
        return chunk_prompt(text, encode, comma_id, length=length, backtrack=backtrack, match=self._match,
                            placeholder=PLACEHOLDER_ID)

    def names_in(self, text: str) -> list[str]:
        """The embeddings a prompt uses, in order of first use (for infotext)."""
        tokenizer = get_tokenizer()
        found = self.chunk(text, tokenizer.encode, tokenizer.token_id(",</w>") or -1)
        return list(dict.fromkeys(name for c in found for _, name in c.fixes))

    def substitute(self, encoder: nn.Module, chunks: Sequence[Chunk], slot: int) -> ContextManager[None]:
        """Within the block, ``encoder`` (text encoder ``slot`` of the bound model) sees the vectors of
        the embeddings placed in ``chunks`` (its input rows, BOS first) instead of their placeholders."""
        vectors = self._require_bound()
        subs = [
            (row, offset + 1, vectors[name][slot])
            for row, c in enumerate(chunks)
            for offset, name in c.fixes
        ]
        return _token_vectors(_token_embedding(encoder), subs) if subs else nullcontext()


def _token_embedding(encoder: nn.Module) -> nn.Module:
    if hasattr(encoder, "text_model"):
        return encoder.text_model.embeddings.token_embedding
    return encoder.token_embedding


@contextmanager
def _token_vectors(embedding: nn.Module, subs: list[tuple[int, int, Tensor]]) -> Iterator[None]:
    """Overwrite rows of the token embedding's output: (batch row, position, vectors [n, D])."""

    def hook(module: nn.Module, args: Any, output: Tensor) -> Tensor:
        output = output.clone()
        for row, pos, vec in subs:
            output[row, pos : pos + vec.shape[0]] = vec.to(output)
        return output

    handle = embedding.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


# --- reading ---------------------------------------------------------------------------------------


def load_embeddings(directory: str | Path, spec: ModelSpec | None = None) -> EmbeddingSet:
    """Every embedding under ``directory`` (recursively). Files that cannot be read (empty ones too) are ``skipped``
    with the reason, as are names seen twice; with ``spec``, the set is bound to that model
    (``EmbeddingSet.for_spec``). Other files, ``*.preview.png`` and links leading out of
    the folder are ignored."""
    directory = Path(directory)
    if not directory.is_dir():
        raise EmbeddingError(f"embeddings directory not found: {directory}")
    found: dict[str, Embedding] = {}
    skipped: dict[str, str] = {}
    folder = ModelFolder("embedding", directory, FILE_SUFFIXES + IMAGE_SUFFIXES, label="embeddings folder")
    for entry in folder.entries():
        path = entry.path
        if path.suffix.lower() in IMAGE_SUFFIXES and path.stem.lower().endswith(".preview"):
            continue
        try:
            emb = read_embedding(path)
        except SfumatoError as e:
            log.warning("embedding %s skipped: %s", entry.name, e)
            skipped[path.stem] = str(e)
            continue
        if emb is None:
            continue
        if emb.name in found:
            log.warning("embedding %s skipped: its name %r is taken by %s", entry.name, emb.name, found[emb.name].path)
            skipped[emb.name] = f"{path} has the same name as {found[emb.name].path}, which is used"
            continue
        found[emb.name] = emb
    embeddings = EmbeddingSet(found.values(), skipped)
    return embeddings.for_spec(spec) if spec is not None else embeddings


def read_embedding(path: str | Path) -> Embedding | None:
    """One embedding file or image; None for an image that holds no embedding (a plain picture)."""
    path = Path(path)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        data = _image_data(path)
        if data is None:
            return None
        name = data.get("name")
        return Embedding(name if isinstance(name, str) and name else path.stem, _vectors(_flatten(data), path), path)
    tensors, _ = load_file(path)
    return Embedding(path.stem, _vectors(tensors, path), path)


def _vectors(tensors: Mapping[str, Tensor], path: Path) -> dict[str, Tensor]:
    """The ``[n, dim]`` float32 vectors of a flat tensor dict, by the formats in the module docstring."""
    params = {k: v for k, v in tensors.items() if k.startswith("string_to_param.")}
    if params:
        if len(params) != 1:
            raise EmbeddingError(
                f"{path.name}: the file holds {len(params)} embeddings ({', '.join(params)}); expected one"
            )
        found = {SINGLE: next(iter(params.values()))}
    elif "emb_params" in tensors:
        found = {SINGLE: tensors["emb_params"]}
    elif all(k in tensors for k in DUAL):
        found = {k: tensors[k] for k in DUAL}
    elif len(tensors) == 1:
        found = {SINGLE: next(iter(tensors.values()))}
    else:
        keys = ", ".join(list(tensors)[:5]) or "none"
        raise EmbeddingError(f"{path.name} is not a textual inversion embedding (tensors: {keys})")
    out = {}
    for key, t in found.items():
        if t.ndim == 1:
            t = t[None]
        if t.ndim != 2 or t.shape[0] == 0 or not (t.is_floating_point()):
            raise EmbeddingError(f"{path.name}: {key} vectors have shape {list(t.shape)} and dtype "
                                 f"{str(t.dtype).removeprefix('torch.')}; expected float [n, dim]")
        out[key] = t.detach().to(torch.float32, copy=True).contiguous()
    check_finite(out, f"the vectors of embedding {path.name}")
    if len({t.shape[0] for t in out.values()}) > 1:
        raise EmbeddingError(f"{path.name}: clip_l and clip_g have different numbers of vectors "
                             f"({out['clip_l'].shape[0]} and {out['clip_g'].shape[0]})")
    return out


def _flatten(obj: Any, prefix: str = "", depth: int = 0) -> dict[str, Tensor]:
    """Tensors in nested dicts keyed by their dotted path, as ``checkpoint.io.load_file`` gives them
    (an embedding's data is at most a few levels deep)."""
    if isinstance(obj, Tensor):
        return {prefix: obj}
    if not isinstance(obj, dict):
        return {}
    if depth > _MAX_DEPTH:
        raise EmbeddingError(f"the embedding data nests deeper than {_MAX_DEPTH} levels")
    out: dict[str, Tensor] = {}
    for key, value in obj.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key), depth + 1))
    return out


_MAX_DEPTH = 8
_MAX_IMAGE_PIXELS = 4096 * 4096
_MAX_PAYLOAD = 16 << 20      # bytes of embedding data an image may hold, decompressed


def _decode_json(raw: bytes | str, path: Path) -> dict[str, Any]:
    def tensor(d: dict[str, Any]) -> Any:
        return torch.tensor(d["TORCHTENSOR"], dtype=torch.float32) if "TORCHTENSOR" in d else d

    try:
        data = json.loads(raw, object_hook=tensor)
    except (ValueError, TypeError, RecursionError) as e:
        raise EmbeddingError(f"{path.name}: the embedding data in the image is not valid JSON "
                             f"({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise EmbeddingError(f"{path.name}: the embedding data in the image is not a JSON object")
    return data


def _image_data(path: Path) -> dict[str, Any] | None:
    """A1111's embedding data from an image: the text chunk, else the pixel blocks; None if neither."""
    try:
        with open_image(path, path.name, max_pixels=_MAX_IMAGE_PIXELS, load=False) as image:
            text = getattr(image, "text", None) or image.info
            if PNG_KEY in text:
                try:
                    raw = base64.b64decode(text[PNG_KEY], validate=True)
                except (binascii.Error, ValueError, TypeError):
                    raise EmbeddingError(f"{path.name}: its {PNG_KEY} text is not base64") from None
                return _decode_json(raw, path)
            pixels = np.asarray(image.convert("RGB"))
    except EmbeddingError:
        raise
    except SfumatoError as e:
        raise EmbeddingError(str(e)) from None
    except Exception as e:  # noqa: BLE001 — untrusted bytes (a truncated image, an oversized chunk)
        raise EmbeddingError(f"{path.name}: cannot read the image ({type(e).__name__})") from None
    payload = _pixel_payload(pixels)
    if payload is None:
        return None
    try:
        inflate = zlib.decompressobj()
        data = inflate.decompress(payload, _MAX_PAYLOAD)
        if inflate.unconsumed_tail:
            raise EmbeddingError(f"{path.name}: the embedding data in its pixels inflates past {_MAX_PAYLOAD} bytes")
        return _decode_json(data, path)
    except zlib.error:
        raise EmbeddingError(f"{path.name}: the image has no {PNG_KEY} text and its pixels hold no "
                             "readable embedding") from None


def _pixel_payload(pixels: np.ndarray) -> bytes | None:
    """The bytes A1111 hides in an image: the picture sits between two data blocks, each separated by
    a black column; the blocks' low nibbles, XORed with a fixed LCG stream, hold the low and high
    nibbles of the compressed data. Black borders are cropped first."""
    lit = (pixels > 0).all(axis=2)
    rows, cols = np.flatnonzero(lit.any(axis=1)), np.flatnonzero(lit.any(axis=0))
    if not len(rows):
        return None
    nibbles = pixels[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] & 0x0F
    empty = np.flatnonzero(nibbles.sum(axis=(0, 2)) == 0)
    if len(empty) < 2:
        return None
    low, high = nibbles[:, : empty[0]], nibbles[:, empty[-1] + 1 :]
    if low.shape != high.shape or not low.size:
        return None
    mask = _lcg_nibbles(low.size).reshape(low.shape)
    return (((high ^ mask) << 4) | (low ^ mask)).astype(np.uint8).tobytes()


def _lcg_nibbles(n: int) -> np.ndarray:
    """A1111's mask: x ← (1664525·x + 1013904223) mod 2³², from x = 0; each value mod 255, low 4 bits."""
    out = np.empty(n, dtype=np.uint8)
    x = 0
    for i in range(n):
        x = (1664525 * x + 1013904223) & 0xFFFFFFFF
        out[i] = (x % 255) & 0x0F
    return out


# --- writing ---------------------------------------------------------------------------------------

SaveFormat = Literal["a1111-safetensors", "diffusers"]


def save_embedding(
    path: str | Path,
    name: str,
    vectors: Tensor | Mapping[str, Tensor],
    format: SaveFormat = "a1111-safetensors",
) -> Path:
    """Write an embedding atomically as safetensors that A1111, kohya and diffusers load.

    ``vectors``: ``[n, dim]`` (or ``[dim]``), or SDXL's ``{"clip_l": …, "clip_g": …}``.
    ``"a1111-safetensors"`` writes ``emb_params`` (or ``clip_l``/``clip_g``) and the name in the
    metadata; ``"diffusers"`` writes ``{name: [n, dim]}`` (``learned_embeds.safetensors``), one
    text encoder only."""
    if not name or not name.strip():
        raise EmbeddingError("name: must not be empty")
    if format not in ("a1111-safetensors", "diffusers"):
        raise EmbeddingError(f"format: unknown {format!r} (expected 'a1111-safetensors' or 'diffusers')")
    raw = {SINGLE: vectors} if isinstance(vectors, Tensor) else dict(vectors)
    if set(raw) not in ({SINGLE}, set(DUAL)):
        raise EmbeddingError(f"vectors: expected a tensor or a mapping with keys clip_l and clip_g, got {sorted(raw)}")
    checked = _vectors(raw, Path(name))
    if format == "diffusers":
        if SINGLE not in checked:
            raise EmbeddingError("format: diffusers files hold one text encoder's vectors; "
                                 "write SDXL embeddings as 'a1111-safetensors'")
        tensors = {name: checked[SINGLE]}
    else:
        tensors = {"emb_params": checked[SINGLE]} if SINGLE in checked else checked
    path = Path(path)
    save_file(tensors, path, {"name": name})
    return path
