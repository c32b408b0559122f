"""The fused no-grad forward (xent._triton.fused_ce_forward: projection and online log-sum-exp in one
kernel) under the interpreter harness, against float64 of the same inputs: every option, float32 exact
and in TF32, bf16 and float16, several row blocks, vocabulary tiles and D steps, none of them full."""

from __future__ import annotations

import pytest

pytest.importorskip("triton.language", reason="triton is not installed (pip install -c constraints.txt "
                                                "-e '.[test]')")
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from triton_reference import ref_loss, ref_rows  # noqa: E402

import xent  # noqa: E402
import xent._triton._fused as fused_module  # noqa: E402
from xent._triton import fused_ce_forward  # noqa: E402
from xent._triton._config import FusedConfig  # noqa: E402
from xent.losses._base import logit_stats  # noqa: E402

N, D, V = 37, 40, 300  # 3 row blocks of 16, 3 D steps of 16, 10 vocabulary tiles of 32: all ragged


@pytest.fixture(autouse=True)
def narrow(monkeypatch):
    monkeypatch.setattr(fused_module, "fused_config", lambda *a: FusedConfig(16, 32, 16, 4, 1))


def make(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g).to(dtype)
    w = (torch.randn(V, D, generator=g) * 0.5).to(dtype)
    b = (torch.randn(V, generator=g) * 0.5).to(dtype)
    w[200:210] += 0.5 * h[0].float().to(dtype)  # row 0's maximum in a late tile: the running max rescales
    y = torch.randint(0, V, (N,), generator=g)
    y[0] = 205
    cw = torch.rand(V, generator=g) * 2 + 0.1
    return h, w, b, y, cw


def tf32(x: torch.Tensor) -> torch.Tensor:
    """Rounded to TF32 (10-bit mantissa, half away from zero), written through float64 frexp."""
    m, e = torch.frexp(x.double())
    return (torch.sign(m) * torch.floor(m.abs() * 2048 + 0.5) / 2048 * 2.0**e).to(x.dtype)


OPTIONS = {
    "plain": {},
    "everything": {"cw": True, "eps": 0.1, "z_coef": 1e-3, "softcap": 6.0},
    "weights_z": {"cw": True, "z_coef": 1e-3},
}


def check(h, w, b, y, cw=None, *, eps=0.0, z_coef=0.0, softcap=None, precision=None, rtol=2e-6, atol=2e-6,
          operands=None):
    st = torch.full((N, 3), float("nan"))
    loss = fused_ce_forward(h, w, y, None if cw is None else cw[y], z_coef, st, bias=b, softcap=softcap,
                            label_smoothing=eps, class_weight=cw, input_precision=precision)
    hh, ww = operands or (h, w)
    logits = hh.double() @ ww.double().T + b.double()
    ref, _ = ref_rows(logits, y, None, weight=cw, z_coef=z_coef, softcap=softcap, eps=eps)
    torch.testing.assert_close(loss.double(), ref, rtol=rtol, atol=atol)
    capped = logits if softcap is None else softcap * torch.tanh(logits / softcap)
    ref_st = logit_stats(capped, y)
    torch.testing.assert_close(st[:, 1:].double(), ref_st[:, 1:], rtol=rtol, atol=atol)
    # correct = argmax == y; a near tie may flip under rounding, none is that close here
    assert torch.equal(st[:, 0].double(), ref_st[:, 0])
    return loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("option", list(OPTIONS))
def test_fused_forward_matches_float64(harness, dtype, option):
    """Exact products summed in float32: float32 with input_precision="ieee", and bf16/fp16 always
    (their products are exact in float32)."""
    h, w, b, y, cw = make(dtype)
    kw = dict(OPTIONS[option])
    kw["cw"] = cw if kw.get("cw") else None
    check(h, w, b, y, precision="ieee", **kw)
    # every address the kernel may touch: h, W, bias, targets, losses, statistics (and w_y, the class
    # weights): no [N, V] buffer is passed, and the harness allows nothing else
    weights = 0 if kw["cw"] is None else N + V
    assert harness.allowed.size == h.numel() + w.numel() + V + N + N + 3 * N + weights


def test_float32_in_tf32(harness):
    """float32 dots in TF32 (a GPU's tensor cores; the harness rounds the operands as an H100 does): the
    float64 result of TF32-rounded operands to float32 accuracy, and of the exact operands to ~1e-3."""
    h, w, b, y, cw = make(torch.float32)
    kw = {"cw": cw, "eps": 0.1, "z_coef": 1e-3, "softcap": 6.0}
    loss = check(h, w, b, y, precision="tf32", operands=(tf32(h), tf32(w)), **kw)
    assert harness.tf32_dots > 0
    exact = fused_ce_forward(h, w, y, cw[y], 1e-3, bias=b, softcap=6.0, label_smoothing=0.1, class_weight=cw,
                             input_precision="ieee")
    assert (loss - exact).abs().max() > 1e-6  # TF32 visibly rounds ...
    torch.testing.assert_close(loss, exact, rtol=1e-3, atol=1e-3)  # ... within REFERENCE.md §5's 1e-3


def test_default_precision_follows_torch():
    h, w, b, y, _ = make(torch.float32)
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        exact = fused_ce_forward(h, w, y, bias=b)
        torch.set_float32_matmul_precision("high")
        fast = fused_ce_forward(h, w, y, bias=b)
    finally:
        torch.set_float32_matmul_precision(before)
    assert torch.equal(exact, fused_ce_forward(h, w, y, bias=b, input_precision="ieee"))
    assert torch.equal(fast, fused_ce_forward(h, w, y, bias=b, input_precision="tf32"))


def test_non_finite_rows_and_bad_arguments():
    h, w, b, y, _ = make(torch.float32)
    h[3, 5] = float("nan")
    h[4, 0] = float("inf")
    loss = fused_ce_forward(h, w, y, bias=b, input_precision="ieee")
    assert loss[3].isnan() and loss[4].isnan() and torch.isfinite(loss[[0, 1, 2, 5]]).all()
    with pytest.raises(ValueError, match="w must be"):
        fused_ce_forward(h, w.to(torch.bfloat16), y)
    with pytest.raises(ValueError, match="input_precision"):
        fused_ce_forward(h, w, y, input_precision="tf32x3")
    with pytest.raises(ValueError, match="target"):
        fused_ce_forward(h, w, y[:-1])


@settings(max_examples=8, deadline=None)
@given(rows=st.integers(1, 40), num_classes=st.integers(1, 200), hidden=st.integers(1, 40),
       seed=st.integers(0, 2**16))
def test_any_shape(rows, num_classes, hidden, seed):
    """Random N, V (1 included) and D against the forced 16×32×16 tiles: every address checked."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, generator=g)
    w = torch.randn(num_classes, hidden, generator=g) * 0.5
    y = torch.randint(0, num_classes, (rows,), generator=g)
    loss = fused_ce_forward(h, w, y, input_precision="ieee")
    ref, _ = ref_rows(h.double() @ w.double().T, y, None)
    torch.testing.assert_close(loss.double(), ref, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize(("option", "dtype", "reduction"), [
    ("everything", torch.float32, "mean"), ("everything", torch.float32, "sum"),
    ("everything", torch.float32, "none"), ("plain", torch.float32, "mean"),
    ("everything", torch.bfloat16, "none")], ids=str)
def test_engine_without_gradient_runs_the_fused_forward(harness, monkeypatch, option, dtype, reduction):
    """xent.linear_cross_entropy(..., backend="triton") without gradient (under no_grad, and on inputs that
    do not require it) is one launch of the fused forward for the whole call: the chunk loop's projection
    and [C, V] buffer are never used (here they raise), and the kernel touches no tensor of C x V.
    Against float64 of the same inputs (bf16 products are exact and summed in float32)."""
    import xent._engine._loop as loop_module

    def no_logits(*args, **kwargs):
        raise AssertionError("the engine formed a [C, V] chunk of logits")

    monkeypatch.setattr(loop_module, "project", no_logits)
    monkeypatch.setattr(loop_module, "chunk_buffer", no_logits)
    h, w, b, y, cw = make(dtype)
    y = y.clone()
    y[[2, 11, 30]] = -100
    every = option == "everything"
    tw = torch.rand(N, generator=torch.Generator().manual_seed(3)) + 0.5 if every else None
    kw = dict(weight=cw, label_smoothing=0.1, z_loss=1e-3, softcap=6.0) if every else {}
    with torch.no_grad():
        got = xent.linear_cross_entropy(h, w, y, linear_bias=b, reduction=reduction, token_weights=tw,
                                        chunk_size=8, backend="triton", **kw)
    assert harness.launches == 1
    n = int((y != -100).sum())
    # the kernel's tensors: h's valid rows, W, bias, targets, losses (and w_y, class weights): nothing of
    # [8, V], whose 8·V elements would exceed the slack of the options not used here
    assert harness.allowed.size <= n * D + V * D + 2 * V + 6 * n < n * D + V * D + 8 * V
    again = xent.linear_cross_entropy(h, w, y, linear_bias=b, reduction=reduction, token_weights=tw,
                                      chunk_size=8, backend="triton", **kw)  # no requires_grad: the same
    assert harness.launches == 2 and torch.equal(again, got)
    kw64 = dict(cw=cw.double(), eps=0.1, z=1e-3, cap=6.0, tw=tw) if every else {}
    ref = ref_loss(h.double() @ w.double().T + b.double(), y, reduction=reduction, **kw64)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)


def test_engine_statistics_without_gradient(harness, monkeypatch):
    """return_stats through the fused forward: the same statistics as the torch backend's chunk loop."""
    h, w, b, y, cw = make(torch.float32)
    kw = dict(linear_bias=b, weight=cw, z_loss=1e-3, softcap=5.0, chunk_size=8, return_stats=True)
    with torch.no_grad():
        got = xent.linear_cross_entropy(h, w, y, backend="triton", **kw)
        ref = xent.linear_cross_entropy(h, w, y, backend="torch", **kw)
    assert harness.launches == 1
    torch.testing.assert_close(got[0], ref[0], rtol=1e-6, atol=1e-6)
    for name in ("count", "correct", "entropy", "lse", "loss"):
        if hasattr(ref[1], name):
            torch.testing.assert_close(getattr(got[1], name), getattr(ref[1], name), rtol=1e-5, atol=1e-6)
