"""Token log-probs through the compiled CPU kernel: its rows (xent._cpu_kernel.ce_rows_ with an inverse
temperature and an entropy scale) against float64 written with log_softmax and autograd, and the fused head's
``backend="cpu_kernel"`` against ``backend="torch"`` and the plain twin on materialised logits."""

import pytest
import torch

import xent
from test_log_probs import _sum_with, ref_log_probs
from xent import _cpu_kernel
from xent.losses._base import log_prob_entropy_and_grad

pytestmark = pytest.mark.skipif(_cpu_kernel._compiler() is None, reason="no C compiler to build the kernel")


@pytest.fixture
def calls(monkeypatch):
    """The chunks the kernel computed; XENT_CPU_KERNEL=1, so a kernel that does not build is an error."""
    monkeypatch.setenv("XENT_CPU_KERNEL", "1")
    assert _cpu_kernel.kernel_status().startswith("compiled")
    seen = []
    original = _cpu_kernel.ce_rows_

    def spy(z, *args, **kwargs):
        seen.append(z.shape)
        return original(z, *args, **kwargs)

    monkeypatch.setattr(_cpu_kernel, "ce_rows_", spy)
    return seen


def _ref_rows(z, target, temperature, a, b):
    """float64 (log q_y, H(q)) of u = z/T through log_softmax, and d(Σ a·log q_y + b·H)/dz by autograd."""
    x = z.detach().double().requires_grad_()
    log_q = torch.log_softmax(x / temperature, dim=-1)
    lp = log_q.gather(-1, target[:, None]).squeeze(-1)
    q = log_q.exp()
    ent = -(q * torch.where(q > 0, log_q, torch.zeros_like(log_q))).sum(-1)  # 0·log 0 = 0, gradient 0
    (g,) = torch.autograd.grad((a.double() * lp + b.double() * ent).sum(), x)
    return lp.detach(), ent.detach(), g


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("with_entropy", [False, True])
def test_rows_match_float64(calls, dtype, temperature, with_entropy):
    g = torch.Generator().manual_seed(0)
    rows, num_classes = 37, 1003
    z = (torch.randn(rows, num_classes, generator=g) * 4).to(dtype)
    z[3] += 1e4  # large offsets: formed about the row max, no cancellation
    z[5, :500] = -float("inf")  # masked logits: q = 0, entropy term 0, gradient 0
    t = torch.randint(0, num_classes, (rows,), generator=g)
    t[5] = 700
    a = torch.randn(rows, generator=g)
    b = torch.randn(rows, generator=g) if with_entropy else torch.zeros(rows)
    lp_ref, ent_ref, g_ref = _ref_rows(z, t, temperature, a, b)

    buf, stats = z.clone(), torch.empty(rows, 3)
    nll = _cpu_kernel.ce_rows_(buf, t, -a, None, 0.0, stats, inv_temperature=1.0 / temperature,
                               entropy_scale=b if with_entropy else None)
    assert (buf[5, :500] == 0).all()
    # the torch closed form on the same rows (float32: u = z/T rounds, 1e-3 at the row offset by 1e4): the
    # kernel is as close to float64 as it is, in the values and the gradient
    lp_plain, ent_plain, g_plain = log_prob_entropy_and_grad(z.float(), t, None, temperature, a,
                                                             b if with_entropy else None)
    pairs = [(-nll, lp_plain, lp_ref), (buf, g_plain.to(dtype), g_ref)]
    if with_entropy:
        pairs.append((stats[:, 1], ent_plain, ent_ref))
    for kernel, plain, ref in pairs:
        err_kernel, err_plain = ((x.double() - ref).abs().max() for x in (kernel, plain))
        assert err_kernel <= 1.5 * err_plain + 1e-6 * ref.abs().max(), (err_kernel, err_plain)
    # the kernel forms u − max u as (z − max z)/T: no rounding of u itself, even at the offset row
    torch.testing.assert_close(-nll.double(), lp_ref, rtol=2e-6, atol=2e-5)
    torch.testing.assert_close(stats[:, 1].double(), ent_ref, rtol=2e-6, atol=2e-5)
    tol = 2e-6 if dtype == torch.float32 else 8e-3
    assert (buf.double() - g_ref).abs().max() <= tol * g_ref.abs().max()


def _head(dtype, seed=0):
    """Odd sizes: 2 × 47 tokens (some ignored), D 31, V 123; a bias that takes no gradient."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2, 47, 31, generator=g).to(dtype).requires_grad_()
    W = (torch.randn(123, 31, generator=g) / 3).to(dtype).requires_grad_()
    b = (torch.randn(123, generator=g) / 2).to(dtype)
    y = torch.randint(0, 123, (2, 47), generator=g)
    y[0, ::5] = -100
    return h, W, b, y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("with_entropy", [False, True])
def test_fused_kernel_matches_torch_and_float64(calls, dtype, temperature, with_entropy):
    h, W, b, y = _head(dtype)
    opts = dict(linear_bias=b, temperature=temperature, with_entropy=with_entropy, chunk_size=32, shift=True)
    outs = {}
    for backend in ("cpu_kernel", "torch"):
        before = len(calls)
        out = xent.linear_log_probs(h, W, y, backend=backend, **opts)
        out = out if with_entropy else (out,)
        outs[backend] = (*out, *torch.autograd.grad(_sum_with(out), (h, W)))
        assert (len(calls) > before) == (backend == "cpu_kernel")  # forward and backward chunks
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-4)
    for k, t in zip(outs["cpu_kernel"], outs["torch"]):
        torch.testing.assert_close(k, t, **tol)  # bf16 gradients: within one rounding of each other
    # float64, computed differently, on the same (upcast) inputs
    x = (h.double() @ W.double().T + b.double()).detach().requires_grad_()
    ref = ref_log_probs(x, y, temperature=temperature, shift=True)[: 1 + with_entropy]
    (g_x,) = torch.autograd.grad(_sum_with([r.float() for r in ref]), x)  # the same upstream gradients
    g_h, g_w = g_x @ W.double(), g_x.reshape(-1, 123).T @ h.double().reshape(-1, 31)
    if dtype == torch.float32:
        for k, r in zip(outs["cpu_kernel"], (*ref, g_h, g_w)):
            torch.testing.assert_close(k.double(), r.detach(), rtol=1e-5, atol=1e-5)
    else:  # bf16: no worse than the naive bf16 computation (logits rounded to bf16, float32 after)
        naive = xent.log_probs((h @ W.T + b).float(), y, temperature=temperature, shift=True,
                               with_entropy=True)[: 1 + with_entropy]
        for k, n, r in zip(outs["cpu_kernel"], naive, ref):
            assert (k.double() - r).abs().max() <= 1.5 * (n.double() - r).abs().max() + 1e-6


def test_kernel_serves_log_probs_and_refuses_what_it_cannot(calls):
    h, W, b, y = _head(torch.float32, seed=1)
    xent.linear_log_probs(h, W, y, backend="cpu_kernel", chunk_size=64).sum().backward()
    assert len(calls) == 2 + 2  # 94 tokens, 66 valid: 2 chunks forward, 2 backward
    bias = b.clone().requires_grad_()
    # "auto" takes the torch backend where the kernel cannot serve: soft-capping always, a bias gradient in
    # the backward (the forward, which needs no gradient, still runs on the kernel: one chunk)
    for kwargs, reason, forward_chunks in [(dict(softcap=5.0), "the CPU kernel has no soft-capping", 0),
                                           (dict(linear_bias=bias), "no bias gradient", 1)]:
        message = f"backend='cpu_kernel' cannot serve this call: .*{reason}"
        with pytest.raises(ValueError, match=message) as err:
            xent.linear_log_probs(h, W, y, backend="cpu_kernel", **kwargs)
        assert "\n" not in str(err.value)
        before = len(calls)
        auto = xent.linear_log_probs(h, W, y, **kwargs)
        grads = torch.autograd.grad(auto.sum(), (h, W))
        assert len(calls) == before + forward_chunks
        plain = xent.linear_log_probs(h, W, y, backend="torch", **kwargs)
        for a, p in zip((auto, *grads), (plain, *torch.autograd.grad(plain.sum(), (h, W)))):
            torch.testing.assert_close(a, p, rtol=1e-5, atol=1e-6)


def test_a_backend_refuses_a_spec_it_does_not_know():
    """The Triton backend computes cross-entropy only: the log-probs' spec is refused, never read as one."""
    pytest.importorskip("triton")
    h, W, _, y = _head(torch.float32, seed=2)
    with pytest.raises(ValueError, match="cross-entropy only, not TokenLogProb"):
        xent.linear_log_probs(h, W, y, backend="triton")
