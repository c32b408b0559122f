"""Language-model losses on Keras 3 tensors (``keras.ops``: JAX, TensorFlow or PyTorch backend).

Each function is the twin of the PyTorch function of the same name in :mod:`xent` (same formulas, same
options, same numbers); tests/keras checks values and gradients against it under JAX and TensorFlow.
Differences from Keras' own ``SparseCategoricalCrossentropy(from_logits=True)``:

- ``reduction="mean"`` divides by the number of valid targets (or Σ of their weights), never by the
  number of positions: padding (``ignore_index``, a Keras mask, ``sample_weight`` 0) does not dilute it;
- label smoothing never builds a one-hot or smoothed [N, V] label tensor;
- the softmax runs in float32 whatever the logits' dtype (bfloat16 under mixed precision);
- ``num_items`` (the valid-target count of a whole step) makes micro-batch losses add up exactly.
"""

from __future__ import annotations

from keras import ops

from .. import _validate as V
from . import _common as C


def _prepare(logits, target, *, ignore_index, reduction, num_items, sample_weight, class_weight=None,
             shift=False):
    """Checks and the causal shift shared by every token loss.

    Returns (z [..., V] in the compute dtype, safe ids, valid, bad, sample weight or None, class weight or
    None, num_items); ``bad`` marks out-of-range ids that could only be seen under tracing."""
    V.check_reduction(reduction)
    V.check_ignore_index(ignore_index)
    logits = C.as_tensor("logits", logits)
    num_classes = C.check_logits(logits)
    lead = tuple(logits.shape[:-1])
    name = "labels" if shift else "target"
    target = C.as_ids(target, lead, name=name)
    C.check_ids_in_range(target, num_classes, ignore_index, name=name)
    num_items = C.check_num_items(num_items, reduction)
    class_weight = C.check_class_weight(class_weight, num_classes)
    sample_weight = C.broadcast_sample_weight(sample_weight, target.shape)
    if sample_weight is not None:
        sample_weight = ops.broadcast_to(sample_weight, ops.shape(target))
    if shift:
        if len(lead) < 1:
            raise ValueError(
                f"the causal shift needs logits of shape [..., T, V], got shape {tuple(logits.shape)}")
        logits = logits[..., :-1, :]  # position t predicts label t + 1; the last position has no target
        target = target[..., 1:]
        sample_weight = None if sample_weight is None else sample_weight[..., 1:]
    valid = target != ignore_index
    C.check_num_items_covers(num_items, valid)
    bad = C.out_of_range(target, valid, num_classes)
    safe = ops.where(ops.logical_and(valid, ops.logical_not(bad)), target, ops.zeros_like(target))
    z = ops.cast(logits, C.compute_dtype(logits))
    sw = None if sample_weight is None else ops.cast(sample_weight, z.dtype)
    cw = None if class_weight is None else ops.cast(class_weight, z.dtype)
    return z, safe, valid, bad, sw, cw, num_items


def _finish(per_token, valid, bad, reduction, num_items, token_weight):
    per_token = ops.where(valid, per_token, ops.zeros_like(per_token))
    per_token = ops.where(bad, ops.full_like(per_token, float("nan")), per_token)  # traced bad ids only
    return C.reduce_tokens(per_token, valid, reduction, num_items, token_weight)


def _token_weights(valid, sw, cw, y):
    """(w_t·w_{y_t} per token or None, the z-loss scale Σ_valid w_t·w_y / Σ_valid w_t, or 1 without class
    weights): the z-loss averages over the valid tokens, never over Σ w_y (as xent's for_mean)."""
    if cw is None:
        return sw, 1.0
    w_y = ops.take(cw, y)
    token_weight = w_y if sw is None else sw * w_y
    zero = ops.zeros_like(w_y)
    weighted = ops.sum(ops.where(valid, token_weight, zero))
    base = ops.sum(ops.where(valid, ops.ones_like(w_y) if sw is None else sw, zero))
    safe_base = ops.where(base != 0, base, ops.ones_like(base))
    return token_weight, ops.where(base != 0, weighted / safe_base, ops.ones_like(base))


def _ce_per_token(z, y, cw, *, label_smoothing, z_loss, z_scale):
    # z [..., V] (capped), y [...] in range.
    eps, num_classes = label_smoothing, z.shape[-1]
    nll, m, rel = C.nll_and_shift(z, y)
    if cw is not None:
        nll = nll * ops.take(cw, y)
    loss = nll
    if eps > 0.0:
        # Σ_c w_c (lse − z_c) = rel·Σw − Σ_c w_c (z_c − m): small parts, no cancellation at large logits,
        # and no one-hot or smoothed label tensor (Keras' label smoothing builds one of [N, V]).
        centred = z - ops.expand_dims(m, -1)
        if cw is None:
            smooth = rel * num_classes - ops.sum(centred, axis=-1)
        else:
            smooth = rel * ops.sum(cw) - ops.sum(centred * cw, axis=-1)
        loss = (1.0 - eps) * nll + (eps / num_classes) * smooth
    if z_loss > 0.0:
        lse = m + rel
        loss = loss + (z_loss * z_scale) * ops.square(lse)
    return loss


def cross_entropy(logits, target, *, ignore_index: int = -100, reduction: str = "mean", weight=None,
                  label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: float | None = None,
                  num_items=None, sample_weight=None):
    r"""Cross-entropy of logits ``[..., V]`` against integer class ids ``[...]``; the Keras twin of
    :func:`xent.cross_entropy` (shared/REFERENCE.md §1): ℓ = w_y(lse z − z_y), with

    - ``ignore_index``: those targets give 0 and no gradient; ``reduction="mean"`` divides by the count of
      valid targets (Σ_valid w_y with class ``weight`` [V], times ``sample_weight`` when given); every
      target ignored gives 0, never NaN;
    - ``label_smoothing`` ε: (1−ε)·nll + (ε/V)·Σ_c w_c(lse − z_c), as torch, with no [N, V] label tensor;
    - ``z_loss`` s: + s·(lse z)² per valid token, averaged over the valid tokens (never over Σ w_y);
    - ``softcap`` c: z ← c·tanh(z/c) first (Gemma 2);
    - ``num_items``: "mean" becomes Σℓ / num_items (the valid targets of every micro-batch and replica),
      so micro-batch losses add up to the full-batch mean; 0 (an all-padding step) gives 0;
    - ``sample_weight``: per-token weights w_t shaped like ``target`` or a prefix of it (``[B]``):
      ℓ_t·w_t, "mean" divides by Σ_valid w_t·w_y (Keras' "mean_with_sample_weight"); weight 0 drops a token.

    Computed in float32 whatever the logits' dtype (float64 stays float64). ``reduction="none"`` returns a
    tensor shaped like ``target``, 0 where ignored.
    """
    z, y, valid, bad, sw, cw, num_items = _prepare(
        logits, target, ignore_index=ignore_index, reduction=reduction, num_items=num_items,
        sample_weight=sample_weight, class_weight=weight)
    V.check_options(label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
    return _ce(z, y, valid, bad, sw, cw, num_items, reduction=reduction, label_smoothing=label_smoothing,
               z_loss=z_loss, softcap=softcap)


def _ce(z, y, valid, bad, sw, cw, num_items, *, reduction, label_smoothing, z_loss, softcap):
    token_weight, z_scale = _token_weights(valid, sw, cw, y)
    if reduction != "mean" or num_items is not None:
        z_scale = 1.0
    per_token = _ce_per_token(C.softcap(z, softcap), y, cw, label_smoothing=label_smoothing, z_loss=z_loss,
                              z_scale=z_scale)
    if sw is not None:
        per_token = per_token * sw
    return _finish(per_token, valid, bad, reduction, num_items, token_weight)


def causal_lm_loss(logits, labels, *, ignore_index: int = -100, reduction: str = "mean", weight=None,
                   label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: float | None = None,
                   num_items=None, sample_weight=None):
    """Next-token loss of a causal LM: logits ``[..., T, V]`` at position t predict ``labels[..., t+1]``
    (labels shaped like the logits without V; the last position has no target). The twin of
    :func:`xent.causal_lm_loss` (``num_items`` is its ``num_items_in_batch``). ``sample_weight`` is
    shaped like ``labels`` (or a prefix) and shifted with them. reduction="none" returns ``[..., T−1]``.
    Options as :func:`cross_entropy`."""
    z, y, valid, bad, sw, cw, num_items = _prepare(
        logits, labels, ignore_index=ignore_index, reduction=reduction, num_items=num_items,
        sample_weight=sample_weight, class_weight=weight, shift=True)
    V.check_options(label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
    return _ce(z, y, valid, bad, sw, cw, num_items, reduction=reduction, label_smoothing=label_smoothing,
               z_loss=z_loss, softcap=softcap)


# ---------- losses that are a function of −log q_y (shared/REFERENCE.md §3) ----------

def _one_minus_q(nll):
    """1 − q_y = −expm1(−nll): exact when q_y is close to 1."""
    return -ops.expm1(-nll)


def tailr_terms(nll, *, gamma, threshold):
    # q/(γ + (1−γ)q) = 1/((1−γ) + γ·e^{nll}): no division by a vanishing q_y; e^{nll} = inf gives 0.
    weight = 1.0 / ((1.0 - gamma) + gamma * ops.exp(nll))
    # clamp to [b, 1] with bounds in the weight's dtype (Keras' clip rounds Python bounds to float32)
    weight = ops.minimum(ops.maximum(weight, ops.full_like(weight, threshold)), ops.ones_like(weight))
    weight = ops.stop_gradient(weight)
    return weight * nll


def focal_terms(nll, *, gamma, alpha, detach_factor):
    if gamma == 0.0:
        return alpha * nll
    base = _one_minus_q(nll)
    # q_y rounds to 1 for a confident token: d(1−q)^γ is infinite there for γ < 1 and times nll = 0
    # gives NaN; powers of a safe base, then select 0 (as xent.losses.Focal).
    positive = base > 0
    safe = ops.where(positive, base, ops.ones_like(base))
    factor = ops.where(positive, ops.power(safe, gamma), ops.zeros_like(base))
    if detach_factor:
        factor = ops.stop_gradient(factor)
    return alpha * factor * nll


def poly_terms(nll, *, epsilon):
    return nll + epsilon * _one_minus_q(nll)


def _nll_loss(terms, logits, target, *, label_smoothing, softcap, ignore_index, reduction, num_items,
              sample_weight, shift=False):
    V.check_options(label_smoothing=label_smoothing, softcap=softcap)
    z, y, valid, bad, sw, _, num_items = _prepare(
        logits, target, ignore_index=ignore_index, reduction=reduction, num_items=num_items,
        sample_weight=sample_weight, shift=shift)
    z = C.softcap(z, softcap)
    nll, m, rel = C.nll_and_shift(z, y)
    per_token = terms(nll)
    eps = label_smoothing
    if eps > 0.0:
        # (ε/V)·Σ_c (lse − z_c) = ε·(rel − mean(z − m)); the smoothing term is not reweighted.
        # a sum over V, not ops.mean: Keras' mean loses float64 digits under JAX
        centred = ops.sum(z - ops.expand_dims(m, -1), axis=-1) / z.shape[-1]
        per_token = (1.0 - eps) * per_token + eps * (rel - centred)
    if sw is not None:
        per_token = per_token * sw
    return _finish(per_token, valid, bad, reduction, num_items, sw)


def check_tailr(gamma, threshold):
    V.check_range("gamma", gamma, 0.0, 1.0, lo_open=True)
    V.check_range("threshold", threshold, 0.0, 1.0)


def tailr_loss(logits, target, *, gamma: float, threshold: float = 0.0, label_smoothing: float = 0.0,
               softcap: float | None = None, ignore_index: int = -100, reduction: str = "mean",
               num_items=None, sample_weight=None):
    """TaiLr (Ji et al., ICLR 2023): ℓ = sg(clamp(q_y/(γ+(1−γ)q_y), b, 1))·(−log q_y); the twin of
    :func:`xent.tailr_loss`. Authors' settings: γ=0.1,b=0.3 (translation); γ=0.8,b=0.2 (summarisation);
    γ=1e-7,b=0.2 (open-ended LM). Common options as :func:`cross_entropy`."""
    check_tailr(gamma, threshold)
    terms = lambda nll: tailr_terms(nll, gamma=float(gamma), threshold=float(threshold))  # noqa: E731
    return _nll_loss(terms, logits, target, label_smoothing=label_smoothing, softcap=softcap,
                     ignore_index=ignore_index, reduction=reduction, num_items=num_items,
                     sample_weight=sample_weight)


def gold_loss(logits, target, *, threshold: float = 0.0, softcap: float | None = None,
              ignore_index: int = -100, reduction: str = "mean", num_items=None, sample_weight=None):
    """GOLD-δ (Pang & He, ICLR 2021): ℓ = −sg(max(q_y, b))·log q_y, TaiLr at γ=1; the twin of
    :func:`xent.gold_loss`. At ``threshold=0`` this is DFT, dynamic fine-tuning (Wu et al. 2025,
    −sg(q_y)·log q_y; TRL's loss_type="dft")."""
    check_tailr(1.0, threshold)
    terms = lambda nll: tailr_terms(nll, gamma=1.0, threshold=float(threshold))  # noqa: E731
    return _nll_loss(terms, logits, target, label_smoothing=0.0, softcap=softcap, ignore_index=ignore_index,
                     reduction=reduction, num_items=num_items, sample_weight=sample_weight)


def check_focal(gamma, alpha):
    if not V.check_number("gamma", gamma) >= 0.0:
        raise ValueError(f"gamma must be a finite number >= 0, got {gamma}")
    if not V.check_number("alpha", alpha) > 0.0:
        raise ValueError(f"alpha must be a finite number > 0, got {alpha}")


def focal_loss(logits, target, *, gamma: float = 2.0, alpha: float = 1.0, detach_factor: bool = False,
               softcap: float | None = None, ignore_index: int = -100, reduction: str = "mean",
               num_items=None, sample_weight=None):
    """Focal loss −α(1−q_y)^γ log q_y (Lin et al. 2017); the twin of :func:`xent.focal_loss`."""
    V.check_flags(detach_factor=detach_factor)
    check_focal(gamma, alpha)
    terms = lambda nll: focal_terms(nll, gamma=float(gamma), alpha=float(alpha),  # noqa: E731
                                    detach_factor=detach_factor)
    return _nll_loss(terms, logits, target, label_smoothing=0.0, softcap=softcap, ignore_index=ignore_index,
                     reduction=reduction, num_items=num_items, sample_weight=sample_weight)


def check_poly(epsilon):
    if not V.check_number("epsilon", epsilon) >= -1.0:
        raise ValueError(f"epsilon must be a finite number >= -1, got {epsilon}")


def poly_loss(logits, target, *, epsilon: float = 1.0, softcap: float | None = None, ignore_index: int = -100,
              reduction: str = "mean", num_items=None, sample_weight=None):
    """Poly-1 loss −log q_y + ε(1−q_y) (Leng et al., ICLR 2022); the twin of :func:`xent.poly_loss`."""
    check_poly(epsilon)
    terms = lambda nll: poly_terms(nll, epsilon=float(epsilon))  # noqa: E731
    return _nll_loss(terms, logits, target, label_smoothing=0.0, softcap=softcap, ignore_index=ignore_index,
                     reduction=reduction, num_items=num_items, sample_weight=sample_weight)


# ---------- binary cross-entropy ----------

def binary_cross_entropy_with_logits(input, target, weight=None, *, pos_weight=None,
                                     label_smoothing: float = 0.0, ignore_index: float = -100,
                                     reduction: str = "mean", num_items=None):
    r"""ℓ = −w·[p_w·y·log σ(x) + (1−y)·log(1−σ(x))] from logits x (``input``), in log-sigmoid form (no
    epsilon); the twin of :func:`xent.binary_cross_entropy_with_logits` (same options and rules: ``weight``
    rescales and is not a normaliser, "mean" divides by the count of valid elements, a target equal to
    ``ignore_index`` is skipped, label smoothing y ← y(1−ε) + ε/2). Equal to
    ``keras.losses.BinaryCrossentropy(from_logits=True)`` when nothing is ignored (a ``[B]`` sample weight
    is ``weight`` broadcast over the last axes)."""
    x, y, valid, bad, shape, dt = _binary_prepare(input, target, label_smoothing, ignore_index, reduction,
                                                  num_items)
    # −log σ(x) and −log(1 − σ(x)) = −log σ(−x): exact for any x, no cancellation, no epsilon.
    pos = -ops.log_sigmoid(x) * y
    if pos_weight is not None:
        pos = pos * ops.cast(_check_broadcast("pos_weight", pos_weight, shape), dt)
    per_elem = pos - ops.log_sigmoid(-x) * (1.0 - y)
    if weight is not None:
        per_elem = per_elem * ops.cast(_check_broadcast("weight", weight, shape), dt)
    return _finish(per_elem, valid, bad, reduction, num_items, None)


def binary_cross_entropy(input, target, weight=None, *, from_logits: bool = False, pos_weight=None,
                         label_smoothing: float = 0.0, ignore_index: float = -100, reduction: str = "mean",
                         num_items=None):
    r"""Binary cross-entropy of probabilities p (``input``; logits with ``from_logits=True``, Keras'
    convention and default) against targets y in [0, 1].

    With ``from_logits=False``: ℓ = −w·[y·max(log p, −100) + (1−y)·max(log(1−p), −100)], the twin of
    :func:`xent.binary_cross_entropy` (torch's clamp of each log at −100: p = 0 or 1 costs at most 100·w,
    where Keras' ``BinaryCrossentropy()`` clips p to [1e-7, 1 − 1e-7], at most 16.1; the two agree inside
    that range). Gradients equal torch's wherever no log is clamped. ``pos_weight`` is for logits only.
    An input outside [0, 1] at a valid element is refused eagerly and makes the loss NaN when traced.
    With ``from_logits=True``: :func:`binary_cross_entropy_with_logits`. The other options as there."""
    V.check_flags(from_logits=from_logits)
    if from_logits:
        return binary_cross_entropy_with_logits(
            input, target, weight, pos_weight=pos_weight, label_smoothing=label_smoothing,
            ignore_index=ignore_index, reduction=reduction, num_items=num_items)
    if pos_weight is not None:
        raise ValueError("pos_weight needs from_logits=True (torch's binary_cross_entropy has none), got "
                         f"a pos_weight with from_logits={from_logits!r}")
    p, y, valid, bad, shape, dt = _binary_prepare(input, target, label_smoothing, ignore_index, reduction,
                                                  num_items, probabilities=True)
    # max(log p, −100) and max(log(1 − p), −100), torch's rule; the log is taken of a safe value where
    # its argument is 0, so the clamped branch has a zero gradient, never 0·inf = NaN
    some_p, some_q = p > 0.0, p < 1.0
    log_p = ops.where(some_p, ops.log(ops.where(some_p, p, ops.ones_like(p))), -100.0)
    log_1mp = ops.where(some_q, ops.log1p(-ops.where(some_q, p, ops.zeros_like(p))), -100.0)
    per_elem = -(y * ops.maximum(log_p, -100.0) + (1.0 - y) * ops.maximum(log_1mp, -100.0))
    if weight is not None:
        per_elem = per_elem * ops.cast(_check_broadcast("weight", weight, shape), dt)
    return _finish(per_elem, valid, bad, reduction, num_items, None)


def _binary_prepare(input, target, label_smoothing, ignore_index, reduction, num_items, probabilities=False):
    """Checks shared by both binary losses; (input and smoothed targets in the compute dtype with
    ignored elements safe, valid, bad (a value only tracing could let through), shape, dtype)."""
    V.check_reduction(reduction)
    V.check_range("label_smoothing", label_smoothing, 0.0, 1.0)
    V.check_number("ignore_index", ignore_index)
    if 0.0 <= ignore_index <= 1.0:
        raise ValueError(f"ignore_index must lie outside [0, 1] (a valid target), got {ignore_index}")
    input = C.as_tensor("input", input)
    C.check_floating("input", input)
    target = C.as_tensor("target", target)
    shape = tuple(input.shape)
    if tuple(target.shape) != shape:
        raise ValueError(f"target shape {tuple(target.shape)} must equal input shape {shape}")
    num_items = C.check_num_items(num_items, reduction)
    dt = C.compute_dtype(input)
    x = ops.cast(input, dt)
    y = ops.cast(target, dt)
    value = C.concrete(y)
    if value is not None and value.size:
        badv = (value != ignore_index) & ~((value >= 0.0) & (value <= 1.0))
        if badv.any():
            raise ValueError(f"target has {int(badv.sum())} value(s) outside [0, 1] that are not "
                             f"ignore_index={ignore_index}; the first is {value[badv].flat[0]}")
    valid = y != ignore_index
    bad = ops.logical_and(valid, ops.logical_not(ops.logical_and(y >= 0.0, y <= 1.0)))  # NaN too
    if probabilities:
        p, known = C.concrete(x), C.concrete(valid)
        if p is not None and known is not None and p.size:
            badp = known & ~((p >= 0.0) & (p <= 1.0))
            if badp.any():
                raise ValueError(
                    "input must hold probabilities in [0, 1] (from_logits=True for logits); "
                    f"{int(badp.sum())} valid element(s) are not, the first is {p[badp].flat[0]}")
        out_of_range = ops.logical_not(ops.logical_and(x >= 0.0, x <= 1.0))
        bad = ops.logical_or(bad, ops.logical_and(valid, out_of_range))
        x = ops.where(ops.logical_and(valid, ops.logical_not(bad)), x, ops.full_like(x, 0.5))
    C.check_num_items_covers(num_items, valid)
    y = ops.where(ops.logical_and(valid, ops.logical_not(bad)), y, ops.zeros_like(y))
    if label_smoothing > 0.0:
        y = y * (1.0 - label_smoothing) + 0.5 * label_smoothing
    return x, y, valid, bad, shape, dt


def _check_broadcast(name, w, shape):
    w = C.as_tensor(name, w)
    C.check_floating(name, w)
    w_shape = tuple(w.shape)
    ok = len(w_shape) <= len(shape) and all(
        a in (1, b) for a, b in zip(reversed(w_shape), reversed(shape)))
    if not ok:
        raise ValueError(f"{name} shape {w_shape} does not broadcast to input shape {shape}")
    return w
