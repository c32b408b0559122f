"""The parity cases shared by the Keras subprocess (keras_checks.py) and the pytest side (test_keras.py).

Pure numpy: each case is a function name of xent (the same name exists in xent and xent.keras), its
options, and inputs made deterministically from a seed, so both processes build the same numbers.
"""

from __future__ import annotations

import numpy as np

IGNORE = -100
V = 11  # vocabulary of the small cases


def _logits(rng, shape, scale=2.0, offset=0.0):
    return rng.standard_normal(shape) * scale + offset


def _ids(rng, shape, num_classes=V, ignored=0.25):
    y = rng.integers(0, num_classes, shape)
    y[rng.random(shape) < ignored] = IGNORE
    return y


def make_inputs(name: str) -> dict:
    """float64 / int64 numpy inputs of a case; the 'x_*' keys are differentiated."""
    spec = CASES[name]
    rng = np.random.default_rng(_seed(name))
    kind = spec.get("kind", "token")
    if kind == "token":
        shape = spec.get("shape", (3, 5))
        inputs = {"x_logits": _logits(rng, shape + (V,), offset=spec.get("offset", 0.0)),
                  "target": _ids(rng, shape, ignored=spec.get("ignored", 0.25))}
        if spec.get("all_ignored"):
            inputs["target"][...] = IGNORE
        if spec.get("class_weight"):
            inputs["weight"] = rng.random(V) * 2 + 0.1
        causal = spec["fn"] == "causal_lm_loss"
        inputs["upstream"] = rng.standard_normal(shape[:-1] + (shape[-1] - 1,) if causal else shape)
        return inputs
    if kind == "binary":
        shape = (4, 6)
        y = rng.random(shape)
        y[rng.random(shape) < 0.2] = IGNORE
        x = rng.uniform(0.02, 0.98, shape) if spec.get("probabilities") else _logits(rng, shape, scale=3.0)
        inputs = {"x_logits": x, "target": y, "upstream": rng.standard_normal(shape)}
        if spec.get("weights"):
            inputs["weight"] = rng.random(shape) + 0.5
            if not spec.get("probabilities"):  # torch's probability function has no pos_weight
                inputs["pos_weight"] = rng.random(shape[-1:]) * 3 + 0.2
        return inputs
    if kind == "linear":
        b, t, d, v = 3, 7, 8, 13
        inputs = {"x_hidden": rng.standard_normal((b, t, d)), "x_kernel": rng.standard_normal((d, v)) * 0.7,
                  "target": _ids(rng, (b, t), num_classes=v)}
        if spec.get("bias"):
            inputs["x_bias"] = rng.standard_normal(v)
        return inputs
    raise ValueError(kind)


def _seed(name: str) -> int:
    return sum((i + 1) * ord(c) for i, c in enumerate(name)) % 2**31


# name -> spec. fn: the function in xent / xent.keras; options: keyword arguments for both.
CASES = {
    "ce_mean": {"fn": "cross_entropy", "options": {}},
    "ce_sum": {"fn": "cross_entropy", "options": {"reduction": "sum"}},
    "ce_none": {"fn": "cross_entropy", "options": {"reduction": "none"}},
    "ce_class_weight": {"fn": "cross_entropy", "options": {}, "class_weight": True},
    "ce_smoothing": {"fn": "cross_entropy", "options": {"label_smoothing": 0.1}},
    "ce_weight_smoothing_zloss": {"fn": "cross_entropy", "class_weight": True,
                                  "options": {"label_smoothing": 0.2, "z_loss": 1e-2}},
    "ce_zloss_none": {"fn": "cross_entropy", "options": {"z_loss": 1e-2, "reduction": "none"}},
    "ce_softcap_zloss": {"fn": "cross_entropy", "options": {"softcap": 2.5, "z_loss": 1e-3}},
    "ce_num_items": {"fn": "cross_entropy", "options": {"num_items": 40}},
    "ce_all_ignored": {"fn": "cross_entropy", "options": {}, "all_ignored": True},
    "ce_all_ignored_num_items_0": {"fn": "cross_entropy", "options": {"num_items": 0}, "all_ignored": True},
    "ce_large_logits": {"fn": "cross_entropy", "options": {"label_smoothing": 0.1}, "offset": 1e4},
    "causal": {"fn": "causal_lm_loss", "shape": (3, 6), "options": {"z_loss": 1e-3}},
    "causal_none": {"fn": "causal_lm_loss", "shape": (3, 6), "options": {"reduction": "none",
                                                                        "label_smoothing": 0.1}},
    "tailr": {"fn": "tailr_loss", "options": {"gamma": 0.1, "threshold": 0.3, "label_smoothing": 0.1}},
    "tailr_lm": {"fn": "tailr_loss", "options": {"gamma": 1e-7, "threshold": 0.2, "softcap": 3.0}},
    "gold": {"fn": "gold_loss", "options": {"threshold": 0.1}},
    "dft": {"fn": "gold_loss", "options": {"reduction": "sum"}},
    "focal": {"fn": "focal_loss", "options": {"gamma": 2.0, "alpha": 0.5}},
    "focal_detach_half": {"fn": "focal_loss", "options": {"gamma": 0.5, "detach_factor": True}},
    "poly": {"fn": "poly_loss", "options": {"epsilon": 1.0, "num_items": 30}},
    "poly_none": {"fn": "poly_loss", "options": {"epsilon": -0.5, "reduction": "none"}},
    "bce": {"fn": "binary_cross_entropy_with_logits", "kind": "binary", "options": {}},
    "bce_weights_smoothing": {"fn": "binary_cross_entropy_with_logits", "kind": "binary", "weights": True,
                              "options": {"label_smoothing": 0.1}},
    "bce_none_num_items": {"fn": "binary_cross_entropy_with_logits", "kind": "binary", "weights": True,
                           "options": {"num_items": 7}},
    "bce_none": {"fn": "binary_cross_entropy_with_logits", "kind": "binary",
                 "options": {"reduction": "none"}},
    # probabilities (in (0.02, 0.98): where torch's gradient formula and the derivative of its clamped logs
    # agree), as torch's binary_cross_entropy
    "bce_probs": {"fn": "binary_cross_entropy", "kind": "binary", "probabilities": True, "weights": True,
                  "options": {"label_smoothing": 0.1}},
    "bce_probs_none": {"fn": "binary_cross_entropy", "kind": "binary", "probabilities": True,
                       "options": {"reduction": "none"}},
    "linear": {"fn": "linear_cross_entropy", "kind": "linear", "bias": True,
               "options": {"shift": True, "chunk_size": 5}},
    "linear_options": {"fn": "linear_cross_entropy", "kind": "linear",
                       "options": {"chunk_size": 4, "label_smoothing": 0.1, "z_loss": 1e-2, "softcap": 3.0}},
    "linear_tied_sum": {"fn": "linear_cross_entropy", "kind": "linear", "bias": True, "tied": True,
                        "options": {"reduction": "sum", "shift": True}},
    "linear_num_items": {"fn": "linear_cross_entropy", "kind": "linear",
                         "options": {"num_items": 50, "chunk_size": 16}},
}

#: The guide's LSTM language model.
GUIDE = {"vocab": 10000, "embed": 128, "hidden": 256, "batch": 32, "steps": 50}
