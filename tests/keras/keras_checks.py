"""Everything the Keras tests need from one backend, in one process (importing TensorFlow or JAX is slow).

    KERAS_BACKEND=jax JAX_ENABLE_X64=1 python keras_checks.py OUT.npz

Computes each case of keras_cases.CASES with xent.keras (float64 eagerly and float32 under jax.jit /
tf.function), Keras' own losses where their semantics coincide, the guide's LSTM language model at
initialisation, the epsilon rows, a Model.fit step of the fused LMHead against Dense + loss, and the
error behaviour. Arrays go to OUT.npz as "<case>/<what>"; a JSON line on stdout names the backend and
any case that raised (the pytest side, test_keras.py, asserts case by case).
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
import traceback

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

START = time.perf_counter()
from keras_cases import CASES, GUIDE, IGNORE, make_inputs  # noqa: E402

import keras  # noqa: E402
import xent.keras as xk  # noqa: E402
from keras import ops  # noqa: E402

BACKEND = keras.backend.backend()
IMPORT_S = time.perf_counter() - START
OUT: dict[str, np.ndarray] = {}
ERRORS: dict[str, str] = {}
if BACKEND == "jax":
    import jax
else:
    import tensorflow as tf


def value_and_grads(fn, xs, traced: bool):
    """fn(*tensors) -> scalar; returns (value, [grads]) as numpy, eagerly or under jit / tf.function."""
    if BACKEND == "jax":
        vg = jax.value_and_grad(fn, argnums=tuple(range(len(xs))))
        if traced:
            vg = jax.jit(vg)
        v, g = vg(*[jax.numpy.asarray(x) for x in xs])
        return np.asarray(v), [np.asarray(a) for a in g]

    def run(*ts):
        with tf.GradientTape() as tape:
            tape.watch(ts)
            v = fn(*ts)
        return v, tape.gradient(v, list(ts))

    if traced:
        run = tf.function(run)
    v, g = run(*[tf.constant(x) for x in xs])
    return v.numpy(), [a.numpy() for a in g]


def compiled(f):
    """jax.jit under JAX (eager JAX compiles op by op: far slower); TensorFlow runs eagerly."""
    return jax.jit(f) if BACKEND == "jax" else f


def to_numpy(x):
    return np.asarray(ops.convert_to_numpy(x))


def vjp(fn, xs, upstream=None):
    """(fn(*xs), the gradient of Σ upstream·fn(*xs) for each x), as backend tensors; inside or outside a
    jit / tf.function."""
    if BACKEND == "jax":
        out, pullback = jax.vjp(fn, *xs)
        return out, list(pullback(jax.numpy.ones_like(out) if upstream is None else upstream))
    with tf.GradientTape() as tape:
        tape.watch(xs)
        out = fn(*xs)
    return out, tape.gradient(out, list(xs), output_gradients=upstream)


def token_case(name, spec, dtype):
    """(differentiated inputs, upstream, fn(*inputs) -> loss) of a case on logits."""
    inputs = make_inputs(name)
    options = dict(spec["options"])
    fn = getattr(xk, spec["fn"])
    if "weight" in inputs:
        options["weight"] = inputs["weight"].astype(dtype)
    if "pos_weight" in inputs:
        options["pos_weight"] = inputs["pos_weight"].astype(dtype)
    target = inputs["target"] if spec.get("kind") != "binary" else inputs["target"].astype(dtype)
    up = inputs["upstream"].astype(dtype) if options.get("reduction") == "none" else None
    return {"logits": inputs["x_logits"].astype(dtype)}, up, lambda x: fn(x, target, **options)


def linear_case(name, spec, dtype):
    inputs = make_inputs(name)
    options = dict(spec["options"])
    tied = spec.get("tied", False)
    xs = {k[2:]: inputs[k].astype(dtype) for k in ("x_hidden", "x_kernel", "x_bias") if k in inputs}
    if tied:  # a tied embedding's [V, D] matrix
        xs["kernel"] = np.ascontiguousarray(xs["kernel"].T)

    def loss(h, w, b=None):
        return xk.linear_cross_entropy(h, w, inputs["target"], bias=b, transpose_kernel=tied, **options)

    return xs, None, loss


def _every(built, arrays):
    """Value and gradients of every case in arrays (name -> {input name: tensor})."""
    out = {}
    for name, xs in arrays.items():
        names, up, fn = list(built[name][0]), built[name][1], built[name][2]
        value, grads = vjp(fn, [xs[k] for k in names], up)
        out[name] = {"value": value, **{"grad_" + k: g for k, g in zip(names, grads)}}
    return out


def run_cases():
    """Every case in one jit / tf.function per dtype (one compilation instead of one per case); a case
    that fails is then rerun alone so that the error is reported against it."""
    t0 = time.process_time()
    # float64 eagerly under TensorFlow (fast there), float32 traced; JAX traces both (eager JAX compiles
    # op by op).
    for dtype, traced in (("float64", BACKEND == "jax"), ("float32", True)):
        built = {}
        for name, spec in CASES.items():
            try:
                builder = linear_case if spec.get("kind") == "linear" else token_case
                built[name] = builder(name, spec, dtype)
            except Exception:
                ERRORS[f"{name}/{dtype}"] = traceback.format_exc(limit=4)

        def run(names, built=built, traced=traced):
            arrays = {n: {k: ops.convert_to_tensor(v) for k, v in built[n][0].items()} for n in names}
            f = functools.partial(_every, built)
            if traced:
                f = jax.jit(f) if BACKEND == "jax" else tf.function(f)
            return f(arrays)

        try:
            results = run(list(built))
        except Exception:
            results = {}
            for name in built:
                try:
                    results.update(run([name]))
                except Exception:
                    ERRORS[f"{name}/{dtype}"] = traceback.format_exc(limit=6)
        for name, res in results.items():
            for what, arr in res.items():
                arr = to_numpy(arr)
                if what == "grad_kernel" and CASES[name].get("tied"):
                    arr = arr.T
                OUT[f"{name}/{dtype}/{what}"] = arr
    TIMES["cases"] = round(time.process_time() - t0, 2)


TIMES: dict[str, float] = {}


def check(name):
    def wrap(f):
        t0 = time.process_time()
        try:
            for what, arr in f().items():
                OUT[f"{name}/{what}"] = np.asarray(arr)
        except Exception:
            ERRORS[name] = traceback.format_exc(limit=6)
        TIMES[name] = round(time.process_time() - t0, 2)
        return f
    return wrap


rng = np.random.default_rng(1234)


@check("keras_sce_no_padding")
def _():
    x = rng.standard_normal((4, 6, 9)).astype("float32") * 2
    y = rng.integers(0, 9, (4, 6))
    sce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    jit = BACKEND == "jax"
    v_ours, (g_ours,) = value_and_grads(lambda t: xk.cross_entropy(t, y), [x], jit)
    v_keras, (g_keras,) = value_and_grads(lambda t: sce(y, t), [x], jit)
    v_class = to_numpy(compiled(lambda t: xk.CrossEntropy()(y, t))(x))
    return {"ours": v_ours, "keras": v_keras, "class": v_class, "grad_ours": g_ours, "grad_keras": g_keras,
            "logits": x, "target": y}


@check("keras_sce_padding")
def _():
    x = rng.standard_normal((4, 6, 9)).astype("float32") * 2
    y = rng.integers(1, 9, (4, 6))
    lengths = np.array([6, 4, 2, 5])
    pad = np.arange(6)[None, :] >= lengths[:, None]
    y_ignore = np.where(pad, IGNORE, y)  # xent's convention
    y_zero = np.where(pad, 0, y)  # keras-hub's: padded ids 0 with a padding-mask sample_weight
    mask = (~pad).astype("float32")
    sce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    return {
        "logits": x, "target": y_ignore,
        "xent": to_numpy(xk.cross_entropy(x, y_ignore)),
        "xent_class_sample_weight": to_numpy(xk.CrossEntropy()(y_zero, x, sample_weight=mask)),
        "keras_sample_weight": to_numpy(sce(y_zero, x, sample_weight=mask)),  # the keras-hub default
        "keras_mean_with_sample_weight": to_numpy(keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction="mean_with_sample_weight")(y_zero, x, sample_weight=mask)),
        "keras_ignore_class": to_numpy(keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, ignore_class=IGNORE)(y_ignore, x)),
    }


@check("keras_bce")
def _():
    x = (rng.standard_normal((5, 7)) * 4).astype("float32")
    y = (rng.random((5, 7)) > 0.5).astype("float32")
    soft = rng.random((5, 7)).astype("float32")
    sw = (rng.random(5) + 0.5).astype("float32")
    out = {"logits": x, "target": y, "soft": soft, "sample_weight": sw}
    for tag, target, eps, weight in (("hard", y, 0.0, None), ("soft_smooth", soft, 0.1, None),
                                     ("sample_weight", y, 0.05, sw)):
        theirs = keras.losses.BinaryCrossentropy(from_logits=True, label_smoothing=eps)
        ours = xk.BinaryCrossEntropy(from_logits=True, label_smoothing=eps)
        out[f"{tag}/keras"], (out[f"{tag}/grad_keras"],) = value_and_grads(
            lambda t, theirs=theirs, target=target, weight=weight: theirs(target, t, sample_weight=weight),
            [x],
            BACKEND == "jax")
        out[f"{tag}/ours"], (out[f"{tag}/grad_ours"],) = value_and_grads(
            lambda t, ours=ours, target=target, weight=weight: ours(target, t, sample_weight=weight), [x],
            BACKEND == "jax")
    # probabilities, both at their default from_logits=False, inside Keras' clip [1e-7, 1 − 1e-7]
    p = rng.uniform(0.01, 0.99, (5, 7)).astype("float32")
    out["probs"] = p
    out["probs/keras"], (out["probs/grad_keras"],) = value_and_grads(
        lambda t: keras.losses.BinaryCrossentropy(label_smoothing=0.05)(y, t, sample_weight=sw), [p], False)
    out["probs/ours"], (out["probs/grad_ours"],) = value_and_grads(
        lambda t: xk.BinaryCrossEntropy(label_smoothing=0.05)(y, t, sample_weight=sw), [p], False)
    # p = 0 and 1 against the wrong label: torch's clamp gives 100, Keras' clip 16.1
    edge_p, edge_y = np.array([0.0, 1.0, 0.5], "float32"), np.array([1.0, 0.0, 1.0], "float32")
    out["edge/ours"] = to_numpy(xk.binary_cross_entropy(edge_p, edge_y, reduction="none"))
    out["edge/keras"] = to_numpy(keras.losses.binary_crossentropy(edge_y[:, None], edge_p[:, None]))
    (out["edge/grad_ours"],) = value_and_grads(
        lambda t: ops.sum(xk.binary_cross_entropy(t, edge_y, reduction="none")), [edge_p], False)[1]
    return out


@check("sample_weight")
def _():
    """Per-token weights with class weights and z-loss, the Loss classes' keyword path, and num_items."""
    x = rng.standard_normal((3, 6, 7)) * 2
    y = rng.integers(0, 7, (3, 6))
    y[0, :2] = IGNORE
    sw = rng.random((3, 6)) + 0.25
    cw = rng.random(7) + 0.5
    loss = compiled(lambda t: xk.cross_entropy(t, y, weight=cw, z_loss=0.05, sample_weight=sw))
    per_row = compiled(lambda t: xk.cross_entropy(t, y, sample_weight=sw[:, 0]))  # [B] weights
    tailr_class = xk.TaiLr(gamma=0.1, threshold=0.2, shift=True)
    return {"logits": x, "target": y, "sw": sw, "cw": cw, "value": to_numpy(loss(x)),
            "per_row": to_numpy(per_row(x)),
            "tailr_class_shift": to_numpy(tailr_class(y, x, num_items=11)),
            "tailr_fn_shift": to_numpy(xk.tailr_loss(x[:, :-1], y[:, 1:], gamma=0.1, threshold=0.2,
                                                     num_items=11))}


@check("mixed_precision")
def _():
    x = rng.standard_normal((3, 5, 40)).astype("float32") * 3
    y = rng.integers(0, 40, (3, 5))
    xb = ops.cast(x, "bfloat16")
    loss = compiled(lambda t, y: xk.cross_entropy(t, y, z_loss=1e-3))
    loss_b = loss(xb, y)
    rounded = to_numpy(ops.cast(xb, "float32"))
    return {"dtype_is_float32": np.array(keras.backend.standardize_dtype(loss_b.dtype) == "float32"),
            "bf16": to_numpy(loss_b), "f32_of_rounded": to_numpy(loss(rounded, y)),
            "rounded": rounded, "target": y}


@check("guide")
def _():
    """The guide's Keras LSTM language model at initialisation: xent, Keras' built-in, the manual version."""
    g = GUIDE
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((g["steps"],), dtype="int32"),
        keras.layers.Embedding(g["vocab"], g["embed"]),
        keras.layers.LSTM(g["hidden"], return_sequences=True),
        keras.layers.Dense(g["vocab"]),
    ])
    r = np.random.default_rng(7)
    x = r.integers(0, g["vocab"], (g["batch"], g["steps"]))
    y = r.integers(0, g["vocab"], (g["batch"], g["steps"]))
    t0 = time.perf_counter()
    logits = model(x)
    TIMES["guide_forward"] = round(time.perf_counter() - t0, 2)

    def losses(logits, y):
        builtin = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, logits)
        probs = ops.softmax(logits, axis=-1)  # the guide's manual version: softmax, gather, +1e-10, log, mean
        p_y = ops.take_along_axis(probs, ops.expand_dims(y, -1), axis=-1)
        manual = ops.mean(-ops.log(p_y + 1e-10))
        return xk.cross_entropy(logits, y), builtin, manual, ops.std(logits)

    ours, builtin, manual, std = compiled(losses)(logits, ops.convert_to_tensor(y))
    return {"xent": to_numpy(ours), "builtin": to_numpy(builtin), "manual": to_numpy(manual),
            "logit_std": to_numpy(std)}


@check("epsilon")
def _():
    """−log(q + 1e-10) against the exact loss on confident rows (float32 and float64)."""
    out = {}
    for dtype in ("float32", "float64"):
        q = 1e-12  # the target's probability: z = [log q, log(1 − q)]
        rows = np.array([[np.log(q), np.log1p(-q)], [0.0, 200.0]], dtype=dtype)  # q_y = 1e-12 and e^-200
        y = np.array([0, 0])

        def manual(t, y=y):
            p_y = ops.take_along_axis(ops.softmax(t, axis=-1), ops.expand_dims(y, -1), axis=-1)[:, 0]
            return -ops.log(p_y + 1e-10)

        jit = BACKEND == "jax"
        out[f"{dtype}/manual"] = to_numpy(compiled(manual)(rows))
        per_token = compiled(lambda t, y=y: xk.cross_entropy(t, y, reduction="none"))
        out[f"{dtype}/xent"] = to_numpy(per_token(rows))
        _, (grad_manual,) = value_and_grads(lambda t: ops.sum(manual(t)), [rows], jit)
        _, (grad_xent,) = value_and_grads(lambda t, y=y: xk.cross_entropy(t, y, reduction="sum"), [rows], jit)
        out[f"{dtype}/grad_manual"], out[f"{dtype}/grad_xent"] = grad_manual, grad_xent
    return out


@check("fit")
def _():
    """One SGD step of Model.fit: the fused LMHead against Dense logits + xent.keras.CrossEntropy."""
    vocab, dim, b, t = 37, 8, 4, 9
    r = np.random.default_rng(3)
    ids = r.integers(0, vocab, (b, t)).astype("int32")
    labels = ids.copy()
    labels[0, :3] = IGNORE  # a prompt that is not scored
    keras.utils.set_random_seed(1)

    def trunk():
        tokens = keras.Input((t,), dtype="int32")
        emb = keras.layers.Embedding(vocab, dim)
        hidden = keras.layers.Dense(dim, activation="tanh")(emb(tokens))
        return tokens, emb, hidden

    tokens, _, hidden = trunk()
    lab = keras.Input((t,), dtype="int32")
    fused = keras.Model([tokens, lab], xk.LMHead(vocab, shift=True, z_loss=1e-3)(hidden, lab))
    tokens2, _, hidden2 = trunk()
    plain = keras.Model(tokens2, keras.layers.Dense(vocab, use_bias=False)(hidden2))
    plain.set_weights(fused.get_weights())
    fused.compile(optimizer=keras.optimizers.SGD(0.5))
    plain.compile(optimizer=keras.optimizers.SGD(0.5), loss=xk.CrossEntropy(shift=True, z_loss=1e-3))
    before = to_numpy(xk.causal_lm_loss(plain(ids), labels, z_loss=1e-3))
    loss_fused = fused.train_on_batch([ids, labels])
    loss_plain = plain.train_on_batch(ids, labels)
    out = {"before": before, "loss_fused": np.asarray(loss_fused), "loss_plain": np.asarray(loss_plain)}
    for i, (a, c) in enumerate(zip(fused.get_weights(), plain.get_weights())):
        out[f"w{i}/fused"], out[f"w{i}/plain"] = a, c
    # tied: the embedding is the head; fit lowers the loss and the embedding is one trainable weight
    tokens3 = keras.Input((t,), dtype="int32")
    lab3 = keras.Input((t,), dtype="int32")
    emb3 = keras.layers.Embedding(vocab, dim)
    h3 = keras.layers.Dense(dim, activation="tanh")(emb3(tokens3))
    tied = keras.Model([tokens3, lab3], xk.LMHead(tied_embedding=emb3, shift=True)(h3, lab3))
    tied.compile(optimizer=keras.optimizers.Adam(0.05))
    hist = tied.fit([ids, labels], epochs=8, batch_size=b, verbose=0)
    out["tied/losses"] = np.array(hist.history["loss"])
    out["tied/num_trainable"] = np.array(len(tied.trainable_weights))
    head = xk.LMHead(tied_embedding=emb3)
    hid = r.standard_normal((2, 3, dim)).astype("float32")
    out["tied/logits"] = to_numpy(head(hid))
    out["tied/expected_logits"] = hid @ to_numpy(emb3.embeddings).T
    return out


@check("errors")
def _():
    """Bad ids raise eagerly; under tracing (jit / tf.function) the loss is NaN, never a clamped id."""
    x = np.zeros((2, 3, 5), "float32")
    bad = np.array([[0, 1, 7], [2, IGNORE, 0]])
    messages = []
    for call in (lambda: xk.cross_entropy(x, bad), lambda: xk.linear_cross_entropy(
            np.zeros((2, 3, 4), "float32"), np.zeros((4, 5), "float32"), bad),
            lambda: xk.cross_entropy(x, np.zeros((2, 3)), num_items=0),
            lambda: xk.binary_cross_entropy(np.zeros((2, 2)), np.full((2, 2), 2.0))):
        try:
            call()
            messages.append("no error")
        except ValueError as err:
            messages.append(str(err))
    if BACKEND == "jax":
        traced = jax.jit(lambda a, y: xk.cross_entropy(a, y))(x, bad)
        traced_fused = jax.jit(lambda h, w, y: xk.linear_cross_entropy(h, w, y))(
            np.zeros((2, 3, 4), "float32"), np.zeros((4, 5), "float32"), bad)
    else:
        traced = tf.function(lambda a, y: xk.cross_entropy(a, y))(tf.constant(x), tf.constant(bad))
        traced_fused = tf.function(lambda h, w, y: xk.linear_cross_entropy(h, w, y))(
            tf.zeros((2, 3, 4)), tf.zeros((4, 5)), tf.constant(bad))
    return {"messages": np.array(messages), "traced": to_numpy(traced),
            "traced_fused": to_numpy(traced_fused)}


@check("edges")
def _():
    """Values eager code refuses in one line (a negative num_items, logits given as probabilities, a
    non-bool flag) are NaN when traced, never a plausible number."""
    h, w = rng.standard_normal((2, 3, 4)).astype("float32"), rng.standard_normal((4, 5)).astype("float32")
    x, y = rng.standard_normal((2, 3, 5)).astype("float32"), rng.integers(0, 5, (2, 3))
    probs_target = np.array([1.0, 0.0, 1.0], "float32")
    out = {}
    jit = jax.jit if BACKEND == "jax" else tf.function
    fused = jit(lambda h, w, n: xk.linear_cross_entropy(h, w, y, num_items=n))
    plain = jit(lambda x, n: xk.cross_entropy(x, y, num_items=n))
    for tag, n in (("minus_one", -1.0), ("inf", np.inf), ("nan", np.nan), ("six", 6.0)):
        out[f"fused/{tag}"] = to_numpy(fused(h, w, np.float32(n)))
        out[f"plain/{tag}"] = to_numpy(plain(x, np.float32(n)))
    out["fused/eager_six"] = to_numpy(xk.linear_cross_entropy(h, w, y, num_items=6))
    out["probs_traced"] = to_numpy(jit(lambda t: xk.binary_cross_entropy(t, probs_target))(
        np.array([2.0, -1.0, 0.5], "float32")))
    calls = {
        "fused_negative": lambda: xk.linear_cross_entropy(h, w, y, num_items=-1),
        "plain_negative": lambda: xk.cross_entropy(x, y, num_items=-1),
        "logits_as_probs": lambda: xk.binary_cross_entropy(np.array([2.0, -1.0, 0.5], "float32"),
                                                           probs_target),
        "pos_weight_probs": lambda: xk.binary_cross_entropy(np.full(3, 0.5, "float32"), probs_target,
                                                            pos_weight=np.ones(3, "float32")),
        "from_logits_str": lambda: xk.BinaryCrossEntropy(from_logits="yes"),
        "shift_int": lambda: xk.CrossEntropy(shift=1),
        "fused_shift_str": lambda: xk.linear_cross_entropy(h, w, y, shift="yes"),
        "transpose_int": lambda: xk.linear_cross_entropy(h, w, y, transpose_kernel=0),
        "detach_str": lambda: xk.focal_loss(x, y, detach_factor="no"),
        "head_use_bias": lambda: xk.LMHead(5, use_bias=1),
    }
    for tag, call in calls.items():
        try:
            call()
            out[f"message/{tag}"] = "no error"
        except Exception as err:  # noqa: BLE001 - the type and text are what is checked
            out[f"message/{tag}"] = f"{type(err).__name__}: {err}"
    return out


def main():
    run_cases()
    np.savez(sys.argv[1], **OUT)
    print(json.dumps({"backend": BACKEND, "keras": keras.__version__, "errors": ERRORS,
                      "import_s": round(IMPORT_S, 1), "times": TIMES,
                      "total_s": round(time.perf_counter() - START, 1),
                      "cpu_s": round(time.process_time(), 1)}))


if __name__ == "__main__":
    main()
