"""Knowledge distillation: a divergence between a teacher's and a student's next-token distributions.

docs/REFERENCE.md §3 is the contract. Per token, teacher P = softmax(cap(z_t)/T) and student
Q = softmax(cap(z_s)/T); every mixture is formed in log space with logsumexp, never as log(p + q + eps).
"""

from __future__ import annotations

import math

import torch

from .. import _validate as V
from .._reduce import apply_token_loss
from ._base import TokenLoss, check_first_order

KINDS = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd")


def _log_weight(w: float) -> float:
    """log w, with log 0 = −inf so that a zero-weight mixture component drops out of logsumexp exactly."""
    return math.log(w) if w > 0.0 else -math.inf


def _log_mix(log_a: torch.Tensor, wa: float, log_b: torch.Tensor, wb: float) -> torch.Tensor:
    """log(wa·a + wb·b) from log a, log b: logaddexp, exact for tiny probabilities and for wa or wb = 0."""
    return torch.logaddexp(log_a + _log_weight(wa), log_b + _log_weight(wb))


def _x_log_ratio(a: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """a·(log a − log b) elementwise, 0 where a = 0 (never 0·inf = NaN)."""
    terms = a * (log_a - log_b)
    return torch.where(a > 0, terms, torch.zeros_like(terms))


def _kl(log_a: torch.Tensor, log_b: torch.Tensor, a: torch.Tensor | None = None) -> torch.Tensor:
    """KL(A‖B) = Σ a (log a − log b) over the last dim (a = e^{log a} if not given); a = 0 terms are 0."""
    return _x_log_ratio(log_a.exp() if a is None else a, log_a, log_b).sum(dim=-1)


def _exp_over_mix(log_num: torch.Tensor, log_m: torch.Tensor) -> torch.Tensor:
    """exp(log_num − log m) formed in log space; 0 where the mixture m is 0 (then so is the numerator)."""
    return torch.where(log_m > -math.inf, torch.exp(log_num - log_m), torch.zeros_like(log_m))


class _ClosedFormGrad(torch.autograd.Function):
    """Per-token values whose backward is the gradient computed with them: no autograd graph is kept,
    only one [..., V] tensor (first-order only: no double backward)."""

    @staticmethod
    def forward(ctx, logits, teacher, target, loss):
        value, grad = loss.value_and_unit_grad(logits, target, teacher, need_grad=True)
        ctx.save_for_backward(grad)
        return value

    @staticmethod
    def backward(ctx, upstream):
        check_first_order("xent.distill_loss")
        (grad,) = ctx.saved_tensors
        return grad * upstream.unsqueeze(-1), None, None, None


class Distill(TokenLoss):
    r"""Per-token distillation loss from student logits, target ids and teacher logits.

    Both logit tensors are soft-capped (z ← c·tanh(z/c), when ``softcap`` = c), then divided by the
    temperature T, then normalised: P (teacher) and Q (student). The teacher gets no gradient. ``kind``:

    - ``"forward_kl"``: KL(P‖Q) = Σ p (log p − log q), Hinton et al. 2015 (arXiv 1503.02531); mean-seeking.
    - ``"reverse_kl"``: KL(Q‖P); mode-seeking (MiniLLM, Gu et al., ICLR 2024).
    - ``"jsd"``: generalised JSD(β) = β·KL(P‖M) + (1−β)·KL(Q‖M), M = βP + (1−β)Q (GKD, Agarwal et al.,
      ICLR 2024; β=0.5 is the symmetric JSD, the paper's sweep used β ∈ {0.1, 0.5, 0.9}). At β=0 and β=1 the
      mixture form is identically 0; xent follows TRL and Liger there: β=0 is forward KL(P‖Q) and β=1
      is reverse KL(Q‖P) (the limits of JSD(β)/β and JSD(β)/(1−β)).
    - ``"skew_kl"``: KL(P‖αP + (1−α)Q); ``"skew_reverse_kl"``: KL(Q‖(1−α)P + αQ) (DistiLLM, Ko et al.,
      ICML 2024, α=0.1). α=0 gives the plain KLs.
    - ``"tvd"``: total variation ½Σ|p − q|.

    ``t_squared=True`` multiplies the divergence by T² (Hinton's factor that keeps gradient sizes
    independent of T); off by default. ``hard_weight`` h mixes in cross-entropy with the target on the
    student's capped logits at temperature 1: ℓ = (1−h)·divergence + h·CE.

    The gradient w.r.t. the student's logits is computed in closed form with the value (see
    :meth:`divergence`), so training keeps one [..., V] tensor per call instead of an autograd graph;
    it is first-order only (no double backward).
    """

    num_extra = 1

    def __init__(self, *, kind: str = "forward_kl", beta: float = 0.5, alpha: float = 0.1,
                 temperature: float = 1.0, t_squared: bool = False, softcap: float | None = None,
                 hard_weight: float = 0.0):
        super().__init__(softcap=softcap)
        V.check_flags(t_squared=t_squared)
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        V.check_range("beta", beta, 0.0, 1.0)
        V.check_range("alpha", alpha, 0.0, 1.0)
        if not (math.isfinite(temperature) and temperature > 0.0):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
        V.check_range("hard_weight", hard_weight, 0.0, 1.0)
        self.kind = kind
        self.beta = float(beta)
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.t_squared = t_squared
        self.hard_weight = float(hard_weight)

    def __call__(self, logits: torch.Tensor, target: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        # Skips the base class's soft-cap, which would cap the student's logits only: token_loss caps
        # both (the teacher's arrive as the extra tensor), then applies the temperature.
        return self.token_loss(logits, target, *extra)

    def divergence(self, log_p: torch.Tensor, log_q: torch.Tensor, q: torch.Tensor):
        """(D, q⊙g, Σ q⊙g) per token from teacher log p, student log q and q = e^{log q}, all [..., V].

        D is the divergence and g = ∂D/∂q (up to a constant per token, which cancels): through the
        softmax, ∂D/∂u_j = q_j g_j − q_j Σ_k q_k g_k for the student's tempered logits u.
        """
        kind, beta, alpha = self.kind, self.beta, self.alpha
        if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
            p = log_p.exp()  # g = −p/q, so q⊙g = −p and Σ q⊙g = −1: the gradient is (q − p)/T
            return _kl(log_p, log_q, p), -p, torch.full_like(p[..., 0], -1.0)
        if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
            kl = _kl(log_q, log_p, q)  # g = log q − log p + 1
            return kl, _x_log_ratio(q, log_q, log_p), kl
        if kind == "jsd":
            log_m = _log_mix(log_p, beta, log_q, 1.0 - beta)
            kl_qm = _kl(log_q, log_m, q)  # g = (1−β)(log q − log m): the mixture's own terms cancel
            value = beta * _kl(log_p, log_m) + (1.0 - beta) * kl_qm
            return value, (1.0 - beta) * _x_log_ratio(q, log_q, log_m), (1.0 - beta) * kl_qm
        if kind == "skew_kl":
            log_m = _log_mix(log_p, alpha, log_q, 1.0 - alpha)
            # g = −(1−α)·p/m; the weight inside the exponent: (1−α)·p·q/m ≤ p never overflows
            qg = -_exp_over_mix(_log_weight(1.0 - alpha) + log_p + log_q, log_m)
            return _kl(log_p, log_m), qg, qg.sum(dim=-1)
        if kind == "skew_reverse_kl":
            log_m = _log_mix(log_p, 1.0 - alpha, log_q, alpha)
            kl = _kl(log_q, log_m, q)  # g = log q − log m + 1 − α·q/m
            # α·q²/m ≤ q, formed in log space: at α = 0 it is exp(−inf) = 0, never 0·exp(overflow) = NaN
            skew = _exp_over_mix(_log_weight(alpha) + 2.0 * log_q, log_m)
            return kl, _x_log_ratio(q, log_q, log_m) - skew, kl - skew.sum(dim=-1)
        p = log_p.exp()  # tvd: g = ½·sign(q − p)
        qg = 0.5 * q * torch.sign(q - p)
        return 0.5 * (p - q).abs().sum(dim=-1), qg, qg.sum(dim=-1)

    def value_and_unit_grad(self, logits, target, teacher_logits, *, need_grad: bool):
        """Per-token loss [...] and, if need_grad, its gradient w.r.t. the student's logits [..., V]."""
        t = self.temperature
        student, teacher, tanh = logits, teacher_logits, None
        if self.softcap is not None:
            tanh = torch.tanh(logits / self.softcap)  # kept for the chain rule
            student = self.softcap * tanh
            teacher = self.softcap * torch.tanh(teacher / self.softcap)
        log_q = torch.log_softmax(student / t if t != 1.0 else student, dim=-1)
        log_p = torch.log_softmax(teacher / t if t != 1.0 else teacher, dim=-1)
        q = log_q.exp()
        value, qg, sum_qg = self.divergence(log_p, log_q, q)
        grad = None
        if need_grad:
            grad = qg.sub_(q * sum_qg.unsqueeze(-1))  # qg is a fresh tensor in every branch
            if t != 1.0:
                grad = grad.div_(t)
        if self.t_squared:
            value = value * (t * t)
            grad = None if grad is None else grad * (t * t)
        h = self.hard_weight
        if h > 0.0:
            log_q1 = torch.log_softmax(student, dim=-1)  # the hard term is at temperature 1
            value = (1.0 - h) * value - h * log_q1.gather(-1, target.unsqueeze(-1)).squeeze(-1)
            if need_grad:
                hard = log_q1.exp_()
                hard.scatter_add_(-1, target.unsqueeze(-1), -torch.ones_like(hard[..., :1]))
                grad = (1.0 - h) * grad + h * hard
        if need_grad and tanh is not None:
            grad = grad * (1.0 - tanh.square())
        return value, grad

    def token_loss(self, logits: torch.Tensor, target: torch.Tensor, teacher_logits: torch.Tensor):
        # logits: student [..., V] float32/64; teacher_logits [..., V] any float dtype, never differentiated.
        teacher = teacher_logits.detach().to(logits.dtype)
        if torch.is_grad_enabled() and logits.requires_grad:
            # The closed-form gradient replaces an autograd graph of ~10 [..., V] tensors with one.
            return _ClosedFormGrad.apply(logits, teacher, target, self)
        return self.value_and_unit_grad(logits, target, teacher, need_grad=False)[0]


def distill_target(target, lead_shape, device, hard_weight: float, ignore_index: int):
    """(target, ignore_index) for the shared reduction; without a target every token counts.

    Then the ids are 0 everywhere (unused: there is no hard term) with an ignore_index they never equal.
    """
    if target is not None:
        return target, ignore_index
    if hard_weight > 0.0:
        raise ValueError(f"hard_weight={hard_weight} needs target (the hard labels); got target=None")
    return torch.zeros(lead_shape, dtype=torch.long, device=device), -1


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor | None = None,
    *,
    kind: str = "forward_kl",
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    t_squared: bool = False,
    softcap: float | None = None,
    hard_weight: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items=None,
    token_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Distillation loss between ``student_logits`` and ``teacher_logits``, both ``[..., V]``.

    Kinds, the order cap → temperature, β/α and the β=0/1 convention are in :class:`Distill`. ``target``
    ``[...]`` (optional) marks ignored tokens with ``ignore_index`` and is the label of the hard CE term
    when ``hard_weight`` > 0; without it every token counts. ``reduction``, ``num_items`` and
    ``token_weights`` (``[...]``) behave exactly as in :func:`xent.cross_entropy` ("mean" divides the
    summed per-token divergence by the valid-token count, or by Σ_valid w_t). Computed in float32
    whatever the input dtypes; no gradient reaches the teacher.

    Example:
        >>> import torch, xent
        >>> s = torch.tensor([[2.0, 1.0, 0.1], [0.5, 2.5, 0.3], [1.5, 0.5, 2.0]])
        >>> t = torch.tensor([[1.0, 2.0, 0.5], [0.2, 1.8, 0.9], [2.2, 0.1, 1.0]])
        >>> y = torch.tensor([0, -100, 2])
        >>> round(xent.distill_loss(s, t, y, kind="forward_kl").item(), 6)
        0.351348
    """
    loss = Distill(kind=kind, beta=beta, alpha=alpha, temperature=temperature, t_squared=t_squared,
                   softcap=softcap, hard_weight=hard_weight)
    num_classes = V.check_logits(student_logits, "student_logits")
    teacher_classes = V.check_logits(teacher_logits, "teacher_logits")
    if teacher_classes != num_classes:
        raise ValueError(
            f"teacher_logits vocabulary size {teacher_classes} does not match student_logits vocabulary "
            f"size {num_classes} (shapes {tuple(teacher_logits.shape)} and {tuple(student_logits.shape)})"
        )
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher_logits shape {tuple(teacher_logits.shape)} must equal student_logits shape "
            f"{tuple(student_logits.shape)}"
        )
    V.check_reduction(reduction)
    V.check_num_items(num_items, reduction)
    lead_shape = student_logits.shape[:-1]
    if target is not None:
        V.check_target(target, lead_shape, num_classes, ignore_index, lead_name="student_logits")
    V.check_token_weights(token_weights, lead_shape, like="student_logits shape without its last dimension")
    target, ignore_index = distill_target(target, lead_shape, student_logits.device, hard_weight,
                                          ignore_index)
    return apply_token_loss(loss, student_logits, target, teacher_logits, ignore_index=ignore_index,
                            reduction=reduction, num_items=num_items, token_weights=token_weights)
