"""The fused linear + loss functions: ``loss(hidden @ weight.T + bias, target)`` a chunk of tokens at a
time, never the [N, V] logits. The engine that runs them (chunking, projection, row backends, the
autograd Function) is :mod:`xent._engine`; this module is its front door for the per-token losses.
"""

from __future__ import annotations

import torch

from . import _validate as V
from ._compile import compiler_disable
from ._engine import (
    LinearLoss,
    Plan,
    auto_chunk_size,
    check_head,
    check_linear,
    chunk_tokens,
    matmul_dtype,
    projection_dtype_for,
    release_buffers,
    valid_rows,
)
from ._reduce import (
    as_token_weights,
    check_stats_loss,
    denominator_weight,
    mean_denominator,
    mean_loss,
    sum_token_stats,
)
from .losses._base import TokenLoss
from .losses._cross_entropy import CrossEntropy

__all__ = ["auto_chunk_size", "linear_cross_entropy", "linear_distill_loss", "linear_loss",
           "linear_sparse_distill_loss", "matmul_dtype", "release_buffers"]


@compiler_disable
def linear_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    loss: TokenLoss | None = None,
    bias: torch.Tensor | None = None,
    shift: bool = False,
    chunk_size: int | str = "auto",
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items=None,
    token_weights: torch.Tensor | None = None,
    return_stats: bool = False,
    projection_dtype: torch.dtype | None = None,
    _extra_heads: tuple = (),
    _token_extras: tuple = (),
):
    """Any per-token loss of ``hidden @ weight.T + bias`` without materialising the logits.

    Same value and gradients (for hidden, weight and bias) as the plain path on materialised logits,
    e.g. ``xent.cross_entropy(hidden @ weight.T + bias, target, ...)`` for ``loss=CrossEntropy(...)``.

    Args:
        hidden: ``[..., D]`` (``[..., T, D]`` with ``shift``), any float dtype.
        weight: ``[V, D]``, the LM head or tied embedding, same dtype as hidden.
        target: ``[...]`` class ids shaped like ``hidden.shape[:-1]``; ``ignore_index`` is skipped.
        loss: a :class:`xent.losses.TokenLoss` (default :class:`xent.losses.CrossEntropy`).
        bias: optional ``[V]``.
        shift: causal shift, hidden[..., t, :] predicts target[..., t+1] (no copy of hidden).
        chunk_size: tokens per chunk, or "auto": as many as fit 64 MiB of logits in the projection
            dtype (XENT_CHUNK_MB overrides the budget), at least 512 tokens.
        reduction, num_items: as :func:`xent.cross_entropy`.
        token_weights: ``[...]`` per-token weights w_t shaped like ``target`` (shifted like it), as
            :func:`xent.cross_entropy`: ℓ_t ← w_t·ℓ_t, "mean" divides by Σ_valid w_t·w_y. The fused engine
            multiplies each token's upstream gradient by w_t, so every loss takes them; tokens with
            w_t = 0 are dropped before the projection like ignored ones.
        return_stats: also return a :class:`xent.TokenStats` of detached sums over the valid tokens
            (loss, count, top-1 correct, entropy, z-loss terms, logsumexp), as ``(loss, stats)``. They are
            computed in the same pass over each chunk of logits (cross-entropy forms them inside its
            closed form; other losses read the block once more before their own pass).
        projection_dtype: None (default): half inputs are projected in their own dtype (float16 on the
            CPU in float32). ``torch.float32``: half inputs are projected in float32 (the weight copied to
            float32 once per call, each chunk of hidden states upcast), so the logits, log-probs and
            gradients equal those of the float32 computation on the upcast inputs (gradients returned in
            the inputs' dtype); costs float32 matmuls and a float32 [V, D] copy of the weight.
    """
    loss = CrossEntropy() if loss is None else loss
    if not isinstance(loss, TokenLoss):
        raise TypeError(f"loss must be a xent.losses.TokenLoss, got {type(loss).__name__}")
    if loss.num_extra != len(_extra_heads) + len(_token_extras):
        raise TypeError(
            f"loss {type(loss).__name__} takes {loss.num_extra} extra tensor(s) per token (a teacher), which "
            "linear_loss cannot supply: use xent.linear_distill_loss or xent.linear_sparse_distill_loss"
        )
    if getattr(loss, "selects_tokens", False):
        raise TypeError(f"loss {type(loss).__name__} selects tokens over the whole call, which a per-token "
                        "pass cannot do: use xent.linear_rho1_loss")
    if return_stats:
        check_stats_loss(loss)
    V.check_reduction(reduction)
    V.check_num_items(num_items, reduction)
    check_linear(hidden, weight, bias, target, ignore_index, shift)
    V.check_token_weights(token_weights, target.shape)
    num_classes = weight.shape[0]
    loss.check(num_classes)
    V.check_chunk_size(chunk_size)

    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    token_weights = as_token_weights(token_weights, dtype, hidden.device)
    rows, tgt, positions, out_shape, tw = valid_rows(hidden, target, ignore_index, shift, token_weights)
    n = rows.numel()
    V.check_num_items_covers(num_items, n)
    mm = projection_dtype_for(hidden, projection_dtype)
    heads = 1 + len(_extra_heads)  # one [C, V] buffer each, in the projection dtype
    chunk = chunk_tokens(chunk_size, n, num_classes, heads * mm.itemsize, hidden.device)
    extras = tuple((h.reshape(-1, h.shape[-1]), w, b) for h, w, b in _extra_heads)
    denom = None
    if reduction == "sum":
        denom = torch.ones((), dtype=dtype, device=hidden.device)
    elif reduction == "mean":
        valid = torch.ones(n, dtype=torch.bool, device=hidden.device)
        class_weight = loss.token_weight(tgt)
        denom = mean_denominator(valid, num_items, denominator_weight(class_weight, tw), dtype)
        loss = mean_loss(loss, valid, num_items, class_weight, dtype, tw)
    stats = torch.empty((n, 3), dtype=dtype, device=hidden.device) if return_stats else None
    # per-token data [..., *] aligned with hidden's rows (like a second head's hidden states)
    lead = hidden.shape[:-1].numel()
    token_extras = tuple(x.reshape(lead, *x.shape[len(hidden.shape) - 1:])[rows] for x in _token_extras)
    plan = Plan(loss, rows, tgt, chunk, dtype, extras, mm, weights=tw, stats=stats, token_extras=token_extras)
    grad_wanted = torch.is_grad_enabled() and (
        hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    out = LinearLoss.apply(hidden2d, weight, bias, plan, out_shape, positions, denom,
                            grad_wanted and denom is not None)
    if not return_stats:
        return out
    return out, sum_token_stats(plan.per_token, stats, None, loss.z_loss)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    shift: bool = False,
    chunk_size: int | str = "auto",
    ignore_index: int = -100,
    reduction: str = "mean",
    weight_classes: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    num_items=None,
    token_weights: torch.Tensor | None = None,
    return_stats: bool = False,
    projection_dtype: torch.dtype | None = None,
):
    """Cross-entropy of ``hidden @ weight.T + bias`` without ever holding the [N, V] logits.

    Same value and the same gradients for hidden, weight and bias as
    ``xent.cross_entropy(hidden @ weight.T + bias, target, weight=weight_classes, ...)`` for every
    option and reduction (class weights are ``weight_classes`` here: ``weight`` is the projection).
    Uses the closed-form gradient softmax − one-hot, computed in place in the chunk's logits buffer.
    See :func:`xent.linear_loss` for shapes, ``shift``, ``chunk_size``, ``projection_dtype`` and
    ``return_stats`` (whose statistics come out of the closed form's own pass over each chunk).

    Example:
        >>> import torch, xent
        >>> h, W = torch.randn(2, 9, 16), torch.randn(100, 16)
        >>> y = torch.randint(0, 100, (2, 9))
        >>> fused = xent.linear_cross_entropy(h, W, y, shift=True)
        >>> plain = xent.causal_lm_loss(h @ W.T, y)
        >>> bool(torch.allclose(fused, plain, atol=1e-5))
        True
    """
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        V.check_options(num_classes=weight.shape[0], weight=weight_classes, weight_name="weight_classes")
    loss = CrossEntropy(weight=weight_classes, label_smoothing=label_smoothing, z_loss=z_loss,
                        softcap=softcap)
    return linear_loss(hidden, weight, target, loss=loss, bias=bias, shift=shift, chunk_size=chunk_size,
                       ignore_index=ignore_index, reduction=reduction, num_items=num_items,
                       token_weights=token_weights, return_stats=return_stats,
                       projection_dtype=projection_dtype)


def linear_distill_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    target: torch.Tensor | None = None,
    *,
    kind: str = "forward_kl",
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    t_squared: bool = False,
    softcap: float | None = None,
    hard_weight: float = 0.0,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    shift: bool = False,
    chunk_size: int | str = "auto",
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items=None,
    token_weights: torch.Tensor | None = None,
    projection_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """:func:`xent.distill_loss` of ``student_hidden @ student_weight.T`` against
    ``teacher_hidden @ teacher_weight.T`` without holding either model's full logits.

    Each chunk of tokens projects both heads (the teacher's without gradient), then the same
    :class:`xent.losses.Distill` per-token loss the plain path uses. student_hidden ``[..., D_s]`` and
    teacher_hidden ``[..., D_t]`` cover the same tokens; both heads have the same V. ``target`` (optional)
    masks ignored tokens and labels the hard CE term when ``hard_weight`` > 0; ``shift`` as in
    :func:`xent.linear_loss`. ``token_weights`` ``[...]`` (shaped like ``student_hidden.shape[:-1]``) as
    :func:`xent.distill_loss`. ``projection_dtype`` as :func:`xent.linear_loss` (both heads: with
    torch.float32, half teacher and student heads are projected in float32). Gradients reach the student's
    hidden, weight and bias only.
    """
    from .losses._distill import Distill, distill_target

    loss = Distill(kind=kind, beta=beta, alpha=alpha, temperature=temperature, t_squared=t_squared,
                   softcap=softcap, hard_weight=hard_weight)
    check_head(student_hidden, student_weight, student_bias, shift, "student_hidden", "student_weight",
                "student_bias")
    check_head(teacher_hidden, teacher_weight, teacher_bias, shift, "teacher_hidden", "teacher_weight",
                "teacher_bias")
    if teacher_weight.shape[0] != student_weight.shape[0]:
        raise ValueError(
            f"teacher_weight vocabulary size {teacher_weight.shape[0]} does not match student_weight "
            f"vocabulary size {student_weight.shape[0]}"
        )
    if teacher_hidden.shape[:-1] != student_hidden.shape[:-1]:
        raise ValueError(
            f"teacher_hidden shape {tuple(teacher_hidden.shape)} and student_hidden shape "
            f"{tuple(student_hidden.shape)} must agree on every dimension but the last"
        )
    target, ignore_index = distill_target(target, student_hidden.shape[:-1], student_hidden.device,
                                          hard_weight, ignore_index)
    return linear_loss(
        student_hidden, student_weight, target, loss=loss, bias=student_bias, shift=shift,
        chunk_size=chunk_size, ignore_index=ignore_index, reduction=reduction, num_items=num_items,
        token_weights=token_weights, projection_dtype=projection_dtype,
        _extra_heads=((teacher_hidden, teacher_weight, teacher_bias),),
    )


def linear_sparse_distill_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    target: torch.Tensor | None = None,
    *,
    kind: str = "forward_kl",
    beta: float = 0.5,
    alpha: float = 0.1,
    softcap: float | None = None,
    student_bias: torch.Tensor | None = None,
    shift: bool = False,
    chunk_size: int | str = "auto",
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items=None,
    token_weights: torch.Tensor | None = None,
    projection_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """:func:`xent.sparse_distill_loss` of ``student_hidden @ student_weight.T + student_bias`` without
    holding the student's logits: each chunk is projected, pooled onto the teacher's k + 1 buckets and
    differentiated in closed form in its own buffer (:class:`xent.losses.SparseDistill`).

    ``teacher_ids`` and ``teacher_log_probs`` are ``[..., k]`` aligned with ``student_hidden``'s positions
    (the teacher's top-k at position t, as ``teacher_hidden`` is in :func:`xent.linear_distill_loss`);
    with ``shift`` position t is scored against ``target[..., t+1]`` and the last position is dropped.
    Other arguments as :func:`xent.linear_distill_loss`.
    """
    from .losses._distill import distill_target
    from .losses._sparse_distill import SparseDistill, check_sparse_teacher

    loss = SparseDistill(kind=kind, beta=beta, alpha=alpha, softcap=softcap)
    check_head(student_hidden, student_weight, student_bias, shift, "student_hidden", "student_weight",
                "student_bias")
    check_sparse_teacher(teacher_ids, teacher_log_probs, student_hidden.shape[:-1], student_weight.shape[0],
                         lead_name="student_hidden")
    target, ignore_index = distill_target(target, student_hidden.shape[:-1], student_hidden.device, 0.0,
                                          ignore_index)
    dtype = torch.float64 if student_hidden.dtype == torch.float64 else torch.float32
    return linear_loss(
        student_hidden, student_weight, target, loss=loss, bias=student_bias, shift=shift,
        chunk_size=chunk_size, ignore_index=ignore_index, reduction=reduction, num_items=num_items,
        token_weights=token_weights, projection_dtype=projection_dtype,
        _token_extras=(V.as_ids(teacher_ids), teacher_log_probs.detach().to(dtype)),
    )
