"""The fused path with the LM head sharded over the vocabulary: never even this rank's [N, V_r] logits.

Forward, per chunk of C valid tokens and without an autograd graph: project to [C, V_r], reduce the
slice to three numbers per token (max, sum of exponentials, smoothing sum), drop the chunk. Then the
two all-reduces of :mod:`xent.parallel._vocab` for all tokens at once; the target logits are row dots
h·W[y] on the rank that owns y. Backward recomputes each chunk with the global logsumexp through the
chunk loop of the fused engine (:func:`xent._engine.run`), then sums the hidden gradient over the
ranks: one all-reduce of [N, D].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .. import _validate as V
from .._compile import compiler_disable
from .._engine import Plan, as_dtype, check_head, chunk_tokens, project, run, valid_rows
from .._reduce import as_token_weights, denominator_weight, reduce_tokens
from ..losses._base import check_first_order
from ._vocab import ShardGrad, all_max, all_sum, group_place, local_stats, owned_targets, softcapped


@dataclass
class _Setup:
    rows: torch.Tensor  # [n] rows of hidden2d with a valid target
    target: torch.Tensor  # [n] their global ids
    chunk: int
    dtype: torch.dtype
    weight_classes: torch.Tensor | None
    eps: float
    z_loss: float
    softcap: float | None
    ignore_index: int
    group: object
    sum_hidden_grad: bool
    z_per_count: bool  # a class-weighted mean: the z-loss averages over the tokens (all_sum's z_count)
    token_weights: torch.Tensor | None  # [n] w_t of the valid rows, None: all 1


def _spans(n: int, chunk: int):
    return (slice(s, min(s + chunk, n)) for s in range(0, n, chunk))


def _local_pass(setup: _Setup, hidden2d, w, b, wc):
    """Per-token (m_r, Σ exp(z − m_r), Σ w_c (m_r − z_c)) of this slice, one chunk of logits at a time."""
    n = setup.rows.numel()
    out = [torch.empty(n, dtype=setup.dtype, device=hidden2d.device) for _ in range(3)]
    for sl in _spans(n, setup.chunk):
        h = hidden2d.index_select(0, setup.rows[sl]).to(setup.dtype)  # [C, D]
        stats = local_stats(softcapped(project(h, w, b), setup.softcap), wc)  # from a [C, V_r] buffer
        for buf, x in zip(out, stats):
            buf[sl] = x
    return out


def _target_logits(setup: _Setup, hidden2d, w, b, owned, local_y):
    """z_y [n] for the targets this rank owns (row dots h·W[y] + b[y], soft-capped), 0 elsewhere."""
    z_y = torch.zeros(setup.rows.numel(), dtype=setup.dtype, device=hidden2d.device)
    mine = owned.nonzero().squeeze(-1)
    for sl in _spans(mine.numel(), setup.chunk):
        i, y = mine[sl], local_y[mine[sl]]
        h = hidden2d.index_select(0, setup.rows[i]).to(setup.dtype)  # [C, D]
        z = (h * w.index_select(0, y)).sum(dim=-1)
        if b is not None:
            z = z + b[y]
        z_y[i] = softcapped(z, setup.softcap)
    return z_y


class _VocabParallelLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden2d, weight, bias, setup: _Setup):
        # Returns ℓ [n] and w_y [n] for the valid tokens, identical on every rank.
        dt, size = setup.dtype, weight.shape[0]
        w, b = as_dtype(weight, dt), as_dtype(bias, dt)  # a float32 copy once for half inputs
        wc = None if setup.weight_classes is None else setup.weight_classes.to(device=w.device, dtype=dt)
        m_local, sumexp_local, dev_local = _local_pass(setup, hidden2d, w, b, wc)
        m, shard = all_max(m_local, size, setup.group)
        # every rank holds the same target, so every rank raises here alike (no rank left waiting)
        V.check_ids_in_range(setup.target, 0, shard.total, setup.ignore_index)
        every = torch.ones(setup.target.shape, dtype=torch.bool, device=m.device)  # all rows are valid
        owned, local_y = owned_targets(setup.target, every, shard)
        z_y = _target_logits(setup, hidden2d, w, b, owned, local_y)
        w_y = owned.to(dt) if wc is None else torch.where(owned, wc[local_y], 0.0)
        w_sum = torch.tensor(float(size), dtype=dt, device=m.device) if wc is None else wc.sum()
        stats = all_sum(m_local, m, sumexp_local, dev_local, z_y, w_y, w_sum, owned=owned, local_y=local_y,
                        shard=shard, eps=setup.eps, z_loss=setup.z_loss, group=setup.group,
                        z_count=setup.rows.numel() if setup.z_per_count else None,
                        token_weights=setup.token_weights)
        grad_fn = ShardGrad(stats, shard, w=wc, eps=setup.eps, softcap=setup.softcap)
        n = setup.rows.numel()
        # the chunk loop's "targets" are indices into the per-token global statistics
        ctx.plan = Plan(grad_fn, setup.rows, torch.arange(n, device=m.device), setup.chunk, dt, ())
        ctx.setup = setup
        ctx.dtypes = (hidden2d.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.save_for_backward(hidden2d, weight, bias)
        ctx.mark_non_differentiable(stats.w_y)
        return stats.loss, stats.w_y

    @staticmethod
    def backward(ctx, grad_loss, _grad_w_y):
        check_first_order("vocab_parallel_linear_cross_entropy")
        hidden2d, weight, bias = ctx.saved_tensors
        need = tuple(ctx.needs_input_grad[:3])
        grads = run(ctx.plan, hidden2d, weight, bias, grad_loss.to(ctx.plan.compute_dtype), need)[1:]
        grad_h = grads[0]
        if grad_h is not None and ctx.setup.sum_hidden_grad:
            # hidden feeds every rank's slice: its gradient is the sum of the slices' contributions
            dist.all_reduce(grad_h, op=dist.ReduceOp.SUM, group=ctx.setup.group)
        grads = [None if g is None else g.to(dt) for g, dt in zip(grads, ctx.dtypes)]
        return (*grads, None)


@compiler_disable
def vocab_parallel_linear_cross_entropy(
    hidden: torch.Tensor,
    local_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    group=None,
    local_bias: torch.Tensor | None = None,
    shift: bool = False,
    chunk_size: int | str = "auto",
    ignore_index: int = -100,
    reduction: str = "mean",
    weight: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    num_items=None,
    token_weights: torch.Tensor | None = None,
    sum_hidden_grad: bool = True,
    projection_dtype: torch.dtype | None = None,
    **deprecated,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ W.T + b`` with the head W ``[V, D]`` sharded over the vocabulary.

    The value of ``xent.linear_cross_entropy(hidden, W, target, linear_bias=b, ...)`` on every rank, without
    the full logits and without even this rank's ``[N, V_r]`` logits: one chunk ``[C, V_r]`` at a time.

    Args:
        hidden: ``[..., D]`` (``[..., T, D]`` with ``shift``), the same on every rank of ``group``
            (replicated, as in front of a column-parallel head).
        local_weight: ``[V_r, D]``, this rank's contiguous rows of W; slices in rank order, sizes free.
        target: ``[...]`` GLOBAL ids, the same on every rank; ``ignore_index`` is skipped.
        local_bias: this rank's ``[V_r]`` of the bias, optional.
        weight: this rank's ``[V_r]`` of the class weights (as ``torch.nn.functional.cross_entropy``; the
            old spelling ``weight_classes=`` works with a DeprecationWarning).
        sum_hidden_grad: all-reduce the gradient of ``hidden`` over ``group`` (default), so every rank
            receives the full d loss/d hidden = Σ_r g_r·W_r, what a tensor-parallel head needs. Set False
            when the framework already does it (Megatron's copy-to-tensor-parallel-region): each rank
            then receives its own partial g_r·W_r.
        projection_dtype: None or torch.float32 (float64 for float64 inputs): this function always
            projects in the compute dtype, half inputs in float32 from a float32 copy of the slice (its
            per-slice reductions are formed from float32 logits), so float32 is what it does either way;
            the argument is there for the same call as :func:`xent.linear_cross_entropy`.
        shift, chunk_size, label_smoothing, z_loss, softcap, ignore_index, reduction, num_items,
            token_weights: as :func:`xent.linear_cross_entropy` and :func:`vocab_parallel_cross_entropy`
            (``token_weights`` shaped like ``target``, the same on every rank).

    Gradients: ``local_weight`` and ``local_bias`` receive exactly their rows of the full gradient;
    ``hidden`` see ``sum_hidden_grad``. Communication: two all-reduces of ~5 numbers per token in the
    forward, one of ``[N, D]`` in the backward. A collective: every rank calls it with the same
    hidden, target and options.
    """
    weight = V.take_deprecated("vocab_parallel_linear_cross_entropy", deprecated,
                               {"weight_classes": "weight"}, {"weight": weight})["weight"]
    V.check_flags(shift=shift, sum_hidden_grad=sum_hidden_grad)
    V.check_reduction(reduction)
    V.check_num_items(num_items, reduction)
    check_head(hidden, local_weight, local_bias, shift, weight_name="local_weight", bias_name="local_bias")
    # the id range needs the global V, known after the first all-reduce
    V.check_ids_tensor(target, hidden.shape[:-1], lead_name="hidden")
    V.check_token_weights(token_weights, target.shape)
    size = local_weight.shape[0]
    V.check_options(num_classes=size, weight=weight,
                    label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
    V.check_chunk_size(chunk_size)
    V.check_ignore_index(ignore_index)
    compute = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    if projection_dtype not in (None, compute):
        raise ValueError(
            f"projection_dtype must be None or {compute} here (the vocabulary-parallel head is always "
            f"projected in {compute} for inputs of dtype {hidden.dtype}), got {projection_dtype!r}"
        )
    group_place(group)

    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    token_weights = as_token_weights(token_weights, dtype, hidden.device)
    rows, tgt, positions, out_shape, tw = valid_rows(hidden, target, ignore_index, shift, token_weights)
    n = rows.numel()
    V.check_num_items_covers(num_items, n)
    # local_stats holds about four [C, V_r] float32 temporaries
    chunk = chunk_tokens(chunk_size, n, size, 4 * 4, hidden.device)
    setup = _Setup(rows, tgt, chunk, dtype, weight, float(label_smoothing), float(z_loss), softcap,
                   ignore_index, group, sum_hidden_grad,
                   reduction == "mean" and weight is not None and num_items is None, tw)
    per_token, w_y = _VocabParallelLinearCE.apply(hidden2d, local_weight, local_bias, setup)
    if tw is not None:
        per_token = per_token * tw  # autograd carries w_t into the upstream gradient of each token
    if reduction == "none":
        flat = per_token.new_zeros(torch.Size(out_shape).numel())
        return flat.index_copy(0, positions, per_token).view(out_shape)
    valid = torch.ones(n, dtype=torch.bool, device=per_token.device)
    return reduce_tokens(per_token, valid, reduction, num_items,
                         denominator_weight(None if weight is None else w_y, tw))
