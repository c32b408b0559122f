"""``torch.nn.Module`` wrappers: they hold options and call the functions, nothing more."""

from __future__ import annotations

import inspect

import torch

from ._causal import causal_lm_loss
from ._linear import RENAMED, linear_cross_entropy
from .losses._cross_entropy import cross_entropy


def _check_options(fn, options: dict, per_call: tuple) -> None:
    """Unknown or per-call options fail at construction, not silently at the first forward."""
    params = inspect.signature(fn).parameters.values()
    allowed = [p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name not in per_call]
    if any(p.kind is p.VAR_KEYWORD for p in params):  # old spellings, renamed by fn with a warning
        allowed += [old for old, new in RENAMED.items() if new in allowed]
    for name in options:
        if name not in allowed:
            raise TypeError(f"unknown option {name!r} for {fn.__name__}; options are {allowed}")


class CrossEntropyLoss(torch.nn.Module):
    """Module form of :func:`xent.cross_entropy`; ``forward(logits, target, num_items=None,
    token_weights=None)``."""

    def __init__(self, **options):
        super().__init__()
        _check_options(cross_entropy, options, per_call=("num_items", "token_weights"))
        self.options = options

    def forward(self, logits: torch.Tensor, target: torch.Tensor, num_items=None,
                token_weights=None) -> torch.Tensor:
        return cross_entropy(logits, target, num_items=num_items, token_weights=token_weights, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class CausalLMLoss(torch.nn.Module):
    """Module form of :func:`xent.causal_lm_loss`."""

    def __init__(self, **options):
        super().__init__()
        _check_options(causal_lm_loss, options,
                       per_call=("num_items_in_batch", "shift_labels", "position_ids", "token_weights"))
        self.options = options

    def forward(self, logits, labels, num_items_in_batch=None, shift_labels=None, position_ids=None,
                token_weights=None):
        return causal_lm_loss(
            logits, labels, num_items_in_batch=num_items_in_batch, shift_labels=shift_labels,
            position_ids=position_ids, token_weights=token_weights, **self.options,
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class LinearCrossEntropyLoss(torch.nn.Module):
    """Module form of :func:`xent.linear_cross_entropy`: ``forward(hidden, weight, target, bias=None,
    num_items=None, token_weights=None)``. Holds options only; the projection weight is the caller's
    (e.g. the LM head)."""

    def __init__(self, **options):
        super().__init__()
        _check_options(linear_cross_entropy, options, per_call=("linear_bias", "num_items", "token_weights"))
        self.options = options

    def forward(self, hidden, weight, target, bias=None, num_items=None, token_weights=None) -> torch.Tensor:
        return linear_cross_entropy(hidden, weight, target, linear_bias=bias, num_items=num_items,
                                    token_weights=token_weights, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
