"""The compiled CPU kernel of the fused head's cross-entropy rows (xent/_cpu_kernel.py, _kernels/ce_rows.c).

Against float64 references (tests/reference.py and autograd), against the plain-torch path it replaces
(XENT_CPU_KERNEL=0), on the corners that must not become plausible numbers (NaN, ±inf rows, masked
logits, large offsets), and its fallback and errors.
"""

from __future__ import annotations

import hashlib
from dataclasses import fields

import pytest
import torch

import xent
from reference import ref_cross_entropy
from xent import _cpu_kernel
from xent.losses import CrossEntropy
from xent.losses._base import logit_stats

pytestmark = pytest.mark.skipif(_cpu_kernel._compiler() is None, reason="no C compiler to build the kernel")


@pytest.fixture
def kernel(monkeypatch):
    monkeypatch.setenv("XENT_CPU_KERNEL", "1")  # must build: a failure is an error, not a silent fallback
    assert _cpu_kernel.kernel_status().startswith("compiled")
    return _cpu_kernel


def _ref_rows(z, t, scale, w=None, z_loss=0.0):
    """float64 per-token losses and their gradient (times scale) by autograd, REFERENCE.md §1."""
    x = z.detach().double().requires_grad_()
    lse = torch.logsumexp(x, -1)
    wy = torch.ones(len(t), dtype=torch.float64) if w is None else w.double()[t]
    exact = wy * (lse - x[torch.arange(len(t)), t]) + z_loss * lse**2
    finite = x.isfinite().all(-1)  # tests/reference.py's loops, on the rows they take (no -inf)
    per = ref_cross_entropy(x[finite].detach(), t[finite], reduction="none", weight=w, z_loss=z_loss)
    torch.testing.assert_close(exact[finite].detach(), per, rtol=1e-12, atol=1e-12)
    (g,) = torch.autograd.grad(exact, x, grad_outputs=scale.double())
    return exact.detach(), g


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weighted, z_loss", [(False, 0.0), (True, 0.0), (False, 1e-3), (True, 1e-3)])
def test_rows_match_float64(kernel, dtype, weighted, z_loss):
    g = torch.Generator().manual_seed(0)
    rows, num_classes = 37, 1003
    z = (torch.randn(rows, num_classes, generator=g) * 4).to(dtype)
    z[3] += 1e4  # large offsets: the loss is formed about the row max, no cancellation
    z[5, :500] = -float("inf")  # masked logits: exp is exactly 0, their gradient 0
    t = torch.randint(0, num_classes, (rows,), generator=g)
    t[5] = 700
    t[7] = int(z[7].float().argmax())  # a correct prediction
    scale = torch.rand(rows, generator=g) + 0.5
    w = torch.rand(num_classes, generator=g) + 0.1 if weighted else None
    per_ref, g_ref = _ref_rows(z, t, scale, w, z_loss)

    buf = z.clone()
    stats = torch.empty(rows, 3)
    loss = kernel.ce_rows_(buf, t, scale, None if w is None else w[t], z_loss, stats)
    torch.testing.assert_close(loss.double(), per_ref, rtol=2e-6, atol=2e-5)
    stats_ref = logit_stats(z.double(), t)  # (correct, entropy, lse), the definition return_stats uses
    torch.testing.assert_close(stats.double(), stats_ref, rtol=2e-6, atol=2e-5)
    assert (buf[5, :500] == 0).all()
    # the plain-torch closed form on the same rows: the kernel is as close to float64 as it is
    plain = z.float()
    _, g_plain = CrossEntropy(weight=w, z_loss=z_loss).value_and_grad(plain, t, scale)
    err_kernel = (buf.double() - g_ref).abs().max()
    err_plain = (g_plain.to(dtype).double() - g_ref).abs().max()
    assert err_kernel <= 1.5 * err_plain + 1e-9, (err_kernel, err_plain)
    tol = 1e-6 if dtype == torch.float32 else 8e-3
    assert err_kernel <= tol * g_ref.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_finite_rows_are_nan(kernel, dtype):
    z = torch.randn(6, 50).to(dtype)
    z[1, 7] = float("nan")
    z[2, 3] = float("inf")
    z[3] = -float("inf")
    t = torch.tensor([0, 1, 2, 3, 4, 5])
    loss = kernel.ce_rows_(z, t, torch.ones(6), None, 0.0)
    bad = torch.tensor([False, True, True, True, False, False])
    assert loss[bad].isnan().all() and loss[~bad].isfinite().all()
    assert z[bad].isnan().all() and z[~bad].isfinite().all()


def test_threads_do_not_change_results(kernel):
    z = torch.randn(64, 999).to(torch.bfloat16)
    t = torch.randint(0, 999, (64,))
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            buf = z.clone()
            outs.append((kernel.ce_rows_(buf, t, torch.ones(64), None, 0.0), buf))
    finally:
        torch.set_num_threads(before)
    for loss, buf in outs[1:]:
        assert torch.equal(loss, outs[0][0]) and torch.equal(buf, outs[0][1])


def _fused(monkeypatch, mode, h, w, y, **kw):
    monkeypatch.setenv("XENT_CPU_KERNEL", mode)
    h = h.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    loss = xent.linear_cross_entropy(h, w, y, **kw)
    loss.sum().backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"reduction": "sum", "chunk_size": 7},
        {"reduction": "none", "chunk_size": 16},
        {"z_loss": 1e-3, "chunk_size": 16},
        {"weight_classes": "random", "chunk_size": 16},
        {"token_weights": "random"},
    ],
    ids=["mean", "sum", "none", "z_loss", "class_weights", "token_weights"],
)
def test_fused_head_with_and_without_kernel(monkeypatch, dtype, kw):
    """xent.linear_cross_entropy with the kernel equals the float64 reference as closely as the plain
    path it replaces, in value and in both gradients."""
    g = torch.Generator().manual_seed(1)
    n, d, v = 50, 24, 301
    h = (torch.randn(n, d, generator=g)).to(dtype)
    w = (torch.randn(v, d, generator=g) * 0.3).to(dtype)
    y = torch.randint(0, v, (n,), generator=g)
    y[::9] = -100
    kw = dict(kw)
    if kw.get("weight_classes") == "random":
        kw["weight_classes"] = torch.rand(v, generator=g) + 0.2
    if kw.get("token_weights") == "random":
        kw["token_weights"] = torch.rand(n, generator=g)
    hd, wd = h.double().requires_grad_(), w.double().requires_grad_()
    kw64 = {k: (x.double() if isinstance(x, torch.Tensor) else x) for k, x in kw.items()}
    ref = xent.linear_cross_entropy(hd, wd, y, **kw64)  # float64: the plain formulas, no kernel
    ref.sum().backward()
    on = _fused(monkeypatch, "1", h, w, y, **kw)
    off = _fused(monkeypatch, "0", h, w, y, **kw)
    for got, base, exact in zip(on, off, (ref.detach(), hd.grad, wd.grad)):
        err_on = (got.double() - exact).abs().max()
        err_off = (base.double() - exact).abs().max()
        assert err_on <= 1.5 * err_off + 1e-6 * exact.abs().max(), (err_on, err_off)


def test_fallback_and_errors(monkeypatch, tmp_path):
    monkeypatch.setattr(_cpu_kernel, "_state", {})
    monkeypatch.setenv("XENT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("XENT_CPU_KERNEL", "auto")
    assert "unavailable" in _cpu_kernel.kernel_status() and "plain torch" in _cpu_kernel.kernel_status()
    h, w = torch.randn(8, 4, requires_grad=True), torch.randn(11, 4, requires_grad=True)
    y = torch.randint(0, 11, (8,))
    loss = xent.linear_cross_entropy(h, w, y)  # plain torch, same number
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(h @ w.T, y))
    monkeypatch.setenv("XENT_CPU_KERNEL", "1")
    with pytest.raises(RuntimeError, match="XENT_CPU_KERNEL=1 but the CPU kernel is unavailable"):
        xent.linear_cross_entropy(h, w, y)
    monkeypatch.setenv("XENT_CPU_KERNEL", "yes")
    with pytest.raises(ValueError, match="XENT_CPU_KERNEL must be auto, 0 or 1, got 'yes'"):
        xent.linear_cross_entropy(h, w, y)


def test_cache_is_keyed_and_reused(monkeypatch, tmp_path):
    monkeypatch.setattr(_cpu_kernel, "_state", {})
    monkeypatch.setenv("XENT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("XENT_CPU_KERNEL", "1")
    assert "built in" in _cpu_kernel.kernel_status()
    (built,) = (tmp_path / "kernels").glob("ce_rows-*.so")
    recorded = built.with_name(built.name + ".sha256")
    assert sorted((tmp_path / "kernels").iterdir()) == [built, recorded]  # no temporary left
    assert recorded.read_text().strip() == hashlib.sha256(built.read_bytes()).hexdigest()
    monkeypatch.setattr(_cpu_kernel, "_state", {})
    assert _cpu_kernel.kernel_status().startswith("compiled (cached")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_losses_without_gradient(kernel, monkeypatch, dtype):
    """Under torch.no_grad (a validation loss) the kernel computes the losses and statistics alone, as
    close to float64 as the torch ops, and leaves bfloat16 logits as they were."""
    g = torch.Generator().manual_seed(5)
    z = (torch.randn(20, 301, generator=g) * 3).to(dtype)
    t = torch.randint(0, 301, (20,), generator=g)
    buf, stats = z.clone(), torch.empty(20, 3)
    loss = kernel.ce_rows_(buf, t, None, None, 1e-3, stats)
    per_ref, _ = _ref_rows(z, t, torch.ones(20), None, 1e-3)
    torch.testing.assert_close(loss.double(), per_ref, rtol=2e-6, atol=2e-5)
    torch.testing.assert_close(stats.double(), logit_stats(z.double(), t), rtol=2e-6, atol=2e-5)
    if dtype == torch.bfloat16:
        assert torch.equal(buf, z)

    n, d, v = 40, 16, 301
    h = torch.randn(n, d, generator=g).to(dtype)
    w = (torch.randn(v, d, generator=g) * 0.3).to(dtype)
    y = torch.randint(0, v, (n,), generator=g)
    y[::7] = -100
    ref_loss, ref_stats = xent.linear_cross_entropy(h.double(), w.double(), y, reduction="none",
                                                    return_stats=True)
    exact = [ref_loss] + [getattr(ref_stats, f.name) for f in fields(ref_stats)]
    got = {}
    for mode in ("1", "0"):
        monkeypatch.setenv("XENT_CPU_KERNEL", mode)
        with torch.no_grad():
            loss, st = xent.linear_cross_entropy(h, w, y, reduction="none", chunk_size=16, return_stats=True)
        got[mode] = [loss] + [getattr(st, f.name) for f in fields(st)]
    for on, off, e in zip(got["1"], got["0"], exact):
        err_on, err_off = (on.double() - e.double()).abs().max(), (off.double() - e.double()).abs().max()
        assert err_on <= 1.5 * err_off + 1e-6 * e.double().abs().max(), (err_on, err_off)
