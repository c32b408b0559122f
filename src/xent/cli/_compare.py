"""``xent compare``: two causal LMs on the same tokens (work in progress)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("compare", help="KL divergence and loss difference of two causal LMs")
    p.set_defaults(run=run)


def run(args) -> int:
    from . import CommandError

    raise CommandError("not implemented yet")
