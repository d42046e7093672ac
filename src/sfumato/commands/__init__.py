"""The ``sfumato`` command line: one module per command, each adding its parser(s) to the main one
(``add_commands(subparsers)``, each parser's ``func`` the command). Commands build the library's
request objects and call the public API (``sfumato.load``, ``Pipeline``, ``GenerationParams``);
nothing here generates by itself.

Every error the user can cause is one line and exit status 2; an internal error is one line with
"rerun with -v for the traceback" (status 1).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ..errors import SfumatoError

MODULES = ("generate", "info", "train", "batch", "serve", "merge", "bench", "segment", "pose", "animate")


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors as one line (and exit status 2, as argparse has it)."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sfumato", description="Stable Diffusion in PyTorch.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name in MODULES:
        importlib.import_module(f"{__name__}.{name}").add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        return args.func(args) or 0
    except SfumatoError as e:
        print(f"sfumato: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sfumato: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 — a bug, not bad input: one line, the traceback on request
        if args.verbose:
            raise
        print(f"sfumato: internal error: {type(e).__name__}: {one_line(str(e))} "
              "(rerun with -v for the traceback)", file=sys.stderr)
        return 1


def one_line(text: str, limit: int = 2000) -> str:
    """Messages are one line: line breaks folded, surrogates (undecodable argv bytes) escaped."""
    line = " ".join(text.split("\n")).encode("utf-8", "backslashreplace").decode("utf-8")
    return line if len(line) <= limit else line[: limit - 1] + "…"
