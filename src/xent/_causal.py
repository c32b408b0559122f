"""Causal-LM loss (as transformers' ForCausalLMLoss) and the global target count for num_items."""

from __future__ import annotations

import torch

from . import _validate as V
from .losses._cross_entropy import cross_entropy


def shifted_targets(
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """labels [B, T] → the targets of positions 0..T−2: labels[:, 1:], with document starts ignored.

    A label whose position_id is 0 begins a new packed document and must not be predicted from the last
    token of the previous one.
    """
    target = labels[..., 1:]
    if position_ids is not None:
        _check_position_ids(position_ids, labels)
        starts = position_ids[..., 1:] == 0
        target = torch.where(starts, torch.full_like(target, ignore_index), target)
    return target


def _mask_shift_labels(shift_labels, position_ids, ignore_index):
    # shift_labels[:, t] is the token at t+1; it starts a document when position_ids[:, t+1] == 0.
    _check_position_ids(position_ids, shift_labels, name="shift_labels")
    starts = torch.zeros_like(shift_labels, dtype=torch.bool)
    starts[..., :-1] = position_ids[..., 1:] == 0
    return torch.where(starts, torch.full_like(shift_labels, ignore_index), shift_labels)


def _check_position_ids(position_ids, labels, name="labels"):
    if not isinstance(position_ids, torch.Tensor) or position_ids.is_floating_point():
        raise TypeError("position_ids must be an integer tensor")
    if position_ids.shape != labels.shape:
        raise ValueError(
            f"position_ids shape {tuple(position_ids.shape)} must equal {name} shape {tuple(labels.shape)}"
        )


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    num_items=None,
    num_items_in_batch=None,
    shift_labels: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    reduction: str = "mean",
    weight: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    token_weights: torch.Tensor | None = None,
    return_stats: bool = False,
):
    """Next-token loss of a causal LM: logits[:, t] predict labels[:, t+1].

    Equal to transformers' ``ForCausalLMLoss(logits, labels, V, num_items_in_batch, ignore_index,
    shift_labels)``, without its padded copy of the labels and without copying the ``[B, T, V]`` logits:
    the shift is a slice. ``shift_labels`` (already shifted, shaped like ``labels``; for sequence or
    context parallelism) are used as given against every position. ``position_ids`` ``[B, T]`` mark
    packed documents: a token whose position_id is 0 is not predicted from the previous document.

    reduction="none" returns ``[B, T−1]`` (``[B, T]`` with shift_labels): the loss of predicting each
    next token, 0 where ignored. ``return_stats=True`` returns ``(loss, stats)`` (:class:`xent.TokenStats`,
    as :func:`xent.cross_entropy`). ``token_weights`` are shaped like ``labels`` (like ``shift_labels`` when
    given) and shifted like them: the weight of label t+1 weighs the prediction of position t.
    ``num_items`` as :func:`xent.cross_entropy`; ``num_items_in_batch`` is the same argument under the name
    transformers passes it (give one of them). Other options as :func:`xent.cross_entropy`.
    """
    if num_items is not None and num_items_in_batch is not None:
        raise TypeError("causal_lm_loss takes num_items or num_items_in_batch (its transformers name), "
                        "not both")
    num_items = num_items_in_batch if num_items is None else num_items
    V.check_flags(return_stats=return_stats)
    V.check_logits(logits)
    if shift_labels is None:
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
        if labels.dim() < 1 or tuple(labels.shape) != tuple(logits.shape[:-1]):
            raise ValueError(
                f"labels shape {tuple(labels.shape)} does not match logits shape without its last "
                f"dimension {tuple(logits.shape[:-1])}"
            )
        V.check_token_weights(token_weights, labels.shape, like="labels shape")
        target = shifted_targets(labels, ignore_index=ignore_index, position_ids=position_ids)
        logits = logits[..., :-1, :]  # a view: no copy of the logits
        if token_weights is not None:
            token_weights = token_weights[..., 1:]
    else:
        if isinstance(shift_labels, torch.Tensor):
            V.check_token_weights(token_weights, shift_labels.shape, like="shift_labels shape")
        target = shift_labels.to(logits.device)
        if position_ids is not None:
            target = _mask_shift_labels(target, position_ids.to(target.device), ignore_index)
    return cross_entropy(
        logits, target, ignore_index=ignore_index, reduction=reduction, weight=weight,
        label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, num_items=num_items,
        token_weights=token_weights, return_stats=return_stats,
    )


def count_items(
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    shift: bool = True,
    position_ids: torch.Tensor | None = None,
    group=None,
) -> torch.Tensor:
    """The number of targets that count, as an int64 scalar tensor: pass it as ``num_items``.

    ``shift=True`` counts the targets of a causal LM (labels[:, 1:], minus packed document starts when
    ``position_ids`` is given), exactly the tokens :func:`causal_lm_loss` scores; ``shift=False`` counts
    ``labels != ignore_index``. With ``group`` (a torch.distributed process group, or
    ``torch.distributed.group.WORLD``) the count is summed over its ranks. Count over every micro-batch
    of a step (sum the counts) and over every rank, and the sum of the per-micro-batch, per-rank losses
    computed with ``num_items`` equals the full-batch mean exactly.
    """
    V.check_flags(shift=shift)
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point():
        raise TypeError("labels must be an integer tensor")
    target = labels
    if shift:
        target = shifted_targets(labels, ignore_index=ignore_index, position_ids=position_ids)
    count = (target != ignore_index).sum(dtype=torch.int64)
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(count, op=dist.ReduceOp.SUM, group=group)
    return count
