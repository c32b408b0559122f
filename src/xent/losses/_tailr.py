"""TaiLr and GOLD: cross-entropy with a stop-gradient weight that grows with the model's own q_y.

Both down-weight tokens the model finds unlikely, which are often noise in the data (docs/REFERENCE.md §3).
"""

from __future__ import annotations

import torch

from .. import _validate as V
from ._focal import NLLLoss, plain_loss


class TaiLr(NLLLoss):
    r"""Total-variation-inspired weighted likelihood (Ji et al., ICLR 2023, "Tailoring Language Generation
    Models under Total Variation Distance", arXiv 2302.13344; code: thu-coai/TaiLr).

    .. math::
        w = \operatorname{sg}\Big(\operatorname{clamp}\Big(\frac{q_y}{\gamma + (1-\gamma)\,q_y},\,
            b,\, 1\Big)\Big), \qquad \ell = w \cdot (-\log q_y)

    with γ = ``gamma`` ∈ (0, 1] and b = ``threshold`` ∈ [0, 1]. Without the clamp the gradient is that of
    −log(γ + (1−γ) q_y)/(1−γ), a bound on the total variation distance; γ → 0 gives cross-entropy,
    γ = 1 gives GOLD's −sg(q_y)·log q_y. With label smoothing ε the loss is
    (1−ε)·ℓ + (ε/V)·Σ_c (−log q_c); the smoothing term is not reweighted (as the authors' code does).

    Settings used by the authors: γ=0.1, b=0.3 (machine translation); γ=0.8, b=0.2 (summarisation);
    γ=1e-7, b=0.2 (open-ended language modelling).
    """

    def __init__(self, *, gamma: float, threshold: float = 0.0, label_smoothing: float = 0.0,
                 softcap: float | None = None):
        super().__init__(softcap=softcap)
        V.check_range("gamma", gamma, 0.0, 1.0, lo_open=True)
        V.check_range("threshold", threshold, 0.0, 1.0)
        V.check_options(label_smoothing=label_smoothing)
        self.gamma = float(gamma)
        self.threshold = float(threshold)
        self.label_smoothing = float(label_smoothing)

    def nll_terms(self, nll):
        with torch.no_grad():
            # q/(γ + (1−γ)q) = 1/((1−γ) + γ·e^{nll}): a sum of non-negative terms, no cancellation and
            # no division by a vanishing q_y; e^{nll} overflowing to inf gives the right limit, 0.
            weight = torch.reciprocal((1.0 - self.gamma) + self.gamma * torch.exp(nll))
            weight = weight.clamp(min=self.threshold, max=1.0)
        return weight * nll, weight


class GOLD(TaiLr):
    r"""GOLD-δ (Pang & He, ICLR 2021, "Text Generation by Learning from Demonstrations",
    arXiv 2009.07839), the reward-1 case: off-policy policy gradient with the model itself as the
    importance weight.

    .. math:: \ell = -\operatorname{sg}(\max(q_y, b))\,\log q_y

    This is :class:`TaiLr` at γ=1. The paper lower-bounds the importance weight by a small constant for
    stability (``threshold`` = b, default 0: no bound) and starts from an MLE-trained model; weighting
    from scratch collapses onto easy tokens.
    """

    def __init__(self, *, threshold: float = 0.0, softcap: float | None = None):
        super().__init__(gamma=1.0, threshold=threshold, softcap=softcap)


def tailr_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    gamma: float,
    threshold: float = 0.0,
    label_smoothing: float = 0.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items=None,
    token_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """TaiLr loss of logits ``[..., V]`` against ids ``[...]``; formula and settings in :class:`TaiLr`.

    ``ignore_index``, ``reduction``, ``num_items`` and ``token_weights`` behave exactly as in
    :func:`xent.cross_entropy`.

    Example:
        >>> import torch, xent
        >>> x = torch.tensor([[2.0, 1.0, 0.1], [0.5, 2.5, 0.3], [1.5, 0.5, 2.0]])
        >>> round(xent.tailr_loss(x, torch.tensor([0, -100, 2]), gamma=0.1).item(), 6)
        0.47718
    """
    loss = TaiLr(gamma=gamma, threshold=threshold, label_smoothing=label_smoothing, softcap=softcap)
    return plain_loss(loss, logits, target, ignore_index=ignore_index, reduction=reduction,
                      num_items=num_items, token_weights=token_weights)


def gold_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    threshold: float = 0.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items=None,
    token_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """GOLD-δ loss −sg(max(q_y, threshold))·log q_y; see :class:`GOLD`.

    Example:
        >>> import torch, xent
        >>> x = torch.tensor([[2.0, 1.0, 0.1], [0.5, 2.5, 0.3], [1.5, 0.5, 2.0]])
        >>> round(xent.gold_loss(x, torch.tensor([0, -100, 2])).item(), 6)
        0.302505
    """
    loss = GOLD(threshold=threshold, softcap=softcap)
    return plain_loss(loss, logits, target, ignore_index=ignore_index, reduction=reduction,
                      num_items=num_items, token_weights=token_weights)

