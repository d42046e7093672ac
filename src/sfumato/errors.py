"""The package's exception types: clear, user-facing errors with one-line messages."""


class SfumatoError(Exception):
    """Base: a clear, user-facing error (the CLI prints its message in one line, exit status 2)."""


class CheckpointError(SfumatoError):
    """A file cannot be read as a checkpoint (unknown format, truncated, corrupt, unknown layout)."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle-based file references a global outside the allow-list; the message names the global."""
