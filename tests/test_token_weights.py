"""Per-token weights (``token_weights``) on every loss, plain and fused.

Contract (docs/REFERENCE.md §1): ℓ_t ← w_t·ℓ_t; "mean" divides by Σ_valid w_t·w_{y_t} (class weights
w_y) or by num_items; the z-loss is weighted by w_t and averaged over Σ_valid w_t. Checked against
float64 references written as explicit per-token loops, against torch (uniform weights, integer weights
as repeated tokens) and against the library's own ignore_index (zero weights), which is an independent
reference for the masking.
"""

from functools import partial

import pytest
import torch
import torch.nn.functional as F

import xent
from xent import losses

V_, D_ = 13, 6


# ---------- independent float64 references: explicit softmax, one token at a time ----------

def _softmax(row):
    e = torch.exp(row - row.max())
    return e / e.sum()


def ce_terms(row, y, *, class_weight=None, label_smoothing=0.0, z_loss=0.0, softcap=None):
    """(class-weighted part, unweighted z part, w_y) of one token's cross-entropy."""
    if softcap is not None:
        row = softcap * torch.tanh(row / softcap)
    V = row.numel()
    w = torch.ones(V, dtype=row.dtype) if class_weight is None else class_weight.to(row.dtype)
    logq = torch.log(_softmax(row))
    main = (1 - label_smoothing) * w[y] * (-logq[y]) + label_smoothing / V * (-(w * logq).sum())
    lse = torch.log(torch.exp(row - row.max()).sum()) + row.max()
    return main, z_loss * lse**2, w[y]


def ref_weighted(logits, target, token_weights, terms, *, reduction="mean", num_items=None,
                 ignore_index=-100):
    """Loop over tokens: w_t·(main_t + z_t); "mean" = Σ w·main / Σ w·w_y + Σ w·z / Σ w (tokens with
    y = ignore_index or w = 0 skipped), or Σ w·(main + z) / num_items. Differentiable w.r.t. logits."""
    V = logits.shape[-1]
    rows = logits.reshape(-1, V)
    ys = target.reshape(-1).tolist()
    ws = token_weights.reshape(-1).tolist()
    per_token, main_sum, z_sum, denom, mass = [], 0.0, 0.0, 0.0, 0.0
    for row, y, w in zip(rows, ys, ws):
        if y == ignore_index or w == 0.0:
            per_token.append(row.sum() * 0.0)
            continue
        main, z, w_y = terms(row, y)
        per_token.append(w * (main + z))
        main_sum, z_sum = main_sum + w * main, z_sum + w * z
        denom, mass = denom + w * float(w_y), mass + w
    out = torch.stack(per_token)
    if reduction == "none":
        return out.reshape(target.shape)
    if reduction == "sum":
        return out.sum()
    if num_items is not None:
        return out.sum() / num_items
    if mass == 0.0:
        return logits.sum() * 0.0
    return main_sum / denom + z_sum / mass


def _only(fn):
    """A per-token loss with no class weight and no z part, as (main, 0, 1)."""
    return lambda row, y: (fn(_softmax(row), y), 0.0, 1.0)


def tailr_ref(p, y, gamma, threshold=0.0):
    w = min(max((p[y] / (gamma + (1 - gamma) * p[y])).item(), threshold), 1.0)
    return -w * torch.log(p[y])


def focal_ref(p, y, gamma, alpha):
    return -alpha * (1 - p[y]) ** gamma * torch.log(p[y])


def poly_ref(p, y, epsilon):
    return -torch.log(p[y]) + epsilon * (1 - p[y])


_E = torch.randn(V_, 4, generator=torch.Generator().manual_seed(9), dtype=torch.float64)


def demd_ref(p, y):
    e = _E / _E.norm(dim=1, keepdim=True)
    cost = 1 - e @ e[y]
    return (p * cost).sum()


# ---------- data ----------

def _logits(shape=(3, 7), seed=0, ignored=True):
    g = torch.Generator().manual_seed(seed)
    x = (2 * torch.randn(*shape, V_, generator=g, dtype=torch.float64)).requires_grad_()
    y = torch.randint(0, V_, shape, generator=g)
    if ignored:
        y[0, :2] = -100
        y[-1, -1] = -100
    w = torch.rand(shape, generator=g, dtype=torch.float64) * 2
    w[1, 1] = 0.0  # a zero weight on a valid token
    w[0, 0] = 0.0  # and on an ignored one
    return x, y, w


def _grad(out, inputs, seed=1):
    up = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad(out, inputs, up)


CLASS_W = torch.rand(V_, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.3

CE_OPTIONS = [
    {},
    {"weight": CLASS_W},
    {"label_smoothing": 0.1},
    {"z_loss": 1e-2},
    {"softcap": 3.0},
    {"weight": CLASS_W, "label_smoothing": 0.2, "z_loss": 1e-2, "softcap": 4.0},
]
REDUCTIONS = ["mean", "sum", "none", "num_items"]


def _reduction_kwargs(reduction):
    return {"reduction": "mean", "num_items": 9.5} if reduction == "num_items" else {"reduction": reduction}


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("opts", CE_OPTIONS, ids=lambda o: ",".join(o) or "plain")
def test_cross_entropy_matches_loop_reference(opts, reduction):
    x, y, w = _logits()
    kw = _reduction_kwargs(reduction)
    got = xent.cross_entropy(x, y, token_weights=w, **opts, **kw)
    terms = partial(ce_terms, class_weight=opts.get("weight"), z_loss=opts.get("z_loss", 0.0),
                    label_smoothing=opts.get("label_smoothing", 0.0), softcap=opts.get("softcap"))
    want = ref_weighted(x, y, w, terms, **kw)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for a, b in zip(_grad(got, x), _grad(want, x)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_negative_weights_mean_divides_by_the_signed_sum():
    """Signed weights (e.g. advantages): "sum" is Σ w_t·ℓ_t, "mean" divides by Σ w_t whatever its sign."""
    x, y, _ = _logits(seed=4)
    w = torch.linspace(-1.0, 0.6, y.numel(), dtype=torch.float64).reshape(y.shape)
    for kw in ({"reduction": "sum"}, {"reduction": "mean"}, {"reduction": "none"}):
        got = xent.cross_entropy(x, y, token_weights=w, **kw)
        torch.testing.assert_close(got, ref_weighted(x, y, w, ce_terms, **kw), rtol=1e-10, atol=1e-12)


# every loss functional with its per-token reference: (functional, options, reference terms)
FUNCTIONALS = [
    (xent.cross_entropy, {"weight": CLASS_W, "z_loss": 1e-2},
     partial(ce_terms, class_weight=CLASS_W, z_loss=1e-2)),
    (xent.tailr_loss, {"gamma": 0.3, "threshold": 0.2}, _only(partial(tailr_ref, gamma=0.3, threshold=0.2))),
    (xent.gold_loss, {}, _only(partial(tailr_ref, gamma=1.0))),
    (xent.focal_loss, {"gamma": 2.0, "alpha": 0.5}, _only(partial(focal_ref, gamma=2.0, alpha=0.5))),
    (xent.poly_loss, {"epsilon": 1.0}, _only(partial(poly_ref, epsilon=1.0))),
    (xent.emo_loss, {"cost_embedding": _E, "mode": "demd"}, _only(demd_ref)),
]
FN_IDS = [fn.__name__ for fn, _, _ in FUNCTIONALS]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("fn, opts, terms", FUNCTIONALS, ids=FN_IDS)
def test_every_functional_matches_loop_reference(fn, opts, terms, reduction):
    x, y, w = _logits(seed=5)
    kw = _reduction_kwargs(reduction)
    got = fn(x, y, token_weights=w, **opts, **kw)
    want = ref_weighted(x, y, w, terms, **kw)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for a, b in zip(_grad(got, x), _grad(want, x)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def _teacher_of(x):
    """A teacher's logits as a fixed function of each student row (so repeating a row repeats both)."""
    return 0.7 * x.detach().flip(-1) + 0.3


def distill_jsd(x, y, **kw):
    return xent.distill_loss(x, _teacher_of(x), y, kind="jsd", beta=0.3, **kw)


def jsd_ref(row, y):
    p, q = _softmax(_teacher_of(row)), _softmax(row)
    m = 0.3 * p + 0.7 * q
    kl = lambda a, b: (a * (torch.log(a) - torch.log(b))).sum()  # noqa: E731
    return 0.3 * kl(p, m) + 0.7 * kl(q, m), 0.0, 1.0


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_distill_matches_loop_reference(reduction):
    x, y, w = _logits(seed=7)
    kw = _reduction_kwargs(reduction)
    got = distill_jsd(x, y, token_weights=w, **kw)
    want = ref_weighted(x, y, w, jsd_ref, **kw)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for a, b in zip(_grad(got, x), _grad(want, x)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


# ---------- torch equivalences and properties ----------

ALL_FUNCTIONALS = [*FUNCTIONALS, (distill_jsd, {}, jsd_ref)]
ALL_IDS = [*FN_IDS, "distill_loss"]


@pytest.mark.parametrize("fn, opts, _", ALL_FUNCTIONALS, ids=ALL_IDS)
def test_uniform_weights_equal_unweighted(fn, opts, _):
    x, y, _w = _logits(seed=8)
    c = 2.5
    w = torch.full(y.shape, c, dtype=torch.float64)
    for reduction, factor in (("mean", 1.0), ("sum", c), ("none", c)):
        got = fn(x, y, token_weights=w, reduction=reduction, **opts)
        want = fn(x, y, reduction=reduction, **opts)
        torch.testing.assert_close(got, factor * want, rtol=1e-12, atol=1e-13)
        for a, b in zip(_grad(got, x), _grad(factor * want, x)):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("class_weights", [False, True])
def test_integer_weights_equal_repeated_tokens_in_torch(class_weights, reduction):
    """w_t = k is the token repeated k times, for torch's own cross-entropy (class weights included)."""
    x, y, _ = _logits(seed=9)
    w = torch.randint(0, 4, y.shape, generator=torch.Generator().manual_seed(2)).double()
    cw = CLASS_W if class_weights else None
    got = xent.cross_entropy(x, y, token_weights=w, weight=cw, reduction=reduction, label_smoothing=0.1)
    reps = w.reshape(-1).long()
    rep_x = x.reshape(-1, V_).repeat_interleave(reps, dim=0)
    rep_y = y.reshape(-1).repeat_interleave(reps)
    want = F.cross_entropy(rep_x, rep_y, weight=cw, reduction=reduction, label_smoothing=0.1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)
    (g,), (r,) = torch.autograd.grad(got, x), torch.autograd.grad(want, x)
    torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("fn, opts, _", ALL_FUNCTIONALS, ids=ALL_IDS)
def test_integer_weights_equal_repeated_tokens(fn, opts, _):
    """Every loss (z-loss included): w_t = k equals the unweighted loss of the token repeated k times."""
    x, y, _w = _logits(seed=10)
    w = torch.randint(1, 4, y.shape, generator=torch.Generator().manual_seed(3)).double()
    reps = w.reshape(-1).long()
    got = fn(x, y, token_weights=w, **opts)
    rep_x = x.reshape(-1, V_).repeat_interleave(reps, dim=0)
    rep_y = y.reshape(-1).repeat_interleave(reps)
    want = fn(rep_x, rep_y, **opts)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)
    (g,), (r,) = torch.autograd.grad(got, x), torch.autograd.grad(want, x)
    torch.testing.assert_close(g, r, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("fn, opts, _", ALL_FUNCTIONALS, ids=ALL_IDS)
def test_zero_weights_equal_ignoring_those_tokens(fn, opts, _, reduction):
    x, y, w = _logits(seed=11)
    w[2, 3] = 0.0
    kw = _reduction_kwargs(reduction)
    got = fn(x, y, token_weights=w, **opts, **kw)
    y_ignored = torch.where(w == 0, -100, y)
    ones = torch.where(w == 0, 0.0, 1.0).double()
    # w·ℓ with the zero-weight tokens ignored: weights 1 / ignored must give the unweighted loss
    want_ignored = fn(x, y_ignored, **opts, **kw)
    got_ones = fn(x, y, token_weights=ones, **opts, **kw)
    torch.testing.assert_close(got_ones, want_ignored, rtol=1e-12, atol=1e-13)
    for a, b in zip(_grad(got_ones, x), _grad(want_ignored, x)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    # and the same weights with the zero-weight tokens ignored outright change nothing
    got_both = fn(x, y_ignored, token_weights=w, **opts, **kw)
    torch.testing.assert_close(got, got_both, rtol=0, atol=0)


def test_all_zero_weights_give_zero_with_zero_gradient():
    x, y, _ = _logits(seed=12)
    w = torch.zeros(y.shape, dtype=torch.float64)
    for kw in ({"reduction": "mean"}, {"reduction": "sum"}, {"reduction": "mean", "num_items": 0}):
        out = xent.cross_entropy(x, y, token_weights=w, weight=CLASS_W, z_loss=1e-2, **kw)
        (g,) = torch.autograd.grad(out, x)
        assert out.item() == 0.0 and not g.any()


def test_probability_targets_take_row_weights():
    x, y, w = _logits(seed=13, ignored=False)
    probs = torch.softmax(torch.randn(*y.shape, V_, generator=torch.Generator().manual_seed(1),
                                      dtype=torch.float64), dim=-1)
    got = xent.cross_entropy(x, probs, token_weights=w, label_smoothing=0.1, reduction="mean")
    per_row = [-(((1 - 0.1) * p + 0.1 / V_) * torch.log(_softmax(r))).sum()
               for r, p in zip(x.reshape(-1, V_), probs.reshape(-1, V_))]
    want = sum(wi * pi for wi, pi in zip(w.reshape(-1).tolist(), per_row)) / w.sum()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)


def test_no_gradient_reaches_the_weights():
    x, y, w = _logits(seed=14)
    w.requires_grad_()
    out = xent.cross_entropy(x, y, token_weights=w)
    assert torch.autograd.grad(out, (x, w), allow_unused=True)[1] is None


def test_gradcheck_plain_and_fused():
    g = torch.Generator().manual_seed(15)
    x = torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([[0, 4, -100], [2, 2, 1]])
    w = torch.tensor([[0.5, 2.0, 1.0], [0.0, 1.5, 3.0]], dtype=torch.float64)
    cw = torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0], dtype=torch.float64)
    for reduction in ("mean", "none"):
        fn = partial(xent.cross_entropy, target=y, token_weights=w, weight=cw, z_loss=0.1,
                     reduction=reduction)
        assert torch.autograd.gradcheck(lambda z, fn=fn: fn(z), (x,))
    h = torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    for reduction in ("mean", "none"):
        def fused(h, W, reduction=reduction):
            return xent.linear_cross_entropy(h, W, y, token_weights=w, weight_classes=cw, z_loss=0.1,
                                             reduction=reduction, chunk_size=2)
        assert torch.autograd.gradcheck(fused, (h, W))


# ---------- causal LM: weights shaped like labels, shifted like them ----------

def test_causal_lm_loss_shifts_the_weights():
    g = torch.Generator().manual_seed(16)
    x = torch.randn(2, 6, V_, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, V_, (2, 6), generator=g)
    labels[0, 2] = -100
    w = torch.rand(2, 6, generator=g, dtype=torch.float64)
    got = xent.causal_lm_loss(x, labels, token_weights=w, z_loss=1e-2)
    num, z_num, den = 0.0, 0.0, 0.0
    for b in range(2):
        for t in range(5):  # position t predicts label t + 1, weighted by the weight of label t + 1
            y = int(labels[b, t + 1])
            if y == -100:
                continue
            main, z, _ = ce_terms(x[b, t], y, z_loss=1e-2)
            num, z_num, den = num + w[b, t + 1] * main, z_num + w[b, t + 1] * z, den + w[b, t + 1]
    torch.testing.assert_close(got, (num + z_num) / den, rtol=1e-12, atol=1e-13)
    # pre-shifted labels take weights shaped like them, unshifted
    shift_labels = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], dim=1)
    shift_w = torch.cat([w[:, 1:], torch.ones(2, 1, dtype=torch.float64)], dim=1)
    again = xent.causal_lm_loss(x, None, shift_labels=shift_labels, token_weights=shift_w, z_loss=1e-2)
    torch.testing.assert_close(again, got, rtol=1e-12, atol=1e-13)
    # the fused path with shift=True: the same weights, the same shift
    h = torch.randn(2, 6, D_, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(V_, D_, generator=g, dtype=torch.float64, requires_grad=True)
    fused = xent.linear_cross_entropy(h, W, labels, shift=True, token_weights=w, z_loss=1e-2, chunk_size=3)
    plain = xent.causal_lm_loss(h @ W.T, labels, token_weights=w, z_loss=1e-2)
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-13)
    for a, b in zip(torch.autograd.grad(fused, (h, W)), torch.autograd.grad(plain, (h, W))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ---------- fused == plain for every loss object, reduction and chunk size ----------

class AutogradCE(losses.CrossEntropy):
    """The generic (autograd per chunk) branch of the engine with CE's definition."""

    has_closed_form_grad = False


FUSED = [
    (losses.CrossEntropy(weight=CLASS_W, label_smoothing=0.1, z_loss=1e-2, softcap=4.0),
     partial(xent.cross_entropy, weight=CLASS_W, label_smoothing=0.1, z_loss=1e-2, softcap=4.0)),
    (AutogradCE(weight=CLASS_W, z_loss=1e-2),
     partial(xent.cross_entropy, weight=CLASS_W, z_loss=1e-2)),
    (losses.TaiLr(gamma=0.3, threshold=0.2, label_smoothing=0.1),
     partial(xent.tailr_loss, gamma=0.3, threshold=0.2, label_smoothing=0.1)),
    (losses.GOLD(), xent.gold_loss),
    (losses.Focal(gamma=2.0, alpha=0.5), partial(xent.focal_loss, gamma=2.0, alpha=0.5)),
    (losses.Poly(epsilon=2.0), partial(xent.poly_loss, epsilon=2.0)),
    (losses.EMO(cost_embedding=_E, mode="emo1"), partial(xent.emo_loss, cost_embedding=_E, mode="emo1")),
]


def _head(seed=17, shape=(3, 7)):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, D_, generator=g, dtype=torch.float64, requires_grad=True)
    W = (torch.randn(V_, D_, generator=g, dtype=torch.float64) / 2).requires_grad_()
    b = (torch.randn(V_, generator=g, dtype=torch.float64) / 3).requires_grad_()
    y = torch.randint(0, V_, shape, generator=g)
    y[0, :2] = -100
    w = torch.rand(shape, generator=g, dtype=torch.float64) * 2
    w[1, 1] = 0.0
    return h, W, b, y, w


@pytest.mark.parametrize("chunk_size", [1, 3, "auto"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("loss, plain", FUSED, ids=[repr(o) for o, _ in FUSED])
def test_fused_equals_plain(loss, plain, reduction, chunk_size):
    h, W, b, y, w = _head()
    kw = _reduction_kwargs(reduction)
    fused = xent.linear_loss(h, W, y, loss=loss, linear_bias=b, chunk_size=chunk_size, token_weights=w, **kw)
    expected = plain(h @ W.T + b, y, token_weights=w, **kw)
    torch.testing.assert_close(fused, expected, rtol=1e-12, atol=1e-12)
    for a, c in zip(_grad(fused, (h, W, b)), _grad(expected, (h, W, b))):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [1, 3, "auto"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_linear_distill_equals_plain(reduction, chunk_size):
    h, W, b, y, w = _head(seed=18)
    g = torch.Generator().manual_seed(19)
    th = torch.randn(3, 7, 5, generator=g, dtype=torch.float64)
    tW = torch.randn(V_, 5, generator=g, dtype=torch.float64)
    kw = _reduction_kwargs(reduction)
    opts = dict(kind="jsd", beta=0.3, temperature=1.5, hard_weight=0.2)
    fused = xent.linear_distill_loss(h, W, th, tW, y, student_bias=b, chunk_size=chunk_size, token_weights=w,
                                     **opts, **kw)
    plain = xent.distill_loss(h @ W.T + b, th @ tW.T, y, token_weights=w, **opts, **kw)
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-12)
    for a, c in zip(_grad(fused, (h, W, b)), _grad(plain, (h, W, b))):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)


def test_fused_float32_and_backward_twice():
    h, W, b, y, w = _head(seed=20)
    h32, W32 = h.detach().float().requires_grad_(), W.detach().float().requires_grad_()
    out = xent.linear_cross_entropy(h32, W32, y, token_weights=w.float(), z_loss=1e-3, chunk_size=4)
    want = xent.cross_entropy(h.detach() @ W.detach().T, y, token_weights=w, z_loss=1e-3)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)
    g1 = torch.autograd.grad(out, (h32, W32), retain_graph=True)
    g2 = torch.autograd.grad(out, (h32, W32))  # the second backward recomputes, weights included
    for a, c in zip(g1, g2):
        torch.testing.assert_close(a, c)


def test_zero_weight_tokens_are_dropped_before_the_projection():
    import xent._engine._loop as engine

    h, W, _, y, w = _head(seed=21)
    shapes, original = [], engine.project

    def spy(hh, ww, bb, out=None):
        shapes.append(hh.shape[0])
        return original(hh, ww, bb, out=out)

    engine.project = spy
    try:
        xent.linear_cross_entropy(h, W, y, token_weights=w, chunk_size=1000).backward()
    finally:
        engine.project = original
    assert shapes == [int(((y != -100) & (w != 0)).sum())]


# ---------- num_items: micro-batches add up to the full batch ----------

def test_num_items_micro_batches_sum_to_the_full_batch():
    h, W, b, y, w = _head(seed=22, shape=(4, 6))
    x = (h @ W.T + b).detach().requires_grad_()
    opts = {"weight": None, "label_smoothing": 0.1, "z_loss": 1e-2}
    full = xent.cross_entropy(x, y, token_weights=w, **opts)
    mass = w[(y != -100)].sum()  # Σ_valid w_t over the whole batch: the step's normaliser
    parts = sum(xent.cross_entropy(x[i : i + 2], y[i : i + 2], token_weights=w[i : i + 2], num_items=mass,
                                   **opts) for i in (0, 2))
    torch.testing.assert_close(parts, full, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(torch.autograd.grad(parts, x)[0], torch.autograd.grad(full, x)[0],
                               rtol=1e-12, atol=1e-13)
    fused_full = xent.linear_cross_entropy(h, W, y, linear_bias=b, token_weights=w, label_smoothing=0.1,
                                           z_loss=1e-2)
    fused_parts = sum(
        xent.linear_cross_entropy(h[i : i + 2], W, y[i : i + 2], linear_bias=b, token_weights=w[i : i + 2],
                                  num_items=mass, label_smoothing=0.1, z_loss=1e-2, chunk_size=2)
        for i in (0, 2))
    torch.testing.assert_close(fused_parts, fused_full, rtol=1e-12, atol=1e-13)
    for a, c in zip(torch.autograd.grad(fused_parts, (h, W)), torch.autograd.grad(fused_full, (h, W))):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)


# ---------- modules and bad input ----------

def test_modules_take_weights_per_call():
    x, y, w = _logits(seed=23)
    assert torch.equal(xent.nn.CrossEntropyLoss(z_loss=1e-3)(x, y, token_weights=w),
                       xent.cross_entropy(x, y, z_loss=1e-3, token_weights=w))
    h, W, _, y2, w2 = _head(seed=24)
    assert torch.equal(xent.nn.LinearCrossEntropyLoss(chunk_size=2)(h, W, y2, token_weights=w2),
                       xent.linear_cross_entropy(h, W, y2, chunk_size=2, token_weights=w2))
    with pytest.raises(TypeError, match="unknown option 'token_weights'"):
        xent.nn.CrossEntropyLoss(token_weights=w)


def _entry_points():
    x, y, _ = _logits(seed=25)
    h, W, _, _, _ = _head(seed=25)
    t = _teacher_of(x)
    return [
        lambda tw: xent.cross_entropy(x, y, token_weights=tw),
        lambda tw: xent.tailr_loss(x, y, gamma=0.5, token_weights=tw),
        lambda tw: xent.gold_loss(x, y, token_weights=tw),
        lambda tw: xent.focal_loss(x, y, token_weights=tw),
        lambda tw: xent.poly_loss(x, y, token_weights=tw),
        lambda tw: xent.emo_loss(x, y, cost_embedding=_E, token_weights=tw),
        lambda tw: xent.distill_loss(x, t, y, token_weights=tw),
        lambda tw: xent.causal_lm_loss(x, y, token_weights=tw),
        lambda tw: xent.linear_cross_entropy(h, W, y, token_weights=tw),
        lambda tw: xent.linear_loss(h, W, y, loss=losses.Focal(), token_weights=tw),
        lambda tw: xent.linear_distill_loss(h, W, h, W, y, token_weights=tw),
    ]


@pytest.mark.parametrize("which", range(11))
def test_bad_token_weights(which):
    call = _entry_points()[which]
    good = torch.ones(3, 7, dtype=torch.float64)
    with pytest.raises(TypeError, match="token_weights must be a floating-point tensor, got dtype=torch.int64"
                       ):
        call(torch.ones(3, 7, dtype=torch.long))
    with pytest.raises(TypeError, match="token_weights must be a torch.Tensor, got list"):
        call([1.0] * 21)
    with pytest.raises(ValueError, match=r"token_weights shape \(3, 6\) must equal"):
        call(good[:, :6])
    bad = good.clone()
    bad[0, 1], bad[2, 2] = float("nan"), float("inf")
    with pytest.raises(ValueError, match=r"token_weights has 2 non-finite value\(s\) \(the first is nan\)"):
        call(bad)
