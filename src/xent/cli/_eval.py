"""``xent eval``: a causal LM's cross-entropy on a corpus (work in progress)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("eval", help="cross-entropy and perplexity of a causal LM on a corpus")
    p.set_defaults(run=run)


def run(args) -> int:
    from . import CommandError

    raise CommandError("not implemented yet")
