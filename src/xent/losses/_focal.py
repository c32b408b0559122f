"""Focal loss and PolyLoss: cross-entropy reweighted by how wrong the model is.

shared/REFERENCE.md §3 is the contract; both reduce to cross-entropy at γ=0 / ε=0.
"""

from __future__ import annotations

import math

import torch

from .._reduce import apply_token_loss, check_common
from ._base import TokenLoss


def nll_of_target(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """−log q_y = logsumexp(z) − z_y, per token; never forms log_softmax over V."""
    return torch.logsumexp(logits, dim=-1) - logits.gather(-1, target.unsqueeze(-1)).squeeze(-1)


def one_minus_q(nll: torch.Tensor) -> torch.Tensor:
    """1 − q_y from −log q_y as −expm1(−nll): exact when q_y is close to 1, where 1 − exp(·) cancels."""
    return -torch.expm1(-nll)


class Focal(TokenLoss):
    r"""Focal loss (Lin et al., ICCV 2017, arXiv 1708.02002), the multi-class form.

    .. math:: \ell = -\alpha\,(1-q_y)^{\gamma}\,\log q_y

    γ down-weights tokens the model already predicts well (γ=2, α=0.25 were the detection settings of
    the paper; for language models α is a plain scale, so the default is α=1). γ=0 is cross-entropy
    scaled by α. ``detach_factor=True`` stops the gradient through (1−q_y)^γ, so the factor acts as a
    fixed per-token weight on the cross-entropy gradient (as importance-weighting losses like TaiLr do).
    """

    def __init__(self, *, gamma: float = 2.0, alpha: float = 1.0, detach_factor: bool = False,
                 softcap: float | None = None):
        super().__init__(softcap=softcap)
        if not (math.isfinite(gamma) and gamma >= 0.0):
            raise ValueError(f"gamma must be a finite number >= 0, got {gamma}")
        if not (math.isfinite(alpha) and alpha > 0.0):
            raise ValueError(f"alpha must be a finite number > 0, got {alpha}")
        self.gamma = float(gamma)
        self.alpha = float(alpha)
        self.detach_factor = bool(detach_factor)

    def token_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        nll = nll_of_target(logits, target)  # [...]
        if self.gamma == 0.0:
            return self.alpha * nll
        base = one_minus_q(nll)
        # q_y rounds to exactly 1 for a confident token (e.g. float32 logits 100 vs 0): d(1−q)^γ is
        # infinite there for γ < 1 and times nll = 0 gives NaN, though the true gradient of
        # (1−q)^γ·nll is 0. Take the power on a safe base and select 0, so both branches stay finite.
        positive = base > 0
        factor = torch.where(positive, torch.where(positive, base, 1.0).pow(self.gamma), 0.0)
        if self.detach_factor:
            factor = factor.detach()
        return self.alpha * factor * nll


class Poly(TokenLoss):
    r"""Poly-1 loss (Leng et al., ICLR 2022, "PolyLoss", arXiv 2204.12511).

    .. math:: \ell = -\log q_y + \varepsilon\,(1-q_y)

    The first polynomial coefficient of cross-entropy's Taylor expansion in (1−q_y), perturbed by ε.
    The paper's best settings: ε=2 for ImageNet classification, ε=−1 for detection; ε=0 is
    cross-entropy. ε ≥ −1 keeps the loss non-negative (−log q ≥ 1 − q).
    """

    def __init__(self, *, epsilon: float = 1.0, softcap: float | None = None):
        super().__init__(softcap=softcap)
        if not (math.isfinite(epsilon) and epsilon >= -1.0):
            raise ValueError(f"epsilon must be a finite number >= -1, got {epsilon}")
        self.epsilon = float(epsilon)

    def token_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        nll = nll_of_target(logits, target)
        return nll + self.epsilon * one_minus_q(nll)


def plain_loss(loss: TokenLoss, logits, target, *extra, ignore_index, reduction, num_items):
    """Validate, check V-dependent options, then the shared masking/reduction: every functional's body."""
    num_classes = check_common(logits, target, ignore_index=ignore_index, reduction=reduction,
                               num_items=num_items)
    loss.check(num_classes)
    return apply_token_loss(loss, logits, target, *extra, ignore_index=ignore_index, reduction=reduction,
                            num_items=num_items)


def focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    gamma: float = 2.0,
    alpha: float = 1.0,
    detach_factor: bool = False,
    softcap: float | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items=None,
) -> torch.Tensor:
    """Focal loss −α(1−q_y)^γ log q_y of logits ``[..., V]`` against ids ``[...]``; see :class:`Focal`.

    ``ignore_index``, ``reduction`` and ``num_items`` behave exactly as in :func:`xent.cross_entropy`.

    Example:
        >>> import torch, xent
        >>> x = torch.tensor([[2.0, 1.0, 0.1], [0.5, 2.5, 0.3], [1.5, 0.5, 2.0]])
        >>> round(xent.focal_loss(x, torch.tensor([0, -100, 2])).item(), 6)
        0.086356
    """
    loss = Focal(gamma=gamma, alpha=alpha, detach_factor=detach_factor, softcap=softcap)
    return plain_loss(loss, logits, target, ignore_index=ignore_index, reduction=reduction,
                      num_items=num_items)


def poly_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    epsilon: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items=None,
) -> torch.Tensor:
    """Poly-1 loss −log q_y + ε(1−q_y) of logits ``[..., V]`` against ids ``[...]``; see :class:`Poly`.

    Example:
        >>> import torch, xent
        >>> x = torch.tensor([[2.0, 1.0, 0.1], [0.5, 2.5, 0.3], [1.5, 0.5, 2.0]])
        >>> round(xent.poly_loss(x, torch.tensor([0, -100, 2])).item(), 6)
        0.907805
    """
    loss = Poly(epsilon=epsilon, softcap=softcap)
    return plain_loss(loss, logits, target, ignore_index=ignore_index, reduction=reduction,
                      num_items=num_items)
