"""The fused linear + loss functions: ``loss(hidden @ weight.T + bias, target)`` a chunk of tokens at a
time, never the [N, V] logits. The engine that runs them (chunking, projection, row backends, the
autograd Function) is :mod:`xent._engine`; this module is its front door for the per-token losses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _validate as V
from ._compile import compiler_disable
from ._engine import (
    LinearLoss,
    Plan,
    auto_chunk_size,
    check_backend,
    check_head,
    check_serves,
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

__all__ = ["FusedCall", "auto_chunk_size", "fused_call", "fused_loss", "linear_cross_entropy",
           "linear_distill_loss", "linear_loss", "linear_sparse_distill_loss", "matmul_dtype",
           "release_buffers"]

#: Old keyword spellings of the fused functions -> their names now (torch's: F.linear_cross_entropy).
RENAMED = {"bias": "linear_bias", "weight_classes": "weight", "weights": "stream_weights"}


@dataclass(frozen=True)
class FusedCall:
    """The arguments of a fused call, checked once by the public function (:func:`fused_call`) and passed
    inward unchecked: internal calls (Rho-1's two passes, the multi-token streams) derive theirs with
    :func:`dataclasses.replace`."""

    hidden: torch.Tensor  # [..., D] ([..., T, D] with shift)
    linear_weight: torch.Tensor  # [V, D]
    target: torch.Tensor  # [...] ids, ignore_index skipped
    linear_bias: torch.Tensor | None = None
    shift: bool = False
    chunk_size: int | str = "auto"
    ignore_index: int = -100
    reduction: str = "mean"
    num_items: object = None
    token_weights: torch.Tensor | None = None
    return_stats: bool = False
    projection_dtype: torch.dtype | None = None
    backend: str = "auto"


def fused_call(hidden, linear_weight, target, *, linear_bias=None, shift=False, chunk_size="auto",
               ignore_index=-100, reduction="mean", num_items=None, token_weights=None, return_stats=False,
               projection_dtype=None, backend="auto", names=("hidden", "linear_weight", "linear_bias"),
               head_checked=False) -> FusedCall:
    """Checks a fused call's arguments (the head's shapes and dtypes unless the caller has,
    ``head_checked``; the target ids; the options) and returns them as a :class:`FusedCall`. ``names``:
    the head's argument names in error messages."""
    V.check_flags(shift=shift, return_stats=return_stats)
    V.check_reduction(reduction)
    V.check_num_items(num_items, reduction)
    name, weight_name, bias_name = names
    if not head_checked:
        check_head(hidden, linear_weight, linear_bias, shift, name, weight_name, bias_name)
    V.check_target(target, hidden.shape[:-1], linear_weight.shape[0], ignore_index, lead_name=name)
    V.check_token_weights(token_weights, target.shape)
    V.check_chunk_size(chunk_size)
    projection_dtype_for(hidden, projection_dtype)
    check_backend(backend)
    return FusedCall(hidden, linear_weight, target, linear_bias, shift, chunk_size, ignore_index, reduction,
                     num_items, token_weights, return_stats, projection_dtype, backend)


def check_loss(loss: TokenLoss, num_extra: int, return_stats: bool) -> None:
    """``loss`` can run in a fused per-token pass with ``num_extra`` extra tensors per token."""
    if not isinstance(loss, TokenLoss):
        raise TypeError(f"loss must be a xent.losses.TokenLoss, got {type(loss).__name__}")
    if loss.num_extra != num_extra:
        raise TypeError(
            f"loss {type(loss).__name__} takes {loss.num_extra} extra tensor(s) per token (a teacher), which "
            "linear_loss cannot supply: use xent.linear_distill_loss or xent.linear_sparse_distill_loss"
        )
    if getattr(loss, "selects_tokens", False):
        raise TypeError(f"loss {type(loss).__name__} selects tokens over the whole call, which a per-token "
                        "pass cannot do: use xent.linear_rho1_loss")
    if return_stats:
        check_stats_loss(loss)


@compiler_disable
def fused_loss(call: FusedCall, loss: TokenLoss, extra_heads: tuple = (), token_extras: tuple = ()):
    """The fused loss of a checked call: the engine's entry behind every fused public function.

    ``extra_heads``: ((hidden, weight, bias), ...) heads projected per chunk without gradient, whose
    logits the loss takes after the call's own (a teacher); ``token_extras``: per-token tensors
    ``[..., *]`` aligned with the hidden states' positions (a sparse teacher's ids and log-probs)."""
    hidden, weight, target = call.hidden, call.linear_weight, call.target
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    token_weights = as_token_weights(call.token_weights, dtype, hidden.device)
    rows, tgt, positions, out_shape, tw = valid_rows(hidden, target, call.ignore_index, call.shift,
                                                     token_weights)
    n, num_classes = rows.numel(), weight.shape[0]
    V.check_num_items_covers(call.num_items, n)
    mm = projection_dtype_for(hidden, call.projection_dtype)
    heads = 1 + len(extra_heads)  # one [C, V] buffer each, in the projection dtype
    chunk = chunk_tokens(call.chunk_size, n, num_classes, heads * mm.itemsize, hidden.device)
    extras = tuple((h.reshape(-1, h.shape[-1]), w, b) for h, w, b in extra_heads)
    denom = None
    if call.reduction == "sum":
        denom = torch.ones((), dtype=dtype, device=hidden.device)
    elif call.reduction == "mean":
        valid = torch.ones(n, dtype=torch.bool, device=hidden.device)
        class_weight = loss.token_weight(tgt)
        denom = mean_denominator(valid, call.num_items, denominator_weight(class_weight, tw), dtype)
        loss = mean_loss(loss, valid, call.num_items, class_weight, dtype, tw)
    stats = torch.empty((n, 3), dtype=dtype, device=hidden.device) if call.return_stats else None
    # per-token data [..., *] aligned with hidden's rows (like a second head's hidden states)
    lead = hidden.shape[:-1].numel()
    token_extras = tuple(x.reshape(lead, *x.shape[len(hidden.shape) - 1:])[rows] for x in token_extras)
    plan = Plan(loss, rows, tgt, chunk, dtype, extras, mm, weights=tw, stats=stats, token_extras=token_extras,
                backend=call.backend)
    bias = call.linear_bias
    grad_wanted = torch.is_grad_enabled() and (
        hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    check_serves(plan, hidden.device, grad_wanted and bias is not None and bias.requires_grad)
    out = LinearLoss.apply(hidden2d, weight, bias, plan, out_shape, positions, denom,
                           grad_wanted and denom is not None)
    if not call.return_stats:
        return out
    return out, sum_token_stats(plan.per_token, stats, None, loss.z_loss)


@compiler_disable
def linear_loss(
    hidden: torch.Tensor,
    linear_weight: torch.Tensor | None = None,
    target: torch.Tensor | None = None,
    *,
    loss: TokenLoss | None = None,
    linear_bias: torch.Tensor | None = None,
    shift: bool = False,
    chunk_size: int | str = "auto",
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items=None,
    token_weights: torch.Tensor | None = None,
    return_stats: bool = False,
    projection_dtype: torch.dtype | None = None,
    backend: str = "auto",
    **deprecated,
):
    """Any per-token loss of ``hidden @ linear_weight.T + linear_bias`` without materialising the logits.

    Same value and gradients (for hidden, linear_weight and linear_bias) as the plain path on
    materialised logits, e.g. ``xent.cross_entropy(hidden @ W.T + b, target, ...)`` for
    ``loss=CrossEntropy(...)``.

    Args:
        hidden: ``[..., D]`` (``[..., T, D]`` with ``shift``), any float dtype.
        linear_weight: ``[V, D]``, the LM head or tied embedding, same dtype as hidden (positional, or
            ``linear_weight=`` as in ``torch.nn.functional.linear_cross_entropy``).
        target: ``[...]`` class ids shaped like ``hidden.shape[:-1]``; ``ignore_index`` is skipped.
        loss: a :class:`xent.losses.TokenLoss` (default :class:`xent.losses.CrossEntropy`).
        linear_bias: optional ``[V]`` (the old spelling ``bias=`` still works, with a DeprecationWarning).
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
        backend: which row backend computes each chunk's losses and gradients: "auto" (the default: the
            compiled CPU kernel where it can, else torch ops), "torch", "cpu_kernel" or "triton"; a named
            backend that cannot serve the call is a ValueError saying why (:mod:`xent._engine`).
    """
    V.head_weight("linear_loss", linear_weight, deprecated.pop("weight", None), class_weights=False)
    given = V.take_deprecated("linear_loss", deprecated, RENAMED, {"linear_bias": linear_bias})
    loss = CrossEntropy() if loss is None else loss
    check_loss(loss, 0, return_stats)
    call = fused_call(hidden, linear_weight, target, linear_bias=given["linear_bias"], shift=shift,
                      chunk_size=chunk_size, ignore_index=ignore_index, reduction=reduction,
                      num_items=num_items, token_weights=token_weights, return_stats=return_stats,
                      projection_dtype=projection_dtype, backend=backend)
    loss.check(linear_weight.shape[0])
    return fused_loss(call, loss)


@compiler_disable
def linear_cross_entropy(
    hidden: torch.Tensor,
    linear_weight: torch.Tensor | None = None,
    target: torch.Tensor | None = None,
    *,
    linear_bias: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    shift: bool = False,
    chunk_size: int | str = "auto",
    num_items=None,
    token_weights: torch.Tensor | None = None,
    return_stats: bool = False,
    projection_dtype: torch.dtype | None = None,
    backend: str = "auto",
    **deprecated,
):
    """Cross-entropy of ``hidden @ linear_weight.T + linear_bias`` without ever holding the [N, V] logits.

    Same value and the same gradients for hidden, linear_weight and linear_bias as
    ``xent.cross_entropy(hidden @ linear_weight.T + linear_bias, target, weight=weight, ...)`` for every
    option and reduction; the names are those of ``torch.nn.functional.linear_cross_entropy``:
    ``linear_weight`` / ``linear_bias`` the head, ``weight`` the ``[V]`` class weights. (Old spellings:
    ``weight_classes=`` and ``bias=`` work with a DeprecationWarning; a 2-D ``weight=`` is refused.)
    Uses the closed-form gradient softmax − one-hot, computed in place in the chunk's logits buffer.
    See :func:`xent.linear_loss` for shapes, ``shift``, ``chunk_size``, ``projection_dtype``,
    ``backend`` and ``return_stats`` (whose statistics come out of the closed form's own pass over each
    chunk).

    Example:
        >>> import torch, xent
        >>> h, W = torch.randn(2, 9, 16), torch.randn(100, 16)
        >>> y = torch.randint(0, 100, (2, 9))
        >>> fused = xent.linear_cross_entropy(h, W, y, shift=True)
        >>> plain = xent.causal_lm_loss(h @ W.T, y)
        >>> bool(torch.allclose(fused, plain, atol=1e-5))
        True
    """
    given = V.take_deprecated("linear_cross_entropy", deprecated, RENAMED,
                              {"linear_bias": linear_bias, "weight": weight})
    linear_bias, weight = given["linear_bias"], given["weight"]
    V.head_weight("linear_cross_entropy", linear_weight, weight)
    loss = CrossEntropy(weight=weight, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
    return linear_loss(hidden, linear_weight, target, loss=loss, linear_bias=linear_bias, shift=shift,
                       chunk_size=chunk_size, ignore_index=ignore_index, reduction=reduction,
                       num_items=num_items, token_weights=token_weights, return_stats=return_stats,
                       projection_dtype=projection_dtype, backend=backend)


@compiler_disable
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
    backend: str = "auto",
) -> torch.Tensor:
    """:func:`xent.distill_loss` of ``student_hidden @ student_weight.T`` against
    ``teacher_hidden @ teacher_weight.T`` without holding either model's full logits.

    Each chunk of tokens projects both heads (the teacher's without gradient), then the same
    :class:`xent.losses.Distill` per-token loss the plain path uses. student_hidden ``[..., D_s]`` and
    teacher_hidden ``[..., D_t]`` cover the same tokens; both heads have the same V. ``target`` (optional)
    masks ignored tokens and labels the hard CE term when ``hard_weight`` > 0; ``shift`` as in
    :func:`xent.linear_loss`. ``token_weights`` ``[...]`` (shaped like ``student_hidden.shape[:-1]``) as
    :func:`xent.distill_loss`. ``projection_dtype`` as :func:`xent.linear_loss` (both heads: with
    torch.float32, half teacher and student heads are projected in float32); ``backend`` as
    :func:`xent.linear_loss`. Gradients reach the student's hidden, weight and bias only.
    """
    from .losses._distill import Distill, distill_target

    loss = Distill(kind=kind, beta=beta, alpha=alpha, temperature=temperature, t_squared=t_squared,
                   softcap=softcap, hard_weight=hard_weight)
    student = ("student_hidden", "student_weight", "student_bias")
    check_head(student_hidden, student_weight, student_bias, shift, *student)
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
    loss.check(student_weight.shape[0])
    call = fused_call(student_hidden, student_weight, target, linear_bias=student_bias, shift=shift,
                      chunk_size=chunk_size, ignore_index=ignore_index, reduction=reduction,
                      num_items=num_items, token_weights=token_weights, projection_dtype=projection_dtype,
                      backend=backend, names=student, head_checked=True)
    return fused_loss(call, loss, extra_heads=((teacher_hidden, teacher_weight, teacher_bias),))


@compiler_disable
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
    backend: str = "auto",
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
    from .losses._sparse_distill import SparseDistill, check_sparse_teacher, teacher_read_mask

    loss = SparseDistill(kind=kind, beta=beta, alpha=alpha, softcap=softcap)
    student = ("student_hidden", "student_weight", "student_bias")
    check_head(student_hidden, student_weight, student_bias, shift, *student)
    check_sparse_teacher(teacher_ids, teacher_log_probs, student_hidden.shape[:-1], student_weight.shape[0],
                         lead_name="student_hidden", read=teacher_read_mask(
                             target, ignore_index, student_hidden.shape[:-1], shift=shift))
    target, ignore_index = distill_target(target, student_hidden.shape[:-1], student_hidden.device, 0.0,
                                          ignore_index)
    loss.check(student_weight.shape[0])
    call = fused_call(student_hidden, student_weight, target, linear_bias=student_bias, shift=shift,
                      chunk_size=chunk_size, ignore_index=ignore_index, reduction=reduction,
                      num_items=num_items, token_weights=token_weights, projection_dtype=projection_dtype,
                      backend=backend, names=student, head_checked=True)
    dtype = torch.float64 if student_hidden.dtype == torch.float64 else torch.float32
    teacher = (V.as_ids(teacher_ids), teacher_log_probs.detach().to(dtype))
    return fused_loss(call, loss, token_extras=teacher)
