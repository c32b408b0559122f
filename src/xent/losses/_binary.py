"""Binary cross-entropy under torch's two names (shared/REFERENCE.md §3, last line):
``binary_cross_entropy_with_logits`` takes logits, ``binary_cross_entropy`` takes probabilities, each
equal to torch's function of the same name, with xent's ignore_index, num_items and all-ignored rules.
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F

from .. import _validate as V
from .._reduce import compute_dtype, reduce_tokens


def binary_cross_entropy_with_logits(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    *,
    pos_weight: torch.Tensor | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    ignore_index: float = -100,
    num_items=None,
) -> torch.Tensor:
    r"""Binary cross-entropy of logits x (``input``) against targets y in [0, 1] (soft targets allowed),
    any shape.

    .. math:: \ell = -w\,[\,p_w\, y \log\sigma(x) + (1-y)\log(1-\sigma(x))\,]

    written with log-sigmoid, log σ(x) = −softplus(−x) and log(1 − σ(x)) = −softplus(x): no epsilon, exact
    at any logit (a probability clipped at 1e-7 caps the loss at 16.1 nats and zeroes its gradient).
    For probabilities use :func:`xent.binary_cross_entropy`.

    Equal to ``torch.nn.functional.binary_cross_entropy_with_logits(input, target, weight,
    pos_weight=pos_weight, reduction=reduction)`` (values and gradients) whenever no target is ignored:

    - ``weight`` rescales each element's loss (broadcast to the input's shape); as in torch it is not a
      normaliser: ``"mean"`` divides by the count of valid elements, not by Σw.
    - ``pos_weight`` p_w multiplies the positive term (broadcast to the input's shape, usually ``[C]``).
    - ``label_smoothing`` ε (torch has none; as Keras' ``BinaryCrossentropy``): y ← y(1 − ε) + ε/2.
    - ``ignore_index``: an element whose target equals it exactly (−100, or −100.0 in a float target)
      gives 0 and no gradient and is left out of the mean's count; it must lie outside [0, 1]. Every other
      target must lie in [0, 1] (torch accepts any number and returns a meaningless loss).
    - ``num_items``: ``"mean"`` becomes Σℓ / num_items, for gradient accumulation and data parallelism;
      every element ignored (or num_items = 0) gives 0 with a zero gradient, never NaN.

    Computed in float32 whatever the input dtype (float64 stays float64). Targets may be float, integer or
    bool, shaped like the input. ``reduction="none"`` returns the per-element losses, 0 where ignored.

    Example:
        >>> import torch, xent
        >>> x = torch.tensor([2.0, -1.0, 0.5])
        >>> y = torch.tensor([1.0, 0.0, -100.0])
        >>> round(xent.binary_cross_entropy_with_logits(x, y).item(), 6)
        0.220095
    """
    _check_binary(input, target, weight, pos_weight, label_smoothing, ignore_index, reduction, num_items)
    x, y, valid, dtype = _prepare(input, target, label_smoothing, ignore_index, num_items)
    # −log σ(x) = softplus(−x), −log(1 − σ(x)) = softplus(x): both exact for any x, no cancellation.
    pos_term = F.softplus(-x) * y
    if pos_weight is not None:
        pos_term = pos_term * pos_weight.to(device=x.device, dtype=dtype)
    per_elem = pos_term + F.softplus(x) * (1.0 - y)
    if weight is not None:
        per_elem = per_elem * weight.to(device=x.device, dtype=dtype)
    per_elem = torch.where(valid, per_elem, torch.zeros_like(per_elem))
    return reduce_tokens(per_elem, valid, reduction, num_items)


def binary_cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    *,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    ignore_index: float = -100,
    num_items=None,
) -> torch.Tensor:
    r"""Binary cross-entropy of probabilities p (``input``, each in [0, 1]) against targets y in [0, 1].

    .. math:: \ell = -w\,[\,y \max(\log p, -100) + (1-y)\max(\log(1-p), -100)\,]

    Equal to ``torch.nn.functional.binary_cross_entropy(input, target, weight, reduction=reduction)``
    (values and gradients; its clamp of each log at −100 included, so p = 0 or 1 gives a finite loss of at
    most 100·w) whenever no target is ignored. For logits use :func:`xent.binary_cross_entropy_with_logits`:
    it is exact at any logit, where a probability that rounds to 0 or 1 has lost the loss's size.

    ``weight``, ``label_smoothing``, ``ignore_index``, ``num_items`` and the reductions as in
    :func:`xent.binary_cross_entropy_with_logits`. An ``input`` outside [0, 1] (or NaN) at a valid element
    is refused, as torch refuses it; ignored elements are never read.

    Example:
        >>> import torch, xent
        >>> p = torch.tensor([0.9, 0.2, 1.0])
        >>> y = torch.tensor([1.0, 0.0, -100.0])
        >>> round(xent.binary_cross_entropy(p, y).item(), 6)
        0.164252
    """
    _check_binary(input, target, weight, None, label_smoothing, ignore_index, reduction, num_items,
                  probabilities=True)
    p, y, valid, dtype = _prepare(input, target, label_smoothing, ignore_index, num_items)
    p = torch.where(valid, p, torch.full_like(p, 0.5))  # an ignored element is never read (nor its gradient)
    # torch's own kernel: its clamp of the logs at −100 and its gradient (p − y)/max(p(1 − p), 1e-12); the
    # weight multiplies afterwards, as torch's kernel does, so it may require grad here too
    per_elem = F.binary_cross_entropy(p, y, reduction="none")
    if weight is not None:
        per_elem = per_elem * weight.to(device=p.device, dtype=dtype)
    per_elem = torch.where(valid, per_elem, torch.zeros_like(per_elem))
    return reduce_tokens(per_elem, valid, reduction, num_items)


def _prepare(input, target, label_smoothing, ignore_index, num_items):
    """(input in the compute dtype, targets with ignored ones 0 and smoothed, valid mask, dtype)."""
    dtype = compute_dtype(input)
    x = input.to(dtype)
    y = target.to(dtype)
    valid = y != ignore_index
    V.check_num_items_covers(num_items, valid.sum())
    y = torch.where(valid, y, torch.zeros_like(y))  # any target in [0, 1]; masked by the caller
    if label_smoothing > 0.0:
        y = y * (1.0 - label_smoothing) + 0.5 * label_smoothing
    return x, y, valid, dtype


def _check_binary(input, target, weight, pos_weight, label_smoothing, ignore_index, reduction, num_items,
                  probabilities=False):
    V.check_floating("input", input)
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.is_complex():
        raise TypeError(f"target must hold real numbers in [0, 1], got dtype={target.dtype}")
    if target.shape != input.shape:
        raise ValueError(
            f"target shape {tuple(target.shape)} must equal input shape {tuple(input.shape)}"
        )
    for name, w in (("weight", weight), ("pos_weight", pos_weight)):
        if w is None:
            continue
        if not isinstance(w, torch.Tensor) or not w.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {type(w).__name__}")
        try:
            shape = torch.broadcast_shapes(w.shape, input.shape)
        except RuntimeError:
            shape = None
        if shape != input.shape:
            raise ValueError(
                f"{name} shape {tuple(w.shape)} does not broadcast to input shape {tuple(input.shape)}"
            )
    V.check_range("label_smoothing", label_smoothing, 0.0, 1.0)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Real):
        raise TypeError(f"ignore_index must be a number, got {ignore_index!r}")
    if 0.0 <= ignore_index <= 1.0:
        raise ValueError(f"ignore_index must lie outside [0, 1] (a valid target), got {ignore_index}")
    V.check_reduction(reduction)
    V.check_num_items(num_items, reduction)
    if not target.numel():
        return
    y = target.double()
    valid = y != ignore_index
    bad = valid & ~((y >= 0.0) & (y <= 1.0))  # NaN is bad too
    n_bad = int(bad.sum())
    if n_bad:
        raise ValueError(
            f"target has {n_bad} value(s) outside [0, 1] that are not ignore_index={ignore_index}; "
            f"the first is {y[bad][0].item()}"
        )
    if probabilities:
        p = input.detach()
        bad = valid & ~((p >= 0.0) & (p <= 1.0))
        n_bad = int(bad.sum())
        if n_bad:
            raise ValueError(
                f"input must hold probabilities in [0, 1] (use binary_cross_entropy_with_logits for logits); "
                f"{n_bad} valid element(s) are not, the first is {p[bad][0].item()}"
            )
