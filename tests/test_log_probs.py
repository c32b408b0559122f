"""Token log-probs and entropies (xent.log_probs, xent.linear_log_probs) against float64 references
written with an explicit softmax per token; gradients; fused == plain; chunk size never matters."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import xent
from reference import X, Y

V_, D_ = 17, 6


def ref_log_probs(logits, target, *, temperature=1.0, softcap=None, shift=False):
    """(log q_y, H(q)) per token by an explicit loop, q = softmax(cap(z)/T); 0 at ignored tokens."""
    if shift:
        logits, target = logits[..., :-1, :], target[..., 1:]
    rows, ys = logits.reshape(-1, logits.shape[-1]), target.reshape(-1).tolist()
    logp, ent = [], []
    for row, y in zip(rows, ys):
        if y == -100:
            logp.append(row.sum() * 0.0)
            ent.append(row.sum() * 0.0)
            continue
        u = row if softcap is None else softcap * torch.tanh(row / softcap)
        u = u / temperature
        e = torch.exp(u - u.max())
        q = e / e.sum()
        logp.append(torch.log(q[y]))
        ent.append(-sum(qi * torch.log(qi) for qi in q if qi > 0))
    return torch.stack(logp).reshape(target.shape), torch.stack(ent).reshape(target.shape)


def _head(seed=0, shape=(3, 6), dtype=torch.float64, ignored=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, D_, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    W = (torch.randn(V_, D_, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    b = (torch.randn(V_, generator=g, dtype=torch.float64) / 2).to(dtype).requires_grad_()
    y = torch.randint(0, V_, shape, generator=g)
    if ignored:
        y[0, 2] = y[2, :2] = -100
    return h, W, b, y


def _sum_with(outputs, seed=1):
    """Σ_k up_k·out_k with fixed random upstream gradients, so both outputs are differentiated."""
    g = torch.Generator().manual_seed(seed)
    return sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outputs)


OPTIONS = [
    {},
    {"temperature": 0.7},
    {"softcap": 3.0},
    {"temperature": 1.6, "softcap": 2.0},
]


def test_worked_numbers():
    """REFERENCE.md §2: log q_y = −(cross-entropy per token); a uniform row has entropy log V."""
    x, y = torch.tensor(X, dtype=torch.float64), torch.tensor(Y)
    lp, ent = xent.log_probs(x, y, with_entropy=True)
    torch.testing.assert_close(lp, -torch.tensor([0.4170300163, 0, 0.6041306053], dtype=torch.float64),
                               rtol=0, atol=1e-10)
    assert ent[1].item() == 0.0
    uniform = xent.log_probs(torch.zeros(1, 5), torch.tensor([3]), with_entropy=True)
    assert abs(uniform[0].item() + math.log(5)) < 1e-6 and abs(uniform[1].item() - math.log(5)) < 1e-6


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("opts", OPTIONS, ids=str)
def test_plain_matches_loop_reference(opts, shift):
    h, W, b, y = _head(seed=2)
    x = (h @ W.T + b).detach().requires_grad_()
    lp, ent = xent.log_probs(x, y, shift=shift, with_entropy=True, **opts)
    ref_lp, ref_ent = ref_log_probs(x, y, shift=shift, **opts)
    torch.testing.assert_close(lp, ref_lp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(xent.log_probs(x, y, shift=shift, **opts), lp)  # without the entropy
    (g,) = torch.autograd.grad(_sum_with((lp, ent)), x)
    (r,) = torch.autograd.grad(_sum_with((ref_lp, ref_ent)), x)
    torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("with_entropy", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 3, "auto"])
@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("opts", OPTIONS, ids=str)
def test_fused_matches_reference_and_plain(opts, shift, chunk_size, with_entropy):
    h, W, b, y = _head(seed=3)
    fused = xent.linear_log_probs(h, W, y, linear_bias=b, shift=shift, chunk_size=chunk_size,
                                  with_entropy=with_entropy, **opts)
    plain = xent.log_probs(h @ W.T + b, y, shift=shift, with_entropy=with_entropy, **opts)
    ref = ref_log_probs(h @ W.T + b, y, shift=shift, **opts)
    if not with_entropy:
        fused, plain, ref = (fused,), (plain,), ref[:1]
    for f, p, r in zip(fused, plain, ref):
        torch.testing.assert_close(f, p, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(f, r, rtol=1e-12, atol=1e-12)
    inputs = (h, W, b)
    grads = [torch.autograd.grad(_sum_with(out), inputs) for out in (fused, plain, ref)]
    for g_fused, g_plain, g_ref in zip(*grads):
        torch.testing.assert_close(g_fused, g_plain, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(g_fused, g_ref, rtol=1e-10, atol=1e-12)


def test_gradcheck_plain_and_fused():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([[0, 4, -100], [2, 2, 1]])
    assert torch.autograd.gradcheck(
        lambda z: xent.log_probs(z, y, temperature=0.8, softcap=2.0, with_entropy=True), (x,))
    h = torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    for with_entropy in (False, True):
        assert torch.autograd.gradcheck(
            lambda h, W, bias, e=with_entropy: xent.linear_log_probs(
                h, W, y, linear_bias=bias, temperature=1.3, softcap=2.5, chunk_size=2, with_entropy=e),
            (h, W, bias))


@settings(max_examples=15, deadline=None)
@given(chunk=st.integers(1, 30), seed=st.integers(0, 1000), with_entropy=st.booleans())
def test_chunk_size_never_changes_the_result(chunk, seed, with_entropy):
    h, W, b, y = _head(seed=seed)
    kw = dict(bias=b, shift=True, temperature=0.9, with_entropy=with_entropy)
    ref = xent.linear_log_probs(h, W, y, chunk_size="auto", **kw)
    out = xent.linear_log_probs(h, W, y, chunk_size=chunk, **kw)
    if not with_entropy:
        ref, out = (ref,), (out,)
    for a, c in zip(out, ref):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)
    inputs = (h, W, b)
    for a, c in zip(torch.autograd.grad(_sum_with(out), inputs), torch.autograd.grad(_sum_with(ref), inputs)):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)


def test_ignored_positions_are_zero_with_zero_gradient_and_never_projected():
    import xent._engine._loop as engine

    h, W, b, y = _head(seed=5)
    rows_projected, original = [], engine.project

    def spy(hh, ww, bb, out=None):
        rows_projected.append(hh.shape[0])
        return original(hh, ww, bb, out=out)

    engine.project = spy
    try:
        lp, ent = xent.linear_log_probs(h, W, y, linear_bias=b, with_entropy=True, chunk_size=1000)
        (gh,) = torch.autograd.grad(_sum_with((lp, ent)), h)
    finally:
        engine.project = original
    ignored = y == -100
    assert not lp[ignored].any() and not ent[ignored].any() and not gh[ignored].any()
    assert rows_projected == [int((~ignored).sum())] * 2  # forward, then backward recomputes


def test_entropy_alone_and_backward_twice():
    """Differentiating one output only, and a second backward (retain_graph), both recompute exactly."""
    h, W, b, y = _head(seed=6)
    lp, ent = xent.linear_log_probs(h, W, y, linear_bias=b, with_entropy=True, chunk_size=4)
    (g1,) = torch.autograd.grad(ent.sum(), h, retain_graph=True)
    (g2,) = torch.autograd.grad(ent.sum(), h)
    _, ref_ent = ref_log_probs(h @ W.T + b, y)
    (r,) = torch.autograd.grad(ref_ent.sum(), h)
    torch.testing.assert_close(g1, r, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g2, g1, rtol=0, atol=0)


def test_masked_logits():
    """A −inf logit (a masked id) has q = 0: finite entropy, the same numbers as without that id."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4, V_, generator=g, dtype=torch.float64)
    x[:, 5] = -math.inf
    y = torch.tensor([0, 3, 16, -100])
    z = x.clone().requires_grad_()
    lp, ent = xent.log_probs(z, y, with_entropy=True)
    keep = [c for c in range(V_) if c != 5]
    sub = x[:, keep].clone().requires_grad_()
    lp2, ent2 = xent.log_probs(sub, torch.where(y > 5, y - 1, y), with_entropy=True)
    torch.testing.assert_close((lp, ent), (lp2, ent2), rtol=1e-12, atol=1e-13)
    (gz,) = torch.autograd.grad(_sum_with((lp, ent)), z)
    (gs,) = torch.autograd.grad(_sum_with((lp2, ent2)), sub)
    assert torch.isfinite(gz).all() and not gz[:, 5].any()
    torch.testing.assert_close(gz[:, keep], gs, rtol=1e-12, atol=1e-13)
    # the fused closed form on the same logits: h = I, W = the finite logits, a bias of −inf masks id 5
    h = torch.eye(4, dtype=torch.float64).requires_grad_()
    W = torch.where(torch.isfinite(x), x, 0.0).T.contiguous().requires_grad_()
    bias = torch.zeros(V_, dtype=torch.float64)
    bias[5] = -math.inf
    fused = xent.linear_log_probs(h, W, y, linear_bias=bias, with_entropy=True, chunk_size=2)
    torch.testing.assert_close(fused, (lp, ent), rtol=1e-12, atol=1e-13)
    gh, gw = torch.autograd.grad(_sum_with(fused), (h, W))
    assert torch.isfinite(gh).all() and torch.isfinite(gw).all()
    torch.testing.assert_close(gw.T[:, keep], gs, rtol=1e-12, atol=1e-13)  # d/dW = the logits' gradient


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs(dtype):
    """Half inputs: projected in their dtype, log-probs in float32; close to float64 on the same inputs,
    gradients returned in the inputs' dtype."""
    h, W, b, y = _head(seed=8, dtype=dtype)
    lp, ent = xent.linear_log_probs(h, W, y, linear_bias=b, with_entropy=True, temperature=0.8)
    assert lp.dtype == torch.float32
    ref_lp, ref_ent = ref_log_probs((h.double() @ W.double().T + b.double()), y, temperature=0.8)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 5e-2}
    torch.testing.assert_close(lp.double(), ref_lp.detach(), **tol)
    torch.testing.assert_close(ent.double(), ref_ent.detach(), **tol)
    gh, gw = torch.autograd.grad(_sum_with((lp, ent)), (h, W))
    assert gh.dtype == dtype and gw.dtype == dtype


def test_returns_and_exports():
    h, W, b, y = _head(seed=9)
    assert isinstance(xent.linear_log_probs(h, W, y), torch.Tensor)
    assert isinstance(xent.linear_log_probs(h, W, y, with_entropy=True), tuple)
    assert xent.linear_log_probs(h, W, y, shift=True).shape == (3, 5)
    assert "log_probs" in xent.__all__ and "linear_log_probs" in xent.__all__


@pytest.mark.parametrize("call", ["plain", "fused"])
def test_bad_input(call):
    h, W, b, y = _head(seed=10)
    fn = ((lambda **kw: xent.log_probs(h @ W.T, y, **kw)) if call == "plain"
          else (lambda **kw: xent.linear_log_probs(h, W, y, **kw)))
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="temperature must be a finite number"):
            fn(temperature=bad)
    with pytest.raises(TypeError, match="temperature must be a number"):
        fn(temperature="1")
    with pytest.raises(ValueError, match="softcap must be None or a finite number > 0"):
        fn(softcap=0.0)
    bad_y = y.clone()
    bad_y[1, 1] = V_
    with pytest.raises(ValueError, match=f"target has 1 id\\(s\\) outside \\[0, {V_}\\)"):
        (xent.log_probs(h @ W.T, bad_y) if call == "plain" else xent.linear_log_probs(h, W, bad_y))


@pytest.mark.parametrize("with_entropy", [False, True])
def test_never_allocates_tokens_by_vocab(with_entropy):
    from test_linear import _Recorder

    N, V, chunk = 96, 500, 16
    g = torch.Generator().manual_seed(11)
    h = torch.randn(N, D_, generator=g, requires_grad=True)
    W = torch.randn(V, D_, generator=g, requires_grad=True)
    y = torch.randint(0, V, (N,), generator=g)
    with _Recorder() as rec:
        out = xent.linear_log_probs(h, W, y, chunk_size=chunk, with_entropy=with_entropy)
        torch.autograd.grad(_sum_with(out if with_entropy else (out,)), (h, W))
    assert rec.max_numel <= chunk * V < N * V
    with _Recorder() as rec_plain:  # the positive control: the plain twin does
        xent.log_probs(h @ W.T, y, with_entropy=with_entropy)
    assert rec_plain.max_numel >= N * V
