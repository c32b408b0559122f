"""What each rank runs for tests/parallel/test_vocab_parallel.py. Every rank builds the same full
problem from a seed, keeps its slice of the vocabulary, and compares with a single-process float64
reference built from torch.nn.functional.cross_entropy on the full logits (plus z-loss and soft-capping
written out), independent of xent."""

from __future__ import annotations

import zlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_launch import each_case

import xent
from reference import X, Y, ref_cross_entropy
from xent.parallel import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy

OPTIONS = {
    "plain": {},
    "weight": {"weight": True},
    "smooth": {"label_smoothing": 0.1},
    "weight_smooth": {"weight": True, "label_smoothing": 0.2},
    "zloss": {"z_loss": 1e-2},
    "softcap": {"softcap": 2.5},
    "all": {"weight": True, "label_smoothing": 0.15, "z_loss": 1e-2, "softcap": 2.5},
}
REDUCTIONS = ("mean", "sum", "none", "num_items")
NUM_ITEMS = 37
OPTION_CASES = [f"{o}-{r}" for o in OPTIONS for r in REDUCTIONS]
# per-token weights (token_weights) with no option, with class weights + z-loss, and with everything
WEIGHTED_CASES = [f"{o}-{r}" for o in ("plain", "weight", "all") for r in REDUCTIONS]
OTHER_CASES = [
    "all_ignored", "float32", "bfloat16", "golden", "one_rank_owns_all", "masked_slice", "subgroup",
    "fused_shift", "fused_bfloat16", "fused_partial_hidden_grad", "fused_chunks", "allreduce_count", "errors",
    "corners", "weighted_fused_shift",
]
CASES = ([f"plain:{c}" for c in OPTION_CASES] + [f"fused:{c}" for c in OPTION_CASES]
         + [f"weighted_plain:{c}" for c in WEIGHTED_CASES] + [f"weighted_fused:{c}" for c in WEIGHTED_CASES]
         + OTHER_CASES)
TOL64 = {"rtol": 1e-10, "atol": 1e-12}


def torch_reference(logits, target, *, reduction="mean", weight=None, label_smoothing=0.0, z_loss=0.0,
                    softcap=None, num_items=None, ignore_index=-100, token_weights=None):
    """One process, whole vocabulary: torch's cross-entropy plus z-loss and soft-capping, autograd-able.
    Under "mean" torch's part is divided by Σ_valid w_y, the z-loss by the count of valid tokens. With
    per-token weights w_t: each token's loss times w_t, torch's part divided by Σ_valid w_t·w_y, the
    z-loss by Σ_valid w_t; a token of weight 0 is not valid."""
    z = logits if softcap is None else softcap * torch.tanh(logits / softcap)
    z2, t = z.reshape(-1, z.shape[-1]), target.reshape(-1)
    per = F.cross_entropy(z2, t, weight=weight, ignore_index=ignore_index, reduction="none",
                          label_smoothing=label_smoothing)
    valid = t != ignore_index
    zt = z_loss * torch.where(valid, torch.logsumexp(z2, dim=-1), 0.0) ** 2
    tw = torch.ones_like(per) if token_weights is None else token_weights.reshape(-1).to(per.dtype)
    valid = valid & (tw != 0)
    per, zt = per * tw, zt * tw
    if reduction == "none":
        return (per + zt).view(target.shape)
    if reduction == "sum":
        return (per + zt).sum()
    if num_items is not None:
        return (per + zt).sum() / num_items
    count = valid.sum()
    denom = (tw[valid] * (1.0 if weight is None else weight[t[valid]])).sum()
    return per.sum() / denom + zt.sum() / tw[valid].sum() if count > 0 else per.sum() * 0.0


def _generator(name):
    return torch.Generator().manual_seed(zlib.crc32(name.encode()))


def _problem(name, sizes, *, D=6, dtype=torch.float64):
    """Same on every rank: logits [2, 5, V], hidden/W/b of a head, class weights, global targets that hit
    every slice, two ignored."""
    g, V = _generator(name), sum(sizes)
    hidden = torch.randn(2, 5, D, generator=g, dtype=dtype)
    W = torch.randn(V, D, generator=g, dtype=dtype)
    b = torch.randn(V, generator=g, dtype=dtype)
    logits = 3.0 * torch.randn(2, 5, V, generator=g, dtype=dtype)
    target = torch.randint(0, V, (2, 5), generator=g)
    starts = torch.tensor([0, *sizes]).cumsum(0)[:-1]
    target.view(-1)[: len(sizes)] = starts + torch.tensor(sizes) - 1  # the last id of every slice
    target[1, 1], target[1, 4] = -100, -100
    weight = torch.rand(V, generator=g, dtype=dtype) + 0.5
    up = torch.randn(2, 5, generator=g, dtype=dtype)
    return hidden, W, b, logits, target, weight, up


def _token_weights(name, shape=(2, 5)):
    """Per-token weights in [0, 2) with a 0 on a valid token, the same on every rank."""
    w = 2.0 * torch.rand(shape, generator=_generator(name + "/token_weights"), dtype=torch.float64)
    w[0, -1] = 0.0
    return w


def _kwargs(option, reduction, weight, rank, sizes):
    kw = dict(OPTIONS[option])
    full = dict(kw)
    if kw.pop("weight", False):
        kw["weight"] = weight.split(sizes)[rank]
        full["weight"] = weight
    if reduction == "num_items":
        kw["num_items"] = full["num_items"] = NUM_ITEMS
        reduction = "mean"
    kw["reduction"] = full["reduction"] = reduction
    return kw, full


def _backward(loss, up, *inputs):
    """Gradients of Σ up·loss (reduction none) or of the scalar loss."""
    seed = up if loss.dim() else torch.ones((), dtype=loss.dtype)
    return torch.autograd.grad(loss, inputs, grad_outputs=seed.to(loss.dtype))


def check_plain(name, rank, sizes, *, weighted=False):
    option, reduction = name.split("-")
    _, _, _, logits, target, weight, up = _problem(name, sizes)
    kw, full_kw = _kwargs(option, reduction, weight, rank, sizes)
    if weighted:
        kw["token_weights"] = full_kw["token_weights"] = _token_weights(name)
    local = logits.split(sizes, dim=-1)[rank].clone().requires_grad_()
    full = logits.clone().requires_grad_()
    got = vocab_parallel_cross_entropy(local, target, **kw)
    want = torch_reference(full, target, **full_kw)
    torch.testing.assert_close(got, want.detach(), **TOL64)
    if weighted:  # the single-process xent function on the full logits
        torch.testing.assert_close(got, xent.cross_entropy(logits, target, **full_kw), **TOL64)
    else:
        loop = ref_cross_entropy(logits, target, **full_kw)  # float64 token loop
        torch.testing.assert_close(got.detach(), loop, **TOL64)
    (g_local,) = _backward(got, up, local)
    (g_full,) = _backward(want, up, full)
    torch.testing.assert_close(g_local, g_full.split(sizes, dim=-1)[rank], **TOL64)


def check_fused(name, rank, sizes, *, shift=False, dtype=torch.float64, tol=TOL64, weighted=False):
    option, reduction = name.split("-")
    hidden, W, b, _, target, weight, up = _problem(name, sizes)
    hidden, W, b = (x.to(dtype).double() for x in (hidden, W, b))  # the reference sees the rounded inputs
    if shift:
        up = up[:, 1:]
    kw, full_kw = _kwargs(option, reduction, weight, rank, sizes)
    if weighted:
        tw = _token_weights(name)
        kw["token_weights"] = tw  # shaped like target, shifted like it
        full_kw["token_weights"] = tw[:, 1:] if shift else tw
    if "weight" in kw:
        kw["weight_classes"] = kw.pop("weight")
    h = hidden.to(dtype).requires_grad_()
    w_r = W.split(sizes)[rank].to(dtype).requires_grad_()
    b_r = b.split(sizes)[rank].to(dtype).requires_grad_()
    got = vocab_parallel_linear_cross_entropy(h, w_r, target, local_bias=b_r, shift=shift, chunk_size=3, **kw)
    g_h, g_w, g_b = _backward(got, up, h, w_r, b_r)

    # the single-process reference on the full head
    H, Wf, bf = (x.clone().requires_grad_() for x in (hidden, W, b))
    logits = H @ Wf.T + bf
    t = target
    if shift:
        logits, t = logits[:, :-1], target[:, 1:]
    want = torch_reference(logits, t, **full_kw)
    G_h, G_w, G_b = _backward(want, up, H, Wf, bf)
    torch.testing.assert_close(got.double(), want.detach(), **tol)
    torch.testing.assert_close(g_h.double(), G_h, **tol)  # every rank receives the full hidden gradient
    torch.testing.assert_close(g_w.double(), G_w.split(sizes)[rank], **tol)
    torch.testing.assert_close(g_b.double(), G_b.split(sizes)[rank], **tol)
    if dtype != torch.float64:
        return
    # fused == plain vocab-parallel on this rank's materialised logits
    h2, w2, b2 = (x.detach().clone().requires_grad_() for x in (h, w_r, b_r))
    local = h2 @ w2.T + b2
    if shift:
        local = local[:, :-1]
    plain_kw = {("weight" if k == "weight_classes" else k): v for k, v in kw.items()}
    if weighted and shift:
        plain_kw["token_weights"] = full_kw["token_weights"]
    plain = vocab_parallel_cross_entropy(local, t, **plain_kw)
    p_h, p_w, p_b = _backward(plain, up, h2, w2, b2)
    dist.all_reduce(p_h)  # the plain path leaves the sum over ranks to the caller
    torch.testing.assert_close(got, plain, **TOL64)
    for a, c in ((g_h, p_h), (g_w, p_w), (g_b, p_b)):
        torch.testing.assert_close(a, c, **TOL64)


def check_all_ignored(rank, sizes):
    _, W, b, logits, target, weight, _ = _problem("all_ignored", sizes)
    target = torch.full_like(target, -100)
    hidden = torch.randn(2, 5, W.shape[1], dtype=torch.float64)
    for reduction in ("mean", "sum", "none"):
        local = logits.split(sizes, dim=-1)[rank].clone().requires_grad_()
        got = vocab_parallel_cross_entropy(local, target, reduction=reduction, label_smoothing=0.1,
                                           weight=weight.split(sizes)[rank], z_loss=1e-3)
        (g,) = torch.autograd.grad(got.sum(), local)
        assert torch.equal(got, torch.zeros_like(got)) and torch.equal(g, torch.zeros_like(g)), reduction
        h = hidden.clone().requires_grad_()
        w_r = W.split(sizes)[rank].clone().requires_grad_()
        fused = vocab_parallel_linear_cross_entropy(h, w_r, target, reduction=reduction, label_smoothing=0.1)
        gh, gw = torch.autograd.grad(fused.sum(), (h, w_r))
        assert torch.equal(fused, torch.zeros_like(fused)), reduction
        assert not gh.any() and not gw.any(), reduction


def check_float32(rank, sizes):
    _, _, _, logits, target, weight, _ = _problem("float32", sizes)
    opts = {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 4.0}
    local = logits.float().split(sizes, dim=-1)[rank].clone().requires_grad_()
    got = vocab_parallel_cross_entropy(local, target, weight=weight.float().split(sizes)[rank], **opts)
    full = logits.clone().requires_grad_()
    want = torch_reference(full, target, weight=weight, **opts)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-6, atol=1e-6)
    (g,) = torch.autograd.grad(got, local)
    (G,) = torch.autograd.grad(want, full)
    torch.testing.assert_close(g.double(), G.split(sizes, dim=-1)[rank], rtol=1e-5, atol=1e-7)


def check_bfloat16(rank, sizes):
    """Half inputs are computed in float32: same value and gradient as xent.cross_entropy on the full
    bf16 logits (which upcasts the same way)."""
    _, _, _, logits, target, _, _ = _problem("bfloat16", sizes)
    x = logits.bfloat16()
    local = x.split(sizes, dim=-1)[rank].clone().requires_grad_()
    got = vocab_parallel_cross_entropy(local, target, label_smoothing=0.1)
    full = x.clone().requires_grad_()
    want = xent.cross_entropy(full, target, label_smoothing=0.1)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    (g,) = torch.autograd.grad(got, local)
    (G,) = torch.autograd.grad(want, full)
    assert g.dtype == torch.bfloat16
    torch.testing.assert_close(g, G.split(sizes, dim=-1)[rank])


def check_golden(rank, world):
    """docs/REFERENCE.md §2 worked numbers, V = 3 split over the ranks."""
    sizes = [2, 1] if world == 2 else [1, 1, 1]
    x, y = torch.tensor(X, dtype=torch.float64), torch.tensor(Y)
    w = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    golden = [
        ({}, [0.4170300163, 0, 0.6041306053], 0.5105803108),
        ({"weight": w}, [0.4170300163, 0, 1.8123918160], 0.5573554581),
        ({"label_smoothing": 0.1}, [0.5136966829, 0, 0.6707972720], 0.5922469775),
        ({"weight": w, "label_smoothing": 0.1}, [0.7153996846, 0, 1.8686454221], 0.6460112767),
        ({"z_loss": 1e-4}, None, 0.5112114873),
        ({"softcap": 30.0}, [0.4179496244, 0, 0.6050527498], 0.5115011871),
    ]
    local = x.split(sizes, dim=-1)[rank]
    for opts, none, mean in golden:
        kw = dict(opts)
        if "weight" in kw:
            kw["weight"] = kw["weight"].split(sizes)[rank]
        if none is not None:
            got = vocab_parallel_cross_entropy(local, y, reduction="none", **kw)
            torch.testing.assert_close(got, torch.tensor(none, dtype=torch.float64), rtol=0, atol=1e-9)
        got = vocab_parallel_cross_entropy(local, y, **kw)
        torch.testing.assert_close(got, torch.tensor(mean, dtype=torch.float64), rtol=0, atol=1e-9)


def check_one_rank_owns_all(rank, sizes):
    """Every target in the last slice: the other ranks contribute only to the normaliser."""
    _, _, _, logits, target, _, up = _problem("one_rank_owns_all", sizes)
    V = sum(sizes)
    target = torch.where(target == -100, target, V - 1 - (target % sizes[-1]))
    local = logits.split(sizes, dim=-1)[rank].clone().requires_grad_()
    full = logits.clone().requires_grad_()
    got = vocab_parallel_cross_entropy(local, target, reduction="none", z_loss=1e-2)
    want = torch_reference(full, target, reduction="none", z_loss=1e-2)
    torch.testing.assert_close(got, want.detach(), **TOL64)
    (g,) = _backward(got, up, local)
    (G,) = _backward(want, up, full)
    torch.testing.assert_close(g, G.split(sizes, dim=-1)[rank], **TOL64)


def check_fused_partial_hidden_grad(rank, sizes):
    """sum_hidden_grad=False: each rank receives its own g_r·W_r; their sum is the full gradient."""
    hidden, W, _, _, target, _, _ = _problem("fused_partial_hidden_grad", sizes)
    h = hidden.clone().requires_grad_()
    w_r = W.split(sizes)[rank]
    (g_partial,) = torch.autograd.grad(
        vocab_parallel_linear_cross_entropy(h, w_r, target, z_loss=1e-2, sum_hidden_grad=False), h)
    H = hidden.clone().requires_grad_()
    (G,) = torch.autograd.grad(torch_reference(H @ W.T, target, z_loss=1e-2), H)
    assert not torch.allclose(g_partial, G)  # a part only
    dist.all_reduce(g_partial)
    torch.testing.assert_close(g_partial, G, **TOL64)


def check_fused_chunks(rank, sizes):
    """The fused path never projects more than chunk_size tokens at once, forward or backward."""
    import xent._engine._loop as engine
    import xent.parallel._vocab_linear as fused

    hidden, W, b, _, target, _, _ = _problem("fused_chunks", sizes)
    shapes, original = [], engine.project

    def spy(h, w, bias, out=None):
        out = original(h, w, bias, out=out)
        shapes.append(tuple(out.shape))
        return out

    engine.project = fused.project = spy
    try:
        h = hidden.clone().requires_grad_()
        w_r = W.split(sizes)[rank].clone().requires_grad_()
        vocab_parallel_linear_cross_entropy(h, w_r, target, chunk_size=3).backward()
    finally:
        engine.project = fused.project = original
    n = int((target != -100).sum())
    assert len(shapes) == 2 * -(-n // 3), shapes  # pass 1 and backward, ceil(n / 3) chunks each
    assert all(c <= 3 and v == sizes[rank] for c, v in shapes), shapes
    # and the chunk size never changes a result
    results = []
    for chunk in (1, 3, 4, 100, "auto"):
        h = hidden.clone().requires_grad_()
        w_r = W.split(sizes)[rank].clone().requires_grad_()
        b_r = b.split(sizes)[rank].clone().requires_grad_()
        loss = vocab_parallel_linear_cross_entropy(h, w_r, target, local_bias=b_r, chunk_size=chunk,
                                                   label_smoothing=0.1, z_loss=1e-2, softcap=2.0)
        results.append((loss, *torch.autograd.grad(loss, (h, w_r, b_r))))
    for other in results[1:]:
        for a, c in zip(results[0], other):
            torch.testing.assert_close(a, c, **TOL64)


def check_subgroup(rank, sizes):
    """A tensor-parallel group that is not the world: ranks 0 and world−1; slices in group-rank order."""
    world = len(sizes)
    members = [0, world - 1]
    group = dist.new_group(members)  # every rank of the world takes part in creating it
    if rank not in members:
        return
    sub = [5, 3]
    me = members.index(rank)
    _, _, _, logits, target, _, up = _problem("subgroup", sub)
    local = logits.split(sub, dim=-1)[me].clone().requires_grad_()
    full = logits.clone().requires_grad_()
    got = vocab_parallel_cross_entropy(local, target, group=group, reduction="none", label_smoothing=0.1)
    want = torch_reference(full, target, reduction="none", label_smoothing=0.1)
    torch.testing.assert_close(got, want.detach(), **TOL64)
    (g,) = _backward(got, up, local)
    (G,) = _backward(want, up, full)
    torch.testing.assert_close(g, G.split(sub, dim=-1)[me], **TOL64)


def check_masked_slice(rank, sizes):
    """Masked vocabulary (e.g. padding ids of a TP-padded head) at −inf: rank 1's whole slice and the last
    column; logits far below 0, in float32, where exp(z) underflows unless shifted by the true max."""
    _, _, _, logits, target, _, up = _problem("masked_slice", sizes)
    logits = logits - 150.0
    starts = [sum(sizes[:r]) for r in range(len(sizes))]
    masked = torch.zeros(sum(sizes), dtype=torch.bool)
    masked[starts[1]:starts[1] + sizes[1]] = True
    masked[-1] = True
    logits[..., masked] = -torch.inf
    target = torch.where(masked[target.clamp(min=0)], 0, target)  # no target on a masked id
    x = logits.float()
    local = x.split(sizes, dim=-1)[rank].clone().requires_grad_()
    full = logits.clone().requires_grad_()
    for opts in ({}, {"z_loss": 1e-4, "softcap": 200.0}):
        got = vocab_parallel_cross_entropy(local, target, reduction="none", **opts)
        want = torch_reference(full, target, reduction="none", **opts)
        torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-5)
        (g,) = _backward(got, up.float(), local)
        (G,) = _backward(want, up, full)
        torch.testing.assert_close(g.double(), G.split(sizes, dim=-1)[rank], rtol=1e-5, atol=1e-6)


def check_allreduce_count(rank, sizes):
    """Plain: 2 all-reduces (MAX, SUM), none in backward; fused: the same plus one for d hidden.
    No other collective; none carries the logits."""
    _, W, b, logits, target, weight, _ = _problem("allreduce_count", sizes)
    calls = []
    originals = {n: getattr(dist, n) for n in ("all_reduce", "all_gather", "all_gather_into_tensor",
                                                 "broadcast", "reduce_scatter_tensor", "all_to_all")}

    def spy(name):
        def wrapped(tensor, *args, **kwargs):
            calls.append((name, tensor.numel() if isinstance(tensor, torch.Tensor) else None))
            return originals[name](tensor, *args, **kwargs)
        return wrapped

    for n in originals:
        setattr(dist, n, spy(n))
    try:
        opts = {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 3.0}
        local = logits.split(sizes, dim=-1)[rank].clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(local, target, weight=weight.split(sizes)[rank], **opts)
        loss.backward()
        plain_calls, calls[:] = list(calls), []
        h = torch.randn(2, 5, W.shape[1], dtype=torch.float64, requires_grad=True)
        w_r = W.split(sizes)[rank].clone().requires_grad_()
        loss = vocab_parallel_linear_cross_entropy(h, w_r, target, chunk_size=4, **opts)
        loss.backward()
        fused_calls = list(calls)
    finally:
        for n, f in originals.items():
            setattr(dist, n, f)
    N, world = target.numel(), len(sizes)
    assert plain_calls == [("all_reduce", N + world), ("all_reduce", 4 * N + 1)], plain_calls
    n = int((target != -100).sum())
    assert fused_calls == [("all_reduce", n + world), ("all_reduce", 4 * n + 1),
                           ("all_reduce", h.numel())], fused_calls


def _same_error(fn_vp, fn_ref, exc):
    try:
        fn_ref()
    except exc as e:
        want = str(e)
    else:
        raise AssertionError("the reference did not raise")
    try:
        fn_vp()
    except exc as e:
        assert str(e) == want, (str(e), want)
    else:
        raise AssertionError("vocab-parallel did not raise")


def _raises(fn, exc, text):
    try:
        fn()
    except exc as e:
        assert text in str(e), str(e)
    else:
        raise AssertionError(f"no {exc.__name__} ({text})")


def check_errors(rank, sizes):
    _, W, _, logits, target, weight, _ = _problem("errors", sizes)
    V = sum(sizes)
    local = logits.split(sizes, dim=-1)[rank]
    h = torch.randn(2, 5, W.shape[1], dtype=torch.float64)
    w_r = W.split(sizes)[rank]
    for bad_id in (V, -5):  # ids outside the GLOBAL vocabulary, the message of xent.cross_entropy
        bad = target.clone()
        bad[0, 2] = bad_id
        _same_error(lambda b=bad: vocab_parallel_cross_entropy(local, b),
                    lambda b=bad: xent.cross_entropy(logits, b), ValueError)
        _same_error(lambda b=bad: vocab_parallel_linear_cross_entropy(h, w_r, b),
                    lambda b=bad: xent.linear_cross_entropy(h, W, b), ValueError)
    _raises(lambda: vocab_parallel_cross_entropy(local, target, weight=weight), ValueError,
            f"weight must have shape [V] = [{sizes[rank]}]")
    _raises(lambda: vocab_parallel_cross_entropy(local, target.float()), TypeError, "integer class ids")
    _raises(lambda: vocab_parallel_cross_entropy(local, target[:, :3]), ValueError, "target shape (2, 3)")
    _raises(lambda: vocab_parallel_cross_entropy(local, target, reduction="avg"), ValueError, "reduction")
    _raises(lambda: vocab_parallel_cross_entropy(local, target, reduction="sum", num_items=3), ValueError,
            "num_items")
    _raises(lambda: vocab_parallel_cross_entropy(local.long(), target), TypeError, "local_logits")
    _raises(lambda: vocab_parallel_linear_cross_entropy(h, w_r, target, local_bias=torch.zeros(V + 1,
            dtype=torch.float64)), ValueError, "local_bias must have shape [V]")
    _raises(lambda: vocab_parallel_linear_cross_entropy(h, w_r[:, :2], target), ValueError, "local_weight")
    _raises(lambda: vocab_parallel_linear_cross_entropy(h, w_r, target[:, :3]), ValueError, "target shape")
    _raises(lambda: vocab_parallel_linear_cross_entropy(h, w_r, target, weight=weight), ValueError,
            "weight must have shape [V]")
    _raises(lambda: vocab_parallel_linear_cross_entropy(h, w_r, target, chunk_size=0), ValueError,
            "chunk_size")
    bad_w = torch.ones(2, 5, dtype=torch.float64)
    bad_w[1, 2] = float("nan")
    _raises(lambda: vocab_parallel_cross_entropy(local, target, token_weights=bad_w), ValueError,
            "token_weights has 1 non-finite value(s)")
    _raises(lambda: vocab_parallel_linear_cross_entropy(h, w_r, target, token_weights=bad_w[:, :4]),
            ValueError, "token_weights shape (2, 4) must equal target shape (2, 5)")
    # after the errors the ranks are still in step
    torch.testing.assert_close(vocab_parallel_cross_entropy(local, target),
                               xent.cross_entropy(logits, target))


def check_corners(rank, sizes):
    """Issue 10's corners on a sharded vocabulary: a negative class-weight sum (torch's value), num_items
    = 0 on an all-ignored step (0, zero gradient), logits around 1e4 (float64 digits), int8 targets."""
    g, V = _generator("corners"), sum(sizes)
    x = torch.randn(4, V, generator=g, dtype=torch.float64)
    y = torch.tensor([0, V - 1, -100, 1])
    w = torch.linspace(-2.0, 1.0, V, dtype=torch.float64)  # Σ_valid w_y < 0
    local = x.split(sizes, dim=-1)[rank].clone().requires_grad_()
    got = vocab_parallel_cross_entropy(local, y, weight=w.split(sizes)[rank])
    full = x.clone().requires_grad_()
    want = F.cross_entropy(full, y, weight=w)
    torch.testing.assert_close(got, want, **TOL64)
    (gl,) = torch.autograd.grad(got, local)
    (gf,) = torch.autograd.grad(want, full)
    torch.testing.assert_close(gl, gf.split(sizes, dim=-1)[rank], **TOL64)
    ignored = torch.full_like(y, -100)
    zero = vocab_parallel_cross_entropy(local, ignored, num_items=0)
    (gz,) = torch.autograd.grad(zero, local)
    assert float(zero) == 0.0 and not gz.any()
    # exact float32 logits around 1e4 (multiples of 1/256): the float64 loss of the same logits
    D = 8
    h = torch.randint(-16, 17, (4, D), generator=g).float() / 16
    W = torch.randint(-16, 17, (V, D), generator=g).float() / 16
    b = torch.full((V,), 1e4)
    z = torch.addmm(b, h, W.T)
    ref = F.cross_entropy(z.double(), y, reduction="none")
    got = vocab_parallel_cross_entropy(z.split(sizes, dim=-1)[rank], y.to(torch.int8), reduction="none")
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=2e-6)
    fused = vocab_parallel_linear_cross_entropy(h, W.split(sizes)[rank], y, local_bias=b.split(sizes)[rank],
                                                reduction="none", chunk_size=3)
    torch.testing.assert_close(fused.double(), ref, rtol=0, atol=2e-6)


def vocab_worker(rank, world, names, sizes):
    def check(name):
        kind, _, rest = name.partition(":")
        if kind == "plain":
            check_plain(rest, rank, sizes)
        elif kind == "fused":
            check_fused(rest, rank, sizes)
        elif kind == "weighted_plain":
            check_plain(rest, rank, sizes, weighted=True)
        elif kind == "weighted_fused":
            check_fused(rest, rank, sizes, weighted=True)
        elif name == "weighted_fused_shift":
            check_fused("all-mean", rank, sizes, shift=True, weighted=True)
            check_fused("weight-none", rank, sizes, shift=True, weighted=True)
        elif name == "golden":
            check_golden(rank, world)
        elif name == "fused_shift":
            check_fused("all-mean", rank, sizes, shift=True)
            check_fused("weight_smooth-none", rank, sizes, shift=True)
        elif name == "fused_bfloat16":
            check_fused("smooth-mean", rank, sizes, dtype=torch.bfloat16, tol={"rtol": 1e-2, "atol": 1e-3})
        else:
            globals()[f"check_{name}"](rank, sizes)

    return each_case(names, check)
