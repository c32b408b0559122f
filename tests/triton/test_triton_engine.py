"""The engine's "triton" row backend (xent._triton._backend) through the fused public functions on CPU
tensors under the interpreter harness, against float64: every reduction, ignored rows, every target
ignored, class and token weights, z-loss, soft-cap, label smoothing, a bias, return_stats, several
chunks and several tiles per row; float32 to float32 rounding, bf16 and float16 within the naive
same-dtype computation's error (REFERENCE.md §5)."""

from __future__ import annotations

import inspect

import pytest

pytest.importorskip("triton.language", reason="triton is not installed (pip install -c constraints.txt "
                                                "-e '.[test]')")
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from triton_reference import ref_loss  # noqa: E402

import xent  # noqa: E402
import xent._triton._rows as rows_module  # noqa: E402
from reference import ref_cross_entropy  # noqa: E402
from xent._triton._config import RowConfig  # noqa: E402

PARAMS = inspect.signature(xent.linear_cross_entropy).parameters
if "backend" not in PARAMS:
    pytest.skip("the engine's backend= argument (issue 21) is not here yet", allow_module_level=True)
CLASS_WEIGHT = "weight" if "linear_weight" in PARAMS else "weight_classes"
BIAS = "linear_bias" if "linear_bias" in PARAMS else "bias"


@pytest.fixture(autouse=True)
def narrow(monkeypatch):
    """128-column tiles: a vocabulary of 300 spans three, the last one ragged."""
    monkeypatch.setattr(rows_module, "row_config", lambda num_classes, itemsize: RowConfig(128, 4))


def make(dtype, seed=0, n=(2, 9), d=16, v=300, ignore=True):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(*n, d, generator=g)).to(dtype)
    w = (torch.randn(v, d, generator=g) * 0.6).to(dtype)
    b = (torch.randn(v, generator=g) * 0.5).to(dtype)
    y = torch.randint(0, v, n, generator=g)
    if ignore:
        y[0, 2] = y[1, 5] = y[1, 6] = -100
    cw = torch.rand(v, generator=g) * 2 + 0.1
    tw = torch.rand(n, generator=g) + 0.5
    return h, w, b, y, cw, tw


OPTIONS = {
    "plain": {},
    "class_weights": {"cw": True},
    "z_loss": {"z": 1e-3},
    "softcap": {"cap": 4.0},
    "smoothing": {"eps": 0.1},
    "weights_smoothing_z": {"cw": True, "eps": 0.2, "z": 1e-3},
    "token_weights": {"tw": True, "z": 1e-3},
}


def run(h, w, b, y, *, reduction, cw=None, eps=0.0, z=0.0, cap=None, tw=None, backend="triton", stats=False,
        chunk=7):
    kw = {CLASS_WEIGHT: cw, BIAS: b}
    return xent.linear_cross_entropy(h, w, y, reduction=reduction, label_smoothing=eps, z_loss=z,
                                     softcap=cap, token_weights=tw, chunk_size=chunk, backend=backend,
                                     return_stats=stats, **kw)


def grads(fn, h, w, b):
    leaves = [t.detach().clone().requires_grad_() for t in (h, w, b)]
    out = fn(*leaves)
    out = out[0] if isinstance(out, tuple) else out
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(out.dtype)
    grads_ = torch.autograd.grad(out, leaves, g)
    return out.detach(), grads_


def options(name, cw, tw):
    kw = dict(OPTIONS[name])
    kw["cw"] = cw if kw.get("cw") else None
    kw["tw"] = tw if kw.get("tw") else None
    return kw


@pytest.fixture
def row_kernel_path(monkeypatch):
    """Passes with gradients chunk by chunk through cuBLAS and the row kernel, not the fused backward."""
    from xent._triton._backend import BACKEND

    monkeypatch.setattr(BACKEND, "fused_backward", False)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_float32_against_float64(harness, option, reduction):
    """Through the fused forward and backward (the Triton backend's default for a pass with gradients)."""
    check_float32(harness, option, reduction)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("option", ["plain", "weights_smoothing_z", "softcap", "token_weights"])
def test_float32_through_the_row_kernel(harness, row_kernel_path, option, reduction):
    """Chunk by chunk through the row kernel (TritonRows.fused_backward False)."""
    check_float32(harness, option, reduction)


def check_float32(harness, option, reduction):
    h, w, b, y, cw, tw = make(torch.float32)
    kw = options(option, cw, tw)
    out, g = grads(lambda h_, w_, b_: run(h_, w_, b_, y, reduction=reduction, **kw), h, w, b)
    kw64 = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    ref, g64 = grads(lambda h_, w_, b_: ref_loss(h_ @ w_.T + b_, y, reduction=reduction, **kw64),
                     h.double(), w.double(), b.double())
    assert harness.launches >= 3  # the forward's chunks went through the kernel
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    for got, exp in zip(g, g64):
        torch.testing.assert_close(got.double(), exp, rtol=1e-4, atol=1e-6)
    if kw["tw"] is None and reduction != "none":  # the loop-by-token reference agrees
        logits = (h.double() @ w.double().T + b.double())
        loop = ref_cross_entropy(logits, y, reduction=reduction, weight=kw64["cw"], label_smoothing=kw["eps"]
                                 if "eps" in kw else 0.0, z_loss=kw.get("z", 0.0), softcap=kw.get("cap"))
        torch.testing.assert_close(out.double(), loop, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path", ["fused", "row_kernel"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("option", ["plain", "weights_smoothing_z", "softcap"])
def test_half_within_the_naive_error(request, dtype, option, path):
    """Half inputs, against float64 of the same half inputs: the loss and the gradients of hidden, weight
    and bias no further than the torch backend's and within 2.5x the naive
    F.cross_entropy(F.linear(h, W, b).float()) in that dtype (REFERENCE.md §5). The Triton backend
    never rounds the logits or their gradient to the half dtype (the fused kernels keep them in float32
    registers; the gradient products in TF32), so it is closer than both; through the row kernel it rounds
    the chunk as the torch backend does."""
    if path == "row_kernel":
        request.getfixturevalue("row_kernel_path")
    h, w, b, y, cw, tw = make(dtype)
    kw = options(option, cw, tw)
    kw64 = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    kwf = {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    ref, g64 = grads(lambda h_, w_, b_: ref_loss(h_ @ w_.T + b_, y, reduction="mean", **kw64),
                     h.double(), w.double(), b.double())
    naive, gn = grads(lambda h_, w_, b_: ref_loss(F.linear(h_, w_, b_).float(), y, reduction="mean", **kwf),
                      h, w, b)
    out, g = grads(lambda h_, w_, b_: run(h_, w_, b_, y, reduction="mean", **kw), h, w, b)
    base, gt = grads(lambda h_, w_, b_: run(h_, w_, b_, y, reduction="mean", backend="torch", **kw), h, w, b)
    err = abs(float(out) - float(ref))
    assert err <= 1.5 * abs(float(base) - float(ref)) + 1e-5
    assert err <= 1.5 * abs(float(naive) - float(ref)) + 1e-5
    for got, nv, tb, exp in zip(g, gn, gt, g64):
        err = (got.double() - exp).abs().max()
        err_naive, err_torch = (nv.double() - exp).abs().max(), (tb.double() - exp).abs().max()
        assert err <= 1.5 * err_torch + 1e-6 * exp.abs().max(), (float(err), float(err_torch))
        assert err <= 2.5 * err_naive, (float(err), float(err_naive))


def test_every_target_ignored(harness):
    h, w, b, y, cw, _ = make(torch.float32)
    y[:] = -100
    for reduction in ("mean", "sum"):
        out, g = grads(lambda h_, w_, b_, r=reduction: run(h_, w_, b_, y, reduction=r, cw=cw), h, w, b)
        assert float(out) == 0.0 and all(float(t.abs().max()) == 0.0 for t in g)


def test_return_stats_and_no_grad(harness):
    """The statistics through the kernel equal the torch backend's; under no_grad the same losses."""
    h, w, b, y, cw, _ = make(torch.float32)
    got = run(h, w, b, y, reduction="mean", cw=cw, z=1e-3, cap=5.0, stats=True)
    ref = run(h, w, b, y, reduction="mean", cw=cw, z=1e-3, cap=5.0, stats=True, backend="torch")
    torch.testing.assert_close(got[0], ref[0], rtol=1e-6, atol=1e-7)
    for name in ("count", "correct", "entropy", "lse", "loss"):
        if hasattr(ref[1], name):
            torch.testing.assert_close(getattr(got[1], name), getattr(ref[1], name), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        nograd = run(h, w, b, y, reduction="none", cw=cw, z=1e-3, cap=5.0)
    torch.testing.assert_close(nograd, run(h, w, b, y, reduction="none", cw=cw, z=1e-3, cap=5.0,
                                           backend="torch").detach(), rtol=1e-6, atol=1e-7)


def test_forced_backend_that_cannot_serve_says_why():
    h, w, b, y, _, _ = make(torch.float64)
    with pytest.raises(ValueError, match="triton"):
        run(h, w, b, y, reduction="mean")


def test_cpu_without_the_interpreter_is_refused_and_auto_never_takes_it(harness, monkeypatch):
    """Outside TRITON_INTERPRET a CPU call forced to "triton" is a one-line error naming the variable, and
    "auto" takes another backend even once the Triton backend has been imported."""
    h, w, b, y, _, _ = make(torch.float32)
    run(h, w, b, y, reduction="mean")  # forced under the interpreter: imports the backend
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        run(h, w, b, y, reduction="mean")
    launches = harness.launches
    auto = run(h, w, b, y, reduction="mean", backend="auto")
    assert harness.launches == launches  # no Triton kernel ran
    torch.testing.assert_close(auto, run(h, w, b, y, reduction="mean", backend="torch"), rtol=1e-6, atol=1e-7)
