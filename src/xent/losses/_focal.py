"""Losses that are a function of the target's NLL alone: focal loss and PolyLoss here, TaiLr and GOLD in
``_tailr.py``. They share one closed-form gradient, so the fused path needs no autograd for them.

docs/REFERENCE.md §3 is the contract; focal and Poly-1 reduce to cross-entropy at γ=0 / ε=0.
"""

from __future__ import annotations

import math

import torch

from .. import _validate as V
from .._reduce import apply_token_loss, check_common
from ._base import TokenLoss, exp_in_place, nll_and_shift


def nll_of_target(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """−log q_y = (m − z_y) + log Σ exp(z − m) per token (m the row max); never forms log_softmax."""
    return nll_and_shift(logits, target)[0]


def one_minus_q(nll: torch.Tensor) -> torch.Tensor:
    """1 − q_y from −log q_y as −expm1(−nll): exact when q_y is close to 1, where 1 − exp(·) cancels."""
    return -torch.expm1(-nll)


class NLLLoss(TokenLoss):
    r"""ℓ = (1−ε)·L(n) + (ε/V)·Σ_c (lse z − z_c) with n = −log q_y and L a function of n only.

    Subclasses define :meth:`nll_terms` once: L(n) as a differentiable expression (stop-gradients
    written with ``.detach()``), and its slope dL/dn under those stop-gradients. Because dn/dz = q − onehot_y,

    .. math:: \partial\ell/\partial z = ((1-\varepsilon)L'(n) + \varepsilon)\,q
              - (1-\varepsilon)L'(n)\,\mathrm{onehot}_y - \varepsilon/V

    which :meth:`value_and_grad` computes in the chunk's own buffer, like cross-entropy. The plain path
    differentiates :meth:`token_loss` by autograd, so fused == plain checks the slope.
    """

    has_closed_form_grad = True
    label_smoothing: float = 0.0

    def nll_terms(self, nll: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(L(n), dL/dn) per token."""
        raise NotImplementedError

    def token_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # logits [..., V], target [...] in range.
        nll, m, rel = nll_and_shift(logits, target)
        loss = self.nll_terms(nll)[0]
        eps = self.label_smoothing
        if eps > 0.0:
            # (ε/V)·Σ_c (lse − z_c) = ε·(rel − mean (z − m)): small parts, no cancellation.
            loss = (1.0 - eps) * loss + eps * (rel - (logits - m.unsqueeze(-1)).mean(dim=-1))
        return loss

    def value_and_grad(self, logits: torch.Tensor, target: torch.Tensor, scale: torch.Tensor):
        """Closed form on a [N, V] buffer that is overwritten with the gradient (no autograd graph).

        ``scale`` [N] multiplies each token's gradient; soft-capping adds the factor 1 − (z/c)².
        """
        eps, num_classes = self.label_smoothing, logits.shape[-1]
        rows, tanh, e, sumexp, _, nll, centred = exp_in_place(logits, target, self.softcap, eps > 0.0)
        value, slope = self.nll_terms(nll)
        coef = (1.0 - eps) * slope
        if eps > 0.0:
            value = (1.0 - eps) * value + eps * (sumexp.log() - centred / num_classes)
        grad = e.mul_(((coef + eps) * scale / sumexp).unsqueeze(-1))  # q_j · (coef + ε) · scale
        grad[rows, target] -= coef * scale
        if eps > 0.0:
            grad.sub_((eps / num_classes) * scale.unsqueeze(-1))
        if tanh is not None:
            grad.mul_(1.0 - tanh.square_())
        return value.detach(), grad


class Focal(NLLLoss):
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
        V.check_flags(detach_factor=detach_factor)
        if not (math.isfinite(gamma) and gamma >= 0.0):
            raise ValueError(f"gamma must be a finite number >= 0, got {gamma}")
        if not (math.isfinite(alpha) and alpha > 0.0):
            raise ValueError(f"alpha must be a finite number > 0, got {alpha}")
        self.gamma = float(gamma)
        self.alpha = float(alpha)
        self.detach_factor = detach_factor

    def nll_terms(self, nll):
        alpha, gamma = self.alpha, self.gamma
        if gamma == 0.0:
            return alpha * nll, torch.full_like(nll, alpha)
        base = one_minus_q(nll)  # 1 − q_y
        # q_y rounds to exactly 1 for a confident token (e.g. float32 logits 100 vs 0): d(1−q)^γ is
        # infinite there for γ < 1 and times nll = 0 gives NaN, though the true gradient of
        # (1−q)^γ·nll is 0. Take powers of a safe base and select 0, so both branches stay finite.
        positive = base > 0
        safe = torch.where(positive, base, 1.0)
        factor = torch.where(positive, safe.pow(gamma), 0.0)
        if self.detach_factor:
            return alpha * factor.detach() * nll, alpha * factor.detach()
        # d(1−q)^γ/dn = γ(1−q)^(γ−1)·q, as dq/dn = −q.
        dfactor = torch.where(positive, gamma * safe.pow(gamma - 1.0) * torch.exp(-nll), 0.0)
        return alpha * factor * nll, alpha * (factor + dfactor * nll).detach()


class Poly(NLLLoss):
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

    def nll_terms(self, nll):
        # d(1 − q)/dn = q = e^{−n}
        return nll + self.epsilon * one_minus_q(nll), (1.0 + self.epsilon * torch.exp(-nll)).detach()


def plain_loss(loss: TokenLoss, logits, target, *extra, ignore_index, reduction, num_items,
               token_weights=None, return_stats=False):
    """Validate, check V-dependent options, then the shared masking/reduction: every functional's body."""
    num_classes = check_common(logits, target, ignore_index=ignore_index, reduction=reduction,
                               num_items=num_items, token_weights=token_weights)
    loss.check(num_classes)
    return apply_token_loss(loss, logits, target, *extra, ignore_index=ignore_index, reduction=reduction,
                            num_items=num_items, token_weights=token_weights, return_stats=return_stats)


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
    token_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Focal loss −α(1−q_y)^γ log q_y of logits ``[..., V]`` against ids ``[...]``; see :class:`Focal`.

    ``ignore_index``, ``reduction``, ``num_items`` and ``token_weights`` behave exactly as in
    :func:`xent.cross_entropy`.

    Example:
        >>> import torch, xent
        >>> x = torch.tensor([[2.0, 1.0, 0.1], [0.5, 2.5, 0.3], [1.5, 0.5, 2.0]])
        >>> round(xent.focal_loss(x, torch.tensor([0, -100, 2])).item(), 6)
        0.086356
    """
    loss = Focal(gamma=gamma, alpha=alpha, detach_factor=detach_factor, softcap=softcap)
    return plain_loss(loss, logits, target, ignore_index=ignore_index, reduction=reduction,
                      num_items=num_items, token_weights=token_weights)


def poly_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    epsilon: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items=None,
    token_weights: torch.Tensor | None = None,
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
                      num_items=num_items, token_weights=token_weights)
