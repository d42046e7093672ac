"""The package's exception types: clear, user-facing errors with one-line messages.

Every error a user can cause is one of these. The CLI prints ``str(error)`` in one line and exits
with status 2; the server answers 4xx with ``error.public`` (no file paths or file contents) and
the field the client sent.
"""

from __future__ import annotations


class SfumatoError(Exception):
    """Base: a clear, user-facing error (the CLI prints its message in one line, exit status 2)."""

    @property
    def public(self) -> str:
        """The message as a remote client may see it: no server paths, nothing read from a file."""
        return str(self)


class ParamError(SfumatoError, ValueError):
    """A request field is invalid; ``field`` names it."""

    def __init__(self, field: str, message: str, public: str | None = None):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message
        self._public = public

    @property
    def public(self) -> str:
        return f"{self.field}: {self._public}" if self._public is not None else str(self)


class CheckpointError(SfumatoError):
    """A file cannot be read as a checkpoint (unknown format, truncated, corrupt, unknown layout).
    ``reason``, where given, is the message without the file's path."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason

    @property
    def public(self) -> str:
        return self.reason or "not a usable model file"


class UnsafeCheckpointError(CheckpointError):
    """A pickle-based file references a global outside the allow-list; the message names the global."""

    @property
    def public(self) -> str:
        return "refused: the file references code outside the allow-list of what a checkpoint may contain"


class NonFiniteWeightsError(CheckpointError):
    """A model, VAE, LoRA, embedding or other weight file holds NaN or infinite values."""


class NonFiniteOutputError(SfumatoError):
    """A model produced NaN or infinite values (instead of an all-black image passed off as a result)."""


class EmbeddingError(SfumatoError):
    """An embedding file cannot be read, or does not fit the model."""


class MergeError(SfumatoError):
    """Checkpoints cannot be merged (different families, shape mismatches) or a setting is invalid."""


class NameNotFoundError(SfumatoError):
    """A name given for a file (LoRA, VAE, checkpoint, …) is not one the folder lists. Said the same
    way whether nothing is there or something outside the folder is: existence outside never shows."""

    def __init__(self, kind: str, name: object, folder: str, available: list[str] | None = None, *,
                 ambiguous: list[str] | None = None, invalid: bool = False):
        self.kind, self.name, self.folder = kind, name, folder
        self.available, self.ambiguous = available or [], ambiguous or []
        if invalid:
            message = f"{kind} name {name!r}: must be a plain name inside the {folder}"
        elif ambiguous:
            message = f"{kind} name {name!r} is ambiguous in the {folder}: {', '.join(ambiguous)}"
        else:
            shown = ", ".join(self.available[:20]) + (", …" if len(self.available) > 20 else "")
            message = f"{kind} {name!r} not found in the {folder}; available: {shown or 'none'}"
        super().__init__(message)
