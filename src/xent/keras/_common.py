"""What every Keras loss shares: dtypes, argument checks, the −log q_y kernel and the one reduction.

The conventions are xent's (shared/REFERENCE.md §1), the same as :mod:`xent._reduce` for PyTorch:
ignored targets give 0 and no gradient; "mean" divides by Σ_valid w (the count of valid targets without
weights) or by ``num_items``; every target ignored (or num_items = 0) gives 0 with a zero gradient.

Checks on values (ids in range, num_items = 0 with valid targets) raise before any work when the values
are known (eager). Under tracing (``jax.jit``, ``tf.function``, ``Model.fit``) a Python exception cannot
depend on a value, so the loss is made NaN instead: never a silent wrong number.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

import keras
from keras import ops

from .. import _validate as V

REDUCTIONS = V.REDUCTIONS


def compute_dtype(x) -> str:
    """float64 stays float64 (JAX needs jax_enable_x64 for it); everything else is computed in float32."""
    return "float64" if keras.backend.standardize_dtype(x.dtype) == "float64" else "float32"


def concrete(x):
    """x as a numpy array when its value is known now; None while it is traced (jit, tf.function, a
    symbolic KerasTensor)."""
    if x is None or isinstance(x, (numbers.Number, np.ndarray, np.generic)):
        return None if x is None else np.asarray(x)
    if isinstance(x, keras.KerasTensor):
        return None
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        if isinstance(x, jax.core.Tracer):
            return None
    elif backend == "tensorflow":
        import tensorflow as tf

        if tf.is_tensor(x) and tf.is_symbolic_tensor(x):
            return None
    return ops.convert_to_numpy(x)


def as_tensor(name: str, x):
    if x is None:
        raise TypeError(f"{name} must be a tensor, got None")
    if isinstance(x, (str, bytes)):
        raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    return x if ops.is_tensor(x) or isinstance(x, keras.KerasTensor) else ops.convert_to_tensor(x)


def check_floating(name: str, x) -> None:
    if not keras.backend.is_float_dtype(x.dtype):
        dtype = keras.backend.standardize_dtype(x.dtype)
        raise TypeError(f"{name} must be a floating-point tensor, got dtype={dtype}")


def check_logits(logits, name: str = "logits") -> int:
    """Returns V, the size of the last (vocabulary) dimension."""
    check_floating(name, logits)
    shape = tuple(logits.shape)
    if len(shape) < 1 or shape[-1] is None or shape[-1] < 1:
        raise ValueError(f"{name} must have shape [..., V] with a known V >= 1, got shape {shape}")
    return int(shape[-1])


def as_ids(target, lead_shape, *, name: str = "target", lead_name: str = "logits"):
    """Integer class ids shaped ``lead_shape`` as int32 (what take_along_axis needs on every backend).
    A float target holding whole numbers is accepted as Keras pipelines often deliver labels as float;
    a trailing axis of 1 (Keras' [B, T, 1] labels) is squeezed."""
    target = as_tensor(name, target)
    shape = tuple(target.shape)
    if len(shape) == len(lead_shape) + 1 and shape[-1] == 1:
        target = ops.squeeze(target, axis=-1)
        shape = shape[:-1]
    dtype = keras.backend.standardize_dtype(target.dtype)
    if dtype == "bool" or dtype.startswith("complex") or dtype == "string":
        raise TypeError(f"{name} must hold integer class ids, got dtype={dtype}")
    if not _same_shape(shape, lead_shape):
        raise ValueError(
            f"{name} shape {shape} does not match {lead_name} shape without its last dimension "
            f"{tuple(lead_shape)}"
        )
    if keras.backend.is_float_dtype(dtype):
        value = concrete(target)
        if value is not None and value.size and not np.all(np.isfinite(value) & (value == np.round(value))):
            bad = value[~(np.isfinite(value) & (value == np.round(value)))]
            raise ValueError(f"{name} must hold whole class ids, got {bad.size} non-integer value(s), "
                             f"the first is {bad.flat[0]}")
    return ops.cast(target, "int32")


def _same_shape(a, b) -> bool:
    return len(a) == len(b) and all(x is None or y is None or x == y for x, y in zip(a, b))


def check_ids_in_range(target, num_classes: int, ignore_index: int, name: str = "target") -> None:
    value = concrete(target)
    if value is None or value.size == 0:
        return
    bad = (value != ignore_index) & ((value < 0) | (value >= num_classes))
    if bad.any():
        raise ValueError(
            f"{name} has {int(bad.sum())} id(s) outside [0, {num_classes}) that are not "
            f"ignore_index={ignore_index}; the first is {int(value[bad].flat[0])}"
        )


def out_of_range(target, valid, num_classes: int):
    """[...] bool: a valid id outside [0, V). Checked eagerly before; under tracing it makes the loss NaN."""
    return ops.logical_and(valid, ops.logical_or(target < 0, target >= num_classes))


def check_num_items(num_items, reduction: str):
    if num_items is None:
        return None
    if reduction != "mean":
        raise ValueError(
            f"num_items replaces the denominator of reduction='mean'; it cannot be used with "
            f"reduction={reduction!r}"
        )
    value = concrete(num_items)
    if value is not None:
        if value.size != 1:
            raise ValueError(f"num_items must be a scalar, got shape {tuple(value.shape)}")
        if value.dtype == bool or not np.issubdtype(value.dtype, np.number):
            raise TypeError(f"num_items must be a number, got {num_items!r}")
        if not (math.isfinite(float(value)) and float(value) >= 0):
            raise ValueError(f"num_items must be a finite number >= 0, got {float(value)}")
    return num_items


def check_num_items_covers(num_items, valid) -> None:
    n, count = concrete(num_items), concrete(valid)
    if n is not None and count is not None and float(n) == 0.0 and int(count.sum()) > 0:
        raise ValueError(
            f"num_items is 0 but {int(count.sum())} target(s) are valid: num_items must count the valid "
            "targets of every micro-batch and replica"
        )


def check_class_weight(weight, num_classes: int, name: str = "weight"):
    if weight is None:
        return None
    weight = as_tensor(name, weight)
    check_floating(name, weight)
    if tuple(weight.shape) != (num_classes,):
        raise ValueError(f"{name} must have shape [V] = [{num_classes}], got shape {tuple(weight.shape)}")
    return weight


def broadcast_sample_weight(sample_weight, shape, name: str = "sample_weight"):
    """Per-token weights: shaped like the target, or a prefix of it ([B] per sequence), which is given
    trailing axes of 1 and broadcast."""
    if sample_weight is None:
        return None
    sample_weight = as_tensor(name, sample_weight)
    sw_shape = tuple(sample_weight.shape)
    if len(sw_shape) > len(shape) or not _same_shape(sw_shape, tuple(shape)[: len(sw_shape)]):
        raise ValueError(
            f"{name} shape {sw_shape} must be the target's shape {tuple(shape)} or a prefix of it")
    for _ in range(len(shape) - len(sw_shape)):
        sample_weight = ops.expand_dims(sample_weight, -1)
    return sample_weight


def row_max(z):
    """m = max_c z_c [..., 1] without gradient (the results do not depend on it); 0 for a row of −inf, +inf
    kept (a row holding +inf gives NaN, as torch and xent's PyTorch functions)."""
    m = ops.stop_gradient(ops.max(z, axis=-1, keepdims=True))
    return ops.where(m == float("-inf"), ops.zeros_like(m), m)


def tanh(u):
    """tanh in u's own dtype. Keras' tanh computes float64 in float32 under JAX (its result_type(x, float)
    is floatx), so float64 uses tanh u = 2σ(2u) − 1: absolute error ~1e-16, and its derivative
    4σ(1−σ) = 1 − tanh² is exact."""
    if keras.backend.standardize_dtype(u.dtype) == "float64":
        return 2.0 * ops.sigmoid(2.0 * u) - 1.0
    return ops.tanh(u)


def softcap(z, cap):
    """Gemma 2: z ← c·tanh(z/c)."""
    return z if cap is None else cap * tanh(z / cap)


def nll_and_shift(z, y):
    """(−log q_y, m, rel) per token: m the row max, rel = log Σ exp(z − m), so lse z = m + rel.

    −log q_y = (m − z_y) + rel: both parts small where the logits are large, so the precision does not
    fall as the logits grow (as :func:`xent.losses._base.nll_and_shift`)."""
    m = row_max(z)
    rel = ops.log(ops.sum(ops.exp(z - m), axis=-1))
    m = ops.squeeze(m, axis=-1)
    z_y = ops.squeeze(ops.take_along_axis(z, ops.expand_dims(y, -1), axis=-1), axis=-1)
    return (m - z_y) + rel, m, rel


def mean_denominator(valid, num_items, token_weight, dtype):
    """num_items if given, else Σ_valid w (the count of valid targets without weights), whatever its sign;
    1 when no target is valid or num_items is 0, so that case gives an exact 0 with a zero gradient.
    A num_items that eager code refuses (0 while targets are valid, negative, infinite or NaN) can reach
    here only traced: it gives NaN, never a plausible number."""
    count = ops.sum(ops.cast(valid, "int32"))
    if num_items is not None:
        n = ops.cast(num_items, dtype)
        stray = ops.logical_or(ops.logical_and(n == 0, count > 0),
                               ops.logical_not(ops.logical_and(ops.isfinite(n), n >= 0)))
        n = ops.where(n == 0, ops.ones_like(n), n)
        return ops.where(stray, ops.full_like(n, float("nan")), n)
    if token_weight is None:
        denom = ops.cast(count, dtype)
    else:
        tw = ops.cast(token_weight, dtype)
        denom = ops.sum(ops.where(valid, tw, ops.zeros_like(tw)))
    return ops.where(count > 0, denom, ops.ones_like(denom))


def scale_for_replicas(value):
    """A per-replica mean times 1/replicas under tf.distribute, as Keras' own losses are scaled: the
    gradients are summed over replicas, so the step then follows the mean of the replicas' means. (With
    ``num_items``, the global count, the plain sum over replicas is already the exact mean: not scaled.)"""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        if replicas > 1:
            value = value * (1.0 / replicas)
    return value


def reduce_tokens(per_token, valid, reduction: str, num_items=None, token_weight=None):
    """per_token is 0 where not valid; token_weight only changes the mean's denominator."""
    if reduction == "none":
        return per_token
    total = ops.sum(per_token)
    if reduction == "sum":
        return total
    return total / mean_denominator(valid, num_items, token_weight, per_token.dtype)
