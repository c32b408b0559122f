"""DFT (dynamic fine-tuning) and entropy-regularised cross-entropy, both with closed-form gradients so
the fused path runs them without autograd. docs/REFERENCE.md §3 is the contract.
"""

from __future__ import annotations

import torch

from .. import _validate as V
from ._base import TokenLoss, entropy, log_prob_entropy_and_grad, nll_and_shift
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
        nll, m, rel = nll_and_shift(logits, target)
        return nll - self.beta * entropy(logits, m, rel)

    def value_and_grad(self, logits: torch.Tensor, target: torch.Tensor, scale: torch.Tensor):
        """Closed form on a [N, V] buffer that is overwritten with the gradient (one more [N, V] block):
        ℓ = −log q_y − β·H is Σ a·log q_y + b·H with a = −1, b = −β, so dℓ/dz_i = q_i − [i=y] +
        β·q_i·(log q_i + H) (:func:`log_prob_entropy_and_grad`), times ``scale`` per token."""
        log_q_y, ent, grad = log_prob_entropy_and_grad(logits, target, self.softcap, 1.0, -scale,
                                                       -self.beta * scale)
        return -log_q_y - self.beta * ent, grad


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
