"""Finding an add-on file named in a prompt tag (``<lora:name>``, ``<hypernet:name>``) inside its folder."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..errors import SfumatoError


def find_named_file(kind: str, name: str, directory: str | Path, extensions: Sequence[str]) -> Path:
    """The `kind` file called `name` (with or without one of `extensions`, optionally in a sub-folder)
    inside `directory`; a bare name is also searched for in sub-folders. Names that leave the folder
    are refused; a missing or ambiguous name is an error."""
    directory = Path(directory)
    parts = Path(name).parts
    if not name or Path(name).is_absolute() or "\\" in name or any(p in ("..", ".") for p in parts):
        raise SfumatoError(f"{kind} name {name!r}: must be a plain name inside the {kind} folder")
    if not directory.is_dir():
        raise SfumatoError(f"{kind} folder not found: {directory}")
    files = {name} if Path(name).suffix.lower() in extensions else {name + e for e in extensions}
    found = sorted(directory / f for f in files if (directory / f).is_file())
    if not found and len(parts) == 1:
        found = sorted(p for p in directory.rglob("*") if p.name in files and p.is_file())
    if not found:
        raise SfumatoError(f"{kind} {name!r} not found in {directory} (looked for {', '.join(sorted(files))})")
    if len(found) > 1:
        raise SfumatoError(f"{kind} name {name!r} is ambiguous: {', '.join(str(p) for p in found)}")
    return found[0]
