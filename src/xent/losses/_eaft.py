"""EAFT, entropy-adaptive fine-tuning: cross-entropy weighted by the model's own (stop-gradient) top-k
entropy. shared/REFERENCE.md §3 is the contract; the reference code fixes the details (see :class:`EAFT`).
"""

from __future__ import annotations

import math
import numbers

import torch

from .. import _validate as V
from ._base import TokenLoss, cap_in_place, exp_in_place, nll_and_shift
from ._focal import plain_loss

#: The divisor of the top-k entropy in the authors' code (LlamaFactory's ``_eaft_cross_entropy``:
#: ``entropy_approx / 3.0``), a rounded ln 20 = 2.9957.
AUTHORS_NORMALIZER = 3.0


def topk_entropy(logits: torch.Tensor, k: int) -> torch.Tensor:
    """H of the softmax over the min(k, V) largest logits of each row [...], without gradient.

    Formed as log Σ e^{v − v_max} − Σ p (v − v_max) over the top values v (non-negative parts); a −inf
    among them has p = 0 and adds 0."""
    with torch.no_grad():
        top = torch.topk(logits, min(k, logits.shape[-1]), dim=-1, sorted=False).values  # [..., k]
        s = top - top.amax(dim=-1, keepdim=True)
        s = s.clamp(min=torch.finfo(s.dtype).min)  # −inf → the lowest finite: 0·s stays 0
        e = torch.exp(s)
        sumexp = e.sum(dim=-1)
        return sumexp.log() - (e * s).sum(dim=-1) / sumexp


class EAFT(TokenLoss):
    r"""Entropy-Adaptive Fine-Tuning (Diao et al. 2026, arXiv 2601.02151; reference code: LlamaFactory
    ``use_eaft_loss`` / ``eaft_alpha``, axolotl ``eaft_k`` / ``eaft_alpha``).

    .. math::
        \ell = \operatorname{sg}\big(\tilde H_k\big)^{\alpha}\cdot(-\log q_y), \qquad
        \tilde H_k = H\big(\operatorname{softmax}(\operatorname{top}_k z)\big) / c

    The weight is the entropy of the softmax over the k largest logits, normalised by c: low-entropy
    (confident) tokens whose label the model disagrees with get little gradient, so fine-tuning forgets
    less. Gradient (the weight is stop-gradient): ∂ℓ/∂z = sg(H̃)^α·(q − onehot_y).

    Defaults as the reference code: k = 20, α = 1, c = 3.0. The paper writes c = ln k (ln 20 = 2.9957);
    the authors' LlamaFactory code divides by the constant 3.0, which xent follows (``normalizer=None``
    gives ln min(k, V); the two differ by a factor 0.9986^α); axolotl's ``eaft_loss`` does not normalise
    at all (``normalizer=1.0``) and adds 1e-10 inside its log (xent forms the entropy without an epsilon).
    Both average the weighted losses over the valid tokens (not over the weights), as xent's "mean"
    does. k larger than V uses V (as axolotl); with one class the entropy is 0.
    """

    has_closed_form_grad = True

    def __init__(self, *, k: int = 20, alpha: float = 1.0, normalizer: float | None = AUTHORS_NORMALIZER,
                 softcap: float | None = None):
        super().__init__(softcap=softcap)
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        if not V.check_number("alpha", alpha) >= 0.0:
            raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
        if normalizer is not None and not V.check_number("normalizer", normalizer) > 0.0:
            raise ValueError(f"normalizer must be None (ln k) or a finite number > 0, got {normalizer!r}")
        self.k = int(k)
        self.alpha = float(alpha)
        self.normalizer = None if normalizer is None else float(normalizer)

    def weight(self, logits: torch.Tensor) -> torch.Tensor:
        """sg(H̃_k)^α per token [...] of (already capped) logits [..., V]."""
        k = min(self.k, logits.shape[-1])
        ent = topk_entropy(logits, k)
        c = self.normalizer if self.normalizer is not None else math.log(k)
        scaled = ent / c if c > 0.0 else torch.zeros_like(ent)  # k = 1: H = 0 (ln 1 = 0)
        return scaled.clamp(min=0.0).pow(self.alpha)  # clamp: a rounding −0 never gives NaN for α < 1

    def token_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # logits [..., V] (already capped), target [...] in range.
        return self.weight(logits) * nll_and_shift(logits, target)[0]

    def value_and_grad(self, logits: torch.Tensor, target: torch.Tensor, scale: torch.Tensor):
        """Closed form on a [N, V] buffer overwritten with the gradient: w·(q − onehot_y)·scale, the
        weight w from the top-k of the capped logits before they are overwritten."""
        logits, tanh = cap_in_place(logits, self.softcap)
        w = self.weight(logits)
        rows, _, e, sumexp, _, nll, _ = exp_in_place(logits, target, None)
        grad = e.mul_((w * scale / sumexp).unsqueeze(-1))
        grad[rows, target] -= w * scale
        if tanh is not None:
            grad.mul_(1.0 - tanh.square_())
        return w * nll, grad


def eaft_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    k: int = 20,
    alpha: float = 1.0,
    normalizer: float | None = AUTHORS_NORMALIZER,
    softcap: float | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items=None,
    token_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """EAFT loss sg(H̃_k)^α·(−log q_y) of logits ``[..., V]`` against ids ``[...]``; see :class:`EAFT`.

    ``ignore_index``, ``reduction``, ``num_items`` and ``token_weights`` behave exactly as in
    :func:`xent.cross_entropy`. LlamaFactory's ``eaft_loss_func(outputs, labels, num_items_in_batch)`` is
    ``xent.eaft_loss(logits[:, :-1], labels[:, 1:], num_items=num_items_in_batch)``.

    Example:
        >>> import torch, xent
        >>> x = torch.tensor([[2.0, 1.0, 0.1], [0.5, 2.5, 0.3], [1.5, 0.5, 2.0]])
        >>> round(xent.eaft_loss(x, torch.tensor([0, -100, 2]), normalizer=1.0, k=3).item(), 6)
        0.464368
    """
    loss = EAFT(k=k, alpha=alpha, normalizer=normalizer, softcap=softcap)
    return plain_loss(loss, logits, target, ignore_index=ignore_index, reduction=reduction,
                      num_items=num_items, token_weights=token_weights)
