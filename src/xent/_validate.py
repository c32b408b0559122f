"""Argument checks shared by every loss: clear errors before any work, never an assert.

Each check raises ``ValueError`` or ``TypeError`` naming the argument and showing the bad value.
Checks on tensor values (target range, num_items) synchronise with the device once; that is the price
of never hitting a device-side assert.
"""

from __future__ import annotations

import math
import numbers

import torch

REDUCTIONS = ("mean", "sum", "none")


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_floating(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype={x.dtype}")


def check_logits(logits: torch.Tensor, name: str = "logits") -> int:
    """Returns V, the size of the last (vocabulary) dimension."""
    check_floating(name, logits)
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"{name} must have shape [..., V] with V >= 1, got shape {tuple(logits.shape)}")
    return logits.shape[-1]


def check_target(
    target: torch.Tensor,
    lead_shape: torch.Size | tuple,
    num_classes: int,
    ignore_index: int,
    *,
    name: str = "target",
    lead_name: str = "logits",
    offset: int = 0,
) -> None:
    """Integer class ids of shape ``lead_shape``, each in [offset, offset + num_classes) or ignore_index."""
    check_ids_tensor(target, lead_shape, name=name, lead_name=lead_name)
    check_ignore_index(ignore_index)
    check_ids_in_range(target, offset, offset + num_classes, ignore_index, name=name)


def check_ignore_index(ignore_index) -> None:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")


def check_ids_tensor(target, lead_shape, *, name: str = "target", lead_name: str = "logits") -> None:
    """An integer tensor of shape ``lead_shape`` (the range is checked apart: check_ids_in_range). Any
    integer dtype is accepted; the losses index with it as int64 (:func:`as_ids`)."""
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(target).__name__}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer class ids, got dtype={target.dtype}")
    if tuple(target.shape) != tuple(lead_shape):
        raise ValueError(
            f"{name} shape {tuple(target.shape)} does not match {lead_name} shape without its last "
            f"dimension {tuple(lead_shape)}"
        )


def as_ids(target: torch.Tensor) -> torch.Tensor:
    """Class ids as int64, what gather and indexing take (uint8/int8/int16/int32 are widened)."""
    return target if target.dtype == torch.int64 else target.long()


def check_ids_in_range(target: torch.Tensor, lo: int, hi: int, ignore_index: int, *, name: str = "target"):
    if target.numel() == 0:
        return
    bad = (target != ignore_index) & ((target < lo) | (target >= hi))
    n_bad = int(bad.sum())
    if n_bad:
        first = int(target[bad][0])
        raise ValueError(
            f"{name} has {n_bad} id(s) outside [{lo}, {hi}) that are not ignore_index={ignore_index}; "
            f"the first is {first}"
        )


def check_options(
    *,
    num_classes: int | None = None,
    weight: torch.Tensor | None = None,
    weight_name: str = "weight",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
) -> None:
    if weight is not None:
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            raise TypeError(f"{weight_name} must be a floating-point tensor of shape [V]")
        if weight.dim() != 1:
            raise ValueError(f"{weight_name} must have shape [V], got shape {tuple(weight.shape)}")
        if num_classes is not None and weight.shape[0] != num_classes:
            raise ValueError(
                f"{weight_name} must have shape [V] = [{num_classes}], got shape {tuple(weight.shape)}"
            )
    check_range("label_smoothing", label_smoothing, 0.0, 1.0)
    if not check_number("z_loss", z_loss) >= 0.0:
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss!r}")
    if softcap is not None and not check_number("softcap", softcap) > 0.0:
        raise ValueError(f"softcap must be None or a finite number > 0, got {softcap!r}")


def check_number(name: str, value) -> float:
    """A finite real number (Python or numpy scalar; not a bool, a string or a tensor): its float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} of type {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def check_flags(**flags) -> None:
    """Each keyword a boolean option (``return_stats=...``, ``shift=...``): exactly True or False. A string,
    a number or a tensor is refused rather than read by its truth value (``with_entropy="no"`` is true)."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r} of type {type(value).__name__}")


def check_chunk_size(chunk_size) -> None:
    ok = chunk_size == "auto" if isinstance(chunk_size, str) else (
        isinstance(chunk_size, numbers.Integral) and not isinstance(chunk_size, bool) and chunk_size >= 1)
    if not ok:
        raise ValueError(f"chunk_size must be 'auto' or an int >= 1, got {chunk_size!r}")


def check_range(name: str, value: float, lo: float, hi: float, *, lo_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} of type {type(value).__name__}")
    ok = (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        left = "(" if lo_open else "["
        raise ValueError(f"{name} must be in {left}{lo}, {hi}], got {value}")


def check_num_items(num_items, reduction: str, name: str = "num_items") -> None:
    if num_items is None:
        return
    if reduction != "mean":
        raise ValueError(
            f"{name} replaces the denominator of reduction='mean'; it cannot be used with "
            f"reduction={reduction!r}"
        )
    if isinstance(num_items, torch.Tensor):
        if num_items.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got shape {tuple(num_items.shape)}")
        if num_items.dtype == torch.bool or num_items.is_complex():
            raise TypeError(f"{name} must be a number, got a tensor of dtype {num_items.dtype}")
        value = num_items.item()
    elif isinstance(num_items, numbers.Real) and not isinstance(num_items, bool):
        value = num_items
    else:
        raise TypeError(f"{name} must be a number or a scalar tensor, got {num_items!r}")
    # 0 is a step whose every target is ignored: the loss is 0 (checked against the targets later)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")


def check_num_items_covers(num_items, num_valid) -> None:
    """num_items = 0 only where nothing is valid: Σℓ/0 is not a loss. ``num_valid`` an int or a tensor."""
    if num_items is not None and float(num_items) == 0.0 and int(num_valid) > 0:
        raise ValueError(
            f"num_items is 0 but {int(num_valid)} target(s) are valid: num_items must count the valid "
            "targets of every micro-batch and rank (xent.count_items)"
        )


def check_token_weights(token_weights, shape, *, name: str = "token_weights", like: str = "target shape"):
    """Per-token weights: a floating-point tensor of exactly ``shape`` (the target's), every value finite
    (one synchronisation to count the bad ones). Any sign is accepted (e.g. advantages)."""
    if token_weights is None:
        return
    if not isinstance(token_weights, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(token_weights).__name__}")
    if not token_weights.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype={token_weights.dtype}")
    if tuple(token_weights.shape) != tuple(shape):
        raise ValueError(f"{name} shape {tuple(token_weights.shape)} must equal {like} {tuple(shape)}")
    n_bad = int((~torch.isfinite(token_weights)).sum())
    if n_bad:
        first = token_weights[~torch.isfinite(token_weights)][0].item()
        raise ValueError(
            f"{name} has {n_bad} non-finite value(s) (the first is {first}); every weight must be finite"
        )


def take_deprecated(fn: str, deprecated: dict, renames: dict, given: dict) -> dict:
    """The values of old keyword spellings: ``deprecated`` holds the keywords a function received that it
    does not name (its ``**deprecated``), ``renames`` maps an old spelling to its name now, ``given`` the
    new names' values. Returns ``given`` with each old spelling moved to its new name, each with a
    DeprecationWarning; a TypeError for an unknown keyword or a value given under both names."""
    import warnings

    out = dict(given)
    for old, value in deprecated.items():
        new = renames.get(old)
        if new not in given:
            raise TypeError(f"{fn}() got an unexpected keyword argument {old!r}")
        if out.get(new) is not None:
            raise TypeError(f"{fn}() got {new!r} and its old spelling {old!r}: give {new!r} only")
        warnings.warn(f"{fn}({old}=...) is deprecated: use {new}=", DeprecationWarning, stacklevel=3)
        out[new] = value
    return out


def head_weight(fn: str, linear_weight, weight, class_weights: bool = True) -> None:
    """A fused function's head is ``linear_weight``: a 2-D ``weight=`` without it is the old spelling of
    the head (``weight`` is the class weights, as in torch), a one-line error; so is any ``weight=`` to a
    function without class weights (``class_weights`` False: they belong to its loss object)."""
    if linear_weight is None:
        if isinstance(weight, torch.Tensor) and weight.dim() == 2:
            raise TypeError(f"{fn}: the head is linear_weight (weight= is the [V] class weights, as in "
                            "torch); pass it as linear_weight= or positionally")
        raise TypeError(f"{fn}() missing the head: linear_weight [V, D]")
    if weight is not None and not class_weights:
        raise TypeError(f"{fn}() got an unexpected keyword argument 'weight' (the head is linear_weight; "
                        "class weights belong to the loss object)")
