"""The one place where ignored tokens, reductions and ``num_items`` are handled.

Every loss in xent is a per-token definition (a :class:`xent.losses.TokenLoss`); this module turns
per-token losses into what the caller asked for. Conventions (shared/REFERENCE.md §1):

- ignored tokens (target == ignore_index) give 0 and no gradient;
- "none": per-token tensor shaped like the target; "sum": Σℓ;
- "mean": Σℓ / Σ_valid w_y (w_y = 1 without class weights) exactly as torch, whatever the sign of
  Σ_valid w_y, or Σℓ / num_items when num_items is given;
- every token ignored (or num_items = 0): 0 with a zero gradient, never NaN (torch returns NaN there);
- terms that are not class-weighted (the z-loss) are averaged over the valid tokens, never over Σ w_y:
  under a class-weighted mean the loss scales them by Σ_valid w_y / count (:meth:`TokenLoss.for_mean`).
"""

from __future__ import annotations

import torch

from . import _validate as V


def reduce_tokens(
    per_token: torch.Tensor,
    valid: torch.Tensor,
    reduction: str,
    num_items=None,
    token_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """per_token is 0 where not valid; token_weight (w_y per token) only changes the mean's denominator."""
    if reduction == "none":
        return per_token
    total = per_token.sum()
    if reduction == "sum":
        return total
    return total / mean_denominator(valid, num_items, token_weight, total.dtype)


def mean_denominator(valid, num_items, token_weight, dtype) -> torch.Tensor:
    """What Σℓ is divided by under reduction="mean": num_items if given, else Σ_valid w_y (the count of
    valid tokens without class weights), whatever its sign, as torch. 1 when no target is valid (or
    num_items is 0), so all-ignored gives an exact 0 with a zero gradient."""
    if num_items is not None:
        if isinstance(num_items, torch.Tensor):
            denom = num_items.to(device=valid.device, dtype=dtype)
        else:
            denom = torch.tensor(float(num_items), dtype=dtype, device=valid.device)
        return torch.where(denom == 0, torch.ones_like(denom), denom)
    count = valid.sum()
    denom = count.to(dtype) if token_weight is None else torch.where(valid, token_weight.to(dtype), 0).sum()
    return torch.where(count > 0, denom, torch.ones_like(denom))


def mean_loss(loss, valid, num_items, token_weight, dtype):
    """The loss to run for reduction="mean": ``loss.for_mean(Σ_valid w_y / count)`` under a
    class-weighted mean without num_items (its unweighted terms then average over the valid tokens),
    else ``loss`` itself."""
    if token_weight is None or num_items is not None:
        return loss
    count = valid.sum()
    weight_sum = torch.where(valid, token_weight.to(dtype), 0).sum()
    return loss.for_mean(torch.where(count > 0, weight_sum / count.clamp(min=1), 1.0))


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64; everything else is computed in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def apply_token_loss(
    loss,
    logits: torch.Tensor,
    target: torch.Tensor,
    *extra: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items=None,
) -> torch.Tensor:
    """The plain (materialised-logits) path shared by every loss.

    logits [..., V] any float dtype, target [...] ids already validated. Works on any leading shape
    without flattening, so a sliced (non-contiguous) logits view is never copied except to upcast.
    """
    target = V.as_ids(target)
    valid = target != ignore_index
    V.check_num_items_covers(num_items, valid.sum())
    safe = torch.where(valid, target, torch.zeros_like(target))  # any in-range id; masked below
    z = logits.to(compute_dtype(logits))
    token_weight = loss.token_weight(safe)
    if reduction == "mean":
        loss = mean_loss(loss, valid, num_items, token_weight, z.dtype)
    per_token = loss(z, safe, *extra)
    per_token = torch.where(valid, per_token, torch.zeros_like(per_token))
    return reduce_tokens(per_token, valid, reduction, num_items, token_weight)


def check_common(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int,
    reduction: str,
    num_items,
) -> int:
    """Validates the arguments every token loss shares; returns V."""
    num_classes = V.check_logits(logits)
    V.check_reduction(reduction)
    V.check_target(target, logits.shape[:-1], num_classes, ignore_index)
    V.check_num_items(num_items, reduction)
    return num_classes
