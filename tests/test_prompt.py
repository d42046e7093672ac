"""A1111 prompt syntax. Every expected value is written out by hand from A1111's documented
behaviour (its wiki and the doctests of ``modules/prompt_parser.py``)."""

import pytest

from sfumato.text.prompt import Chunk, chunk_prompt, parse_attention, prompt_schedule, split_and

UP, DOWN = 1.1, 1 / 1.1

ATTENTION = [
    ("normal text", [("normal text", 1.0)]),
    ("", [("", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", UP), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", UP)]),
    ("[unbalanced", [("unbalanced", DOWN)]),
    (r"\(literal\]", [("(literal]", 1.0)]),
    (r"a \\ b \[c\)", [("a \\ b [c)", 1.0)]),
    (r"a\:b", [("a:b", 1.0)]),                               # a backslash escaping nothing is dropped
    ("(unnecessary)(parens)", [("unnecessaryparens", UP)]),
    ("[a] [[b]]", [("a", DOWN), (" ", 1.0), ("b", DOWN * DOWN)]),
    ("(a:1.5) b", [("a", 1.5), (" b", 1.0)]),
    ("(a: 0.5 )", [("a", 0.5)]),
    ("((a:2))", [("a", 2.2)]),
    ("(a:1.2", [("a:1.2", UP)]),                             # no ')' after the number: plain text
    ("a:1.2) b] c)", [("a:1.2) b] c)", 1.0)]),               # closers without an opener are text
    ("a (b [c] d) e", [("a ", 1.0), ("b ", UP), ("c", 1.0), (" d", UP), (" e", 1.0)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [("a ", 1.0), ("house", 1.3 * UP * UP), (" ", UP), ("on", 1.0), (" a ", UP), ("hill", 0.55),
         (", sun, ", UP), ("sky", UP**4), (".", UP)],
    ),
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("a BREAK BREAK b", [("a", 1.0), ("BREAK", -1.0), ("", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("a break b BREAKING aBREAK", [("a break b BREAKING aBREAK", 1.0)]),
    ("(a BREAK b)", [("a", UP), ("BREAK", -UP), ("b", UP)]),  # scaled marker: the literal word
]


@pytest.mark.parametrize("text, expected", ATTENTION)
def test_parse_attention(text, expected):
    got = parse_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])


def alternating(steps, *options):
    return [(s, options[(s - 1) % len(options)]) for s in range(1, steps + 1)]


SCHEDULES = [
    ("test", 10, [(10, "test")]),
    ("a [b:3]", 10, [(3, "a "), (10, "a b")]),
    ("a [b: 3]", 10, [(3, "a "), (10, "a b")]),
    ("a [b:c:0.25]", 10, [(2, "a b"), (10, "a c")]),           # fraction of steps, truncated
    ("a [b:.5] c", 10, [(5, "a  c"), (10, "a b c")]),
    ("a [b:c:1.5]", 10, [(1, "a b"), (10, "a c")]),            # ≥ 1: a step number
    ("[a::4] b", 10, [(4, "a b"), (10, " b")]),                # removal
    ("[a:b:20]", 10, [(10, "a")]),                             # clamped to the last step
    ("[a:b:0]", 10, [(10, "b")]),
    ("a [[[b]]:2]", 10, [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", 10, [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", 10, [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", 10, [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", 10, [(10, "a [unbalanced")]),
    ("((a][:b:c [d:3]", 10, [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    (r"\[a:b:3\]", 10, [(10, r"\[a:b:3\]")]),                  # escaped: not an edit
    ("a | [b:3]", 10, [(10, "a | [b:3]")]),                    # '|' outside brackets: unparsable, literal
    ("[a|(b:1.1)]", 10, alternating(10, "a", "(b:1.1)")),
    ("[fe|]male", 6, alternating(6, "female", "male")),
    ("[fe|||]male", 6, alternating(6, "female", "male", "male", "male")),
    ("[[a|b]:c:3]", 4, [(1, "a"), (2, "b"), (3, "a"), (4, "c")]),
    ("[x|[y:z:2]]", 4, [(1, "x"), (2, "y"), (3, "x"), (4, "z")]),
]


@pytest.mark.parametrize("prompt, steps, expected", SCHEDULES)
def test_prompt_schedule(prompt, steps, expected):
    assert prompt_schedule(prompt, steps) == expected


def test_prompt_schedule_rejects_zero_steps():
    with pytest.raises(ValueError, match="steps"):
        prompt_schedule("a", 0)


AND = [
    ("a", [("a", 1.0)]),
    ("a AND b :1.5", [("a", 1.0), (" b", 1.5)]),
    ("a:2", [("a", 2.0)]),
    ("cat AND dog : -0.5 ", [("cat", 1.0), (" dog", -0.5)]),
    ("a :.5 AND b:2.", [("a", 0.5), (" b", 2.0)]),
    ("(a:1.2) AND b", [("(a:1.2)", 1.0), (" b", 1.0)]),
    ("ANDROID and AND", [("ANDROID and", 1.0), ("", 1.0)]),
]


@pytest.mark.parametrize("prompt, expected", AND)
def test_split_and(prompt, expected):
    assert split_and(prompt) == expected


# chunking with a toy vocabulary: each word is its own id, "," is the comma
COMMA = 267
VOCAB = {",": COMMA, "w": 1, "x": 2}


def words(text: str) -> list[int]:
    return [VOCAB[w] for w in text.replace(",", " , ").split()]


CHUNKS = [
    ("", [0]),
    ("w " * 75, [75]),
    ("w " * 76, [75, 1]),
    ("w " * 70 + ", " + "w " * 10, [71, 10]),       # comma 5 from the end: cut after it
    ("w " * 55 + ", " + "w " * 30, [56, 30]),       # comma 20 from the end: still cut
    ("w " * 54 + ", " + "w " * 30, [75, 10]),       # 21 from the end: too far back
    ("w " * 74 + ", w", [75, 1]),                   # comma is the last token that fits
    ("w BREAK w", [1, 1]),
    ("BREAK w", [0, 1]),
    ("w BREAK", [1]),
    ("w " * 75 + "BREAK w", [75, 1]),              # a full chunk waits for the next token
    ("w BREAK BREAK w", [1, 0, 1]),
]


@pytest.mark.parametrize("text, lengths", CHUNKS)
def test_chunk_lengths(text, lengths):
    assert [len(c.tokens) for c in chunk_prompt(text, words, COMMA)] == lengths


def test_chunks_carry_weights():
    got = chunk_prompt("w (x:1.5) [w]", words, COMMA)
    assert got == [Chunk((1, 2, 1), (1.0, 1.5, DOWN))]
    assert [len(c.tokens) for c in chunk_prompt("w " * 70 + ", " + "w " * 10, words, COMMA, backtrack=0)] == [75, 6]
