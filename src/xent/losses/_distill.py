"""Knowledge distillation: a divergence between a teacher's and a student's next-token distributions.

shared/REFERENCE.md §3 is the contract. Per token, teacher P = softmax(cap(z_t)/T) and student
Q = softmax(cap(z_s)/T); every mixture is formed in log space with logsumexp, never as log(p + q + eps).
"""

from __future__ import annotations

import math

import torch

from .. import _validate as V
from .._reduce import apply_token_loss
from ._base import TokenLoss
from ._focal import nll_of_target

KINDS = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd")


def _log_weight(w: float) -> float:
    """log w, with log 0 = −inf so that a zero-weight mixture component drops out of logsumexp exactly."""
    return math.log(w) if w > 0.0 else -math.inf


def _log_mix(log_a: torch.Tensor, wa: float, log_b: torch.Tensor, wb: float) -> torch.Tensor:
    """log(wa·a + wb·b) from log a, log b: logaddexp, exact for tiny probabilities and for wa or wb = 0."""
    return torch.logaddexp(log_a + _log_weight(wa), log_b + _log_weight(wb))


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(A‖B) = Σ a (log a − log b) over the last dim; terms with a = 0 are 0 (no 0·inf = NaN)."""
    a = log_a.exp()
    terms = a * (log_a - log_b)
    return torch.where(a > 0, terms, torch.zeros_like(terms)).sum(dim=-1)


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
    """

    num_extra = 1

    def __init__(self, *, kind: str = "forward_kl", beta: float = 0.5, alpha: float = 0.1,
                 temperature: float = 1.0, t_squared: bool = False, softcap: float | None = None,
                 hard_weight: float = 0.0):
        super().__init__(softcap=softcap)
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
        self.t_squared = bool(t_squared)
        self.hard_weight = float(hard_weight)

    def __call__(self, logits: torch.Tensor, target: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        # Skips the base class's soft-cap, which would cap the student's logits only: token_loss caps
        # both (the teacher's arrive as the extra tensor), then applies the temperature.
        return self.token_loss(logits, target, *extra)

    def _cap(self, z: torch.Tensor) -> torch.Tensor:
        return z if self.softcap is None else self.softcap * torch.tanh(z / self.softcap)

    def divergence(self, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
        """The chosen divergence per token from teacher log p and student log q, both [..., V]."""
        kind, beta, alpha = self.kind, self.beta, self.alpha
        if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
            return _kl(log_p, log_q)
        if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
            return _kl(log_q, log_p)
        if kind == "jsd":
            log_m = _log_mix(log_p, beta, log_q, 1.0 - beta)
            return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)
        if kind == "skew_kl":
            return _kl(log_p, _log_mix(log_p, alpha, log_q, 1.0 - alpha))
        if kind == "skew_reverse_kl":
            return _kl(log_q, _log_mix(log_p, 1.0 - alpha, log_q, alpha))
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(dim=-1)  # tvd

    def token_loss(self, logits: torch.Tensor, target: torch.Tensor, teacher_logits: torch.Tensor):
        # logits: student [..., V] float32/64; teacher_logits [..., V] any float dtype, never differentiated.
        student = self._cap(logits)
        teacher = self._cap(teacher_logits.detach().to(logits.dtype))
        t = self.temperature
        log_q = torch.log_softmax(student / t, dim=-1)
        log_p = torch.log_softmax(teacher / t, dim=-1)
        loss = self.divergence(log_p, log_q)
        if self.t_squared:
            loss = loss * (t * t)
        h = self.hard_weight
        if h > 0.0:
            loss = (1.0 - h) * loss + h * nll_of_target(student, target)
        return loss


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
) -> torch.Tensor:
    """Distillation loss between ``student_logits`` and ``teacher_logits``, both ``[..., V]``.

    Kinds, the order cap → temperature, β/α and the β=0/1 convention are in :class:`Distill`. ``target``
    ``[...]`` (optional) marks ignored tokens with ``ignore_index`` and is the label of the hard CE term
    when ``hard_weight`` > 0; without it every token counts. ``reduction`` and ``num_items`` behave exactly
    as in :func:`xent.cross_entropy` ("mean" divides the summed per-token divergence by the valid-token
    count). Computed in float32 whatever the input dtypes; no gradient reaches the teacher.

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
    target, ignore_index = distill_target(target, lead_shape, student_logits.device, hard_weight,
                                          ignore_index)
    return apply_token_loss(loss, student_logits, target, teacher_logits, ignore_index=ignore_index,
                            reduction=reduction, num_items=num_items)
