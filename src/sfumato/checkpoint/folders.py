"""Names → files inside a models folder: the one resolver that the server's catalog, the prompt-tag
loaders (``<lora:…>``, ``<hypernet:…>``) and the command line all use.

A folder lists the files it holds: regular files with the kind's extensions, found by walking it
without following folder links, and file links only where the linked file lies inside the folder
(symlinks resolved). A name is looked up in that list only, so a name never reaches a file the
listing does not show, whatever links, ``..`` or absolute paths it tries; and the answer for a
name outside is the same as for a name that does not exist. The path handed to a loader is the
resolved one, checked again when it is handed out.

Accepted names, as AUTOMATIC1111 accepts them: the relative name with or without its extension
(``sub/style.safetensors``, ``sub/style``), A1111's model name (``sub_style``), a title with its
hash (``style [0123abcd]``), and a bare file name found in a sub-folder when it is unique there.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import NameNotFoundError

_TITLE_HASH = re.compile(r"\s*\[[0-9a-fA-F]{8,64}\]$")


@dataclass(frozen=True)
class FolderEntry:
    """One file (or diffusers folder) a folder lists. ``name`` is relative to the folder, posix separators."""

    kind: str
    name: str
    path: Path
    is_dir: bool = False     # a diffusers folder (decided when listed: lookups stat nothing)

    @property
    def base(self) -> str:
        """The relative name without its extension."""
        return self.name if self.is_dir or "." not in self.name.rsplit("/", 1)[-1] else self.name.rsplit(".", 1)[0]

    @property
    def stem(self) -> str:
        return self.base.rsplit("/", 1)[-1]

    @property
    def model_name(self) -> str:
        """A1111's ``model_name``: the relative name, folders joined by ``_``, without extension."""
        return self.base.replace("/", "_")


def plain_name(name: object) -> str | None:
    """``name`` if it can only mean something inside a folder (relative, ``/``-separated, no ``..``,
    no NUL, no drive, no backslash), else None."""
    if not isinstance(name, str) or not name.strip() or len(name) > 1024:
        return None
    if "\0" in name or "\\" in name or name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return None
    if any(part in ("..", ".") for part in name.split("/")):
        return None
    return name


def strip_title_hash(name: str) -> str:
    """``"style [0123abcd]"`` → ``"style"`` (A1111 lists models as titles with a hash)."""
    return _TITLE_HASH.sub("", name.strip())


class ModelFolder:
    """The files of one kind (LoRA, VAE, checkpoint, …) inside ``root``.

    ``label`` says where in messages ("Lora folder", "--lora-dir"), never the absolute path;
    ``skip``: top-level sub-folders that belong to other kinds; ``diffusers``: a sub-folder holding
    ``model_index.json`` is one entry (a diffusers pipeline folder)."""

    def __init__(self, kind: str, root: str | Path, extensions: Iterable[str], *, label: str | None = None,
                 skip: Iterable[str] = (), diffusers: bool = False):
        self.kind = kind
        self.root = Path(root)
        self.extensions = tuple(e.lower() for e in extensions)
        self.label = label or f"{kind} folder"
        self.skip = set(skip)
        self.diffusers = diffusers
        self._entries: list[FolderEntry] | None = None

    @property
    def real(self) -> Path:
        return self.root.resolve()

    def entries(self, refresh: bool = False) -> list[FolderEntry]:
        if self._entries is None or refresh:
            self._entries = sorted(self._scan(), key=lambda e: e.name)
        return list(self._entries)

    def contains(self, path: str | Path) -> bool:
        """Whether ``path``, links resolved, is an existing file or folder inside this folder."""
        try:
            resolved = Path(path).resolve()
        except (OSError, RuntimeError):   # a link loop
            return False
        return resolved.is_relative_to(self.real) and resolved.exists()

    def find(self, name: str) -> FolderEntry:
        """The listed entry ``name`` means (see the module docstring); NameNotFoundError otherwise.
        A miss rescans the folder once (a file added since)."""
        plain = plain_name(name)
        if plain is None:
            raise NameNotFoundError(self.kind, name, self.label, invalid=True)
        key = strip_title_hash(plain)
        for attempt in range(2):
            entries = self.entries(refresh=attempt == 1)
            exact = [e for e in entries if key in (e.name, e.base)]
            if len(exact) == 1:
                return self._checked(exact[0], name)
            loose = [e for e in entries if key in (e.stem, e.model_name)]
            if len(loose) == 1:
                return self._checked(loose[0], name)
            if len(loose) > 1:
                raise NameNotFoundError(self.kind, name, self.label, ambiguous=[e.name for e in loose])
        raise NameNotFoundError(self.kind, name, self.label, [e.name for e in self.entries()])

    def path(self, name: str) -> Path:
        """The resolved path of the file ``name`` means."""
        return self.find(name).path.resolve()

    def _checked(self, entry: FolderEntry, name: str) -> FolderEntry:
        """At use time: the entry still resolves inside the folder (a link changed since the scan)."""
        if not self.contains(entry.path):
            raise NameNotFoundError(self.kind, name, self.label, [e.name for e in self.entries(refresh=True)])
        return entry

    def _scan(self) -> list[FolderEntry]:
        root = self.root
        if not root.is_dir():
            return []
        out = []
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            here = Path(dirpath)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and not (here == root and d in self.skip))
            if self.diffusers and here != root and "model_index.json" in filenames:
                dirnames[:] = []
                if self.contains(here):
                    out.append(FolderEntry(self.kind, here.relative_to(root).as_posix(), here, True))
                continue
            for filename in filenames:
                path = here / filename
                if filename.startswith(".") or not filename.lower().endswith(self.extensions):
                    continue
                if self.contains(path) and path.resolve().is_file():
                    out.append(FolderEntry(self.kind, path.relative_to(root).as_posix(), path))
        return out
