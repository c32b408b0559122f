"""xent.linear_cross_entropy / linear_loss: same value and gradients as the plain path on materialised
logits and as a float64 reference; never an [N, V] tensor; ignored tokens cost no work."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import xent
from reference import ref_causal, ref_cross_entropy

OPTIONS = [
    {},
    {"weight_classes": "rand"},
    {"label_smoothing": 0.2},
    {"z_loss": 1e-3},
    {"softcap": 3.0},
    {"weight_classes": "rand", "label_smoothing": 0.1, "z_loss": 1e-2, "softcap": 2.5},
]


def _inputs(shape=(3, 11), D=8, V=37, seed=0, ignore_frac=0.3, dtype=torch.float64, bias=True, device="cpu"):
    """Drawn on the CPU (the same numbers on every device), then moved to ``device``."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, D, generator=g).to(device, dtype).requires_grad_(True)
    W = (torch.randn(V, D, generator=g) / D**0.5 * 2).to(device, dtype).requires_grad_(True)
    b = (0.5 * torch.randn(V, generator=g)).to(device, dtype).requires_grad_(True) if bias else None
    y = torch.randint(0, V, shape, generator=g)
    y[torch.rand(shape, generator=g) < ignore_frac] = -100
    return h, W, b, y.to(device)


def _opts(opts, V, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(1)
    return {k: (torch.rand(V, generator=g).to(device, dtype) + 0.2 if v == "rand" else v)
            for k, v in opts.items()}


def _plain(h, W, b, y, shift, reduction, o):
    logits = h @ W.T + (b if b is not None else 0)
    o = dict(o)
    wc = o.pop("weight_classes", None)
    fn = xent.causal_lm_loss if shift else xent.cross_entropy
    return fn(logits, y, reduction=reduction, weight=wc, **o)


def _grads(out, tensors, seed=2):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype).to(out.device)
    ts = [t for t in tensors if t is not None]
    return torch.autograd.grad(out, ts, g)


@pytest.mark.parametrize("chunk_size", [1, 7, "auto", 1000])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", OPTIONS, ids=str)
@pytest.mark.parametrize("shift", [False, True])
def test_fused_equals_plain_float64(opts, reduction, chunk_size, shift, device):
    h, W, b, y = _inputs(device=device)
    o = _opts(opts, W.shape[0], device=device)
    fused = xent.linear_cross_entropy(h, W, y, linear_bias=b, shift=shift, chunk_size=chunk_size,
                                      reduction=reduction, **o)
    plain = _plain(h, W, b, y, shift, reduction, o)
    assert fused.shape == plain.shape and fused.dtype == torch.float64
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-12)
    for gf, gp in zip(_grads(fused, (h, W, b)), _grads(plain, (h, W, b))):
        torch.testing.assert_close(gf, gp, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("opts", OPTIONS, ids=str)
@pytest.mark.parametrize("shift", [False, True])
def test_fused_float32_against_float64_reference(opts, shift, device):
    h, W, b, y = _inputs(shape=(2, 13), D=16, V=53, seed=3, dtype=torch.float32, device=device)
    o = _opts(opts, 53, torch.float32, device=device)
    fused = xent.linear_cross_entropy(h, W, y, linear_bias=b, shift=shift, chunk_size=5, reduction="none",
                                      **o)
    logits64 = (h.double() @ W.double().T + b.double()).cpu()  # the float64 reference runs on the CPU
    ref_o = {("weight" if k == "weight_classes" else k): (v.cpu() if torch.is_tensor(v) else v)
             for k, v in o.items()}
    ref = (ref_causal(logits64, y.cpu(), reduction="none", **ref_o) if shift
           else ref_cross_entropy(logits64, y.cpu(), reduction="none", **ref_o))
    torch.testing.assert_close(fused.double().cpu(), ref, rtol=2e-5, atol=2e-5)


def test_gradcheck_fused(device):
    h, W, b, y = _inputs(shape=(2, 4), D=3, V=6, seed=4, device=device)
    o = {"label_smoothing": 0.1, "z_loss": 1e-2, "softcap": 2.0}
    for reduction in ("mean", "none"):
        assert torch.autograd.gradcheck(
            lambda h, W, b, r=reduction: xent.linear_cross_entropy(h, W, y, linear_bias=b, chunk_size=3,
                                                                   reduction=r, **o), (h, W, b))


def test_all_ignored(device):
    h, W, b, y = _inputs(ignore_frac=1.0, device=device)
    for reduction in ("mean", "sum"):
        out = xent.linear_cross_entropy(h, W, y, linear_bias=b, reduction=reduction)
        assert out.item() == 0.0
        for g in torch.autograd.grad(out, (h, W, b)):
            assert torch.equal(g, torch.zeros_like(g))
    out = xent.linear_cross_entropy(h, W, y, reduction="none")
    assert torch.equal(out, torch.zeros(y.shape, dtype=out.dtype, device=device))


def _truth(h, W, b, y):
    """float64 loss and gradients on the same half values, and the largest |logit|."""
    h64, W64, b64 = (t.detach().double().requires_grad_(True) for t in (h, W, b))
    logits = h64 @ W64.T + b64
    truth = xent.cross_entropy(logits, y)
    return truth, torch.autograd.grad(truth, (h64, W64, b64)), logits.abs().max().item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype, device):
    h, W, b, y = _inputs(shape=(4, 9), D=32, V=101, seed=5, dtype=dtype, device=device)
    fused = xent.linear_cross_entropy(h, W, y, linear_bias=b, chunk_size=7)
    assert fused.dtype == torch.float32
    gh, gW, gb = torch.autograd.grad(fused, (h, W, b))
    assert gh.dtype == gW.dtype == gb.dtype == dtype
    truth, grads64, zmax = _truth(h, W, b, y)
    # Each logit is rounded once to the half dtype (relative 2^-9 for bfloat16, 2^-12 for float16), which
    # moves lse and z_y by at most that much each.
    unit = 2.0**-9 if dtype == torch.bfloat16 else 2.0**-12
    assert abs(fused.double() - truth) <= 2 * unit * zmax
    for g, g64 in zip((gh, gW, gb), grads64):
        torch.testing.assert_close(g.double(), g64, rtol=2e-2, atol=2e-2 * g64.abs().max().item())
    if dtype == torch.bfloat16 or device.type != "cpu":
        # projected in its own dtype like the plain path's addmm: the same logits, so the same loss
        plain = xent.cross_entropy(torch.addmm(b, h.reshape(-1, 32), W.T), y.reshape(-1))
        # a GPU may pick another GEMM kernel for a chunk than for the whole: one rounding of a logit apart
        tol = 1e-6 if device.type == "cpu" else 2 * unit * zmax
        torch.testing.assert_close(fused, plain, rtol=tol, atol=tol)
    else:
        # float16 on CPU is projected in float32: at least as close to the truth as the plain path
        plain = xent.cross_entropy(h @ W.T + b, y)
        assert abs(fused.double() - truth) <= abs(plain.double() - truth) + 1e-6


def test_bfloat16_weight_gradient_is_accumulated_in_float32(device):
    """One token per chunk: 512 bfloat16 partial products summed. Accumulated in float32 the error stays
    at one bfloat16 rounding, as with a single chunk; accumulated in bfloat16 it would grow with every add.
    (On CUDA the GEMM writes float32 itself: xent._engine.float_out_mm.)"""
    h, W, b, y = _inputs(shape=(512,), D=16, V=64, seed=14, ignore_frac=0.0, dtype=torch.bfloat16,
                         device=device)
    _, (_, gW64, gb64), _ = _truth(h, W, b, y)
    errors = {}
    for chunk in (1, 512):
        out = xent.linear_cross_entropy(h, W, y, linear_bias=b, chunk_size=chunk)
        gW, gb = torch.autograd.grad(out, (W, b))
        errors[chunk] = [((g.double() - r).norm() / r.norm()).item() for g, r in ((gW, gW64), (gb, gb64))]
    for many, one in zip(errors[1], errors[512]):
        assert many <= 2 * one + 2.0**-9, errors
    # the control: summing the same 512 partial products in bfloat16 is several times worse
    acc = torch.zeros_like(W)
    with torch.no_grad():
        logits = (h @ W.T + b).float()
        g = (torch.softmax(logits, -1) - torch.nn.functional.one_hot(y, 64)) / 512
        for i in range(512):
            acc += (g[i : i + 1].T.to(torch.bfloat16) @ h[i : i + 1])
    bad = ((acc.double() - gW64).norm() / gW64.norm()).item()
    assert bad > 3 * errors[1][0], (bad, errors)


def test_float16_matmuls_do_not_flush_small_gradients(monkeypatch):
    """Where float16 is projected in float16 (CUDA), p·(1/N) would underflow in a float16 buffer; the
    chunk gradient is formed at unit scale instead. Forced on CPU here."""
    import xent._engine._plan

    monkeypatch.setattr(xent._engine._plan, "matmul_dtype", lambda dtype, device: dtype)
    N, D, V = 4096, 8, 8000
    g = torch.Generator().manual_seed(15)
    # nearly flat logits (p_j ≈ 1/V, so p_j/N ≈ 3e-8 is below float16's smallest step) and hidden states
    # sharing one direction: the weight gradient is then the small difference Σ_t (p_t − onehot_t)/N,
    # which is wrong if the p_j/N terms are lost.
    h = (torch.ones(N, D) + 0.1 * torch.randn(N, D, generator=g)).half().requires_grad_(True)
    W = (0.01 * torch.randn(V, D, generator=g)).half().requires_grad_(True)
    b = torch.zeros(V, dtype=torch.float16, requires_grad=True)
    y = torch.randint(0, V, (N,), generator=g)
    out = xent.linear_cross_entropy(h, W, y, linear_bias=b, chunk_size=1024)
    gh, gW, gb = torch.autograd.grad(out, (h, W, b))
    _, grads64, _ = _truth(h, W, b, y)
    for g, g64 in zip((gh, gW, gb), grads64):
        assert torch.isfinite(g).all()
        assert ((g.double() - g64).norm() / g64.norm()).item() < 2e-2


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("closed_form", [True, False])
def test_row_blocks_never_change_the_result(monkeypatch, reduction, closed_form):
    """The loss sees each chunk a few rows at a time (BLOCK_BYTES): blocks of 1 or 3 rows give the
    numbers of one block, for the closed-form and the autograd path, with the bias gradient."""
    import xent._engine._backends

    class Loss(xent.losses.CrossEntropy):
        has_closed_form_grad = closed_form

    h, W, b, y = _inputs(seed=16)
    o = {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 4.0}
    ref = xent.linear_loss(h, W, y, linear_bias=b, loss=Loss(**o), chunk_size=10, reduction=reduction)
    ref_grads = _grads(ref, (h, W, b))
    for rows in (1, 3):
        monkeypatch.setattr(xent._engine._backends, "BLOCK_BYTES", rows * 4 * W.shape[0])
        out = xent.linear_loss(h, W, y, linear_bias=b, loss=Loss(**o), chunk_size=10, reduction=reduction)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        for g, r in zip(_grads(out, (h, W, b)), ref_grads):
            torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


def test_generic_engine_matches_closed_form(device):
    """The autograd path of linear_loss (any TokenLoss) gives the closed-form CE's numbers."""

    class AutogradCE(xent.losses.CrossEntropy):
        has_closed_form_grad = False

    h, W, b, y = _inputs(seed=6, device=device)
    o = {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 4.0}
    for reduction in ("mean", "none"):
        a = xent.linear_loss(h, W, y, linear_bias=b, loss=AutogradCE(**o), chunk_size=4, reduction=reduction)
        c = xent.linear_loss(h, W, y, linear_bias=b, loss=xent.losses.CrossEntropy(**o), chunk_size=4,
                             reduction=reduction)
        torch.testing.assert_close(a, c)
        for ga, gc in zip(_grads(a, (h, W, b)), _grads(c, (h, W, b))):
            torch.testing.assert_close(ga, gc)


def test_num_items_and_accumulation(device):
    h, W, _, y = _inputs(shape=(4, 10), seed=7, ignore_frac=0.4, device=device)
    n = xent.count_items(y)
    full = xent.linear_cross_entropy(h, W, y, shift=True)
    parts = sum(xent.linear_cross_entropy(h[i : i + 1], W, y[i : i + 1], shift=True, num_items=n)
                for i in range(4))
    torch.testing.assert_close(parts, full)
    for gp, gf in zip(_grads(parts, (h, W)), _grads(full, (h, W))):
        torch.testing.assert_close(gp, gf)


@settings(max_examples=20, deadline=None)
@given(chunk=st.integers(1, 40), batch=st.integers(1, 4), seed=st.integers(0, 1000))
def test_chunk_size_and_batch_never_change_the_result(chunk, batch, seed):
    h, W, b, y = _inputs(shape=(batch, 9), seed=seed)
    ref = xent.linear_cross_entropy(h, W, y, linear_bias=b, shift=True, reduction="none", chunk_size="auto")
    out = xent.linear_cross_entropy(h, W, y, linear_bias=b, shift=True, reduction="none", chunk_size=chunk)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    # each sequence alone gives its own row
    for i in range(batch):
        one = xent.linear_cross_entropy(h[i : i + 1], W, y[i : i + 1], linear_bias=b, shift=True,
                                        reduction="none", chunk_size=chunk)
        torch.testing.assert_close(one[0], ref[i], rtol=1e-12, atol=1e-12)


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.max_numel = 0
        self.mm_rows = []
        self.mm_dims = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        name = func.__name__.split(".")[0]
        if name in ("mm", "addmm", "addmm_"):
            a, b = (args[1], args[2]) if name.startswith("addmm") else (args[0], args[1])
            self.mm_rows.append(a.shape[0])
            self.mm_dims.update((*a.shape, *b.shape))
        return out


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_never_allocates_tokens_by_vocab(reduction):
    N, D, V = 96, 16, 500
    h, W, b, y = _inputs(shape=(N,), D=D, V=V, seed=8, ignore_frac=0.0, dtype=torch.float32)
    with _Recorder() as rec:
        out = xent.linear_cross_entropy(h, W, y, linear_bias=b, chunk_size=16, reduction=reduction)
        torch.autograd.grad(out.sum(), (h, W, b))
    assert rec.max_numel <= 16 * V < N * V
    # the positive control: the plain path does allocate [N, V]
    with _Recorder() as rec_plain:
        xent.cross_entropy(h @ W.T + b, y)
    assert rec_plain.max_numel >= N * V


def test_ignored_tokens_are_dropped_before_the_projection():
    N, D, V = 40, 8, 64
    h, W, b, y = _inputs(shape=(N,), D=D, V=V, seed=9, ignore_frac=0.0, dtype=torch.float32)
    y[::4] = -100  # 30 valid tokens
    with _Recorder() as rec:
        xent.linear_cross_entropy(h, W, y, linear_bias=b, chunk_size=1000)
    # D=8 and V=64 are the other dimensions: the token dimension of every matmul is 30, never 40
    assert rec.mm_dims == {30, 8, 64}
    y[:] = -100
    with _Recorder() as rec:
        xent.linear_cross_entropy(h, W, y, linear_bias=b)
    assert rec.mm_rows == []


def test_no_grad_does_one_matmul():
    h, W, b, y = _inputs(shape=(20,), seed=10, ignore_frac=0.0, dtype=torch.float32)
    with torch.no_grad(), _Recorder() as rec:
        xent.linear_cross_entropy(h, W, y, linear_bias=b, chunk_size=1000)
    assert len(rec.mm_rows) == 1


def test_module():
    h, W, b, y = _inputs(seed=11)
    mod = xent.nn.LinearCrossEntropyLoss(label_smoothing=0.1, shift=True)
    torch.testing.assert_close(mod(h, W, y, bias=b),
                               xent.linear_cross_entropy(h, W, y, linear_bias=b, label_smoothing=0.1,
                                                         shift=True))


def test_bad_input():
    h, W, b, y = _inputs(dtype=torch.float32)
    with pytest.raises(ValueError, match=r"weight must have shape \[V, D\] with D = hidden.shape\[-1\] = 8"):
        xent.linear_cross_entropy(h, W[:, :5], y)
    with pytest.raises(TypeError, match="weight dtype torch.float64 must equal hidden dtype torch.float32"):
        xent.linear_cross_entropy(h, W.double(), y)
    with pytest.raises(ValueError, match=r"bias must have shape \[V\] = \[37\]"):
        xent.linear_cross_entropy(h, W, y, linear_bias=b[:3])
    bad = y.clone()
    bad[0, 0] = 37
    with pytest.raises(ValueError, match=r"the first is 37"):
        xent.linear_cross_entropy(h, W, bad)
    with pytest.raises(ValueError, match=r"chunk_size must be 'auto' or an int >= 1, got 0"):
        xent.linear_cross_entropy(h, W, y, chunk_size=0)
    with pytest.raises(TypeError, match="loss must be a xent.losses.TokenLoss"):
        xent.linear_loss(h, W, y, loss=torch.nn.CrossEntropyLoss())
    with pytest.raises(ValueError, match=r"^weight must have shape \[V\] = \[37\]"):
        xent.linear_cross_entropy(h, W, y, weight=torch.ones(5))


def test_torch_compile_model_calling_it():
    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)
            self.lm_head = torch.nn.Linear(8, 37, bias=False)

        def forward(self, x, y):
            return xent.linear_cross_entropy(torch.relu(self.proj(x)), self.lm_head.weight, y, shift=True)

    torch.manual_seed(0)
    model = Head()
    x = torch.randn(2, 11, 8)
    y = torch.randint(0, 37, (2, 11))
    eager = model(x, y)
    compiled = torch.compile(model)
    out = compiled(x, y)
    out.backward()
    torch.testing.assert_close(out, eager)
    assert model.lm_head.weight.grad is not None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    h, W, b, y = _inputs(shape=(4, 33), D=64, V=1000, seed=12, dtype=torch.float32)
    cpu = xent.linear_cross_entropy(h, W, y, linear_bias=b, shift=True, label_smoothing=0.1)
    cuda = xent.linear_cross_entropy(h.cuda(), W.cuda(), y.cuda(), linear_bias=b.cuda(), shift=True,
                                     label_smoothing=0.1)
    torch.testing.assert_close(cuda.cpu(), cpu, rtol=1e-4, atol=1e-5)


def test_backward_twice_and_scaled_upstream():
    """A second backward (retain_graph) recomputes; an upstream scale multiplies the stored gradients."""
    h, W, b, y = _inputs(seed=13)
    out = xent.linear_cross_entropy(h, W, y, linear_bias=b, label_smoothing=0.1)
    plain = xent.cross_entropy(h @ W.T + b, y, label_smoothing=0.1)
    first = torch.autograd.grad(3.0 * out, (h, W, b), retain_graph=True)
    second = torch.autograd.grad(-0.5 * out, (h, W, b))
    ref = torch.autograd.grad(plain, (h, W, b))
    for g1, g2, r in zip(first, second, ref):
        torch.testing.assert_close(g1, 3.0 * r)
        torch.testing.assert_close(g2, -0.5 * r)


def test_auto_chunk_size_is_a_memory_budget_in_the_projection_dtype(monkeypatch):
    from xent._engine import auto_chunk_size

    monkeypatch.delenv("XENT_CHUNK_MB", raising=False)
    # the budget's tokens, rounded down to a multiple of 64 (CHUNK_ALIGN: the GEMMs' row blocks)
    assert 64 * 2**20 // (4 * 32000) == 524 and auto_chunk_size(10**6, 32000, 4) == 512  # float32 logits
    assert auto_chunk_size(10**6, 32000, 2) == 1024  # bfloat16 logits (1048 by the budget): twice the tokens
    assert auto_chunk_size(10**6, 128256, 4) == 512  # the floor: 64 MiB would be 130 tokens
    assert auto_chunk_size(100, 32000, 4) == 100  # never more than every token
    # CUDA: 1 GiB, at least 1024 tokens (bfloat16 logits of the TRL shape's V = 248320: 2162 → 2112 tokens)
    assert 2**30 // (2 * 248320) == 2162 and auto_chunk_size(10**6, 248320, 2, "cuda") == 2112
    assert auto_chunk_size(10**6, 128256, 8, "cuda") == 1024  # 1046 by the budget
    assert auto_chunk_size(10**6, 10**6, 4, "cuda") == 1024
    monkeypatch.setenv("XENT_CHUNK_MB", "256")
    assert auto_chunk_size(10**6, 32000, 4) == 2048  # 2097 by the budget
    # what linear_loss passes: one buffer per head, in the projection dtype
    h, W, _, y = _inputs(shape=(3000,), D=4, V=32000, ignore_frac=0.0, dtype=torch.bfloat16)
    monkeypatch.setenv("XENT_CHUNK_MB", "64")
    with torch.no_grad(), _Recorder() as rec:
        xent.linear_cross_entropy(h, W, y)
    assert rec.mm_rows == [1024, 1024, 952]


def test_row_blocks_in_bfloat16(monkeypatch):
    """Half logits are copied to a float32 block buffer: blocks of any size fit it, including a last
    chunk whose single block is larger than the first chunk's blocks (5 tokens → 3 + 2, then 4 → 4)."""
    import xent._engine._backends as backends

    h, W, b, y = _inputs(shape=(9,), D=16, V=40, seed=17, ignore_frac=0.0, dtype=torch.bfloat16)
    ref = xent.linear_cross_entropy(h, W, y, linear_bias=b, chunk_size=5, reduction="none")
    ref_grads = _grads(ref.float(), (h, W, b))
    monkeypatch.setattr(backends, "BLOCK_BYTES", 4 * 4 * W.shape[0])
    assert [(s.start, s.stop) for s in backends.row_blocks(5, 40)] == [(0, 3), (3, 5)]
    assert [(s.start, s.stop) for s in backends.row_blocks(4, 40)] == [(0, 4)]
    out = xent.linear_cross_entropy(h, W, y, linear_bias=b, chunk_size=5, reduction="none")
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for g, r in zip(_grads(out.float(), (h, W, b)), ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-2, atol=1e-3)


def test_kept_chunk_buffer_carries_nothing_between_calls(monkeypatch):
    """The CPU chunk buffer kept between calls (chunk_buffer): calls of other shapes and dtypes in any
    order, and calls from two threads at once, give what a fresh buffer gives."""
    import threading

    from xent._engine import _project as _linear

    def run(seed, n, V, dtype):
        h, W, _, y = _inputs(shape=(n,), D=8, V=V, ignore_frac=0.2, dtype=dtype, seed=seed)
        h.requires_grad_(), W.requires_grad_()
        loss = xent.linear_cross_entropy(h, W, y, chunk_size=7)
        loss.backward()
        return loss.detach(), h.grad, W.grad

    cases = [(0, 40, 301, torch.float32), (1, 90, 700, torch.float32), (2, 30, 50, torch.bfloat16),
             (3, 40, 301, torch.float32)]
    _linear.release_buffers()  # earlier tests' calls kept theirs
    monkeypatch.delenv("XENT_KEEP_CHUNK_BUFFER", raising=False)  # the default: a buffer per call
    fresh = [run(*c) for c in cases]
    assert not _linear._kept.__dict__.get("buffers")
    monkeypatch.setenv("XENT_KEEP_CHUNK_BUFFER", "1")
    _linear.release_buffers()
    for case, expected in zip(cases + cases[::-1], fresh + fresh[::-1]):
        for got, want in zip(run(*case), expected):
            assert torch.equal(got, want)
    kept = _linear._kept.buffers
    assert kept[torch.float32].numel() == 7 * 700 and kept[torch.bfloat16].numel() == 7 * 50
    results = {}

    def worker(i):
        results[i] = [run(*cases[j]) for j in (1, 0, 1)]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        for got, want in zip(results[i], [fresh[1], fresh[0], fresh[1]]):
            assert all(torch.equal(a, b) for a, b in zip(got, want))
    _linear.release_buffers()
    assert not _linear._kept.__dict__.get("buffers")
