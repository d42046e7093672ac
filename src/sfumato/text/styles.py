"""A1111's prompt styles: named prompt and negative-prompt snippets kept in a ``styles.csv``
(``name,prompt,negative_prompt``), applied to a request's prompts in order.

A style whose text holds ``{prompt}`` wraps the prompt (the placeholder replaced by it); any other
style is appended after a comma (empty parts left out), exactly as A1111's ``merge_prompts`` does.
The file is read with a bound on its size and on the number of styles.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from ..errors import ParamError, SfumatoError

MAX_BYTES = 4 << 20
MAX_STYLES = 10_000


@dataclass(frozen=True)
class Style:
    name: str
    prompt: str = ""
    negative_prompt: str = ""


def read_styles(path: str | Path) -> dict[str, Style]:
    """The styles of an A1111 ``styles.csv`` by name (the first of a repeated name wins, as in A1111)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise SfumatoError(f"styles: {path} is {size} bytes; at most {MAX_BYTES}")
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise SfumatoError(f"styles: cannot read {path} ({type(e).__name__})") from None
    try:
        rows = list(csv.DictReader(io.StringIO(text)))
    except csv.Error as e:
        raise SfumatoError(f"styles: {path} is not a CSV file ({e})") from None
    if len(rows) > MAX_STYLES:
        raise SfumatoError(f"styles: {path} holds {len(rows)} styles; at most {MAX_STYLES}")
    styles: dict[str, Style] = {}
    for row in rows:
        name = (row.get("name") or "").strip()
        if name and name not in styles:
            styles[name] = Style(name, row.get("prompt") or "", row.get("negative_prompt") or "")
    return styles


def merge_prompts(style: str, prompt: str) -> str:
    """A1111's merge: ``{prompt}`` in the style is replaced by the prompt, else the style follows it."""
    if "{prompt}" in style:
        return style.replace("{prompt}", prompt)
    return ", ".join(part for part in (prompt.strip(), style.strip()) if part)


def apply_styles(prompt: str, negative_prompt: str, names: list[str], styles: dict[str, Style],
                 field: str = "styles") -> tuple[str, str]:
    """(prompt, negative prompt) with the named styles applied in order; an unknown name is a
    ParamError naming ``field``."""
    for name in names:
        style = styles.get(name) if isinstance(name, str) else None
        if style is None:
            shown = ", ".join(list(styles)[:20]) or "none"
            raise ParamError(field, f"unknown style {name!r}; available: {shown}")
        prompt = merge_prompts(style.prompt, prompt)
        negative_prompt = merge_prompts(style.negative_prompt, negative_prompt)
    return prompt, negative_prompt
