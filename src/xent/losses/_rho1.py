"""Rho-1 selective language modelling (Lin et al. 2024, arXiv 2404.07965): train only on the tokens whose
excess loss CE_θ − CE_ref is in the top fraction of the call's valid tokens. The loss object and its plain
function on materialised logits; the fused two-pass version is :func:`xent.linear_rho1_loss`.
"""

from __future__ import annotations

import torch

from .. import _validate as V
from .._reduce import apply_token_loss, check_common, select_top_fraction
from ._base import TokenLoss, nll_and_shift
from ._cross_entropy import CrossEntropy

#: The fraction of tokens Rho-1 trains on: 60% for its 1B model in the paper's math continual
#: pretraining (70% for 7B).
DEFAULT_RATIO = 0.6


class Rho1(CrossEntropy):
    r"""Rho-1 selective language modelling (Lin et al., NeurIPS 2024, "Rho-1: Not All Tokens Are What You
    Need", arXiv 2404.07965).

    .. math:: e_t = \mathrm{CE}_\theta(t) - \mathrm{CE}_{\mathrm{ref}}(t), \qquad
              L = \frac{1}{|S|}\sum_{t \in S} \mathrm{CE}_\theta(t), \quad
              S = \text{the } \lfloor k\,n \rfloor \text{ valid tokens of largest } e_t

    The per-token loss is cross-entropy (soft-capped when ``softcap`` is set); the selection is over a
    whole call, so this object is used by :func:`xent.rho1_loss` and :func:`xent.linear_rho1_loss`, not by
    :func:`xent.linear_loss` (which refuses it). ``ratio`` k: 0.6 as the paper's 1B model (0.7 for 7B).
    Ties in e_t: stable order (the earlier token first). Gradients reach the selected tokens only; the
    selection itself is not differentiated.
    """

    selects_tokens = True

    def __init__(self, *, ratio: float = DEFAULT_RATIO, softcap: float | None = None):
        super().__init__(softcap=softcap)
        V.check_range("ratio", ratio, 0.0, 1.0)
        self.ratio = float(ratio)

    def as_cross_entropy(self) -> CrossEntropy:
        return CrossEntropy(softcap=self.softcap)

    def __repr__(self) -> str:
        return f"Rho1(ratio={self.ratio!r}, softcap={self.softcap!r})"


class Excess(TokenLoss):
    """CE_θ − CE_ref per token, from the model's and the reference's logits (both soft-capped alike):
    the selection score of the fused path's first pass with a reference head."""

    num_extra = 1

    def __call__(self, logits, target, ref_logits):
        if self.softcap is not None:
            logits = self.softcap * torch.tanh(logits / self.softcap)
            ref_logits = self.softcap * torch.tanh(ref_logits / self.softcap)
        return nll_and_shift(logits, target)[0] - nll_and_shift(ref_logits.to(logits.dtype), target)[0]


def check_ref_losses(ref_losses, target, ignore_index, shift=False):
    """Shaped like the target and finite wherever it is read (a valid target; not the first position
    under ``shift``): an infinite reference loss would make the excess ±inf and rig the selection."""
    V.check_floating("ref_losses", ref_losses)
    if tuple(ref_losses.shape) != tuple(target.shape):
        raise ValueError(f"ref_losses shape {tuple(ref_losses.shape)} must equal the target shape "
                         f"{tuple(target.shape)}")
    read = target != ignore_index
    if shift:
        read = read[..., 1:]
        ref_losses = ref_losses[..., 1:]
    bad = read & ~torch.isfinite(ref_losses.detach())
    n_bad = int(bad.sum())
    if n_bad:
        raise ValueError(f"ref_losses has {n_bad} non-finite value(s) at valid targets (the first is "
                         f"{ref_losses.detach()[bad][0].item()}); every reference loss must be finite")


def rho1_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    ref_losses: torch.Tensor,
    *,
    ratio: float = DEFAULT_RATIO,
    softcap: float | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items=None,
    token_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rho-1 loss of logits ``[..., V]`` against ids ``[...]``: cross-entropy on the ⌊ratio·n⌋ valid tokens
    whose excess CE_θ − ``ref_losses`` is largest; see :class:`xent.losses.Rho1`.

    ``ref_losses`` ``[...]`` (shaped like ``target``): the reference model's per-token cross-entropy,
    e.g. ``xent.cross_entropy(ref_logits, target, reduction="none")``. ``reduction="mean"`` divides by
    the number of selected tokens (by Σ w_t over them with ``token_weights``, which multiply the selected
    tokens' losses; a token of weight 0 is never selected). ``num_items`` replaces that denominator: for
    gradient accumulation pass the selected-token count of the whole step (each call selects
    ⌊ratio·n⌋ of its own n valid tokens). ``"none"``: CE at the selected tokens, 0 elsewhere.
    """
    loss = Rho1(ratio=ratio, softcap=softcap)
    check_common(logits, target, ignore_index=ignore_index, reduction=reduction, num_items=num_items,
                 token_weights=token_weights)
    check_ref_losses(ref_losses, target, ignore_index)
    ce = loss.as_cross_entropy()
    with torch.no_grad():
        own = apply_token_loss(ce, logits, target, ignore_index=ignore_index, reduction="none")
    valid = target != ignore_index
    if token_weights is not None:
        valid = valid & (token_weights != 0)
    selected = select_top_fraction(own - ref_losses.detach().to(own.dtype), valid, loss.ratio)
    weights = selected.to(own.dtype) if token_weights is None else torch.where(selected, token_weights, 0.0)
    return apply_token_loss(ce, logits, target, ignore_index=ignore_index, reduction=reduction,
                            num_items=num_items, token_weights=weights)
