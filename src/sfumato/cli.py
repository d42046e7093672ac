"""The ``sfumato`` command (its package is ``sfumato.commands``, one module per command)."""

import sys

from .commands import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
