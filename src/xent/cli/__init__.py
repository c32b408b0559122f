"""The ``xent`` command. Each subcommand lives in its own module with ``register(subparsers)``; a
module imports only argparse at registration and its heavy dependencies when it runs, so
``xent --version`` stays fast."""

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
    except KeyboardInterrupt:
        print(f"xent {args.command}: interrupted", file=sys.stderr)
        return 130
