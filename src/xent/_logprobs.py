"""Token log-probabilities (and entropies) for RL: log q_y with q = softmax(cap(z)/T), differentiable.

:func:`linear_log_probs` runs the fused engine of :mod:`xent._linear` (never the [N, V] logits) with a
per-token "loss" of two values, log q_y and H(q); :func:`log_probs` is its plain twin on materialised
logits. docs/REFERENCE.md §3 ("Token log-probs").
"""

from __future__ import annotations

import torch

from . import _validate as V
from ._compile import compiler_disable
from ._linear import (
    _check_linear,
    _LinearLoss,
    _Plan,
    _valid_rows,
    chunk_tokens,
    projection_dtype_for,
)
from ._reduce import apply_token_loss, check_common
from .losses._base import TokenLoss, entropy, log_prob_entropy_and_grad, nll_and_shift


class TokenLogProb(TokenLoss):
    r"""Per token: log q_y, or (log q_y, H(q)) with ``with_entropy``, q = softmax(cap(z)/T).

    Not a loss, but written as one so the fused engine chunks it: ``num_outputs`` = 2 with the entropy.
    Closed-form gradient w.r.t. u = cap(z)/T, for upstream gradients a (of log q_y) and b (of H):

    .. math:: a\,(\mathrm{onehot}_y - q) - b\,q \odot (\log q + H), \qquad
              \log q_i + H = s_i - \textstyle\sum_j q_j s_j \quad (s = u - \max u)

    then times 1/T and, under soft-capping, 1 − tanh²(z/c).
    """

    has_closed_form_grad = True

    def __init__(self, *, temperature: float = 1.0, softcap: float | None = None, with_entropy: bool = False):
        super().__init__(softcap=softcap)
        V.check_flags(with_entropy=with_entropy)
        check_temperature(temperature)
        self.temperature = float(temperature)
        self.with_entropy = with_entropy
        self.num_outputs = 2 if self.with_entropy else 1

    def token_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # logits [..., V] (already capped), target [...] in range.
        u = logits / self.temperature if self.temperature != 1.0 else logits
        nll, m, rel = nll_and_shift(u, target)
        if not self.with_entropy:
            return -nll
        return torch.stack([-nll, entropy(u, m, rel)], dim=-1)

    def value_and_grad(self, logits: torch.Tensor, target: torch.Tensor, scale: torch.Tensor):
        """Closed form on a [N, V] buffer, overwritten with the gradient; ``scale`` [N] or [N, 2] (the
        upstream gradients of log q_y and H): :func:`log_prob_entropy_and_grad`."""
        a, b = (scale, None) if not self.with_entropy else (scale[:, 0], scale[:, 1])
        log_q_y, ent, grad = log_prob_entropy_and_grad(logits, target, self.softcap, self.temperature, a, b)
        return (log_q_y if ent is None else torch.stack([log_q_y, ent], dim=-1)), grad

    def __repr__(self) -> str:
        return (f"TokenLogProb(temperature={self.temperature!r}, softcap={self.softcap!r}, "
                f"with_entropy={self.with_entropy!r})")


def check_temperature(temperature) -> None:
    if not V.check_number("temperature", temperature) > 0.0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def _split(out: torch.Tensor, with_entropy: bool):
    return (out[..., 0], out[..., 1]) if with_entropy else out


def log_probs(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    temperature: float = 1.0,
    softcap: float | None = None,
    shift: bool = False,
    with_entropy: bool = False,
    ignore_index: int = -100,
):
    r"""Per-token log-probability log q_y of logits ``[..., V]`` against ids ``[...]``, q = softmax(cap(z)/T).

    The plain twin of :func:`linear_log_probs` (same arguments, materialised logits). Returns a tensor
    shaped like the target (``target[..., 1:]`` with ``shift``: ``logits[..., t, :]`` scores
    ``target[..., t+1]``), 0 at ignored positions; with ``with_entropy=True`` a pair (log-probs,
    entropies H(q) = −Σ q log q, also 0 at ignored positions). Soft-capping (z ← c·tanh(z/c)) comes
    before the temperature. Differentiable (autograd through the same per-token definition the fused path
    uses in closed form). Computed in float32 whatever the input dtype (float64 stays float64).

    Example:
        >>> import torch, xent
        >>> x = torch.tensor([[2.0, 1.0, 0.1], [0.5, 2.5, 0.3], [1.5, 0.5, 2.0]])
        >>> xent.log_probs(x, torch.tensor([0, -100, 2]))  # −(cross-entropy) per token
        tensor([-0.4170,  0.0000, -0.6041])
    """
    V.check_flags(shift=shift, with_entropy=with_entropy)
    V.check_options(softcap=softcap)
    V.check_logits(logits)
    if shift:
        if logits.dim() < 2:
            raise ValueError(f"shift=True needs logits of shape [..., T, V], got shape {tuple(logits.shape)}")
        V.check_ids_tensor(target, logits.shape[:-1])
        logits, target = logits[..., :-1, :], target[..., 1:]  # views: no copy
    num_classes = check_common(logits, target, ignore_index=ignore_index, reduction="none", num_items=None)
    loss = TokenLogProb(temperature=temperature, softcap=softcap, with_entropy=with_entropy)
    loss.check(num_classes)
    out = apply_token_loss(loss, logits, target, ignore_index=ignore_index, reduction="none")
    return _split(out, with_entropy)


@compiler_disable
def linear_log_probs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    shift: bool = False,
    chunk_size: int | str = "auto",
    with_entropy: bool = False,
    ignore_index: int = -100,
    projection_dtype: torch.dtype | None = None,
):
    r"""Per-token log q_y of ``hidden @ weight.T + bias`` without ever holding the [N, V] logits.

    Same values and gradients (for hidden, weight and bias) as
    ``xent.log_probs(hidden @ weight.T + bias, target, ...)``: q = softmax(cap(z)/T), a tensor shaped
    like the target (``target[..., 1:]`` with ``shift``), 0 at ignored positions (which are dropped
    before the projection); with ``with_entropy=True`` the pair (log-probs, entropies H(q)), both
    differentiable. The gradient is closed-form (∂log q_y/∂z = (onehot − q)/T, ∂H/∂z_i =
    −q_i(log q_i + H)/T, times 1 − tanh² under soft-capping) and computed in backward, one chunk of
    logits at a time (the forward is one matmul per chunk). Shapes, ``shift`` and ``chunk_size`` as
    :func:`xent.linear_loss`. ``projection_dtype=torch.float32`` projects half inputs in float32 (the
    log-probs of the float32 computation on the upcast inputs; see :func:`xent.linear_loss`). First-order
    only (no double backward).

    Example (a policy-gradient step with an entropy bonus; ``labels`` −100 outside the completion)::

        logp, entropy = xent.linear_log_probs(hidden, lm_head.weight, labels, shift=True,
                                              temperature=0.7, with_entropy=True)   # [B, T−1] each
        n = (labels[:, 1:] != -100).sum()
        loss = -(advantages[:, 1:] * logp).sum() / n - 0.01 * entropy.sum() / n
    """
    V.check_flags(shift=shift, with_entropy=with_entropy)
    V.check_options(softcap=softcap)
    loss = TokenLogProb(temperature=temperature, softcap=softcap, with_entropy=with_entropy)
    _check_linear(hidden, weight, bias, target, ignore_index, shift)
    V.check_chunk_size(chunk_size)
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    rows, tgt, positions, out_shape, _ = _valid_rows(hidden, target, ignore_index, shift)
    n, num_classes = rows.numel(), weight.shape[0]
    mm = projection_dtype_for(hidden, projection_dtype)
    chunk = chunk_tokens(chunk_size, n, num_classes, mm.itemsize, hidden.device)
    plan = _Plan(loss, rows, tgt, chunk, dtype, (), mm)
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    out = _LinearLoss.apply(hidden2d, weight, bias, plan, out_shape, positions, None, False)
    return _split(out, with_entropy)

