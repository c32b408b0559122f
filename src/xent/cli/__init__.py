"""The ``xent`` command. Each subcommand lives in its own module with ``register(subparsers)``; a
module imports only argparse (and xent's own light modules) at registration and its heavy dependencies
when it runs, so ``xent --version`` stays fast. ``set_defaults(run=..., interrupted=...)``: the command,
and optionally the message Ctrl-C prints."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> module (relative to xent.cli) that defines register(subparsers)
COMMANDS = {
    "demo": "._demo",
    "eval": "._eval",
    "compare": "._compare",
    "train": "._train",
}


class CommandError(Exception):
    """A user-facing error: printed as one line, exit status 2, no traceback."""


def plain(doc: str) -> str:
    """A module docstring as --help text: without reStructuredText's double backticks."""
    return doc.replace("``", "")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="xent",
        description="Cross-entropy of language models: exact losses, fused linear+loss, evaluation.",
    )
    parser.add_argument("--version", action="version", version=f"xent {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS.values():
        importlib.import_module(module, __name__).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except CommandError as err:
        print(f"xent {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a command may say what Ctrl-C leaves behind and how to continue
        hint = getattr(args, "interrupted", None)
        print(f"xent {args.command}: {hint(args) if hint else 'interrupted'}", file=sys.stderr)
        return 130
