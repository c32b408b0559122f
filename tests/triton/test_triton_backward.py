"""The fused backward (xent._triton.fused_ce_backward: the logits recomputed tile by tile, two kernels
without atomics) under the interpreter harness, against float64 autograd of the same inputs: every
option, float32 exact and in TF32, bf16 and float16, several row blocks, vocabulary tiles and D steps,
none of them full. The interpreter runs programs one after another, so what it shows of a GPU run holds
because no program writes what another reads or writes (each owns its rows of dH, its classes of dW)."""

from __future__ import annotations

import pytest

pytest.importorskip("triton.language", reason="triton is not installed (pip install -c constraints.txt "
                                                "-e '.[test]')")
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from triton_reference import ref_loss  # noqa: E402

import xent._triton._backward as backward_module  # noqa: E402
import xent._triton._fused as fused_module  # noqa: E402
from xent._triton import fused_ce_backward, fused_ce_forward  # noqa: E402
from xent._triton._config import FusedConfig  # noqa: E402

N, D, V = 37, 40, 300  # 3 row blocks of 16, 3 D steps of 16, 10 vocabulary tiles of 32: all ragged


@pytest.fixture(autouse=True)
def narrow(monkeypatch):
    monkeypatch.setattr(fused_module, "fused_config", lambda *a: FusedConfig(16, 32, 16, 4, 1))
    monkeypatch.setattr(backward_module, "backward_config", lambda *a: FusedConfig(16, 32, 16, 4, 1))


def make(dtype, seed=0, rows=N, hidden=D, classes=V):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, generator=g).to(dtype)
    w = (torch.randn(classes, hidden, generator=g) * 0.5).to(dtype)
    b = (torch.randn(classes, generator=g) * 0.5).to(dtype)
    y = torch.randint(0, classes, (rows,), generator=g)
    cw = torch.rand(classes, generator=g) * 2 + 0.1
    scale = torch.randn(rows, generator=g)  # any upstream gradient, signs mixed
    return h, w, b, y, cw, scale


def ref_grads(h, w, b, y, scale, *, cw=None, eps=0.0, z_coef=0.0, softcap=None):
    """float64 autograd of Σ scale_r·ℓ_r through torch's cross-entropy of (capped) h @ W.T + b."""
    leaves = [t.detach().double().requires_grad_() for t in (h, w, b)]
    z = leaves[0] @ leaves[1].T + leaves[2]
    x = z if softcap is None else softcap * torch.tanh(z / softcap)
    per = F.cross_entropy(x, y, weight=None if cw is None else cw.double(), label_smoothing=eps,
                          reduction="none") + z_coef * x.logsumexp(-1) ** 2
    return torch.autograd.grad((per * scale.double()).sum(), leaves), x.detach().logsumexp(-1)


OPTIONS = {
    "plain": {},
    "everything": {"cw": True, "eps": 0.1, "z_coef": 1e-3, "softcap": 6.0},
    "weights_z": {"cw": True, "z_coef": 1e-3},
}


def run(h, w, b, y, scale, *, cw=None, eps=0.0, z_coef=0.0, softcap=None, precision="ieee", lse=None,
        need=(True, True, True)):
    """The fused backward, its lse from the fused forward's statistics (as a caller chains them)."""
    if lse is None:
        stats = torch.empty(h.shape[0], 3)
        fused_ce_forward(h, w, y, None if cw is None else cw[y], z_coef, stats, bias=b, softcap=softcap,
                         label_smoothing=eps, class_weight=cw, input_precision=precision)
        lse = stats[:, 2]
    return fused_ce_backward(h, w, y, lse, scale, None if cw is None else cw[y], z_coef, bias=b,
                             softcap=softcap, label_smoothing=eps, class_weight=cw, input_precision=precision,
                             need=need)


def assert_close(got, ref, rel):
    """Each gradient within ``rel`` of its largest float64 element."""
    for name, g, r in zip(("h", "w", "bias"), got, ref):
        err = float((g.double() - r).abs().max())
        assert g.dtype == torch.float32 and err <= rel * float(r.abs().max()) + 1e-12, (name, err)


@pytest.mark.parametrize("option", list(OPTIONS))
def test_float32_exact_against_float64(harness, option):
    """Exact products summed in float32: the gradients to float32 rounding of float64's."""
    h, w, b, y, cw, scale = make(torch.float32)
    kw = dict(OPTIONS[option])
    kw["cw"] = cw if kw.get("cw") else None
    got = run(h, w, b, y, scale, **kw)
    ref, _ = ref_grads(h, w, b, y, scale, **kw)
    assert_close(got, ref, 2e-6)
    # the last launch (dW and the bias gradient) touches exactly h, W, bias, targets, lse, the three row
    # factors, the class weights and its gradients: nothing of [N, V]
    expected = h.numel() + 2 * w.numel() + 2 * V + 5 * N + (0 if kw["cw"] is None else V)
    assert harness.allowed.size == expected


@pytest.mark.parametrize(("dtype", "option"), [(torch.float32, "everything"), (torch.bfloat16, "plain"),
                                               (torch.bfloat16, "everything"), (torch.float16, "weights_z")],
                         ids=str)
def test_in_tf32_against_float64(harness, dtype, option):
    """float32 in TF32 (the harness rounds the operands as an H100 does), bf16 and float16 (products of
    their values exact, the gradient tile in TF32): within TF32's rounding of the float64 gradients of the
    same inputs, which is finer than the torch chunk loop's half gradient buffer."""
    h, w, b, y, cw, scale = make(dtype)
    kw = dict(OPTIONS[option])
    kw["cw"] = cw if kw.get("cw") else None
    got = run(h, w, b, y, scale, precision="tf32", **kw)
    ref, _ = ref_grads(h, w, b, y, scale, **kw)
    assert harness.tf32_dots > 0
    assert_close(got, ref, 2e-3 if dtype == torch.float32 else 5e-4)
    if dtype == torch.float32:  # TF32 visibly rounds: the exact dots are closer
        exact = run(h, w, b, y, scale, precision="ieee", **kw)
        assert (got[1] - exact[1]).abs().max() > 1e-6


def test_need_and_no_bias(harness):
    """Only the gradients asked for are computed (the others None, no launch for them); without a bias no
    bias gradient; the lse of the float64 reference gives the same gradients as the forward's."""
    h, w, _, y, _, scale = make(torch.float32)
    b0 = torch.zeros(V)
    ref, lse = ref_grads(h, w, b0, y, scale)
    gh, gw, gb = run(h, w, None, y, scale, lse=lse.float())
    assert gb is None
    assert_close((gh, gw), ref[:2], 2e-6)
    launches = harness.launches
    only_h = run(h, w, None, y, scale, lse=lse.float(), need=(True, False, False))
    assert only_h[1] is None and harness.launches == launches + 1
    assert torch.equal(only_h[0], gh)
    only_b = run(h, w, b0, y, scale, lse=lse.float(), need=(False, False, True))
    assert only_b[0] is None and only_b[1] is None
    torch.testing.assert_close(only_b[2].double(), ref[2], rtol=2e-6, atol=1e-7)


def test_nan_rows_and_bad_arguments():
    h, w, b, y, _, scale = make(torch.float32)
    lse = torch.zeros(N)
    lse[4] = float("nan")
    gh, gw, _ = run(h, w, b, y, scale, lse=lse)
    assert gh[4].isnan().all() and torch.isfinite(gh[[0, 1, 2, 3, 5]]).all() and gw.isnan().all()
    with pytest.raises(ValueError, match="lse"):
        fused_ce_backward(h, w, y, lse[:-1], scale)
    with pytest.raises(ValueError, match="scale"):
        fused_ce_backward(h, w, y, lse, scale[:, None])
    with pytest.raises(TypeError, match="need"):
        fused_ce_backward(h, w, y, lse, scale, need=(True, True))
    with pytest.raises(ValueError, match="w must be"):
        fused_ce_backward(h, w.half(), y, lse, scale)


@settings(max_examples=6, deadline=None)
@given(rows=st.integers(1, 40), num_classes=st.integers(1, 100), hidden=st.integers(1, 40),
       seed=st.integers(0, 2**16))
def test_any_shape(rows, num_classes, hidden, seed):
    """Random N, V (1 included) and D against the forced 16×32×16 tiles: every address checked."""
    h, w, b, y, _, scale = make(torch.float32, seed, rows, hidden, num_classes)
    got = run(h, w, b, y, scale)
    ref, _ = ref_grads(h, w, b, y, scale)
    assert_close(got, ref, 2e-6)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_engine_gradients_form_no_logits(harness, monkeypatch, reduction):
    """xent.linear_cross_entropy(..., backend="triton") with gradients runs the fused forward and backward:
    the chunk loop's projection and [C, V] buffer are never used (here they raise), ignored rows get a
    zero gradient, and the gradients match float64 autograd."""
    import xent
    import xent._engine._loop as loop_module

    def no_logits(*args, **kwargs):
        raise AssertionError("the engine formed a [C, V] chunk of logits")

    monkeypatch.setattr(loop_module, "project", no_logits)
    monkeypatch.setattr(loop_module, "chunk_buffer", no_logits)
    h, w, b, y, cw, _ = make(torch.float32)
    y[[3, 17]] = -100
    leaves = [t.clone().requires_grad_() for t in (h, w, b)]
    out = xent.linear_cross_entropy(leaves[0], leaves[1], y, linear_bias=leaves[2], weight=cw, z_loss=1e-3,
                                    softcap=6.0, reduction=reduction, chunk_size=8, backend="triton")
    up = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(out, leaves, up)
    ref_leaves = [t.double().requires_grad_() for t in (h, w, b)]
    ref = ref_loss(ref_leaves[0] @ ref_leaves[1].T + ref_leaves[2], y, reduction=reduction, cw=cw.double(),
                   z=1e-3, cap=6.0)
    ref = (ref * up.double()).sum()
    expected = torch.autograd.grad(ref, ref_leaves)
    assert float(got[0][[3, 17]].abs().max()) == 0.0
    for g, r in zip(got, expected):
        torch.testing.assert_close(g.double(), r, rtol=1e-5, atol=1e-7)
