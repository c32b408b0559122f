"""The one place where ignored tokens, reductions, ``num_items`` and per-token weights are handled.

Every loss in xent is a per-token definition (a :class:`xent.losses.TokenLoss`); this module turns
per-token losses into what the caller asked for. Conventions (docs/REFERENCE.md §1):

- ignored tokens (target == ignore_index) give 0 and no gradient; so do tokens whose per-token weight
  w_t is 0 (a zero weight is exactly an ignored token: not counted either);
- per-token weights w_t (``token_weights``, shaped like the target): ℓ_t ← w_t·ℓ_t;
- "none": per-token tensor shaped like the target; "sum": Σℓ;
- "mean": Σℓ / Σ_valid w_t·w_{y_t} (w_y the class weight, w_t the token weight, each 1 when not given)
  exactly as torch for class weights, whatever the sign of the sum, or Σℓ / num_items when num_items is
  given;
- every token ignored (or num_items = 0): 0 with a zero gradient, never NaN (torch returns NaN there);
- terms that are not class-weighted (the z-loss) are weighted by w_t and averaged over Σ_valid w_t (the
  count of valid tokens without token weights), never over Σ w_t·w_y: under a class-weighted mean the
  loss scales them by Σ_valid w_t·w_y / Σ_valid w_t (:meth:`TokenLoss.for_mean`).
"""

from __future__ import annotations

import torch

from . import _validate as V
from ._stats import TokenStats


def reduce_tokens(
    per_token: torch.Tensor,
    valid: torch.Tensor,
    reduction: str,
    num_items=None,
    token_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """per_token is 0 where not valid (and already times w_t); token_weight (w_t·w_y per token, see
    :func:`denominator_weight`) only changes the mean's denominator."""
    if reduction == "none":
        return per_token
    total = per_token.sum()
    if reduction == "sum":
        return total
    return total / mean_denominator(valid, num_items, token_weight, total.dtype)


def denominator_weight(class_weight: torch.Tensor | None, token_weights: torch.Tensor | None):
    """w_t·w_{y_t} per token, what "mean" sums in its denominator; None when both are None (then 1)."""
    if class_weight is None:
        return token_weights
    return class_weight if token_weights is None else class_weight * token_weights


def mean_denominator(valid, num_items, token_weight, dtype) -> torch.Tensor:
    """What Σℓ is divided by under reduction="mean": num_items if given, else Σ_valid token_weight
    (w_t·w_y; the count of valid tokens without weights), whatever its sign, as torch. 1 when no target
    is valid (or num_items is 0), so all-ignored gives an exact 0 with a zero gradient."""
    if num_items is not None:
        if isinstance(num_items, torch.Tensor):
            denom = num_items.to(device=valid.device, dtype=dtype)
        else:
            denom = torch.tensor(float(num_items), dtype=dtype, device=valid.device)
        return torch.where(denom == 0, torch.ones_like(denom), denom)
    count = valid.sum()
    denom = count.to(dtype) if token_weight is None else torch.where(valid, token_weight.to(dtype), 0).sum()
    return torch.where(count > 0, denom, torch.ones_like(denom))


def mean_loss(loss, valid, num_items, class_weight, dtype, token_weights=None):
    """The loss to run for reduction="mean": under a class-weighted mean without num_items,
    ``loss.for_mean(Σ_valid w_t·w_y / Σ_valid w_t)`` (w_t = 1 without token weights), so its unweighted
    terms (the z-loss) are averaged over Σ_valid w_t; else ``loss`` itself."""
    if class_weight is None or num_items is not None:
        return loss
    count = valid.sum()
    mass = count.to(dtype) if token_weights is None else torch.where(valid, token_weights.to(dtype), 0).sum()
    combined = denominator_weight(class_weight.to(dtype), token_weights)
    weight_sum = torch.where(valid, combined.to(dtype), 0).sum()
    return loss.for_mean(torch.where(count > 0, weight_sum / torch.where(count > 0, mass, 1.0), 1.0))


def sum_token_stats(per_token: torch.Tensor, stats: torch.Tensor, valid: torch.Tensor | None,
                    z_loss: float) -> TokenStats:
    """The ``return_stats`` sums: per_token [...] (w_t·ℓ_t, 0 where not valid), stats [..., 3] (correct,
    entropy, lse; :func:`xent.losses._base.logit_stats`) and valid [...] (None: every token is valid).
    Summed in float64 over the valid tokens only, detached."""
    per_token, stats = per_token.detach().to(torch.float64), stats.detach().to(torch.float64)
    if valid is not None:
        stats = torch.where(valid.unsqueeze(-1), stats, 0.0)
        tokens = valid.sum(dtype=torch.int64)
    else:
        tokens = torch.tensor(per_token.numel(), dtype=torch.int64, device=per_token.device)
    stats = stats.reshape(-1, stats.shape[-1])
    lse = stats[:, 2]
    return TokenStats(
        loss_sum=per_token.sum(), tokens=tokens, correct=stats[:, 0].sum().round().to(torch.int64),
        entropy_sum=stats[:, 1].sum(), z_loss_sum=z_loss * lse.square().sum(), lse_sum=lse.sum(),
    )


def top_fraction_count(n: int, ratio: float) -> int:
    """How many of n valid tokens :func:`select_top_fraction` keeps: ⌊ratio·n⌋, at least 1 when n > 0 and
    ratio > 0 (a training step that sums these over micro-batches gets Rho-1's num_items)."""
    count = min(n, int(ratio * n + 1e-6)) if n else 0  # +1e-6: 0.29·100 is 28.999999999999996 in floats
    return max(count, 1) if n and ratio > 0.0 else count


def select_top_fraction(scores: torch.Tensor, valid: torch.Tensor, ratio: float) -> torch.Tensor:
    """Rho-1's selection: a bool mask shaped like ``scores`` holding the ⌊ratio·n⌋ valid tokens with the
    largest scores (n the number of valid tokens; at least 1 when n > 0 and ratio > 0); ties in stable
    order (the earlier token, in row-major order, first). Invalid tokens are never selected; a NaN score
    at a valid token is an error."""
    flat_valid = valid.reshape(-1)
    idx = flat_valid.nonzero().squeeze(-1)
    picked = scores.detach().reshape(-1)[idx]
    if torch.isnan(picked).any():
        raise ValueError(f"the selection scores (excess losses) have {int(torch.isnan(picked).sum())} NaN "
                         "value(s) at valid tokens")
    count = top_fraction_count(idx.numel(), ratio)
    order = torch.sort(picked, descending=True, stable=True).indices[:count]
    mask = torch.zeros(flat_valid.shape, dtype=torch.bool, device=scores.device)
    mask[idx[order]] = True
    return mask.view(valid.shape)


def as_token_weights(token_weights: torch.Tensor | None, dtype, device) -> torch.Tensor | None:
    """Validated token weights as data in the compute dtype: no gradient reaches them (on the fused path
    none could)."""
    if token_weights is None:
        return None
    return token_weights.detach().to(device=device, dtype=dtype)


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
    token_weights: torch.Tensor | None = None,
    return_stats: bool = False,
):
    """The plain (materialised-logits) path shared by every loss.

    logits [..., V] any float dtype, target [...] ids and token_weights [...] (or None) already
    validated. Works on any leading shape without flattening, so a sliced (non-contiguous) logits view is
    never copied except to upcast. With ``return_stats``: (result, :class:`xent.TokenStats`).
    """
    if return_stats:
        check_stats_loss(loss)
    target = V.as_ids(target)
    z = logits.to(compute_dtype(logits))
    valid = target != ignore_index
    tw = as_token_weights(token_weights, z.dtype, z.device)
    if tw is not None:
        valid = valid & (tw != 0)  # a zero weight is an ignored token: no loss, no gradient, not counted
    V.check_num_items_covers(num_items, valid.sum())
    safe = torch.where(valid, target, torch.zeros_like(target))  # any in-range id; masked below
    class_weight = loss.token_weight(safe)
    if reduction == "mean":
        loss = mean_loss(loss, valid, num_items, class_weight, z.dtype, tw)
    per_token = loss(z, safe, *extra)  # [...], or [..., K] for a loss with K values per token
    # valid [...] broadcast over the K values; a shape tuple, not unpacked sizes: view() of no sizes is an
    # error, and an unbatched call (logits [V], a 0-d target, as torch takes it) has valid.shape == ().
    extra_dims = (1,) * (per_token.dim() - valid.dim())
    if tw is not None:
        per_token = per_token * tw.view(tw.shape + extra_dims)
    per_token = torch.where(valid.view(valid.shape + extra_dims), per_token, torch.zeros_like(per_token))
    result = reduce_tokens(per_token, valid, reduction, num_items, denominator_weight(class_weight, tw))
    if not return_stats:
        return result
    return result, sum_token_stats(per_token, loss.stats(z, safe), valid, loss.z_loss)


def check_stats_loss(loss) -> None:
    if loss.num_outputs != 1:
        raise ValueError(f"return_stats needs a loss with one value per token; {type(loss).__name__} has "
                         f"{loss.num_outputs}")


def check_common(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int,
    reduction: str,
    num_items,
    token_weights=None,
) -> int:
    """Validates the arguments every token loss shares; returns V."""
    num_classes = V.check_logits(logits)
    V.check_reduction(reduction)
    V.check_target(target, logits.shape[:-1], num_classes, ignore_index)
    V.check_num_items(num_items, reduction)
    V.check_token_weights(token_weights, target.shape)
    return num_classes
