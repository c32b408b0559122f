"""DFT (dynamic fine-tuning) and entropy-regularised cross-entropy, both with closed-form gradients so
the fused path runs them without autograd. shared/REFERENCE.md §3 is the contract.
"""

from __future__ import annotations

import torch

from .. import _validate as V
from ._base import TokenLoss, cap_in_place, nll_and_lse, row_max
from ._focal import plain_loss
from ._tailr import GOLD

#: β of :class:`EntropyRegularized` when not given (see its docstring for where 0.01 comes from).
DEFAULT_ENTROPY_BETA = 0.01


class DFT(GOLD):
    r"""Dynamic Fine-Tuning (Wu et al. 2025, "On the Generalization of SFT: A Reinforcement Learning
    Perspective with Reward Rectification", arXiv 2508.05629).

    .. math:: \ell = -\operatorname{sg}(q_y)\,\log q_y, \qquad
              \partial\ell/\partial z = q_y\,(q - \mathrm{onehot}_y)

    The paper reads SFT as a policy gradient whose implicit reward is 1/q_y and rectifies it by scaling
    each token's cross-entropy by its own (stop-gradient) probability. Its value is that of TRL's
    ``SFTTrainer`` with ``loss_type="dft"`` (per-token −sg(e^{log q_y})·log q_y, averaged over the valid
    tokens, or divided by ``num_items_in_batch``) and of Liger's ``use_token_scaling=True``. The same
    per-token loss as :class:`GOLD` with ``threshold=0`` (GOLD-δ, Pang & He 2021, reached the same
    weighting from off-policy learning with the model as the importance weight).
    """

    def __init__(self, *, softcap: float | None = None):
        super().__init__(threshold=0.0, softcap=softcap)

    def __repr__(self) -> str:
        return f"DFT(softcap={self.softcap!r})"


class EntropyRegularized(TokenLoss):
    r"""Cross-entropy minus an entropy bonus (the confidence penalty of Pereyra et al. 2017,
    "Regularizing Neural Networks by Penalizing Confident Output Distributions", arXiv 1701.06548).

    .. math::
        \ell = -\log q_y - \beta\,H(q), \qquad H(q) = -\sum_i q_i \log q_i, \qquad
        \frac{\partial H}{\partial z_i} = -q_i\,(\log q_i + H)

    Sign convention: β > 0 is an entropy *bonus*: minimising ℓ raises H, so it keeps the predicted
    distribution from collapsing (as label smoothing does, but towards the model's own spread rather than
    the uniform distribution). β < 0 penalises entropy (entropy minimisation, sharpening); β = 0 is plain
    cross-entropy. The default β = 0.01 is the entropy coefficient of PPO's Atari runs (Schulman et al.
    2017, arXiv 1707.06347); for language models there is no agreed value: treat it as a free choice.

    H is formed as log Σ e^{z−m} + Σ_i q_i (m − z_i) (m the row max): non-negative parts, no cancellation.
    A −inf logit (a masked id) has q = 0 and adds 0·log 0 = 0. Soft-capping (z ← c·tanh(z/c)) comes first.
    """

    has_closed_form_grad = True

    def __init__(self, *, beta: float = DEFAULT_ENTROPY_BETA, softcap: float | None = None):
        super().__init__(softcap=softcap)
        self.beta = V.check_number("beta", beta)

    def token_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # logits [..., V], target [...] in range.
        nll, m, rel = nll_and_lse(logits, target)
        s = _shifted(logits, m.unsqueeze(-1))  # z − m ≤ 0
        q = torch.exp(s - rel.unsqueeze(-1))
        entropy = rel - (q * s).sum(dim=-1)  # −Σ q (s − rel) = rel + Σ q·(m − z) ≥ 0
        return nll - self.beta * entropy

    def value_and_grad(self, logits: torch.Tensor, target: torch.Tensor, scale: torch.Tensor):
        """Closed form on a [N, V] buffer that is overwritten with the gradient (one more [N, V] block).

        With s = z − m and q = softmax(z): dℓ/dz_i = q_i − [i=y] + β·q_i·(log q_i + H), and
        log q_i + H = s_i − Σ_j q_j s_j, so the gradient is β·q_i s_i + q_i (1 − β Σ_j q_j s_j) − [i=y]
        (q_i s_i stays finite where q_i = 0), times ``scale`` per token and 1 − (z/c)² under soft-capping.
        """
        rows = torch.arange(logits.shape[0], device=logits.device)
        logits, tanh = cap_in_place(logits, self.softcap)
        z_y = logits[rows, target]
        m = row_max(logits)
        s = _shifted(logits, m, out=logits)  # in place: the logits are not needed past this point
        q = torch.exp(s)
        sumexp = q.sum(dim=-1)
        q.div_(sumexp.unsqueeze(-1))
        rel = sumexp.log()
        mean_s = (q.unsqueeze(1) @ s.unsqueeze(2)).reshape(-1)  # Σ q s ≤ 0, a batched dot (no temporary)
        entropy = rel - mean_s
        value = ((m.squeeze(-1) - z_y) + rel) - self.beta * entropy
        grad = s.mul_(q).mul_(self.beta).addcmul_(q, (1.0 - self.beta * mean_s).unsqueeze(-1))
        grad.mul_(scale.unsqueeze(-1))
        grad[rows, target] -= scale
        if tanh is not None:
            grad.mul_(1.0 - tanh.square_())
        return value, grad


def _shifted(logits: torch.Tensor, m: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """s = z − m, with −inf (a masked logit) floored at the dtype's lowest finite value: exp(s) is still
    exactly 0, and q·s = 0 instead of 0·(−inf) = NaN."""
    s = torch.sub(logits, m, out=out) if out is not None else logits - m
    return s.clamp_(min=torch.finfo(s.dtype).min)


def dft_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    softcap: float | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items=None,
    token_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """DFT loss −sg(q_y)·log q_y of logits ``[..., V]`` against ids ``[...]``; see :class:`DFT`.

    ``ignore_index``, ``reduction``, ``num_items`` and ``token_weights`` behave exactly as in
    :func:`xent.cross_entropy`. TRL's ``dft_loss(outputs, labels)`` is
    ``xent.dft_loss(logits[:, :-1], labels[:, 1:])``.

    Example:
        >>> import torch, xent
        >>> x = torch.tensor([[2.0, 1.0, 0.1], [0.5, 2.5, 0.3], [1.5, 0.5, 2.0]])
        >>> round(xent.dft_loss(x, torch.tensor([0, -100, 2])).item(), 6)
        0.302505
    """
    loss = DFT(softcap=softcap)
    return plain_loss(loss, logits, target, ignore_index=ignore_index, reduction=reduction,
                      num_items=num_items, token_weights=token_weights)


def entropy_regularized_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    beta: float = DEFAULT_ENTROPY_BETA,
    softcap: float | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items=None,
    token_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy minus β times the predictive entropy, −log q_y − β·H(q); see
    :class:`EntropyRegularized` (β > 0 rewards entropy).

    ``ignore_index``, ``reduction``, ``num_items`` and ``token_weights`` behave exactly as in
    :func:`xent.cross_entropy`.

    Example:
        >>> import torch, xent
        >>> x = torch.tensor([[2.0, 1.0, 0.1], [0.5, 2.5, 0.3], [1.5, 0.5, 2.0]])
        >>> y = torch.tensor([0, -100, 2])
        >>> round(xent.entropy_regularized_loss(x, y, beta=0.0).item(), 6)  # β = 0: cross-entropy
        0.51058
    """
    loss = EntropyRegularized(beta=beta, softcap=softcap)
    return plain_loss(loss, logits, target, ignore_index=ignore_index, reduction=reduction,
                      num_items=num_items, token_weights=token_weights)
