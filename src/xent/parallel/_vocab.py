"""Cross-entropy with the vocabulary sharded over the ranks of a process group (tensor parallelism).

Rank r holds the contiguous slice [start_r, start_r + V_r) of the vocabulary, slices in group-rank
order, sizes free. Every term of the loss (docs/REFERENCE.md §1) is a max or a sum over the
vocabulary, so per token a few numbers reduced over the ranks give it exactly; the logits are never
gathered:

1. all-reduce MAX: the shift m = max_c z_c, with each rank's V_r appended (a vector that is V_r at
   this rank's place and 0 elsewhere: its max over ranks is every size, hence the offsets and V);
2. all-reduce SUM: Σ_c exp(z_c − m), z_y and w_y (added only by the rank that owns y), the smoothing
   sum Σ_c w_c (m − z_c) (≥ 0: no cancellation), and the scalar Σ_c w_c.

Each rank first reduces its own slice with its own shift m_r and rescales to the global m after the
MAX, so the logits of a chunk are read once. The gradient of a slice is the closed form of
:meth:`xent.losses.CrossEntropy.value_and_grad` with those global numbers: backward communicates nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .. import _validate as V
from .._compile import compiler_disable
from .._reduce import as_token_weights, compute_dtype, denominator_weight, reduce_tokens
from ..losses._base import TokenLoss, cap_in_place, check_first_order

# The slice sizes travel in the compute dtype of the MAX reduction; float32 holds integers exactly
# below 2**24.
_MAX_SLICE = 2**24


def group_place(group) -> tuple[int, int]:
    """(rank in group, group size); a clear error when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "xent.parallel needs an initialised torch.distributed process group "
            "(torch.distributed.init_process_group, e.g. under torchrun)"
        )
    return dist.get_rank(group), dist.get_world_size(group)


@dataclass
class Shard:
    """This rank's slice [start, start + size) of a vocabulary of total ids."""

    start: int
    size: int
    total: int


def softcapped(z: torch.Tensor, softcap: float | None) -> torch.Tensor:
    # z ← c·tanh(z/c) (Gemma 2); a new tensor, z is left alone.
    return z if softcap is None else (z / softcap).tanh_().mul_(softcap)


def local_stats(z: torch.Tensor, w: torch.Tensor | None):
    """z [C, V_r] (soft-capped, compute dtype; overwritten). Per token, with this slice's own max m_r:
    (m_r, Σ_c exp(z_c − m_r), Σ_c w_c (m_r − z_c)), each [C].

    m_r is −inf for a slice masked to −inf (the padding ids of a padded vocabulary); its sums are then
    taken about 0 instead, which gives an exact 0 for the exponentials (all the MAX must not see is the
    0, which would move the global shift away from the true max)."""
    m = z.amax(dim=-1)
    about = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    d = z.neg_().add_(about.unsqueeze(-1))  # m_r − z_c ≥ 0, in z's buffer
    dev = d.sum(dim=-1) if w is None else d @ w
    sumexp = d.neg_().exp_().sum(dim=-1)
    return m, sumexp, dev


def all_max(m_local: torch.Tensor, size: int, group) -> tuple[torch.Tensor, Shard]:
    """All-reduce 1 (MAX): the global shift m [N] and this rank's place in the vocabulary."""
    rank, world = group_place(group)
    if size >= _MAX_SLICE:
        raise ValueError(f"a vocabulary slice must have fewer than {_MAX_SLICE} ids, got {size}")
    sizes = m_local.new_zeros(world)
    sizes[rank] = size
    buf = torch.cat([m_local, sizes])
    dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=group)
    sizes = [int(s) for s in buf[-world:].tolist()]
    return buf[:-world], Shard(start=sum(sizes[:rank]), size=size, total=sum(sizes))


@dataclass
class GlobalStats:
    """Per-token numbers over the whole vocabulary, identical on every rank; [N] each."""

    loss: torch.Tensor  # ℓ (not yet masked at ignored tokens)
    lse: torch.Tensor
    m: torch.Tensor  # the global row max; lse = m + rel
    rel: torch.Tensor  # log Σ_c exp(z_c − m)
    coef: torch.Tensor  # ∂ℓ/∂z_j = p_j·coef − (1−ε)w_y[j=y] − (ε/V)w_j
    w_y: torch.Tensor  # the target's class weight, 0 at ignored tokens
    owned: torch.Tensor  # bool: y is in this rank's slice
    local_y: torch.Tensor  # y − start where owned, else 0


def all_sum(
    m_local, m, sumexp_local, dev_local, z_y, w_y, w_sum_local, *, owned, local_y, shard, eps, z_loss, group,
    z_count: int | torch.Tensor | None = None, token_weights: torch.Tensor | None = None,
) -> GlobalStats:
    """All-reduce 2 (SUM) of the local sums moved to the global shift m, then the loss per token.

    z_y and w_y are this rank's contributions (0 where it does not own the target, or where the target
    is ignored). ``z_count``: under a class-weighted mean, the count of valid tokens; the z-loss is then
    scaled by Σ w_t·w_y / Σ w_t (``token_weights`` w_t [N], 0 where not valid; 1 when None), so that
    the mean's division by Σ w_t·w_y averages it over Σ_valid w_t (:meth:`xent.losses.TokenLoss.for_mean`).
    The losses returned are not yet times w_t."""
    shift = m_local - m  # ≤ 0; −inf for a masked slice, whose sumexp is 0
    cols = torch.stack([sumexp_local * shift.exp(), z_y, w_y, dev_local - shift * w_sum_local])
    buf = torch.cat([cols.reshape(-1), w_sum_local.reshape(1)])
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    sumexp, z_y, w_y, dev = buf[:-1].view(4, -1)
    w_sum = buf[-1]
    rel = sumexp.log()
    lse = m + rel
    # lse − z_y as (m − z_y) + rel: no cancellation at large logits
    loss = (1.0 - eps) * w_y * ((m - z_y) + rel)
    coef = (1.0 - eps) * w_y
    if eps > 0.0:
        # Σ_c w_c (lse − z_c) = (lse − m)·Σw + Σ_c w_c (m − z_c)
        loss = loss + (eps / shard.total) * (rel * w_sum + dev)
        coef = coef + (eps / shard.total) * w_sum
    if z_loss > 0.0:
        s = z_loss
        if z_count is not None:
            count = torch.as_tensor(z_count, device=w_y.device)
            if token_weights is None:
                weighted, mass = w_y.sum(), count.to(w_y.dtype)
            else:
                weighted, mass = (w_y * token_weights).sum(), token_weights.sum()
            s = z_loss * torch.where(count > 0, weighted / torch.where(count > 0, mass, 1.0), 1.0)
        loss = loss + s * lse.square()
        coef = coef + 2.0 * s * lse
    return GlobalStats(loss, lse, m, rel, coef, w_y, owned, local_y)


def owned_targets(target: torch.Tensor, valid: torch.Tensor, shard: Shard):
    """(owned [N] bool, local index [N]) of each target id in this rank's slice."""
    owned = valid & (target >= shard.start) & (target < shard.start + shard.size)
    return owned, torch.where(owned, target - shard.start, torch.zeros_like(target))


class ShardGrad(TokenLoss):
    """The gradient of a vocabulary slice, as a TokenLoss whose "target" is the token's index into the
    global statistics: so :func:`xent._engine.run` chunks, projects and accumulates for the fused path.

    dℓ/dz_j = p_j·coef − (1−ε)w_y·[j=y] − (ε/V)·w_j with p_j = exp(z_j − lse) over the GLOBAL lse, times
    1 − (z/c)² under soft-capping (as CrossEntropy.value_and_grad).
    """

    has_closed_form_grad = True

    def __init__(self, stats: GlobalStats, shard: Shard, *, w, eps, softcap):
        super().__init__(softcap=softcap)
        self.stats, self.shard, self.w, self.eps = stats, shard, w, eps

    def token_loss(self, logits, index):
        return self.stats.loss[index]

    def value_and_grad(self, logits, index, scale):
        # logits [C, V_r] raw (overwritten with the gradient), index [C] into the stats, scale [C].
        s = self.stats
        logits, tanh = cap_in_place(logits, self.softcap)
        # p_j = exp((z_j − m) − rel): z − lse directly would lose the digits of lse at large logits
        grad = logits.sub_(s.m[index].unsqueeze(-1)).sub_(s.rel[index].unsqueeze(-1)).exp_()
        grad.mul_((s.coef[index] * scale).unsqueeze(-1))
        owned = s.owned[index]
        rows = owned.nonzero().squeeze(-1)
        grad[rows, s.local_y[index][rows]] -= ((1.0 - self.eps) * s.w_y[index] * scale)[rows]
        if self.eps > 0.0:
            w = 1.0 if self.w is None else self.w
            grad.sub_((self.eps / self.shard.total) * scale.unsqueeze(-1) * w)
        if tanh is not None:
            grad.mul_(1.0 - tanh.square_())
        return s.loss[index], grad


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local_logits, target, w, eps, z_loss, softcap, ignore_index, group, z_per_count, tw):
        # local_logits [..., V_r], target [...] global ids, tw [N] token weights or None. Returns per-token
        # ℓ [...] (0 where ignored, not yet times w_t) and w_y [...] (for the mean's denominator).
        # z_per_count: a class-weighted mean (all_sum's z_count).
        size = local_logits.shape[-1]
        dt = compute_dtype(local_logits)
        logits2d = local_logits.reshape(-1, size)  # [N, V_r]
        z = softcapped(logits2d.to(dt, copy=True), softcap)  # a copy: local_stats overwrites it
        w = None if w is None else w.to(device=z.device, dtype=dt)
        m_local, sumexp_local, dev_local = local_stats(z, w)
        del z
        m, shard = all_max(m_local, size, group)
        # every rank holds the same target, so every rank raises here alike (no rank left waiting)
        V.check_target(target, local_logits.shape[:-1], shard.total, ignore_index)
        t = V.as_ids(target.reshape(-1))
        valid = t != ignore_index
        if tw is not None:
            valid = valid & (tw != 0)  # a zero weight is an ignored token
        owned, local_y = owned_targets(t, valid, shard)
        z_y = softcapped(logits2d.gather(1, local_y.unsqueeze(-1)).squeeze(-1).to(dt), softcap)
        z_y = torch.where(owned, z_y, 0.0)
        w_y = owned.to(dt) if w is None else torch.where(owned, w[local_y], 0.0)
        w_sum = torch.tensor(float(size), dtype=dt, device=m.device) if w is None else w.sum()
        stats = all_sum(m_local, m, sumexp_local, dev_local, z_y, w_y, w_sum, owned=owned, local_y=local_y,
                        shard=shard, eps=eps, z_loss=z_loss, group=group,
                        z_count=valid.sum() if z_per_count else None,
                        token_weights=None if tw is None else torch.where(valid, tw, 0.0))
        ctx.shard_grad = ShardGrad(stats, shard, w=w, eps=eps, softcap=softcap)
        ctx.valid = valid
        ctx.save_for_backward(local_logits)
        per_token = torch.where(valid, stats.loss, 0.0).view(target.shape)
        w_y = stats.w_y.view(target.shape)
        ctx.mark_non_differentiable(w_y)
        return per_token, w_y

    @staticmethod
    def backward(ctx, grad_loss, _grad_w_y):
        check_first_order("vocab_parallel_cross_entropy")
        (local_logits,) = ctx.saved_tensors
        size = local_logits.shape[-1]
        dt = compute_dtype(local_logits)
        z = local_logits.reshape(-1, size).to(dt, copy=True)  # overwritten with the gradient
        scale = torch.where(ctx.valid, grad_loss.reshape(-1).to(dt), 0.0)
        index = torch.arange(z.shape[0], device=z.device)
        grad = ctx.shard_grad.value_and_grad(z, index, scale)[1]
        return grad.view(local_logits.shape).to(local_logits.dtype), *([None] * 9)


@compiler_disable
def vocab_parallel_cross_entropy(
    local_logits: torch.Tensor,
    target: torch.Tensor,
    *,
    group=None,
    ignore_index: int = -100,
    reduction: str = "mean",
    weight: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    num_items=None,
    token_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Cross-entropy of logits whose vocabulary is sharded over the ranks of ``group``.

    Every rank gets the value :func:`xent.cross_entropy` gives on the full logits (the concatenation of
    the slices in rank order), and backward gives each rank exactly the gradient of its own slice.

    Args:
        local_logits: ``[..., V_r]``, this rank's contiguous slice of the vocabulary. Slices follow the
            rank order of ``group`` and may differ in size; the offsets and the global V are found in the
            first all-reduce, nothing to configure.
        target: ``[...]`` GLOBAL class ids in [0, V) or ``ignore_index``; the same tensor on every rank.
        group: the tensor-parallel process group (default: the world).
        weight: this rank's slice ``[V_r]`` of the class weights.
        label_smoothing: ε spread over the GLOBAL vocabulary (ε/V per class).
        z_loss, softcap, ignore_index, reduction, num_items: as :func:`xent.cross_entropy` (z-loss on the
            global logsumexp).
        token_weights: ``[...]`` per-token weights shaped like ``target``, the same on every rank; as
            :func:`xent.cross_entropy`.

    Communication: two all-reduces of ~5 numbers per token (MAX then SUM), none in backward; no
    all-gather of logits. It is a collective: every rank of ``group`` must call it with the same
    target and options, or the ranks wait for each other forever (bad input raises on every rank alike).

    Example (under ``torchrun --nproc-per-node 2``)::

        local = full_logits.tensor_split(world, dim=-1)[rank]  # [B, T, V_r]
        loss = xent.parallel.vocab_parallel_cross_entropy(local, target)
        loss.backward()  # local.grad is this rank's slice of the full gradient
    """
    if isinstance(target, torch.Tensor) and target.is_floating_point():
        raise TypeError("vocab_parallel_cross_entropy takes integer class ids, not probability targets")
    V.check_logits(local_logits, "local_logits")
    V.check_reduction(reduction)
    V.check_num_items(num_items, reduction)
    V.check_options(num_classes=local_logits.shape[-1], weight=weight, label_smoothing=label_smoothing,
                    z_loss=z_loss, softcap=softcap)
    if token_weights is not None:
        V.check_ids_tensor(target, local_logits.shape[:-1])
        V.check_token_weights(token_weights, target.shape)
    group_place(group)
    z_per_count = reduction == "mean" and weight is not None and num_items is None
    tw = as_token_weights(token_weights, compute_dtype(local_logits), local_logits.device)
    per_token, w_y = _VocabParallelCE.apply(local_logits, target, weight, float(label_smoothing),
                                            float(z_loss), softcap, ignore_index, group, z_per_count,
                                            None if tw is None else tw.reshape(-1))
    valid = target != ignore_index
    if tw is not None:
        valid = valid & (tw != 0)
        per_token = per_token * tw  # autograd carries w_t into the upstream gradient of each token
    V.check_num_items_covers(num_items, valid.sum())
    return reduce_tokens(per_token, valid, reduction, num_items,
                         denominator_weight(None if weight is None else w_y, tw))

