"""AUTOMATIC1111's prompt syntax, as plain functions over strings.

* ``split_and``: composable diffusion, ``a AND b :1.5`` → weighted sub-prompts.
* ``prompt_schedule``: prompt editing ``[from:to:when]``, ``[to:when]``, ``[from::when]`` and
  alternation ``[a|b|c]``, nested, resolved into the text used up to each step.
* ``parse_attention``: emphasis ``(x)`` ×1.1, ``(x:w)``, ``[x]`` ÷1.1, escapes and ``BREAK``.
* ``chunk_prompt``: weighted token ids cut into 75-token chunks (BREAK, comma backtrack).

Order of use, as in A1111: split on AND, resolve each part's schedule, then parse the emphasis of
each resolved text and chunk it for the text encoder.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

# --- AND (composable diffusion) -------------------------------------------------------------------

_AND = re.compile(r"\bAND\b")
_PART_WEIGHT = re.compile(r"(.*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*", re.S)


def split_and(prompt: str) -> list[tuple[str, float]]:
    """Split on the word ``AND``; a trailing ``:number`` is that part's weight (default 1).

    Trailing whitespace is dropped, leading whitespace is kept: ``"a AND b :1.5"`` →
    ``[("a", 1.0), (" b", 1.5)]``.
    """
    parts = []
    for part in _AND.split(prompt):
        m = _PART_WEIGHT.fullmatch(part)
        parts.append((m.group(1), float(m.group(2)) if m.group(2) is not None else 1.0))
    return parts


# --- prompt editing and alternation ---------------------------------------------------------------


@dataclass
class _Edit:
    """``[before:after:when]``; ``when`` is the number as written."""

    before: list[_Node]
    after: list[_Node]
    when: str


@dataclass
class _Alternate:
    options: list[list[_Node]]


_Node = str | _Edit | _Alternate

_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+")  # text; a backslash escapes the next character
_WHEN = re.compile(r"\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*\]")
_STRAY = "[]():"  # brackets and colons that open nothing are literal text at the top level


class _Parser:
    """Recursive descent over A1111's grammar. Inside brackets a prompt is plain text and nested
    constructs only; a bracket that does not close a construct is literal text at the top level
    and fails the enclosing construct elsewhere. A ``|`` outside an alternation fails the parse."""

    def __init__(self, text: str):
        self.text, self.pos = text, 0

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def top(self) -> list[_Node] | None:
        nodes: list[_Node] = []
        while self.pos < len(self.text):
            nodes += self.prompt()
            if self.peek() and self.peek() in _STRAY:
                nodes.append(self.peek())
                self.pos += 1
            elif self.peek():
                return None  # a '|' outside brackets, or a backslash escaping nothing
        return nodes

    def prompt(self) -> list[_Node]:
        nodes: list[_Node] = []
        while True:
            c = self.peek()
            if c == "(":
                found = self.round()
            elif c == "[":
                found = self.square()
            elif (m := _PLAIN.match(self.text, self.pos)) is not None:
                self.pos = m.end()
                found = [m.group()]
            else:
                found = None
            if found is None:
                return nodes
            nodes += found

    def round(self) -> list[_Node] | None:
        """``(a)`` or ``(a:b)``: emphasis, kept as text for the attention parser."""
        start = self.pos
        self.pos += 1
        inner = ["(", *self.prompt()]
        if self.peek() == ":":
            self.pos += 1
            inner += [":", *self.prompt()]
        if self.peek() == ")":
            self.pos += 1
            return [*inner, ")"]
        self.pos = start
        return None

    def square(self) -> list[_Node] | None:
        """``[a]`` (emphasis), ``[a|b|…]``, ``[to:when]`` or ``[from:to:when]``."""
        start = self.pos
        self.pos += 1
        first = self.prompt()
        c = self.peek()
        if c == "]":
            self.pos += 1
            return ["[", *first, "]"]
        if c == "|":
            options = [first]
            while self.peek() == "|":
                self.pos += 1
                options.append(self.prompt())
            if self.peek() == "]":
                self.pos += 1
                return [_Alternate(options)]
        if c == ":":
            self.pos += 1
            if (when := self.when()) is not None:
                return [_Edit([], first, when)]
            second = self.prompt()
            if self.peek() == ":":
                self.pos += 1
                if (when := self.when()) is not None:
                    return [_Edit(first, second, when)]
        self.pos = start
        return None

    def when(self) -> str | None:
        m = _WHEN.match(self.text, self.pos)
        if m is None:
            return None
        self.pos = m.end()
        return m.group(1)


def _when_step(when: str, steps: int) -> int:
    """Below 1: a fraction of ``steps``; otherwise a step number. Clamped to ``0..steps``."""
    v = float(when)
    v = v * steps if v < 1 else v
    return int(max(0.0, min(v, float(steps))))


def _boundaries(nodes: list[_Node], steps: int) -> set[int]:
    ends: set[int] = set()
    for node in nodes:
        if isinstance(node, _Edit):
            step = _when_step(node.when, steps)
            ends |= {step} if step >= 1 else set()
            ends |= _boundaries(node.before, steps) | _boundaries(node.after, steps)
        elif isinstance(node, _Alternate):
            ends |= set(range(1, steps + 1))
            for option in node.options:
                ends |= _boundaries(option, steps)
    return ends


def _render(nodes: list[_Node], step: int, steps: int) -> str:
    out = []
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, _Edit):
            active = node.before if step <= _when_step(node.when, steps) else node.after
            out.append(_render(active, step, steps))
        else:
            out.append(_render(node.options[(step - 1) % len(node.options)], step, steps))
    return "".join(out)


def prompt_schedule(prompt: str, steps: int) -> list[tuple[int, str]]:
    """``[(end_at_step, text), …]`` covering steps 1..``steps``: ``text`` is used for every step
    up to and including ``end_at_step`` (steps count from 1). A prompt that does not parse is used
    as written for all steps, as A1111 does.

    ``"a [b:c:3]"`` with 10 steps → ``[(3, "a b"), (10, "a c")]``.
    """
    if steps < 1:
        raise ValueError(f"steps must be ≥ 1, got {steps}")
    try:
        nodes = _Parser(prompt).top()
    except RecursionError:  # absurd nesting: treat like any other unparsable prompt
        nodes = None
    if nodes is None:
        return [(steps, prompt)]
    ends = sorted(_boundaries(nodes, steps) | {steps})
    return [(end, _render(nodes, end, steps)) for end in ends]


# --- emphasis -------------------------------------------------------------------------------------

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1

_ATTENTION = re.compile(
    r"""
    \\[()\[\]\\]                                  # escaped bracket or backslash: literal
    | \\                                          # any other backslash: dropped
    | [(\[]                                       # opening brackets
    | :\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\)        # ':1.3)' closes a round bracket with a weight
    | [)\]]                                       # closing brackets
    | [^\\()\[\]:]+                               # text
    | :
    """,
    re.X,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
BREAK = ("BREAK", -1.0)  # the marker parse_attention yields for the word BREAK


def parse_attention(text: str) -> list[tuple[str, float]]:
    """Emphasis runs ``[(text, weight), …]``; adjacent runs of equal weight are merged.

    Brackets multiply everything inside them; nesting multiplies; a bracket left open applies to
    the rest of the prompt; unmatched closers are literal. ``BREAK`` (upper case, a word of its
    own) yields the marker ``("BREAK", -1.0)``, which a surrounding bracket scales (and thereby
    turns into the literal word, as in A1111).
    """
    runs: list[list] = []
    rounds: list[int] = []
    squares: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    for m in _ATTENTION.finditer(text):
        token, weight = m.group(0), m.group(1)
        if token.startswith("\\"):
            runs.append([token[1:], 1.0])
        elif token == "(":
            rounds.append(len(runs))
        elif token == "[":
            squares.append(len(runs))
        elif weight is not None and rounds:
            multiply(rounds.pop(), float(weight))
        elif token == ")" and rounds:
            multiply(rounds.pop(), ROUND_MULTIPLIER)
        elif token == "]" and squares:
            multiply(squares.pop(), SQUARE_MULTIPLIER)
        else:
            for i, part in enumerate(_BREAK.split(token)):
                if i:
                    runs.append(list(BREAK))
                runs.append([part, 1.0])
    for start in rounds:
        multiply(start, ROUND_MULTIPLIER)
    for start in squares:
        multiply(start, SQUARE_MULTIPLIER)

    merged: list[tuple[str, float]] = []
    for part, weight in runs:
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + part, weight)
        else:
            merged.append((part, weight))
    return merged or [("", 1.0)]


# --- chunks of 75 tokens --------------------------------------------------------------------------

CHUNK_LENGTH = 75       # tokens per chunk, between BOS and EOS
COMMA_BACKTRACK = 20    # A1111's default "comma padding backtrack"


@dataclass(frozen=True)
class Chunk:
    """Up to ``CHUNK_LENGTH`` token ids of a prompt and their emphasis weights (no BOS/EOS/padding).
    ``fixes`` place textual inversion embeddings: (offset into ``tokens``, name); the tokens there
    are placeholders for the embedding's vectors."""

    tokens: tuple[int, ...]
    weights: tuple[float, ...]
    fixes: tuple[tuple[int, str], ...] = ()


# (ids, i) → None, or (embedding name, ids it spans from i, placeholders it takes)
Matcher = Callable[[list[int], int], "tuple[str, int, int] | None"]


def chunk_prompt(
    text: str,
    encode: Callable[[str], list[int]],
    comma_id: int,
    *,
    length: int = CHUNK_LENGTH,
    backtrack: int = COMMA_BACKTRACK,
    match: Matcher | None = None,
    placeholder: int = 0,
) -> list[Chunk]:
    """Tokenize each emphasis run of ``text`` with ``encode`` and cut the weighted ids into chunks.

    ``BREAK`` closes the current chunk. When a chunk is full and one of its last ``backtrack``
    tokens is a comma, the chunk ends right after that comma and the tokens after it move to the
    next chunk. An empty prompt gives one empty chunk. ``match`` finds embedding names: each
    becomes its ``placeholder`` tokens, kept together (one that does not fit starts the next chunk).
    """
    chunks: list[Chunk] = []
    tokens: list[int] = []
    weights: list[float] = []
    fixes: list[tuple[int, str]] = []
    last_comma = -1

    def close(keep: int) -> None:
        nonlocal tokens, weights, fixes, last_comma
        chunks.append(Chunk(tuple(tokens[:keep]), tuple(weights[:keep]), tuple(f for f in fixes if f[0] < keep)))
        fixes = [(at - keep, name) for at, name in fixes if at >= keep]
        tokens, weights, last_comma = tokens[keep:], weights[keep:], -1

    for run, weight in parse_attention(text):
        if (run, weight) == BREAK:
            close(len(tokens))
            continue
        ids = encode(run)
        i = 0
        while i < len(ids):
            token = ids[i]
            if token == comma_id:
                last_comma = len(tokens)
            elif backtrack and len(tokens) == length and last_comma != -1 and length - last_comma <= backtrack:
                close(last_comma + 1)
            if len(tokens) == length:
                close(length)
            found = match(ids, i) if match is not None else None
            if found is None:
                tokens.append(token)
                weights.append(weight)
                i += 1
                continue
            name, spanned, n = found
            if len(tokens) + n > length:
                close(len(tokens))
            fixes.append((len(tokens), name))
            tokens += [placeholder] * n
            weights += [weight] * n
            i += spanned
    if tokens or not chunks:
        close(len(tokens))
    return chunks
