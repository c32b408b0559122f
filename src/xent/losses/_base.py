"""The per-token loss protocol: the unit every xent loss is written in.

A :class:`TokenLoss` maps float32 (or float64) logits ``[..., V]`` and in-range target ids ``[...]`` to
per-token losses ``[...]``. It knows nothing of ignored tokens, reductions or chunking: the plain path
(:func:`xent._reduce.apply_token_loss`) and the fused path (:func:`xent.linear_loss`) both call the same
object, so a loss written once is fused for free.
"""

from __future__ import annotations

import torch

from .. import _validate as V


class TokenLoss:
    """Base class. Subclasses implement :meth:`token_loss`; options live on the instance.

    ``softcap`` (Gemma 2) is applied here, before the loss sees the logits: z ← c·tanh(z/c).
    """

    #: Extra per-token tensors the loss takes after (logits, target), e.g. teacher logits.
    num_extra: int = 0
    #: The fused path hands the loss a chunk a cache-sized block of rows at a time; a loss that runs a
    #: matmul of its own per block (EMO's costs) asks for at least this many rows, for BLAS efficiency.
    min_block_rows: int = 1

    def __init__(self, *, softcap: float | None = None):
        V.check_options(softcap=softcap)
        self.softcap = softcap

    def __call__(self, logits: torch.Tensor, target: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        if self.softcap is not None:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        return self.token_loss(logits, target, *extra)

    def token_loss(self, logits: torch.Tensor, target: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def token_weight(self, target: torch.Tensor) -> torch.Tensor | None:
        """Per-token weight in the denominator of reduction="mean" (class weights); None means 1."""
        return None

    def check(self, num_classes: int) -> None:
        """Validates options that depend on the vocabulary size (e.g. a class-weight length)."""

    # A closed-form gradient, when a loss has one, lets the fused path skip autograd.
    has_closed_form_grad: bool = False

    def value_and_grad(self, logits: torch.Tensor, target: torch.Tensor, scale: torch.Tensor):
        """Returns (per-token loss [N], d(Σ scale·loss)/d logits [N, V]); may overwrite ``logits``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not isinstance(v, torch.Tensor))
        return f"{type(self).__name__}({opts})"


def cap_in_place(logits: torch.Tensor, softcap: float | None):
    """z ← c·tanh(z/c) in the buffer itself; returns (logits, tanh or None), tanh kept for the chain rule
    factor 1 − tanh² of a closed-form gradient."""
    if softcap is None:
        return logits, None
    tanh = torch.tanh(logits / softcap)
    return torch.mul(tanh, softcap, out=logits), tanh


def exp_in_place(logits: torch.Tensor, target: torch.Tensor, softcap: float | None, mean: bool = False):
    """The shared start of a closed-form gradient on a [N, V] chunk, which it overwrites.

    Caps (z ← c·tanh(z/c)), then turns the buffer into e = exp(z − max z). Returns (rows, tanh or None
    (for the chain factor 1 − tanh²), e [N, V], Σe [N], lse [N], −log q_y [N], mean z [N] or None).
    """
    rows = torch.arange(logits.shape[0], device=logits.device)
    logits, tanh = cap_in_place(logits, softcap)
    z_y = logits[rows, target]
    mean_z = logits.mean(dim=-1) if mean else None
    m = logits.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # a row of all −inf stays −inf
    e = logits.sub_(m).exp_()  # in place: the logits are not needed past this point
    sumexp = e.sum(dim=-1)
    lse = m.squeeze(-1) + sumexp.log()
    return rows, tanh, e, sumexp, lse, lse - z_y, mean_z
