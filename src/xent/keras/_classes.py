"""``keras.losses.Loss`` subclasses: they hold options and call the functions in ``_losses``, nothing more.

Keras' ``Loss.__call__`` reduces ``call``'s per-token output with its own rules ("sum_over_batch_size"
divides by every position, padding included); these classes override ``__call__`` so the reduction is
xent's: "mean" over the valid targets. ``call`` still returns the per-token losses (reduction "none").
"""

from __future__ import annotations

import numpy as np

import keras
from keras import ops

from .. import _validate as V
from . import _common as C
from . import _losses as L


class _TokenLoss(keras.losses.Loss):
    """Base: ``__call__(y_true, y_pred, sample_weight=None, *, num_items=None)``.

    y_pred are the logits ``[..., V]`` (``[..., T, V]`` with ``shift=True``), y_true the integer ids
    ``[...]``. A Keras mask on y_pred (``Embedding(mask_zero=True)``) ignores the masked positions;
    ``sample_weight`` are per-token weights (``[B]`` per sequence or shaped like y_true) and
    ``num_items`` the valid-target count of a whole step for gradient accumulation (a custom train step).
    """

    _function = None  # the functional: (logits, target, **options) -> loss

    def __init__(self, *, ignore_index: int = -100, reduction: str = "mean", shift: bool = False,
                 name: str | None = None, dtype=None, **options):
        V.check_flags(shift=shift)
        V.check_reduction(reduction)
        V.check_ignore_index(ignore_index)
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.ignore_index = int(ignore_index)
        self.shift = shift
        self.options = options

    def __call__(self, y_true, y_pred, sample_weight=None, *, num_items=None):
        mask = getattr(y_pred, "_keras_mask", None)
        with keras.name_scope(self.name):
            if mask is not None:
                y_true = ops.where(ops.cast(mask, "bool"), C.as_ids(y_true, tuple(mask.shape), name="y_true",
                                                                     lead_name="the mask"),
                                   self.ignore_index)
            loss = self._run(y_true, y_pred, self.reduction, sample_weight, num_items)
            return C.scale_for_replicas(loss) if self.reduction == "mean" and num_items is None else loss

    def call(self, y_true, y_pred):
        """Per-token losses (reduction "none"), 0 at ignored targets."""
        return self._run(y_true, y_pred, "none", None, None)

    def _run(self, y_true, y_pred, reduction, sample_weight, num_items):
        fn = type(self)._function
        if self.shift:
            fn = _shifted(fn)
        return fn(y_pred, y_true, ignore_index=self.ignore_index, reduction=reduction, num_items=num_items,
                  sample_weight=sample_weight, **self.options)

    def get_config(self):
        options = {k: (np.asarray(C.concrete(v)).tolist() if ops.is_tensor(v) else v)
                   for k, v in self.options.items()}
        return {"name": self.name, "reduction": self.reduction, "ignore_index": self.ignore_index,
                "shift": self.shift, **options}


def _shifted(fn):
    """fn with the causal shift: logits[..., t, :] predict labels[..., t+1]."""
    if fn is L.cross_entropy:
        return L.causal_lm_loss

    def shifted(logits, labels, *, sample_weight=None, **kw):
        logits = C.as_tensor("logits", logits)
        C.check_logits(logits)
        lead = tuple(logits.shape[:-1])
        if len(lead) < 1:
            raise ValueError(f"shift=True needs logits of shape [..., T, V], got shape {tuple(logits.shape)}")
        labels = C.as_ids(labels, lead, name="labels")
        if sample_weight is not None:
            sample_weight = ops.broadcast_to(C.broadcast_sample_weight(sample_weight, labels.shape),
                                             ops.shape(labels))[..., 1:]
        return fn(logits[..., :-1, :], labels[..., 1:], sample_weight=sample_weight, **kw)

    return shifted


class CrossEntropy(_TokenLoss):
    """:func:`xent.keras.cross_entropy` as a Keras loss (``shift=True``: :func:`xent.keras.causal_lm_loss`).

    ``model.compile(loss=xent.keras.CrossEntropy(ignore_index=0))`` is
    ``SparseCategoricalCrossentropy(from_logits=True)`` averaged over the real tokens only, in float32.
    Options: ``weight`` [V], ``label_smoothing``, ``z_loss``, ``softcap``."""

    _function = staticmethod(L.cross_entropy)

    def __init__(self, *, weight=None, label_smoothing: float = 0.0, z_loss: float = 0.0,
                 softcap: float | None = None, ignore_index: int = -100, reduction: str = "mean",
                 shift: bool = False, name: str | None = None, dtype=None):
        V.check_options(label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
        super().__init__(ignore_index=ignore_index, reduction=reduction, shift=shift, name=name, dtype=dtype,
                         weight=weight, label_smoothing=float(label_smoothing), z_loss=float(z_loss),
                         softcap=softcap)


class TaiLr(_TokenLoss):
    """:func:`xent.keras.tailr_loss` as a Keras loss."""

    _function = staticmethod(L.tailr_loss)

    def __init__(self, *, gamma: float, threshold: float = 0.0, label_smoothing: float = 0.0,
                 softcap: float | None = None, ignore_index: int = -100, reduction: str = "mean",
                 shift: bool = False, name: str | None = None, dtype=None):
        L.check_tailr(gamma, threshold)
        V.check_options(label_smoothing=label_smoothing, softcap=softcap)
        super().__init__(ignore_index=ignore_index, reduction=reduction, shift=shift, name=name, dtype=dtype,
                         gamma=float(gamma), threshold=float(threshold),
                         label_smoothing=float(label_smoothing), softcap=softcap)


class GOLD(_TokenLoss):
    """:func:`xent.keras.gold_loss` as a Keras loss; ``threshold=0`` is DFT."""

    _function = staticmethod(L.gold_loss)

    def __init__(self, *, threshold: float = 0.0, softcap: float | None = None, ignore_index: int = -100,
                 reduction: str = "mean", shift: bool = False, name: str | None = None, dtype=None):
        L.check_tailr(1.0, threshold)
        V.check_options(softcap=softcap)
        super().__init__(ignore_index=ignore_index, reduction=reduction, shift=shift, name=name, dtype=dtype,
                         threshold=float(threshold), softcap=softcap)


class Focal(_TokenLoss):
    """:func:`xent.keras.focal_loss` as a Keras loss."""

    _function = staticmethod(L.focal_loss)

    def __init__(self, *, gamma: float = 2.0, alpha: float = 1.0, detach_factor: bool = False,
                 softcap: float | None = None, ignore_index: int = -100, reduction: str = "mean",
                 shift: bool = False, name: str | None = None, dtype=None):
        V.check_flags(detach_factor=detach_factor)
        L.check_focal(gamma, alpha)
        V.check_options(softcap=softcap)
        super().__init__(ignore_index=ignore_index, reduction=reduction, shift=shift, name=name, dtype=dtype,
                         gamma=float(gamma), alpha=float(alpha), detach_factor=detach_factor,
                         softcap=softcap)


class Poly(_TokenLoss):
    """:func:`xent.keras.poly_loss` as a Keras loss."""

    _function = staticmethod(L.poly_loss)

    def __init__(self, *, epsilon: float = 1.0, softcap: float | None = None, ignore_index: int = -100,
                 reduction: str = "mean", shift: bool = False, name: str | None = None, dtype=None):
        L.check_poly(epsilon)
        V.check_options(softcap=softcap)
        super().__init__(ignore_index=ignore_index, reduction=reduction, shift=shift, name=name, dtype=dtype,
                         epsilon=float(epsilon), softcap=softcap)


class BinaryCrossEntropy(keras.losses.Loss):
    """:func:`xent.keras.binary_cross_entropy` as a Keras loss: ``keras.losses.BinaryCrossentropy(
    from_logits=...)`` (probabilities by default, as Keras'; ``from_logits=True`` for logits) plus
    ``ignore_index``, ``pos_weight`` (logits only) and ``num_items``. A ``[B]`` sample_weight scales each
    row (broadcast over the last axes) and, as in Keras, is not a normaliser."""

    def __init__(self, *, from_logits: bool = False, pos_weight=None, label_smoothing: float = 0.0,
                 ignore_index: float = -100, reduction: str = "mean", name: str | None = None, dtype=None):
        V.check_flags(from_logits=from_logits)
        V.check_reduction(reduction)
        V.check_range("label_smoothing", label_smoothing, 0.0, 1.0)
        if pos_weight is not None and not from_logits:
            raise ValueError("pos_weight needs from_logits=True (torch's binary_cross_entropy has none)")
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.from_logits = from_logits
        self.pos_weight = pos_weight
        self.label_smoothing = float(label_smoothing)
        self.ignore_index = ignore_index

    def __call__(self, y_true, y_pred, sample_weight=None, *, num_items=None):
        mask = getattr(y_pred, "_keras_mask", None)
        with keras.name_scope(self.name):
            y_pred = C.as_tensor("y_pred", y_pred)
            if mask is not None:
                m = C.broadcast_sample_weight(ops.cast(mask, "bool"), tuple(y_pred.shape), "mask")
                y_true = ops.where(m, ops.cast(y_true, C.compute_dtype(y_pred)), float(self.ignore_index))
            weight = None
            if sample_weight is not None:
                weight = C.broadcast_sample_weight(sample_weight, tuple(y_pred.shape))
                weight = ops.cast(weight, C.compute_dtype(y_pred))
            loss = self._run(y_true, y_pred, self.reduction, weight, num_items)
            return C.scale_for_replicas(loss) if self.reduction == "mean" and num_items is None else loss

    def call(self, y_true, y_pred):
        return self._run(y_true, y_pred, "none", None, None)

    def _run(self, y_true, y_pred, reduction, weight, num_items):
        return L.binary_cross_entropy(y_pred, y_true, weight, from_logits=self.from_logits,
                                      pos_weight=self.pos_weight, label_smoothing=self.label_smoothing,
                                      ignore_index=self.ignore_index, reduction=reduction,
                                      num_items=num_items)

    def get_config(self):
        pw = self.pos_weight
        pw = np.asarray(C.concrete(pw)).tolist() if pw is not None and ops.is_tensor(pw) else pw
        return {"name": self.name, "reduction": self.reduction, "from_logits": self.from_logits,
                "pos_weight": pw, "label_smoothing": self.label_smoothing, "ignore_index": self.ignore_index}
