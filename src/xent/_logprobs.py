"""Token log-probabilities (and entropies) for RL: log q_y with q = softmax(cap(z)/T), differentiable.

:func:`linear_log_probs` runs the fused engine of :mod:`xent._engine` (never the [N, V] logits) with a
per-token "loss" of two values, log q_y and H(q), which declares itself to the row backends
(:class:`xent.losses._base.LogProbRows`) so the CPU kernel computes it; :func:`log_probs` is its plain twin
on materialised logits. docs/REFERENCE.md §3 ("Token log-probs").
"""

from __future__ import annotations

import torch

from . import _validate as V
from ._compile import compiler_disable
from ._linear import RENAMED, fused_call, fused_loss
from ._reduce import apply_token_loss, check_common
from .losses._base import LogProbRows, TokenLoss, entropy, log_prob_entropy_and_grad, nll_and_shift


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

    def row_spec(self) -> LogProbRows:
        """Exactly the token log-probability (and entropy): a row backend's closed form may compute it (the
        CPU kernel does, without soft-capping)."""
        return LogProbRows(self.temperature, self.softcap, self.with_entropy)

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
    linear_weight: torch.Tensor | None = None,
    target: torch.Tensor | None = None,
    *,
    linear_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    shift: bool = False,
    chunk_size: int | str = "auto",
    with_entropy: bool = False,
    ignore_index: int = -100,
    projection_dtype: torch.dtype | None = None,
    backend: str = "auto",
    **deprecated,
):
    r"""Per-token log q_y of ``hidden @ linear_weight.T + linear_bias`` without the [N, V] logits.

    Same values and gradients (for hidden, linear_weight and linear_bias) as
    ``xent.log_probs(hidden @ linear_weight.T + linear_bias, target, ...)``: q = softmax(cap(z)/T), a
    tensor shaped like the target (``target[..., 1:]`` with ``shift``), 0 at ignored positions (which
    are dropped before the projection); with ``with_entropy=True`` the pair (log-probs, entropies H(q)),
    both differentiable. The gradient is closed-form (∂log q_y/∂z = (onehot − q)/T, ∂H/∂z_i =
    −q_i(log q_i + H)/T, times 1 − tanh² under soft-capping) and computed in backward, one chunk of
    logits at a time (the forward is one matmul per chunk: 4 matmuls per token with the gradient against
    fused cross-entropy's 3). On the CPU the compiled kernel of :func:`xent.linear_cross_entropy` computes
    the rows (log q_y = −cross-entropy of z/T; with the entropy in the same pass) in float32 and bfloat16;
    soft-capping, a bias gradient, float64 and CUDA take torch ops. Shapes, ``shift``, ``chunk_size`` and
    ``backend`` as :func:`xent.linear_loss` (``bias=`` is the old spelling of ``linear_bias``).
    ``projection_dtype=torch.float32`` projects half inputs in float32 (the log-probs of the float32
    computation on the upcast inputs; see :func:`xent.linear_loss`). First-order only (no double
    backward).

    Example (a policy-gradient step with an entropy bonus; ``labels`` −100 outside the completion)::

        logp, entropy = xent.linear_log_probs(hidden, lm_head.weight, labels, shift=True,
                                              temperature=0.7, with_entropy=True)   # [B, T−1] each
        n = (labels[:, 1:] != -100).sum()
        loss = -(advantages[:, 1:] * logp).sum() / n - 0.01 * entropy.sum() / n
    """
    V.head_weight("linear_log_probs", linear_weight, deprecated.pop("weight", None), class_weights=False)
    given = V.take_deprecated("linear_log_probs", deprecated, RENAMED, {"linear_bias": linear_bias})
    V.check_flags(shift=shift, with_entropy=with_entropy)
    V.check_options(softcap=softcap)
    loss = TokenLogProb(temperature=temperature, softcap=softcap, with_entropy=with_entropy)
    call = fused_call(hidden, linear_weight, target, linear_bias=given["linear_bias"], shift=shift,
                      chunk_size=chunk_size, ignore_index=ignore_index, reduction="none",
                      projection_dtype=projection_dtype, backend=backend)
    return _split(fused_loss(call, loss), with_entropy)
