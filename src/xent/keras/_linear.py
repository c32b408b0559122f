"""Fused linear + cross-entropy for Keras 3: ``cross_entropy(hidden @ kernel + bias, target)`` a chunk of
tokens at a time, never holding the [N, V] logits, and an LM head layer that adds it as its loss.

The tokens are padded to K chunks of C rows (static shapes, so it jits under JAX and runs in a
tf.function) and ``keras.ops.fori_loop`` walks the chunks. Each chunk projects [C, V] logits, forms the loss
and its closed-form gradient (softmax − one-hot, with smoothing, z-loss and soft-capping) in the same
pass, and runs the two gradient products; the forward therefore returns the gradients of hidden, kernel
and bias, and ``keras.ops.custom_gradient``'s backward only scales them by the upstream gradient. Three
matmuls in all (logits, grad hidden, grad kernel), as the unfused loss; memory: a few [C, V] chunks and
the float32 [D, V] kernel-gradient accumulator.
"""

from __future__ import annotations

import keras
from keras import ops

from .. import _validate as V
from . import _common as C

#: Bytes of float32 logits per chunk when chunk_size="auto" (C = this / (4·V), at least 16 tokens).
AUTO_CHUNK_BYTES = 32 * 2**20


def auto_chunk(num_tokens: int, num_classes: int) -> int:
    return max(1, min(num_tokens, max(16, AUTO_CHUNK_BYTES // (4 * num_classes))))


def _chunking(n: int, chunk: int):
    """(K chunks, C rows each) covering n tokens with as little padding as possible: K = ⌈n/chunk⌉,
    C = ⌈n/K⌉ ≤ chunk."""
    n = max(n, 1)
    k = -(-n // chunk)
    return k, -(-n // k)


def linear_cross_entropy(hidden, kernel, target, *, bias=None, transpose_kernel: bool = False,
                         shift: bool = False, chunk_size="auto", ignore_index: int = -100,
                         reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0,
                         softcap: float | None = None, num_items=None):
    r"""Cross-entropy of ``hidden @ kernel + bias`` against ``target`` without the [N, V] logits.

    Same value and gradients (hidden, kernel, bias) as
    ``xent.keras.cross_entropy(hidden @ kernel + bias, target, ...)`` and, on the same numbers, as
    :func:`xent.linear_cross_entropy` in PyTorch.

    Args:
        hidden: ``[..., D]`` (``[..., T, D]`` with ``shift``), any float dtype; the shapes must be static
            (they are under ``jax.jit`` and ``Model.fit``).
        kernel: ``[D, V]``, a Dense layer's kernel; with ``transpose_kernel=True`` a ``[V, D]`` matrix
            (a tied embedding's ``embeddings``), used as is (no transposed copy).
        target: integer ids shaped like ``hidden.shape[:-1]``; ``ignore_index`` is skipped.
        bias: optional ``[V]``.
        shift: causal shift, hidden[..., t, :] predicts target[..., t+1].
        chunk_size: tokens per chunk, or "auto": 32 MiB of float32 logits per chunk (256 tokens at
            V = 32000).
        reduction: "mean" (over the valid targets, or ÷ ``num_items``) or "sum"; "none" is not fused
            (use :func:`xent.keras.cross_entropy` on logits).
        label_smoothing, z_loss, softcap, num_items: as :func:`xent.keras.cross_entropy`.

    The projections and the softmax run in float32 (float64 for float64 inputs; JAX needs
    jax_enable_x64), also for bfloat16 inputs; gradients come back in the inputs' dtypes. Ignored tokens
    are masked, not dropped (shapes are static), so they still cost their share of the matmuls.
    First-order only: the gradient is computed in closed form.
    """
    V.check_flags(transpose_kernel=transpose_kernel, shift=shift)
    V.check_reduction(reduction)
    if reduction == "none":
        raise ValueError("reduction='none' is not fused: linear_cross_entropy returns 'mean' or 'sum'; "
                         "for per-token losses use xent.keras.cross_entropy on logits")
    V.check_ignore_index(ignore_index)
    V.check_options(label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
    if not (chunk_size == "auto" or (isinstance(chunk_size, int) and not isinstance(chunk_size, bool)
                                     and chunk_size >= 1)):
        raise ValueError(f"chunk_size must be 'auto' or an int >= 1, got {chunk_size!r}")
    hidden = C.as_tensor("hidden", hidden)
    kernel = C.as_tensor("kernel", kernel)
    C.check_floating("hidden", hidden)
    C.check_floating("kernel", kernel)
    shape = tuple(hidden.shape)
    if len(shape) < 1 or any(d is None for d in shape):
        raise ValueError(f"hidden must have a static shape [..., D], got shape {shape}")
    dim = shape[-1]
    kshape = tuple(kernel.shape)
    expected = "[V, D]" if transpose_kernel else "[D, V]"
    if len(kshape) != 2 or kshape[1 if transpose_kernel else 0] != dim:
        raise ValueError(f"kernel must have shape {expected} with D = hidden.shape[-1] = {dim}, "
                         f"got shape {kshape}")
    num_classes = kshape[0 if transpose_kernel else 1]
    if bias is not None:
        bias = C.as_tensor("bias", bias)
        C.check_floating("bias", bias)
        if tuple(bias.shape) != (num_classes,):
            raise ValueError(f"bias must have shape [V] = [{num_classes}], got shape {tuple(bias.shape)}")
    if shift and len(shape) < 2:
        raise ValueError(f"shift=True needs hidden of shape [..., T, D], got shape {shape}")
    target = C.as_ids(target, shape[:-1], lead_name="hidden")
    C.check_ids_in_range(target, num_classes, ignore_index)
    num_items = C.check_num_items(num_items, reduction)
    if shift:
        hidden, target = hidden[..., :-1, :], target[..., 1:]
    n = 1
    for d in tuple(target.shape):
        n *= d
    h2 = ops.reshape(hidden, (n, dim))
    y = ops.reshape(target, (n,))
    valid = y != ignore_index
    C.check_num_items_covers(num_items, valid)
    dt = C.compute_dtype(hidden)
    if reduction == "mean":
        inv = 1.0 / C.mean_denominator(valid, num_items, None, dt)
    else:
        inv = ops.ones((), dt)
    chunk = auto_chunk(n, num_classes) if chunk_size == "auto" else chunk_size
    k, c = _chunking(n, chunk)
    pad = k * c - n
    h3 = ops.reshape(ops.pad(h2, [[0, pad], [0, 0]]), (k, c, dim))
    y3 = ops.reshape(ops.pad(y, [[0, pad]], constant_values=ignore_index), (k, c))
    options = dict(label_smoothing=float(label_smoothing), z_loss=float(z_loss), softcap=softcap,
                   ignore_index=ignore_index, transpose_kernel=bool(transpose_kernel), dtype=dt)
    if bias is None:
        fused = ops.custom_gradient(lambda h, w: _fused(h, w, None, y3, inv, **options))
        value = fused(h3, kernel)
    else:
        fused = ops.custom_gradient(lambda h, w, b: _fused(h, w, b, y3, inv, **options))
        value = fused(h3, kernel, bias)
    # ids out of range can only reach here under tracing (checked eagerly above): NaN, never a clamp.
    bad = ops.any(C.out_of_range(y, valid, num_classes))
    return value + ops.cast(ops.where(bad, float("nan"), 0.0), value.dtype)


def _fused(h3, kernel, bias, y3, inv, *, label_smoothing, z_loss, softcap, ignore_index, transpose_kernel,
           dtype):
    """(Σℓ·inv, grad_fn) for h3 [K, C, D]; the gradients are formed in the forward (see the module)."""
    eps = label_smoothing
    w = ops.cast(kernel, dtype)
    b = None if bias is None else ops.cast(bias, dtype)
    num_classes = w.shape[0] if transpose_kernel else w.shape[1]
    project = "cd,vd->cv" if transpose_kernel else "cd,dv->cv"
    back_h = "cv,vd->cd" if transpose_kernel else "cv,dv->cd"
    back_w = "cv,cd->vd" if transpose_kernel else "cd,cv->dv"
    classes = ops.arange(num_classes, dtype="int32")

    num_chunks = h3.shape[0]
    chunk_ids = ops.arange(num_chunks, dtype="int32")

    def body(i, carry):
        grad_w, grad_b, total, grad_h_all = carry
        h = ops.cast(ops.take(h3, i, axis=0), dtype)  # [C, D]
        y = ops.take(y3, i, axis=0)  # [C]
        z = ops.einsum(project, h, w)  # [C, V]
        if b is not None:
            z = z + b
        if softcap is not None:
            t = C.tanh(z / softcap)
            z = softcap * t
        valid = y != ignore_index
        # an id out of range (only possible under tracing) must not reach a gather: TensorFlow raises on
        # it and JAX clamps; it is counted as 0 here and the loss is made NaN outside
        in_range = ops.logical_and(valid, ops.logical_and(y >= 0, y < num_classes))
        safe = ops.where(in_range, y, ops.zeros_like(y))
        m = ops.max(z, axis=-1, keepdims=True)
        m = ops.where(ops.isfinite(m), m, ops.zeros_like(m))
        e = ops.exp(z - m)
        sumexp = ops.sum(e, axis=-1)
        rel = ops.log(sumexp)
        z_y = ops.squeeze(ops.take_along_axis(z, ops.expand_dims(safe, -1), axis=-1), -1)
        m = ops.squeeze(m, -1)
        loss = (1.0 - eps) * ((m - z_y) + rel)  # −log q_y = (m − z_y) + log Σ exp(z − m)
        coef = 1.0  # Σ of the target's weights: (1 − ε) on y, ε/V on each class
        if eps > 0.0:
            # ε·(rel − Σ(z − m)/V): a sum, as Keras' mean loses float64 digits under JAX
            loss = loss + eps * (rel - ops.sum(z - ops.expand_dims(m, -1), axis=-1) / num_classes)
        if z_loss > 0.0:
            lse = m + rel
            loss = loss + z_loss * ops.square(lse)
            coef = 1.0 + 2.0 * z_loss * lse
        scale = ops.where(valid, inv * ops.ones_like(rel), ops.zeros_like(rel))  # [C]
        # dℓ/dz = coef·softmax(z) − (1−ε)·onehot_y − ε/V, times 1 − tanh² under soft-capping
        onehot = ops.cast(ops.expand_dims(safe, -1) == classes, dtype)
        g = e * ops.expand_dims(coef * scale / sumexp, -1) - onehot * ops.expand_dims((1.0 - eps) * scale, -1)
        if eps > 0.0:
            g = g - ops.expand_dims((eps / num_classes) * scale, -1)
        if softcap is not None:
            g = g * (1.0 - ops.square(t))
        grad_h = ops.einsum(back_h, g, w)  # [C, D]
        grad_w = grad_w + (ops.einsum(back_w, g, h) if transpose_kernel else ops.einsum(back_w, h, g))
        if b is not None:
            grad_b = grad_b + ops.sum(g, axis=0)
        total = total + ops.sum(ops.where(valid, loss, ops.zeros_like(loss)))
        # Written into chunk i of the [K, C, D] result by a select: every backend runs it inside its loop
        # (Keras' TensorFlow scan cannot emit outputs shaped unlike its carry), and it costs one pass over
        # [N, D] per chunk, nothing next to the [C, V] work.
        at_i = ops.reshape(chunk_ids == i, (num_chunks, 1, 1))
        grad_h_all = ops.where(at_i, ops.expand_dims(grad_h, 0), grad_h_all)
        return grad_w, grad_b, total, grad_h_all

    init = (ops.zeros(tuple(w.shape), dtype), ops.zeros((num_classes,) if b is not None else (), dtype),
            ops.zeros((), dtype), ops.zeros(tuple(h3.shape), dtype))
    grad_w, grad_b, total, grad_h = ops.fori_loop(0, num_chunks, body, init)
    value = total * inv

    def grad(*args, upstream=None):
        if upstream is None:
            (upstream,) = args
        u = ops.cast(upstream, dtype)
        out = (ops.cast(grad_h * u, h3.dtype), ops.cast(grad_w * u, kernel.dtype))
        if bias is not None:
            out = out + (ops.cast(grad_b * u, bias.dtype),)
        return out

    return value, grad


@keras.saving.register_keras_serializable(package="xent")
class LMHead(keras.layers.Layer):
    """A language-model head whose loss is fused: ``head(hidden, labels)`` adds
    :func:`linear_cross_entropy` of ``hidden @ kernel (+ bias)`` as the layer's loss and returns it; the
    [N, V] logits never exist, so ``Model.fit`` trains a large vocabulary in little memory.
    ``head(hidden)`` (no labels) returns the logits, for generation and evaluation.

    Untied: ``LMHead(vocab_size)`` owns a ``[D, V]`` kernel (``kernel_initializer``). Tied:
    ``LMHead(tied_embedding=embedding_layer)`` uses the embedding's ``[V, D]`` matrix, transposed
    in the product, not copied. Loss options (``shift``, ``ignore_index``, ``label_smoothing``,
    ``z_loss``, ``softcap``, ``chunk_size``) as :func:`linear_cross_entropy`.

    Example::

        tokens = keras.Input((T,), dtype="int32"); labels = keras.Input((T,), dtype="int32")
        embed = keras.layers.Embedding(V, D)
        hidden = keras.layers.LSTM(D, return_sequences=True)(embed(tokens))
        loss = xent.keras.LMHead(tied_embedding=embed, shift=True)(hidden, labels)
        model = keras.Model([tokens, labels], loss)
        model.compile(optimizer="adam")          # no loss=: the head adds it
        model.fit([ids, ids], epochs=1)          # labels = the inputs, shifted inside
    """

    def __init__(self, vocab_size: int | None = None, *, tied_embedding=None, use_bias: bool = False,
                 shift: bool = False, ignore_index: int = -100, label_smoothing: float = 0.0,
                 z_loss: float = 0.0, softcap: float | None = None, chunk_size="auto",
                 kernel_initializer="glorot_uniform", **kwargs):
        V.check_flags(use_bias=use_bias, shift=shift)
        super().__init__(**kwargs)
        if tied_embedding is None and (vocab_size is None or int(vocab_size) < 1):
            raise ValueError(f"vocab_size must be an int >= 1 for an untied head, got {vocab_size!r}")
        if tied_embedding is not None and not isinstance(tied_embedding, keras.layers.Embedding):
            raise TypeError(
                f"tied_embedding must be a keras.layers.Embedding, got {type(tied_embedding).__name__}")
        if (tied_embedding is not None and vocab_size is not None
                and int(vocab_size) != tied_embedding.input_dim):
            raise ValueError(f"vocab_size {vocab_size} does not match the tied embedding's "
                             f"input_dim {tied_embedding.input_dim}")
        V.check_options(label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
        self.vocab_size = int(tied_embedding.input_dim if tied_embedding is not None else vocab_size)
        # Kept out of Keras' tracking: the embedding's weights belong to the embedding layer (tracked
        # twice, an optimizer would see them twice).
        object.__setattr__(self, "_tied", tied_embedding)
        self.use_bias = use_bias
        self.loss_options = dict(shift=shift, ignore_index=int(ignore_index),
                                 label_smoothing=float(label_smoothing), z_loss=float(z_loss),
                                 softcap=softcap, chunk_size=chunk_size)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

    def build(self, hidden_shape, labels_shape=None):
        dim = hidden_shape[-1]
        if self._tied is None:
            self.kernel = self.add_weight(name="kernel", shape=(dim, self.vocab_size),
                                          initializer=self.kernel_initializer)
        elif self._tied.output_dim != dim:
            raise ValueError(
                f"the tied embedding has output_dim {self._tied.output_dim}, hidden has D = {dim}")
        self.bias = self.add_weight(name="bias", shape=(self.vocab_size,), initializer="zeros") \
            if self.use_bias else None

    def _kernel(self):
        return (self._tied.embeddings, True) if self._tied is not None else (self.kernel, False)

    def call(self, hidden, labels=None):
        kernel, transposed = self._kernel()
        if labels is None:
            logits = ops.einsum("...d,vd->...v" if transposed else "...d,dv->...v", hidden,
                                ops.cast(kernel, hidden.dtype))
            return logits if self.bias is None else logits + ops.cast(self.bias, hidden.dtype)
        loss = linear_cross_entropy(hidden, kernel, labels, bias=self.bias, transpose_kernel=transposed,
                                    **self.loss_options)
        self.add_loss(C.scale_for_replicas(loss))  # as a compiled Keras loss under tf.distribute
        return loss

    def compute_output_spec(self, hidden, labels=None):
        if labels is None:
            return keras.KerasTensor(tuple(hidden.shape[:-1]) + (self.vocab_size,), dtype=self.compute_dtype)
        dtype = "float64" if keras.backend.standardize_dtype(hidden.dtype) == "float64" else "float32"
        return keras.KerasTensor((), dtype=dtype)

    def get_config(self):
        if self._tied is not None:
            raise NotImplementedError("an LMHead tied to an embedding is saved with its model's weights; "
                                      "rebuild it with tied_embedding= when loading")
        config = super().get_config()
        config.update(vocab_size=self.vocab_size, use_bias=self.use_bias,
                      kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
                      **self.loss_options)
        return config
