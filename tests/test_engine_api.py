"""The fused functions' front door: torch's argument names (linear_weight, linear_bias, weight), the old
spellings with a DeprecationWarning, the row backend chosen by backend=, and arguments checked once."""

from __future__ import annotations

import warnings

import pytest
import torch

import xent
from xent import _cpu_kernel


def _inputs(seed=0, N=(2, 9), D=8, V=37, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*N, D, generator=g, dtype=dtype).requires_grad_()
    W = torch.randn(V, D, generator=g, dtype=dtype).requires_grad_()
    b = torch.randn(V, generator=g, dtype=dtype).requires_grad_()
    y = torch.randint(0, V, N, generator=g)
    y[0, 1] = -100
    wc = torch.rand(V, generator=g) + 0.5
    return h, W, b, y, wc


def _value_and_grads(out, inputs):
    return (out.detach(), *torch.autograd.grad(out.sum(), inputs))


def _same(a, b):
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def _quiet(fn, *args, **kwargs):
    """fn(...) expecting exactly the DeprecationWarnings of old spellings; returns (result, messages)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(*args, **kwargs)
    return out, [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]


def test_torch_names_match_positional_and_old_spellings():
    h, W, b, y, wc = _inputs()
    positional = _value_and_grads(xent.linear_cross_entropy(h, W, y, linear_bias=b, weight=wc, z_loss=1e-3),
                                  (h, W, b))
    keywords = _value_and_grads(xent.linear_cross_entropy(h, linear_weight=W, target=y, linear_bias=b,
                                                          weight=wc, z_loss=1e-3), (h, W, b))
    old, messages = _quiet(xent.linear_cross_entropy, h, W, y, bias=b, weight_classes=wc, z_loss=1e-3)
    _same(positional, keywords)
    _same(positional, _value_and_grads(old, (h, W, b)))
    assert sorted(messages) == ["linear_cross_entropy(bias=...) is deprecated: use linear_bias=",
                                "linear_cross_entropy(weight_classes=...) is deprecated: use weight="]
    # the class weights really are applied under the name weight (not ignored)
    unweighted = xent.linear_cross_entropy(h, W, y, linear_bias=b, z_loss=1e-3).detach()
    assert not torch.equal(positional[0], unweighted)


@pytest.mark.parametrize("fn", ["linear_loss", "linear_log_probs", "linear_rho1_loss"])
def test_old_bias_spelling_of_the_other_fused_functions(fn):
    h, W, b, y, _ = _inputs(seed=1)
    extra = {"ref_losses": torch.rand(y.shape)} if fn == "linear_rho1_loss" else {}
    f = getattr(xent, fn)
    new = _value_and_grads(f(h, W, y, linear_bias=b, **extra), (h, W, b))
    old, messages = _quiet(f, h, W, y, bias=b, **extra)
    _same(new, _value_and_grads(old, (h, W, b)))
    assert messages == [f"{fn}(bias=...) is deprecated: use linear_bias="]


def test_multi_token_stream_weights_and_old_spelling():
    g = torch.Generator().manual_seed(2)
    hs, W = torch.randn(2, 2, 9, 8, generator=g).requires_grad_(), torch.randn(37, 8, generator=g)
    y = torch.randint(0, 37, (2, 9), generator=g)
    new = xent.linear_multi_token_loss(hs, W, y, stream_weights=[1.0, 0.5])
    old, messages = _quiet(xent.linear_multi_token_loss, hs, W, y, weights=[1.0, 0.5])
    assert torch.equal(new, old) and messages == ["linear_multi_token_loss(weights=...) is deprecated: use "
                                                  "stream_weights="]
    # λ_2 = 0.5 is used: the other weighting gives another value
    assert not torch.equal(new, xent.linear_multi_token_loss(hs, W, y, stream_weights=[1.0, 0.1]))
    z = torch.randn(2, 2, 9, 37, generator=g)
    plain_old, messages = _quiet(xent.multi_token_loss, z, y, weights=[1.0, 0.5])
    assert torch.equal(xent.multi_token_loss(z, y, stream_weights=[1.0, 0.5]), plain_old) and messages


def test_parallel_class_weights_renamed(tmp_path):
    import torch.distributed as dist

    from xent.parallel import vocab_parallel_linear_cross_entropy
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        h, W, _, y, wc = _inputs(seed=3)
        new = vocab_parallel_linear_cross_entropy(h, W, y, weight=wc, chunk_size=4)
        old, messages = _quiet(vocab_parallel_linear_cross_entropy, h, W, y, weight_classes=wc, chunk_size=4)
    finally:
        dist.destroy_process_group()
    assert torch.equal(new, old) and len(messages) == 1
    torch.testing.assert_close(new, xent.linear_cross_entropy(h, W, y, weight=wc), rtol=1e-5, atol=1e-6)


def test_causal_lm_loss_takes_num_items_and_num_items_in_batch():
    g = torch.Generator().manual_seed(4)
    z, y = torch.randn(2, 9, 37, generator=g), torch.randint(0, 37, (2, 9), generator=g)
    a = xent.causal_lm_loss(z, y, num_items=5)
    assert torch.equal(a, xent.causal_lm_loss(z, y, num_items_in_batch=5))
    assert torch.equal(a, xent.causal_lm_loss(z, y, reduction="sum") / 5)
    with pytest.raises(TypeError, match="num_items or num_items_in_batch"):
        xent.causal_lm_loss(z, y, num_items=5, num_items_in_batch=5)


def test_wrong_spellings_are_one_line_errors():
    h, W, b, y, wc = _inputs(seed=5)
    with pytest.raises(TypeError, match="the head is linear_weight") as err:
        xent.linear_cross_entropy(h, weight=W, target=y)
    assert "\n" not in str(err.value)
    with pytest.raises(TypeError, match="the head is linear_weight"):
        xent.linear_loss(h, weight=W, target=y)
    with pytest.raises(TypeError, match="unexpected keyword argument 'weight'"):
        xent.linear_loss(h, W, y, weight=wc)  # its class weights live in the loss object
    with pytest.raises(TypeError, match="missing the head"):
        xent.linear_cross_entropy(h, target=y)
    with pytest.raises(TypeError, match="got 'weight' and its old spelling 'weight_classes'"):
        xent.linear_cross_entropy(h, W, y, weight=wc, weight_classes=wc)
    with pytest.raises(TypeError, match="unexpected keyword argument 'bais'"):
        xent.linear_cross_entropy(h, W, y, bais=b)
    with pytest.raises(TypeError, match="unexpected keyword argument 'weights'"):
        xent.linear_cross_entropy(h, W, y, weights=wc)  # a rename of another function, not this one's


def test_public_signatures_carry_no_private_plumbing():
    import inspect

    lazy = {"train", "nn", "eval", "parallel", "integrations", "keras"}  # importing keras takes seconds
    for name in set(xent.__all__) - lazy:
        fn = getattr(xent, name)
        if inspect.isfunction(fn):
            assert not [p for p in inspect.signature(fn).parameters if p.startswith("_")], name


def test_all_lists_the_lazy_names():
    for name in ("train", "nn", "eval", "parallel", "integrations", "keras"):
        assert name in xent.__all__


def _kernel_calls(monkeypatch):
    calls = []
    original = _cpu_kernel.ce_rows_

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(_cpu_kernel, "ce_rows_", spy)
    return calls


needs_kernel = pytest.mark.skipif(_cpu_kernel._compiler() is None, reason="no C compiler to build the kernel")


@needs_kernel
def test_backend_forces_the_row_backend(monkeypatch):
    monkeypatch.setenv("XENT_CPU_KERNEL", "auto")
    calls = _kernel_calls(monkeypatch)
    h, W, _, y, wc = _inputs(seed=6, N=(4, 16))
    opts = dict(weight=wc, chunk_size=16)
    kernel = _value_and_grads(xent.linear_cross_entropy(h, W, y, backend="cpu_kernel", **opts), (h, W))
    assert len(calls) == 4  # every chunk went through the kernel
    torch_ops = _value_and_grads(xent.linear_cross_entropy(h, W, y, backend="torch", **opts), (h, W))
    assert len(calls) == 4  # and none with backend="torch"
    for a, b in zip(kernel, torch_ops):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # the environment only overrides "auto": XENT_CPU_KERNEL=0 keeps auto off the kernel
    monkeypatch.setenv("XENT_CPU_KERNEL", "0")
    xent.linear_cross_entropy(h, W, y, chunk_size=16)
    assert len(calls) == 4


def test_forced_backend_that_cannot_serve_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv("XENT_CPU_KERNEL", "auto")
    h, W, b, y, _ = _inputs(seed=7)
    cases = [
        (dict(label_smoothing=0.1), "no label smoothing or soft-capping"),
        (dict(linear_bias=b), "no bias gradient"),
    ]
    for kwargs, reason in cases:
        message = f"backend='cpu_kernel' cannot serve this call: .*{reason}"
        with pytest.raises(ValueError, match=message) as err:
            xent.linear_cross_entropy(h, W, y, backend="cpu_kernel", **kwargs)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="computes cross-entropy and token log-probs only, not Focal"):
        xent.linear_loss(h, W, y, loss=xent.losses.Focal(gamma=2.0), backend="cpu_kernel")
    with pytest.raises(ValueError, match="backend='triton' cannot serve this call"):
        xent.linear_cross_entropy(h, W, y, backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        xent.linear_cross_entropy(h, W, y, backend="cuda")


def test_rho1_checks_its_arguments_once(monkeypatch):
    """linear_rho1_loss runs two fused passes; the target ids are checked (a device sync) once, at the
    door."""
    from xent import _validate

    seen = []
    original = _validate.check_target
    monkeypatch.setattr(_validate, "check_target", lambda *a, **k: (seen.append(1), original(*a, **k))[1])
    h, W, _, y, _ = _inputs(seed=8)
    xent.linear_rho1_loss(h, W, y, ref_losses=torch.rand(y.shape)).backward()
    assert len(seen) == 1


def _reference_rows(z, target, w_y, z_coef, scale):
    """float64 autograd reference of the row contract: ℓ = w_y·(lse − z_y) + s·lse², its gradient times
    scale, and the statistics (correct, entropy, lse)."""
    x = z.detach().double().requires_grad_()
    lse = torch.logsumexp(x, dim=-1)
    loss = w_y.double() * (lse - x.gather(-1, target[:, None])[:, 0]) + z_coef * lse.square()
    (grad,) = torch.autograd.grad((loss * scale.double()).sum(), x)
    p = torch.softmax(x.detach(), dim=-1)
    entropy = -(p * torch.log_softmax(x.detach(), dim=-1)).sum(-1)
    correct = (x.detach().gather(-1, target[:, None])[:, 0] >= x.detach().amax(-1)).double()
    return loss.detach(), grad, torch.stack([correct, entropy, lse.detach()], dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["torch", "cpu_kernel"])
def test_row_backend_contract(name, dtype, monkeypatch):
    """The RowBackend interface, for every backend that serves a cross-entropy chunk here: losses returned,
    gradient written over the logits (rows contiguous, row stride > V), statistics filled; without a scale
    the losses and statistics alone."""
    from xent._engine import _backends

    monkeypatch.setenv("XENT_CPU_KERNEL", "auto")
    backend = _backends.get(name)
    g = torch.Generator().manual_seed(9)
    C, V = 11, 53
    wc = torch.rand(V, generator=g) + 0.5
    loss = xent.losses.CrossEntropy(weight=wc, z_loss=1e-3)
    request = _backends.RowRequest(loss, loss.row_spec(), dtype, torch.float32, torch.device("cpu"),
                                   grad=True, stats=True)
    if isinstance(backend, str) or backend.can_serve(request) is not None:
        pytest.skip(f"{name} cannot serve a CPU cross-entropy chunk here")
    logits = (torch.randn(C, V, generator=g) * 3).to(dtype)
    target = torch.randint(0, V, (C,), generator=g)
    scale = torch.rand(C, generator=g)
    ref_loss, ref_grad, ref_stats = _reference_rows(logits, target, wc[target], 1e-3, scale)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    for with_scale in (True, False):
        buf = torch.zeros(C, V + 3, dtype=dtype)
        z = buf[:, :V].copy_(logits)
        stats = torch.empty(C, 3)
        out = backend.rows_(request, z, target, scale if with_scale else None, w_y=wc[target], stats=stats,
                            scratch=backend.scratch(request, C, V))
        assert out.dtype == torch.float32 and out.shape == (C,)
        torch.testing.assert_close(out.double(), ref_loss, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(stats.double(), ref_stats, rtol=1e-5, atol=1e-5)
        if with_scale:
            torch.testing.assert_close(z.double(), ref_grad, **tol)
            assert not buf[:, V:].any()  # nothing written past the row's V logits
