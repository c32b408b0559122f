"""Distillation from a sparse teacher: the teacher's top-k ids and log-probs per position, the rest of its
mass as one tail bucket. shared/REFERENCE.md §3 ("Sparse-teacher distillation") is the contract.

Per token the student's full softmax q is pooled onto the same k + 1 buckets: q_i for the k teacher ids
and q_tail = Σ_{c ∉ S} q_c, formed as a sum over the complement (never 1 − Σ_S q_i, which cancels when
the top-k hold nearly all the mass). The divergence on the buckets is :meth:`xent.losses.Distill.divergence`,
the very function the dense distillation uses, so k = V gives the dense losses exactly.
"""

from __future__ import annotations

import math

import torch

from .. import _validate as V
from .._reduce import apply_token_loss
from ._base import TokenLoss, cap_in_place, row_max
from ._distill import Distill, distill_target

#: Σ_S p_i may exceed 1 by rounding (log-probs stored in half precision); beyond this it is an error.
MASS_TOLERANCE = 1e-3


def teacher_buckets(log_p_top: torch.Tensor, has_tail: bool) -> torch.Tensor:
    """log p over the k + 1 buckets [..., k+1] (k without a tail): the tail's p_tail = max(0, 1 − Σ p_i)
    (rounding can push Σ p_i just past 1: then the tail is empty, log 0 = −inf)."""
    log_p_top = log_p_top.detach()
    if not has_tail:
        return log_p_top
    mass = log_p_top.exp().sum(dim=-1)
    rest = (1.0 - mass).clamp(min=0.0)
    log_tail = torch.where(rest > 0, torch.log(torch.where(rest > 0, rest, 1.0)), -math.inf)
    return torch.cat([log_p_top, log_tail.unsqueeze(-1)], dim=-1)


class SparseDistill(TokenLoss):
    r"""Per-token distillation loss from student logits and a sparse teacher (top-k ids and log-probs).

    Buckets b = the k teacher ids S and the tail (every other id): P_b the teacher's (p_i given, p_tail =
    1 − Σ_S p_i), Q_b the student's (q_i, q_tail = Σ_{c∉S} q_c). ``kind`` as :class:`Distill` on the
    buckets (forward KL, reverse KL, JSD(β), skew KLs, TVD); e.g. forward KL =
    Σ_S p_i (log p_i − log q_i) + p_tail (log p_tail − log q_tail), 0·log 0 = 0. With k = V there is no
    tail and the loss is the dense :class:`Distill` loss. The teacher's log-probs are used as given (at the
    temperature they were computed at); the student's logits are soft-capped first when ``softcap`` = c.

    Gradient through the pooling: with g_b = ∂D/∂Q_b, ∂D/∂z_j = q_j (g_{b(j)} − Σ_b Q_b g_b); the closed
    form (:meth:`value_and_grad`, used by the fused path) forms it in the chunk's own buffer.
    """

    num_extra = 2  # teacher ids [..., k] (int), teacher log-probs [..., k]
    has_closed_form_grad = True

    def __init__(self, *, kind: str = "forward_kl", beta: float = 0.5, alpha: float = 0.1,
                 softcap: float | None = None):
        super().__init__(softcap=softcap)
        self.divergence = Distill(kind=kind, beta=beta, alpha=alpha).divergence
        self.kind, self.beta, self.alpha = kind, float(beta), float(alpha)

    def token_loss(self, logits, target, ids, log_p_top):
        # logits [..., V] (capped), ids [..., k] distinct in range, log_p_top [..., k]; differentiable.
        num_classes, k = logits.shape[-1], ids.shape[-1]
        log_q = torch.log_softmax(logits, dim=-1)
        log_q_b = log_q.gather(-1, ids)
        if k < num_classes:
            rest = log_q.scatter(-1, ids, -math.inf)  # the complement of S
            log_q_b = torch.cat([log_q_b, torch.logsumexp(rest, dim=-1, keepdim=True)], dim=-1)
        log_p_b = teacher_buckets(log_p_top.to(log_q.dtype), k < num_classes)
        return self.divergence(log_p_b, log_q_b, log_q_b.exp())[0]

    def value_and_grad(self, logits, target, scale, ids, log_p_top):
        """Closed form on a [N, V] buffer overwritten with the gradient. The buffer becomes e = exp(z − m);
        the teacher's ids are read out (e_S) and zeroed, so Σe over the rest is the tail's mass, exactly."""
        num_classes, k = logits.shape[-1], ids.shape[-1]
        has_tail = k < num_classes
        logits, tanh = cap_in_place(logits, self.softcap)
        s = logits.sub_(row_max(logits))  # s = z − m ≤ 0, in place
        s_s = s.gather(-1, ids)  # [N, k]: log q_i = s_i − log Σe, exact even where e_i underflows
        e = s.exp_()
        e_s = e.gather(-1, ids)
        e.scatter_(-1, ids, 0.0)
        tail = e.sum(dim=-1)  # Σ_{c∉S} e_c: a sum of the complement, no cancellation
        sumexp = tail + e_s.sum(dim=-1)
        log_z = sumexp.log().unsqueeze(-1)
        log_q_b = s_s - log_z
        if has_tail:
            log_q_b = torch.cat([log_q_b, tail.log().unsqueeze(-1) - log_z], dim=-1)
        log_p_b = teacher_buckets(log_p_top.to(e.dtype), has_tail)
        q_b = log_q_b.exp()
        value, qg, sum_qg = self.divergence(log_p_b, log_q_b, q_b)
        # ∂D/∂z_j = q_j g_{b(j)} − q_j Σ_b Q_b g_b: for j in S, q_j g_j = qg_j; for j in the tail,
        # q_j g_tail = q_j qg_tail / Q_tail (0 where Q_tail = 0: then every such q_j is 0 too)
        if has_tail:
            q_tail = q_b[:, -1]
            g_tail = torch.where(q_tail > 0, qg[:, -1] / torch.where(q_tail > 0, q_tail, 1.0), 0.0)
            coef = (g_tail - sum_qg) * scale / sumexp
        else:
            coef = torch.zeros_like(sumexp)
        grad = e.mul_(coef.unsqueeze(-1))  # the tail's entries (S is zero here)
        grad.scatter_(-1, ids, (qg[:, :k] - q_b[:, :k] * sum_qg.unsqueeze(-1)) * scale.unsqueeze(-1))
        if tanh is not None:
            grad.mul_(1.0 - tanh.square_())
        return value, grad

    def __repr__(self) -> str:
        return (f"SparseDistill(kind={self.kind!r}, beta={self.beta!r}, alpha={self.alpha!r}, "
                f"softcap={self.softcap!r})")


def teacher_read_mask(target, ignore_index, lead_shape, *, shift=False):
    """[...] bool over the teacher's positions: where its ids and log-probs are read (a valid target; with
    ``shift`` position t is read when target[..., t+1] is valid, the last position never). None: all are.
    Elsewhere they are never read, so padding there (id −1, log-prob 0 or NaN) is accepted."""
    if target is None:
        if not shift:
            return None
        read = torch.ones(lead_shape, dtype=torch.bool)
        read[..., -1] = False
        return read
    V.check_ids_tensor(target, lead_shape, lead_name="the teacher's positions")
    V.check_ignore_index(ignore_index)
    valid = target != ignore_index
    if not shift:
        return valid
    return torch.cat([valid[..., 1:], torch.zeros_like(valid[..., :1])], dim=-1)


def check_sparse_teacher(teacher_ids, teacher_log_probs, lead_shape, num_classes, *, lead_name, read=None):
    """ids [..., k] distinct integers in [0, V), log-probs [..., k] ≤ 0 whose mass is at most 1, at the
    positions ``read`` ([...] bool, :func:`teacher_read_mask`; None: every position)."""
    V.check_floating("teacher_log_probs", teacher_log_probs)
    if not isinstance(teacher_ids, torch.Tensor):
        raise TypeError(f"teacher_ids must be a torch.Tensor, got {type(teacher_ids).__name__}")
    if teacher_ids.dim() < 1:
        raise ValueError(f"teacher_ids must have shape [..., k], got shape {tuple(teacher_ids.shape)}")
    V.check_ids_tensor(teacher_ids, (*lead_shape, teacher_ids.shape[-1]), name="teacher_ids",
                       lead_name=f"{lead_name} (plus k)")
    k = teacher_ids.shape[-1]
    if not 1 <= k <= num_classes:
        raise ValueError(f"teacher_ids must hold 1 <= k <= V = {num_classes} ids per position, got k = {k}")
    if teacher_log_probs.shape != teacher_ids.shape:
        raise ValueError(f"teacher_log_probs shape {tuple(teacher_log_probs.shape)} must equal teacher_ids "
                         f"shape {tuple(teacher_ids.shape)}")
    if read is not None:  # [n, k]: only the positions whose teacher is read
        teacher_ids = teacher_ids[read.to(teacher_ids.device)]
        teacher_log_probs = teacher_log_probs[read.to(teacher_log_probs.device)]
    bad = (teacher_ids < 0) | (teacher_ids >= num_classes)
    if bad.any():
        raise ValueError(f"teacher_ids has {int(bad.sum())} id(s) outside [0, {num_classes}) at positions "
                         f"that are not ignored; the first is {int(teacher_ids[bad][0])}")
    if k > 1:
        ordered = teacher_ids.sort(dim=-1).values
        dup = (ordered[..., 1:] == ordered[..., :-1]).any(dim=-1)
        if dup.any():
            raise ValueError(f"teacher_ids repeats an id at {int(dup.sum())} position(s); the ids of a "
                             "position must be distinct")
    lp = teacher_log_probs.detach().double()
    if torch.isnan(lp).any() or (lp > 0).any():
        raise ValueError("teacher_log_probs must be log-probabilities (<= 0, not NaN)")
    mass = lp.exp().sum(dim=-1)
    if (mass > 1.0 + MASS_TOLERANCE).any():
        raise ValueError(f"teacher_log_probs hold more than probability 1 at a position (max mass "
                         f"{float(mass.max()):.6g}); they must be log-probs of the full vocabulary")


def _unread_as_valid(teacher_ids, teacher_log_probs, read):
    """The plain path computes every position before masking: at the positions never read the teacher is
    replaced by ids 0..k−1 with mass 1/(k+1) each (finite, in range), so padding there cannot raise."""
    if read is None:
        return teacher_ids, teacher_log_probs
    k = teacher_ids.shape[-1]
    keep = read.to(teacher_ids.device).unsqueeze(-1)
    ids = torch.where(keep, teacher_ids, torch.arange(k, device=teacher_ids.device, dtype=teacher_ids.dtype))
    lp = torch.where(keep, teacher_log_probs, torch.full_like(teacher_log_probs, -math.log(k + 1)))
    return ids, lp


def sparse_distill_loss(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    target: torch.Tensor | None = None,
    *,
    kind: str = "forward_kl",
    beta: float = 0.5,
    alpha: float = 0.1,
    softcap: float | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items=None,
    token_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Distillation of ``student_logits`` ``[..., V]`` from a sparse teacher: ``teacher_ids`` ``[..., k]``
    (distinct ids per position) and their ``teacher_log_probs`` ``[..., k]`` (log-probs of the teacher's
    full distribution; the rest of its mass is the tail bucket). See :class:`SparseDistill`.

    ``target`` (optional) marks ignored positions with ``ignore_index``; without it every position counts.
    ``reduction``, ``num_items`` and ``token_weights`` as :func:`xent.cross_entropy`. No gradient reaches
    the teacher. With k = V this is :func:`xent.distill_loss` (at temperature 1) on the teacher's logits.

    Example:
        >>> import torch, xent
        >>> s = torch.tensor([[2.0, 1.0, 0.1], [1.5, 0.5, 2.0]])
        >>> t = torch.log_softmax(torch.tensor([[1.0, 2.0, 0.5], [2.2, 0.1, 1.0]]), -1)
        >>> top = t.topk(1, dim=-1)   # the teacher's most likely id and its log-prob; the rest is the tail
        >>> round(xent.sparse_distill_loss(s, top.indices, top.values).item(), 6)
        0.310327
    """
    loss = SparseDistill(kind=kind, beta=beta, alpha=alpha, softcap=softcap)
    num_classes = V.check_logits(student_logits, "student_logits")
    V.check_reduction(reduction)
    V.check_num_items(num_items, reduction)
    lead_shape = student_logits.shape[:-1]
    if target is not None:
        V.check_target(target, lead_shape, num_classes, ignore_index, lead_name="student_logits")
    read = teacher_read_mask(target, ignore_index, lead_shape)
    check_sparse_teacher(teacher_ids, teacher_log_probs, lead_shape, num_classes, lead_name="student_logits",
                         read=read)
    V.check_token_weights(token_weights, lead_shape, like="student_logits shape without its last dimension")
    target, ignore_index = distill_target(target, lead_shape, student_logits.device, 0.0, ignore_index)
    teacher_ids, teacher_log_probs = _unread_as_valid(V.as_ids(teacher_ids), teacher_log_probs, read)
    return apply_token_loss(loss, student_logits, target, teacher_ids, teacher_log_probs,
                            ignore_index=ignore_index, reduction=reduction, num_items=num_items,
                            token_weights=token_weights)
