"""xent.keras under the JAX and TensorFlow backends, against xent's PyTorch functions and Keras' own losses.

Each backend runs once in a subprocess (keras_checks.py, KERAS_BACKEND set before Keras is imported) that
computes every case and writes its arrays; the assertions are here, case by case, with the PyTorch
references computed in this process on the same inputs (keras_cases.py builds them in both).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from keras_cases import CASES, GUIDE, IGNORE, make_inputs

import xent

HERE = Path(__file__).resolve().parent
SRC = HERE.parents[1] / "src"


def _have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not _have("keras"), reason="Keras 3 is not installed (pip install 'xent[keras]')"),
]
BACKENDS = [
    pytest.param("jax", marks=pytest.mark.skipif(not _have("jax"), reason="JAX is not installed")),
    pytest.param("tensorflow", marks=pytest.mark.skipif(not _have("tensorflow"),
                                                        reason="TensorFlow is not installed")),
]


@functools.cache
def _run(backend: str):
    out = Path(tempfile.mkdtemp(prefix=f"xent-keras-{backend}-")) / "results.npz"
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    if backend == "jax":
        env["JAX_ENABLE_X64"] = "1"  # float64 parity; float32 cases use explicit float32 arrays
    proc = subprocess.run([sys.executable, str(HERE / "keras_checks.py"), str(out)], env=env,
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"keras_checks.py ({backend}) failed:\n{proc.stderr[-4000:]}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    with np.load(out) as data:
        arrays = {k: data[k] for k in data.files}
    return summary, arrays


def results(backend: str, key: str):
    """The arrays under key/ and the error text of that key, if the subprocess recorded one."""
    summary, arrays = _run(backend)
    for name, text in summary["errors"].items():
        if key == name or key.startswith(name + "/"):
            pytest.fail(f"{key} raised under {backend}:\n{text}")
    prefix = key + "/"
    found = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
    assert found, f"no results for {key} under {backend}"
    return found


# ---------- parity with xent's PyTorch functions ----------

def _torch_reference(name: str, dtype: str):
    """The PyTorch loss and gradients on the same inputs (rounded to dtype first), in float64."""
    spec, inputs = CASES[name], make_inputs(name)
    rounded = {k: v.astype(dtype).astype(np.float64) if v.dtype.kind == "f" else v for k, v in inputs.items()}
    options = dict(spec["options"])
    if spec.get("kind") == "linear":
        h = torch.tensor(rounded["x_hidden"], requires_grad=True)
        w = torch.tensor(rounded["x_kernel"].T.copy(), requires_grad=True)  # xent's weight is [V, D]
        leaves = {"hidden": h, "kernel": w}
        if "x_bias" in rounded:
            leaves["bias"] = torch.tensor(rounded["x_bias"], requires_grad=True)
        loss = xent.linear_cross_entropy(h, w, torch.tensor(inputs["target"]), bias=leaves.get("bias"),
                                         **options)
        loss.backward()
        grads = {f"grad_{k}": t.grad.numpy() for k, t in leaves.items()}
        grads["grad_kernel"] = grads["grad_kernel"].T
        return loss.detach().numpy(), grads
    x = torch.tensor(rounded["x_logits"], requires_grad=True)
    if spec.get("kind") == "binary":
        target = torch.tensor(rounded["target"])
        for k in ("weight", "pos_weight"):
            if k in rounded:
                options[k] = torch.tensor(rounded[k])
    else:
        target = torch.tensor(inputs["target"])
        if "weight" in rounded:
            options["weight"] = torch.tensor(rounded["weight"])
    if spec["fn"] == "causal_lm_loss" and "num_items" in options:
        options["num_items_in_batch"] = options.pop("num_items")
    loss = getattr(xent, spec["fn"])(x, target, **options)
    upstream = torch.tensor(rounded["upstream"]) if options.get("reduction") == "none" else torch.ones(())
    (grad,) = torch.autograd.grad(loss, x, grad_outputs=upstream)
    return loss.detach().numpy(), {"grad_logits": grad.numpy()}


def _tolerance(name: str, dtype: str):
    if dtype == "float64":
        return {"rtol": 1e-10, "atol": 1e-12}
    # float32 softmax of the same rounded inputs; at logits around 1e4 the form (m − z_y) + log Σ e^(z−m)
    # keeps the loss within a few float32 ulps of its size, not of the logits'
    return {"rtol": 2e-5, "atol": 3e-6}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_values_and_gradients_equal_xent_pytorch(backend, name, dtype):
    got = results(backend, f"{name}/{dtype}")
    value, grads = _torch_reference(name, dtype)
    tol = _tolerance(name, dtype)
    np.testing.assert_allclose(got["value"], value, **tol, err_msg=f"{name} value")
    assert set(grads) <= set(got), f"{name}: gradients {sorted(got)} lack {sorted(grads)}"
    for k, g in grads.items():
        np.testing.assert_allclose(got[k], g, **tol, err_msg=f"{name} {k}")
    if CASES[name].get("all_ignored"):  # every target ignored: 0 with a zero gradient, never NaN
        assert float(got["value"]) == 0.0 and not np.any(got["grad_logits"])


# ---------- Keras' own losses, where the semantics coincide and where they do not ----------

@pytest.mark.parametrize("backend", BACKENDS)
def test_equals_sparse_categorical_crossentropy_without_padding(backend):
    r = results(backend, "keras_sce_no_padding")
    np.testing.assert_allclose(r["ours"], r["keras"], rtol=1e-6)
    np.testing.assert_allclose(r["class"], r["keras"], rtol=1e-6)
    np.testing.assert_allclose(r["grad_ours"], r["grad_keras"], rtol=1e-5, atol=1e-8)
    ref = F.cross_entropy(torch.tensor(r["logits"], dtype=torch.float64).reshape(-1, 9),
                          torch.tensor(r["target"]).reshape(-1))
    np.testing.assert_allclose(r["ours"], ref.item(), rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_keras_default_divides_by_padded_positions(backend):
    """keras-hub's causal-LM loss: SparseCategoricalCrossentropy with the padding mask as sample_weight
    and the default "sum_over_batch_size" divides by every position (Keras issue 19740); xent divides
    by the real tokens, as Keras does with ignore_class or "mean_with_sample_weight"."""
    r = results(backend, "keras_sce_padding")
    logits, target = torch.tensor(r["logits"], dtype=torch.float64), torch.tensor(r["target"])
    valid = target != IGNORE
    exact = F.cross_entropy(logits[valid], target[valid]).item()  # mean over the real tokens
    np.testing.assert_allclose(r["xent"], exact, rtol=1e-6)
    np.testing.assert_allclose(r["xent_class_sample_weight"], exact, rtol=1e-6)
    np.testing.assert_allclose(r["keras_ignore_class"], exact, rtol=1e-6)
    np.testing.assert_allclose(r["keras_mean_with_sample_weight"], exact, rtol=1e-6)
    diluted = exact * valid.sum().item() / valid.numel()  # Σ over real tokens / every position
    np.testing.assert_allclose(r["keras_sample_weight"], diluted, rtol=1e-6)
    assert r["keras_sample_weight"] < 0.8 * r["xent"]  # 17 real tokens of 24: 29 % too small


@pytest.mark.parametrize("backend", BACKENDS)
def test_binary_cross_entropy_equals_keras_and_torch(backend):
    r = results(backend, "keras_bce")
    x = torch.tensor(r["logits"], dtype=torch.float64)
    targets = {"hard": (r["target"], 0.0, None), "soft_smooth": (r["soft"], 0.1, None),
               "sample_weight": (r["target"], 0.05, r["sample_weight"])}
    for tag, (y, eps, sw) in targets.items():
        np.testing.assert_allclose(r[f"{tag}/ours"], r[f"{tag}/keras"], rtol=2e-6, err_msg=tag)
        np.testing.assert_allclose(r[f"{tag}/grad_ours"], r[f"{tag}/grad_keras"], rtol=1e-5, atol=1e-8,
                                   err_msg=tag)
        weight = None if sw is None else torch.tensor(sw, dtype=torch.float64)[:, None].expand_as(x)
        ref = xent.binary_cross_entropy_with_logits(x, torch.tensor(y, dtype=torch.float64), weight,
                                                    label_smoothing=eps)
        np.testing.assert_allclose(r[f"{tag}/ours"], ref.item(), rtol=2e-6, err_msg=tag)
    # probabilities, Keras' default: equal inside Keras' clip, and to torch's binary_cross_entropy
    np.testing.assert_allclose(r["probs/ours"], r["probs/keras"], rtol=2e-6)
    np.testing.assert_allclose(r["probs/grad_ours"], r["probs/grad_keras"], rtol=1e-5, atol=1e-8)
    p = torch.tensor(r["probs"], dtype=torch.float64)
    y = torch.tensor(r["target"], dtype=torch.float64) * 0.95 + 0.025
    sw = torch.tensor(r["sample_weight"], dtype=torch.float64)[:, None].expand_as(p)
    np.testing.assert_allclose(r["probs/ours"], F.binary_cross_entropy(p, y, sw).item(), rtol=2e-6)
    # p = 0 or 1 against the wrong label: torch's clamp of the log at −100, with no NaN gradient; Keras
    # clips p at 1e-7 (about 16 nats)
    edge = F.binary_cross_entropy(torch.tensor([0.0, 1.0, 0.5]), torch.tensor([1.0, 0.0, 1.0]),
                                  reduction="none")
    np.testing.assert_allclose(r["edge/ours"], edge.numpy(), rtol=1e-6)
    assert np.all((15.5 < r["edge/keras"][:2]) & (r["edge/keras"][:2] < 16.2)), r["edge/keras"]
    assert np.all(np.isfinite(r["edge/grad_ours"]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_edges_traced_give_nan_and_eager_raise_one_line(backend):
    r = results(backend, "edges")
    for path in ("fused", "plain"):
        for tag in ("minus_one", "inf", "nan"):
            assert np.isnan(r[f"{path}/{tag}"]), (path, tag, r[f"{path}/{tag}"])
        assert np.isfinite(r[f"{path}/six"])
    np.testing.assert_allclose(r["fused/six"], r["fused/eager_six"], rtol=1e-6)
    assert np.isnan(r["probs_traced"])  # logits given to the probability function, traced
    messages = {k[len("message/"):]: str(v) for k, v in r.items() if k.startswith("message/")}
    expected = {
        "fused_negative": "ValueError: num_items must be a finite number >= 0, got -1.0",
        "plain_negative": "ValueError: num_items must be a finite number >= 0, got -1.0",
        "logits_as_probs": "ValueError: input must hold probabilities in [0, 1] (from_logits=True for "
                           "logits); 2 valid element(s) are not, the first is 2.0",
        "pos_weight_probs": "ValueError: pos_weight needs from_logits=True",
        "from_logits_str": "TypeError: from_logits must be True or False, got 'yes' of type str",
        "shift_int": "TypeError: shift must be True or False, got 1 of type int",
        "fused_shift_str": "TypeError: shift must be True or False, got 'yes' of type str",
        "transpose_int": "TypeError: transpose_kernel must be True or False, got 0 of type int",
        "detach_str": "TypeError: detach_factor must be True or False, got 'no' of type str",
        "head_use_bias": "TypeError: use_bias must be True or False, got 1 of type int",
    }
    assert set(messages) == set(expected)
    for tag, start in expected.items():
        assert messages[tag].startswith(start) and "\n" not in messages[tag], (tag, messages[tag])


@pytest.mark.parametrize("backend", BACKENDS)
def test_sample_weight_is_a_per_token_weight(backend):
    """REFERENCE.md §1: ℓ_t·w_t, "mean" divides by Σ_valid w_t·w_y; the z-loss averages over the valid
    tokens (weighted by w_t), never over Σ w_y."""
    r = results(backend, "sample_weight")
    x, y = torch.tensor(r["logits"]), torch.tensor(r["target"])
    sw, cw = torch.tensor(r["sw"]), torch.tensor(r["cw"])
    valid = y != IGNORE
    ce = xent.cross_entropy(x, y, weight=cw, reduction="none")  # w_y·nll, 0 where ignored
    lse_sq = torch.logsumexp(x, -1).square()
    w_y = cw[y.clamp(min=0)]
    s = torch.where(valid, sw, 0.0)
    expected = (s * ce).sum() / (s * w_y).sum() + 0.05 * (s * lse_sq).sum() / s.sum()
    np.testing.assert_allclose(r["value"], expected.item(), rtol=1e-10)
    s_row = torch.where(valid, sw[:, :1].expand_as(sw), 0.0)
    plain = xent.cross_entropy(x, y, reduction="none")
    np.testing.assert_allclose(r["per_row"], ((s_row * plain).sum() / s_row.sum()).item(), rtol=1e-10)
    np.testing.assert_allclose(r["tailr_class_shift"], r["tailr_fn_shift"], rtol=1e-12)
    ref = xent.tailr_loss(x[:, :-1], y[:, 1:], gamma=0.1, threshold=0.2, num_items=11)
    np.testing.assert_allclose(r["tailr_class_shift"], ref.item(), rtol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_logits_softmax_in_float32(backend):
    r = results(backend, "mixed_precision")
    assert bool(r["dtype_is_float32"])
    np.testing.assert_allclose(r["bf16"], r["f32_of_rounded"], rtol=1e-6)
    ref = xent.cross_entropy(torch.tensor(r["rounded"], dtype=torch.float64), torch.tensor(r["target"]),
                             z_loss=1e-3)
    np.testing.assert_allclose(r["bf16"], ref.item(), rtol=1e-6)


# ---------- the guide's example ----------

LN_V = math.log(GUIDE["vocab"])  # 9.2103


@pytest.mark.parametrize("backend", BACKENDS)
def test_guide_lstm_language_model_at_initialisation_keras(backend):
    r = results(backend, "guide")
    assert abs(float(r["xent"]) - LN_V) < 0.01, (float(r["xent"]), float(r["logit_std"]))
    np.testing.assert_allclose(r["builtin"], r["xent"], rtol=1e-6)
    # the +1e-10 changes nothing at q_y ≈ 1e-4: its effect is 1e-10 / 1e-4 = 1e-6 relative
    np.testing.assert_allclose(r["manual"], r["xent"], rtol=2e-6)


def test_guide_lstm_language_model_at_initialisation_pytorch(one_thread):
    g = GUIDE
    torch.manual_seed(0)
    embed = torch.nn.Embedding(g["vocab"], g["embed"])
    lstm = torch.nn.LSTM(g["embed"], g["hidden"], batch_first=True)
    head = torch.nn.Linear(g["hidden"], g["vocab"])
    r = np.random.default_rng(7)
    x = torch.tensor(r.integers(0, g["vocab"], (g["batch"], g["steps"])))
    y = torch.tensor(r.integers(0, g["vocab"], (g["batch"], g["steps"])))
    with torch.no_grad():
        logits = head(lstm(embed(x))[0])  # [32, 50, 10000]
        ours = xent.cross_entropy(logits, y).item()
        builtin = F.cross_entropy(logits.reshape(-1, g["vocab"]), y.reshape(-1)).item()
        p_y = torch.softmax(logits, dim=-1).gather(-1, y.unsqueeze(-1))  # the guide's manual version
        manual = torch.mean(-torch.log(p_y + 1e-10)).item()
    assert abs(ours - LN_V) < 0.02, ours
    assert abs(builtin - ours) < 1e-5
    assert abs(manual - ours) < 2e-5


def _epsilon_expectations():
    q = 1e-12
    return {"manual": [-math.log(q + 1e-10), -math.log(1e-10)], "exact": [-math.log(q), 200.0]}


@pytest.mark.parametrize("backend", BACKENDS)
def test_epsilon_in_the_log_caps_the_loss_on_confident_rows(backend):
    """Row 1: q_y = 1e-12, −log(q + 1e-10) = 23.02 instead of 27.63; row 2: q_y = e^-200 (0 in float32),
    the manual loss is stuck at 23.03 with no gradient, the exact one is 200 with gradient q − onehot."""
    r = results(backend, "epsilon")
    want = _epsilon_expectations()
    for dtype in ("float32", "float64"):
        np.testing.assert_allclose(r[f"{dtype}/xent"], want["exact"], rtol=2e-6)
        np.testing.assert_allclose(r[f"{dtype}/manual"], want["manual"], rtol=2e-6)
        np.testing.assert_allclose(r[f"{dtype}/grad_xent"][1], [-1.0, 1.0], atol=1e-6)
        assert np.all(np.abs(r[f"{dtype}/grad_manual"][1]) < 1e-30)  # the epsilon kills the gradient
    assert abs(float(r["float64/manual"][0]) - float(r["float64/xent"][0]) + 4.615) < 1e-3


def test_epsilon_in_the_log_pytorch():
    want = _epsilon_expectations()
    q = 1e-12
    for dtype in (torch.float32, torch.float64):
        rows = torch.tensor([[math.log(q), math.log1p(-q)], [0.0, 200.0]], dtype=dtype)
        y = torch.tensor([0, 0])
        manual = -torch.log(torch.softmax(rows, -1).gather(-1, y[:, None])[:, 0] + 1e-10)
        np.testing.assert_allclose(manual.double().numpy(), want["manual"], rtol=2e-6)
        exact = xent.cross_entropy(rows, y, reduction="none")
        np.testing.assert_allclose(exact.double().numpy(), want["exact"], rtol=2e-6)


# ---------- Model.fit with the fused head ----------

@pytest.mark.parametrize("backend", BACKENDS)
def test_fit_with_fused_head_equals_dense_logits_plus_loss(backend):
    r = results(backend, "fit")
    np.testing.assert_allclose(r["loss_fused"], r["before"], rtol=1e-5)
    np.testing.assert_allclose(r["loss_plain"], r["before"], rtol=1e-5)
    n = len([k for k in r if k.endswith("/fused") and k.startswith("w")])
    assert n == 4  # embedding, dense kernel and bias, head kernel
    for i in range(n):
        np.testing.assert_allclose(r[f"w{i}/fused"], r[f"w{i}/plain"], rtol=1e-5, atol=1e-6, err_msg=f"w{i}")
    losses = r["tied/losses"]
    assert losses[-1] < losses[0] - 0.5, losses
    assert int(r["tied/num_trainable"]) == 3  # the tied embedding counts once
    np.testing.assert_allclose(r["tied/logits"], r["tied/expected_logits"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_ids_raise_eagerly_and_give_nan_when_traced(backend):
    r = results(backend, "errors")
    messages = [str(m) for m in r["messages"]]
    assert "1 id(s) outside [0, 5) that are not ignore_index=-100; the first is 7" in messages[0]
    assert "outside [0, 5)" in messages[1]
    assert "num_items is 0 but 6 target(s) are valid" in messages[2]
    assert "outside [0, 1]" in messages[3]
    assert np.isnan(r["traced"]) and np.isnan(r["traced_fused"])
