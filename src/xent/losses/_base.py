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
        """Per-token class weight w_y in the denominator of reduction="mean"; None means 1. (Per-token
        weights w_t are the caller's, applied by the reduction and the fused engine: no loss sees them.)"""
        return None

    def check(self, num_classes: int) -> None:
        """Validates options that depend on the vocabulary size (e.g. a class-weight length)."""

    def for_mean(self, count_scale: torch.Tensor) -> TokenLoss:
        """The loss to use under a class-weighted reduction="mean", whose denominator is Σ_valid w_y.

        ``count_scale`` = Σ_valid w_t·w_y / Σ_valid w_t (w_t the per-token weights, 1 without them: then
        Σ_valid w_y / the count of valid tokens). A term that must be averaged over the valid tokens rather
        than over Σ w_t·w_y (cross-entropy's z-loss) is multiplied by it, so Σ w_t·ℓ / Σ w_t·w_y gives that
        term's w_t-weighted mean. Losses without such a term return themselves."""
        return self

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


def row_max(logits: torch.Tensor) -> torch.Tensor:
    """m = max_c z_c [..., 1], the shift of every log-sum-exp here (0 for a row of all −inf, which then
    stays −inf); no gradient flows through it (the results do not depend on it)."""
    m = logits.detach().amax(dim=-1, keepdim=True)
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def nll_and_lse(logits: torch.Tensor, target: torch.Tensor):
    """(−log q_y, m, rel) per token for logits [..., V] and in-range ids [...]: m the row max and
    rel = log Σ_c exp(z_c − m), so lse z = m + rel (use rel itself where lse − m is wanted).

    −log q_y = (m − z_y) + log Σ_c exp(z_c − m): both parts are small where the logits are large, so the
    precision does not fall as the logits grow (lse − z_y loses the digits of lse: at an offset of 1e4,
    5e-4 in float32). A row of equal values gives exactly log V."""
    m = row_max(logits)
    rel = torch.logsumexp(logits - m, dim=-1)  # log Σ exp(z − m) ∈ [0, log V]
    m = m.squeeze(-1)
    z_y = logits.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return (m - z_y) + rel, m, rel


def check_first_order(what: str) -> None:
    """Called in a closed-form backward: under create_graph=True (a double backward, e.g. a gradient
    penalty) the returned gradient would have no graph and the second-order term would be silently 0."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{what} computes its gradient in closed form and is first-order only: it cannot differentiate "
            "twice (backward with create_graph=True). Use the plain path on materialised logits for a "
            "gradient penalty or other double backward."
        )


def exp_in_place(logits: torch.Tensor, target: torch.Tensor, softcap: float | None, centred: bool = False,
                 w: torch.Tensor | None = None):
    """The shared start of a closed-form gradient on a [N, V] chunk, which it overwrites.

    Caps (z ← c·tanh(z/c)), then turns the buffer into e = exp(z − m), m = max z. Returns (rows, tanh or
    None (for the chain factor 1 − tanh²), e [N, V], Σe [N], lse [N], −log q_y [N], centred [N] or None)
    with −log q_y = (m − z_y) + log Σe (no cancellation at large logits) and, when asked, the centred
    sum Σ_c w_c (z_c − m) (w = 1 without ``w``) for label smoothing, formed before the exponential.
    """
    rows = torch.arange(logits.shape[0], device=logits.device)
    logits, tanh = cap_in_place(logits, softcap)
    z_y = logits[rows, target]
    m = row_max(logits)
    shifted = logits.sub_(m)  # in place: the logits are not needed past this point
    summed = None
    if centred:
        summed = shifted.sum(dim=-1) if w is None else shifted @ w
    e = shifted.exp_()
    sumexp = e.sum(dim=-1)
    rel = sumexp.log()
    m = m.squeeze(-1)
    return rows, tanh, e, sumexp, m + rel, (m - z_y) + rel, summed
