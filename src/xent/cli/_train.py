"""``xent train``: train a causal LM with any xent objective (placeholder until the trainer lands)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("train", help="train a causal language model with an xent objective")
    p.set_defaults(run=run)


def run(args) -> int:
    from . import CommandError

    raise CommandError("not implemented yet")
