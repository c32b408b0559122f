"""Temperature scaling (Guo et al. 2017): the T* that minimises the corpus NLL Σ_t ℓ_t(z_t / T).

Newton's method on β = 1/T (xent._temperature_fit, shared with the demo), a step halved while it does
not lower the NLL, converges in a few passes. Each pass re-projects the scored hidden states kept by
the run (N × D in the model's dtype, on the CPU) a chunk at a time; the logits are never kept. Under
torch.distributed each rank holds its own batches' states and the per-pass sums are added over the
ranks (in rank order: every rank finds the same T*).
"""

from __future__ import annotations

import torch

from .._temperature_fit import fit_inverse_temperature, nll_derivatives
from . import _distributed as dist
from ._errors import EvalError
from ._head import chunk_rows
from ._score import eval_stats
from ._sums import Totals


class Kept:
    """The scored hidden states [N, D], targets [N] and context lengths [N] of one batch."""

    def __init__(self, hidden: torch.Tensor, targets: torch.Tensor, context: torch.Tensor):
        self.hidden, self.targets, self.context = hidden, targets, context


def _chunks(head, kept: list[Kept]):
    """(float32 final logits at T = 1 [C, V], targets [C], context [C]) over the kept batches."""
    for k in kept:
        size = chunk_rows(len(k.targets), head.vocab, head.device)
        for s in range(0, len(k.targets), size):
            h = k.hidden[s : s + size].to(head.device)
            yield head.project(h), k.targets[s : s + size].to(head.device), k.context[s : s + size]


def _all_sum(values: tuple) -> tuple:
    gathered = dist.all_gather(values)
    return tuple(sum(v[i] for v in gathered) for i in range(len(values)))


def fit_temperature(head, kept: list[Kept], *, max_passes: int = 30) -> tuple[float, int]:
    """(T*, passes): the temperature minimising the NLL of the kept tokens (all ranks), by
    :func:`xent._temperature_fit.fit_inverse_temperature`; each pass re-projects the kept states and
    adds this rank's sums to the others'. EvalError where the fit has no finite minimum."""

    def sums(beta):
        return _all_sum(nll_derivatives(((z, y) for z, y, _ in _chunks(head, kept)), beta))

    try:
        return fit_inverse_temperature(sums, max_passes=max_passes)
    except ValueError as err:
        raise EvalError(str(err)) from None


@torch.no_grad()
def totals_at(head, kept: list[Kept], temperature: float, max_length: int) -> Totals:
    """This rank's Totals of the kept tokens with logits divided by ``temperature``."""
    t = Totals(max_length)
    for z, y, context in _chunks(head, kept):
        stats = {k: v.cpu() for k, v in eval_stats(z.div_(temperature), y).items()}
        stats["context"] = context
        t.add_tokens(stats)  # a non-finite value raises EvalError (fixed point), never summed
    return t
