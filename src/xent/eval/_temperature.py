"""Temperature scaling (Guo et al. 2017): the T* that minimises the corpus NLL Σ_t ℓ_t(z_t / T).

With β = 1/T the corpus NLL F(β) = Σ_t [logsumexp(β z_t) − β z_{t,y}] is convex in β, with
F'(β) = Σ_t (E_q[z] − z_y) and F''(β) = Σ_t Var_q[z] (q = softmax(β z_t)): Newton's method on β from
β = 1, a step halved while it does not lower F, converges in a few passes. Each pass re-projects the
scored hidden states kept by the run (N × D in the model's dtype, on the CPU) a chunk at a time; the
logits are never kept. Under torch.distributed each rank holds its own batches' states and the
per-pass sums are added over the ranks (in rank order: every rank finds the same T*).
"""

from __future__ import annotations

import torch

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


@torch.no_grad()
def _pass(head, kept: list[Kept], beta: float) -> tuple[float, float, float, int]:
    """(F(β), F'(β), F''(β), tokens) summed over this rank's kept tokens, in float64."""
    f = g = h = 0.0
    n = 0
    for z, y, _ in _chunks(head, kept):
        z_y = z.gather(-1, y[:, None]).squeeze(-1).double()
        z.mul_(beta)
        m = z.amax(-1)
        e = torch.exp(z - m[:, None])
        S = e.sum(-1)
        z.div_(beta)  # back to z: the derivatives are in z
        mean = torch.linalg.vecdot(e, z) / S  # E_q[z]
        var = torch.linalg.vecdot(e, (z - mean[:, None]).square_()) / S  # Var_q[z]
        f += float(((m.double() + S.double().log()) - beta * z_y).sum())
        g += float((mean.double() - z_y).sum())
        h += float(var.double().sum())
        n += len(y)
    return f, g, h, n


def _all_sum(values: tuple) -> tuple:
    gathered = dist.all_gather(values)
    return tuple(sum(v[i] for v in gathered) for i in range(len(values)))


def fit_temperature(head, kept: list[Kept], *, max_passes: int = 30) -> tuple[float, int]:
    """(T*, passes): the temperature minimising the NLL of the kept tokens (all ranks). Newton steps on
    β = 1/T, each halved (one more pass) while it raises F beyond the float32 rounding of the sum; stops
    when a step is below 1e-7·β (the per-token values are float32: F' is known to about that)."""
    beta = 1.0
    f, g, h, n = _all_sum(_pass(head, kept, beta))
    passes = 1
    if n == 0:
        raise EvalError("no tokens to fit a temperature on")
    while passes < max_passes and h > 0:
        step = -g / h
        if abs(step) <= 1e-7 * beta:
            break
        while beta + step <= 0:  # stay at β > 0
            step /= 2
        while passes < max_passes:
            f2, g2, h2, _ = _all_sum(_pass(head, kept, beta + step))
            passes += 1
            if f2 <= f + 1e-7 * abs(f):  # not higher, up to the float32 rounding of the sum: accept
                break
            step /= 2
        else:
            break
        beta, f, g, h = beta + step, f2, g2, h2
    return 1.0 / beta, passes


@torch.no_grad()
def totals_at(head, kept: list[Kept], temperature: float, max_length: int) -> Totals:
    """This rank's Totals of the kept tokens with logits divided by ``temperature``."""
    t = Totals(max_length)
    for z, y, context in _chunks(head, kept):
        stats = {k: v.cpu() for k, v in eval_stats(z.div_(temperature), y).items()}
        stats["context"] = context
        t.add_tokens(stats)  # a non-finite value raises EvalError (fixed point), never summed
    return t
