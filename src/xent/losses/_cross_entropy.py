"""Cross-entropy: PyTorch's semantics, extended with z-loss, soft-capping and num_items.

docs/REFERENCE.md §1–2 is the contract.
"""

from __future__ import annotations

import copy

import torch

from .. import _validate as V
from .._reduce import apply_token_loss, as_token_weights, check_common, compute_dtype, reduce_tokens
from ._base import CrossEntropyRows, TokenLoss, exp_in_place, nll_and_shift


class CrossEntropy(TokenLoss):
    r"""Per-token cross-entropy with class weights, label smoothing, z-loss and soft-capping.

    .. math::
        \ell = (1-\varepsilon)\, w_y (\operatorname{lse} z - z_y)
               + \frac{\varepsilon}{V} \sum_c w_c (\operatorname{lse} z - z_c)
               + s\,(\operatorname{lse} z)^2

    with ε = ``label_smoothing`` (as ``torch.nn.functional.cross_entropy``), s = ``z_loss`` (PaLM, t5x,
    OLMo; Liger's ``lse_square_scale``; 1e-4 is typical) and z ← c·tanh(z/c) first when ``softcap`` = c
    (Gemma 2 uses 30 on the final logits). Under reduction="mean" the class-weighted terms are divided by
    Σ_valid w_y, as torch does, and the z-loss by the count of valid tokens (as Liger), so scaling every
    class weight never changes the z-loss; with per-token weights w_t (``token_weights`` of the
    functions) by Σ_valid w_t·w_y and Σ_valid w_t. lse − z_y is computed as (m − z_y) + log Σ exp(z − m),
    m the row max, so the precision does not fall as the logits grow.
    """

    has_closed_form_grad = True

    def __init__(
        self,
        *,
        weight: torch.Tensor | None = None,
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
    ):
        super().__init__(softcap=softcap)
        V.check_options(weight=weight, label_smoothing=label_smoothing, z_loss=z_loss)
        self.weight = weight
        self.label_smoothing = float(label_smoothing)
        self.z_loss = float(z_loss)
        # the z-loss's multiplier under a class-weighted mean: Σ_valid w_t·w_y / Σ_valid w_t (for_mean)
        self.z_scale: torch.Tensor | float = 1.0

    def check(self, num_classes: int) -> None:
        V.check_options(num_classes=num_classes, weight=self.weight)

    def token_weight(self, target: torch.Tensor) -> torch.Tensor | None:
        return None if self.weight is None else self.weight.to(target.device)[target]

    def for_mean(self, count_scale: torch.Tensor) -> CrossEntropy:
        if self.z_loss == 0.0:
            return self
        scaled = copy.copy(self)
        scaled.z_scale = count_scale
        return scaled

    def _weight(self, like: torch.Tensor) -> torch.Tensor | None:
        return None if self.weight is None else self.weight.to(device=like.device, dtype=like.dtype)

    def _z_coef(self, like: torch.Tensor):
        """s, times the class-weighted mean's count scale: a float or a scalar tensor on like's device."""
        if isinstance(self.z_scale, torch.Tensor):
            return self.z_loss * self.z_scale.to(device=like.device, dtype=like.dtype)
        return self.z_loss * self.z_scale

    def token_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # logits [..., V], target [...] in range.
        eps, num_classes = self.label_smoothing, logits.shape[-1]
        w = self._weight(logits)
        nll, m, rel = nll_and_shift(logits, target)
        if w is not None:
            nll = nll * w[target]
        loss = nll
        if eps > 0.0:
            # Σ_c w_c (lse − z_c) = rel·Σw − Σ_c w_c (z_c − m): every part small, no cancellation at
            # large logits (one [..., V] temporary, only with smoothing).
            centred = logits - m.unsqueeze(-1)
            w_sum = num_classes if w is None else w.sum()
            smooth = rel * w_sum - (centred.sum(dim=-1) if w is None else centred @ w)
            loss = (1.0 - eps) * nll + (eps / num_classes) * smooth
        if self.z_loss > 0.0:
            lse = m + rel
            loss = loss + self._z_coef(lse) * lse.square()
        return loss

    def row_spec(self) -> CrossEntropyRows | None:
        """This loss's options for a row backend's closed form; None for a subclass (which may change the
        formulas)."""
        if type(self) is not CrossEntropy:
            return None
        z_coef = self._z_coef(torch.ones((), dtype=torch.float32)) if self.z_loss > 0.0 else 0.0
        return CrossEntropyRows(self.weight, self.label_smoothing, z_coef, self.softcap)

    def value_and_grad(self, logits: torch.Tensor, target: torch.Tensor, scale: torch.Tensor):
        """Closed form on a [N, V] buffer that is overwritten with the gradient (no autograd graph).

        dℓ/dz_j = p_j·((1−ε)w_y + (ε/V)Σw + 2s·lse) − (1−ε)w_y·[j=y] − (ε/V)·w_j, times dz/dx = 1 − (z/c)²
        under soft-capping. ``scale`` [N] multiplies each token's gradient (1/denominator, or the
        upstream gradient for reduction="none").
        """
        return self._closed_form(logits, target, scale, False)

    def value_grad_stats(self, logits: torch.Tensor, target: torch.Tensor, scale: torch.Tensor):
        """:meth:`value_and_grad` and the training statistics [N, 3] from the same pass over the buffer
        (:func:`xent.losses._base.exp_in_place` with ``stats``)."""
        return self._closed_form(logits, target, scale, True)

    def _closed_form(self, logits, target, scale, stats):
        eps, num_classes = self.label_smoothing, logits.shape[-1]
        w = self._weight(logits)
        w_sum = float(num_classes) if w is None else w.sum()
        # The buffer becomes e = exp(z − m); nll = (m − z_y) + log Σe; centred = Σ_c w_c (z_c − m).
        rows, tanh, e, sumexp, lse, nll, centred, *st = exp_in_place(logits, target, self.softcap, eps > 0.0,
                                                                     w, stats=stats)
        w_y = torch.ones_like(nll) if w is None else w[target]
        loss = (1.0 - eps) * w_y * nll
        if eps > 0.0:
            loss = loss + (eps / num_classes) * (sumexp.log() * w_sum - centred)
        coef = (1.0 - eps) * w_y + (eps / num_classes) * w_sum
        if self.z_loss > 0.0:
            s = self._z_coef(lse)
            loss = loss + s * lse.square()
            coef = coef + 2.0 * s * lse
        grad = e.mul_((coef * scale / sumexp).unsqueeze(-1))  # p_j · coef · scale
        grad[rows, target] -= (1.0 - eps) * w_y * scale
        if eps > 0.0:
            if w is None:
                grad.sub_((eps / num_classes) * scale.unsqueeze(-1))
            else:
                grad.sub_((eps / num_classes) * scale.unsqueeze(-1) * w)
        if tanh is not None:
            grad.mul_(1.0 - tanh.square_())
        return (loss, grad, *st)


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    weight: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    num_items=None,
    token_weights: torch.Tensor | None = None,
    return_stats: bool = False,
):
    r"""Cross-entropy of logits ``[..., V]`` (vocabulary last) against class ids ``[...]``.

    Exactly ``torch.nn.functional.cross_entropy(logits.float().reshape(-1, V), target.reshape(-1), ...)``
    for every option torch has, plus:

    - ``z_loss`` s: adds s·(logsumexp z)² per valid token;
    - ``softcap`` c: z ← c·tanh(z/c) before anything else;
    - ``num_items``: reduction "mean" becomes Σℓ / num_items. Pass the count of valid targets over all
      micro-batches and ranks (:func:`xent.count_items`) and the micro-batch losses sum to the
      full-batch mean exactly;
    - ``token_weights`` w ``[...]`` (float, shaped like ``target``, finite, any sign; no gradient reaches
      it): ℓ_t ← w_t·ℓ_t, and "mean" divides by Σ_valid w_t·w_{y_t} (w_y the class weight, 1 without
      ``weight``) or by ``num_items``. The z-loss is weighted by w_t too and averaged over Σ_valid w_t
      (not over Σ w_t·w_y). A token with w_t = 0 is exactly an ignored one (no loss, no gradient, not
      counted). Signed weights (advantages) whose sum may be 0 want "sum" or ``num_items``: "mean"
      divides by the weight sum whatever its sign, as torch does with class weights;
    - every target ignored gives 0 with a zero gradient (torch gives NaN);
    - ``return_stats=True`` returns ``(loss, stats)``, stats a :class:`xent.TokenStats` of detached sums
      over the valid tokens (loss, count, top-1 correct, entropy, z-loss terms, logsumexp) to sum over
      micro-batches and ranks before dividing.

    Computed in float32 whatever the input dtype (float64 stays float64); half inputs give a float32
    result. ``reduction="none"`` returns a tensor shaped like ``target``, 0 where ignored.

    Probability targets (a float ``target`` shaped like ``logits``) are accepted as torch does:
    ℓ = −Σ_c w_c t_c log q_c, smoothed as t ← (1−ε)t + ε/V, "mean" divides by the number of rows (by
    Σ w_t with ``token_weights``, then shaped like ``target`` without its last dimension).

    Example:
        >>> import torch, xent
        >>> x = torch.tensor([[2.0, 1.0, 0.1], [0.5, 2.5, 0.3], [1.5, 0.5, 2.0]])
        >>> y = torch.tensor([0, -100, 2])
        >>> round(xent.cross_entropy(x, y).item(), 6)
        0.51058
    """
    V.check_flags(return_stats=return_stats)
    if isinstance(target, torch.Tensor) and target.is_floating_point():
        if return_stats:
            raise ValueError("return_stats needs class-id targets (top-1 correctness is undefined for "
                             f"probability targets), got a target of dtype {target.dtype}")
        return _cross_entropy_probs(
            logits, target, reduction=reduction, weight=weight, label_smoothing=label_smoothing,
            z_loss=z_loss, softcap=softcap, num_items=num_items, token_weights=token_weights,
        )
    num_classes = check_common(logits, target, ignore_index=ignore_index, reduction=reduction,
                               num_items=num_items, token_weights=token_weights)
    loss = CrossEntropy(weight=weight, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
    loss.check(num_classes)
    return apply_token_loss(loss, logits, target, ignore_index=ignore_index, reduction=reduction,
                            num_items=num_items, token_weights=token_weights, return_stats=return_stats)


def _cross_entropy_probs(logits, target, *, reduction, weight, label_smoothing, z_loss, softcap, num_items,
                         token_weights):
    num_classes = V.check_logits(logits)
    V.check_reduction(reduction)
    if target.shape != logits.shape:
        raise ValueError(
            f"probability target shape {tuple(target.shape)} must equal logits shape {tuple(logits.shape)}"
        )
    V.check_options(num_classes=num_classes, weight=weight, label_smoothing=label_smoothing,
                    z_loss=z_loss, softcap=softcap)
    V.check_num_items(num_items, reduction)
    V.check_token_weights(token_weights, target.shape[:-1], like="target shape without its last dimension")
    dtype = compute_dtype(logits)
    z = logits.to(dtype)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    t = target.to(dtype)
    if label_smoothing > 0.0:
        t = (1.0 - label_smoothing) * t + label_smoothing / num_classes
    if weight is not None:
        t = t * weight.to(device=z.device, dtype=dtype)
    logq = torch.log_softmax(z, dim=-1)
    per_row = -(t * logq).sum(dim=-1)
    if z_loss > 0.0:
        per_row = per_row + z_loss * torch.logsumexp(z, dim=-1).square()
    valid = torch.ones(per_row.shape, dtype=torch.bool, device=per_row.device)
    tw = as_token_weights(token_weights, per_row.dtype, per_row.device)
    if tw is not None:
        valid = tw != 0  # a zero weight is an ignored row
        per_row = torch.where(valid, per_row * tw, 0.0)
    V.check_num_items_covers(num_items, valid.sum())
    return reduce_tokens(per_row, valid, reduction, num_items, tw)
