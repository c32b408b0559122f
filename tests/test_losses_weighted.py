"""TaiLr, GOLD, focal and Poly-1: worked numbers, float64 references from the papers' formulas, gradients,
properties and errors. The references below use an explicit softmax and a per-token loop on purpose."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import xent
from reference import assert_closed_form_grad
from xent import losses

X = torch.tensor([[2.0, 1.0, 0.1], [0.5, 2.5, 0.3], [1.5, 0.5, 2.0]], dtype=torch.float64)
Y = torch.tensor([0, -100, 2])


# ---------- independent float64 references: explicit softmax, one token at a time ----------

def _probs(row):
    e = torch.exp(row - row.max())
    return e / e.sum()


def _per_token_ref(logits, target, fn, ignore_index=-100):
    """fn(p [V], y) -> loss for one token; returns the per-token tensor (0 where ignored)."""
    flat_z, flat_y = logits.reshape(-1, logits.shape[-1]), target.reshape(-1)
    out = []
    for z, y in zip(flat_z, flat_y.tolist()):
        out.append(fn(_probs(z), y) if y != ignore_index else z.sum() * 0.0)
    return torch.stack(out).reshape(target.shape)


def _mean_ref(per_token, target, ignore_index=-100):
    return per_token.sum() / (target != ignore_index).sum()


def tailr_ref(p, y, gamma, threshold=0.0, eps=0.0):
    w = p[y] / (gamma + (1 - gamma) * p[y])
    w = min(max(w.item(), threshold), 1.0)  # a float: no gradient through the weight
    loss = -w * torch.log(p[y])
    if eps:
        loss = (1 - eps) * loss + eps / p.numel() * (-torch.log(p)).sum()
    return loss


def focal_ref(p, y, gamma, alpha):
    return -alpha * (1 - p[y]) ** gamma * torch.log(p[y])


def poly_ref(p, y, epsilon):
    return -torch.log(p[y]) + epsilon * (1 - p[y])


CASES = [
    # (functional, options, loss object, per-token reference)
    (xent.tailr_loss, dict(gamma=0.1), losses.TaiLr(gamma=0.1), lambda p, y: tailr_ref(p, y, 0.1)),
    (xent.tailr_loss, dict(gamma=0.8, threshold=0.2), losses.TaiLr(gamma=0.8, threshold=0.2),
     lambda p, y: tailr_ref(p, y, 0.8, 0.2)),
    (xent.tailr_loss, dict(gamma=0.1, threshold=0.3, label_smoothing=0.1),
     losses.TaiLr(gamma=0.1, threshold=0.3, label_smoothing=0.1),
     lambda p, y: tailr_ref(p, y, 0.1, 0.3, 0.1)),
    (xent.gold_loss, dict(), losses.GOLD(), lambda p, y: tailr_ref(p, y, 1.0)),
    (xent.gold_loss, dict(threshold=0.2), losses.GOLD(threshold=0.2), lambda p, y: tailr_ref(p, y, 1.0, 0.2)),
    (xent.focal_loss, dict(), losses.Focal(), lambda p, y: focal_ref(p, y, 2.0, 1.0)),
    (xent.focal_loss, dict(gamma=0.5, alpha=0.25), losses.Focal(gamma=0.5, alpha=0.25),
     lambda p, y: focal_ref(p, y, 0.5, 0.25)),
    (xent.poly_loss, dict(), losses.Poly(), lambda p, y: poly_ref(p, y, 1.0)),
    (xent.poly_loss, dict(epsilon=-1.0), losses.Poly(epsilon=-1.0), lambda p, y: poly_ref(p, y, -1.0)),
]
IDS = [f"{fn.__name__}-{opts}" for fn, opts, _, _ in CASES]


# ---------- REFERENCE.md §3 worked numbers ----------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "fn, options, expected",
    [
        (xent.tailr_loss, dict(gamma=0.1), 0.4771803414),
        (xent.gold_loss, dict(), 0.3025052339),
        (xent.focal_loss, dict(gamma=2.0, alpha=1.0), 0.0863560714),
        (xent.poly_loss, dict(epsilon=1.0), 0.9078050477),
    ],
)
def test_reference_worked_numbers(fn, options, expected, dtype):
    got = fn(X.to(dtype), Y, **options)
    assert got.dtype == dtype
    assert got.item() == pytest.approx(expected, abs=1e-10 if dtype == torch.float64 else 1e-6)


def test_tailr_worked_weights():
    # REFERENCE.md: weights 0.9508009873 and 0.9233899534 for γ=0.1, b=0 on rows 0 and 2.
    nll = xent.cross_entropy(X, Y, reduction="none")
    per_token = xent.tailr_loss(X, Y, gamma=0.1, reduction="none")
    weights = per_token[[0, 2]] / nll[[0, 2]]
    torch.testing.assert_close(weights, torch.tensor([0.9508009873, 0.9233899534], dtype=torch.float64),
                               atol=1e-10, rtol=0)


# ---------- against the float64 references: values and gradients, every reduction ----------

@pytest.mark.parametrize("fn, options, loss_obj, ref", CASES, ids=IDS)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_matches_float64_reference(fn, options, loss_obj, ref, reduction):
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(4, 5, 11, generator=g, dtype=torch.float64)).requires_grad_()
    target = torch.randint(0, 11, (4, 5), generator=g)
    target[0, :2] = -100
    got = fn(logits, target, reduction=reduction, **options)
    ref_logits = logits.detach().clone().requires_grad_()
    per_token = _per_token_ref(ref_logits, target, ref)
    expected = {"none": per_token, "sum": per_token.sum(), "mean": _mean_ref(per_token, target)}[reduction]
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)
    upstream = torch.randn(got.shape, generator=g, dtype=torch.float64)
    (grad,) = torch.autograd.grad(got, logits, upstream)
    (grad_ref,) = torch.autograd.grad(expected, ref_logits, upstream)
    torch.testing.assert_close(grad, grad_ref, atol=1e-12, rtol=1e-10)
    # The loss object on in-range targets is the per-token definition itself.
    safe = target.clamp(min=0)
    torch.testing.assert_close(loss_obj(logits.detach(), safe), _per_token_ref(logits.detach(), safe, ref),
                               atol=1e-12, rtol=1e-12)


SMOOTH_CASES = [c for c in CASES if c[0] in (xent.focal_loss, xent.poly_loss)]


@pytest.mark.parametrize("fn, options, loss_obj, ref", SMOOTH_CASES)
def test_gradcheck(fn, options, loss_obj, ref):
    # Only the losses without a stop-gradient: for TaiLr/GOLD the finite difference also moves the
    # weight, which is the point of the stop-gradient; their gradients are checked against the bounds below.
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([1, -100, 5])
    assert torch.autograd.gradcheck(lambda z: fn(z, target, reduction="sum", **options), (logits,))


def test_gold_gradient_is_the_policy_gradient():
    # Pang & He: −sg(q_y)·∇log q_y = −∇q_y, the gradient of the expected reward 1 at the data token.
    z = torch.randn(7, 9, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 9, (7,))
    (grad,) = torch.autograd.grad(xent.gold_loss(z, y, reduction="sum"), z)
    (grad_pg,) = torch.autograd.grad(-torch.softmax(z, -1).gather(-1, y[:, None]).sum(), z)
    torch.testing.assert_close(grad, grad_pg, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("loss_obj", [c[2] for c in CASES] + [
    losses.Focal(gamma=0.0, alpha=2.0), losses.Focal(gamma=0.5, detach_factor=True),
    losses.TaiLr(gamma=0.2, label_smoothing=0.3, softcap=2.0), losses.Poly(epsilon=0.5, softcap=1.0)],
    ids=repr)
def test_closed_form_gradient_matches_autograd(loss_obj):
    # The fused path's value_and_grad against autograd of the per-token definition, token by token scaled.
    g = torch.Generator().manual_seed(5)
    z = 3 * torch.randn(9, 13, generator=g, dtype=torch.float64)
    z[0] = torch.tensor([60.0] + [0.0] * 12, dtype=torch.float64)  # q_y ≈ 1
    y = torch.randint(0, 13, (9,), generator=g)
    y[0] = 0
    scale = torch.rand(9, generator=g, dtype=torch.float64)
    assert loss_obj.has_closed_form_grad
    assert_closed_form_grad(loss_obj, z, y, scale, value_rtol=1e-12)


def test_tailr_gradient_is_the_tvd_bound_without_clamp():
    # Ji et al.: without the clamp, ∇ℓ = ∇[−log(γ + (1−γ) q_y)] / (1−γ).
    gamma = 0.3
    z = torch.randn(7, 9, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 9, (7,))
    (grad,) = torch.autograd.grad(xent.tailr_loss(z, y, gamma=gamma, reduction="sum"), z)
    q_y = torch.softmax(z, -1).gather(-1, y[:, None]).squeeze(-1)
    bound = (-torch.log(gamma + (1 - gamma) * q_y) / (1 - gamma)).sum()
    (grad_bound,) = torch.autograd.grad(bound, z)
    torch.testing.assert_close(grad, grad_bound, atol=1e-12, rtol=1e-10)


# ---------- properties ----------

@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 6), v=st.integers(2, 40),
       scale=st.floats(0.1, 20.0))
def test_limits_are_cross_entropy(seed, n, v, scale):
    g = torch.Generator().manual_seed(seed)
    z = scale * torch.randn(n, v, generator=g, dtype=torch.float64)
    y = torch.randint(0, v, (n,), generator=g)
    ce = xent.cross_entropy(z, y, reduction="none")
    # TaiLr γ → 0 (threshold 0): the weight 1/(1 − γ + γ·e^{nll}) → 1, with 1 − w ≤ γ·e^{nll}.
    for gamma in (1e-3, 1e-8):
        gap = ce - xent.tailr_loss(z, y, gamma=gamma, reduction="none")
        assert bool((gap >= 0).all() and (gap <= gamma * torch.exp(ce) * ce + 1e-12).all())
    torch.testing.assert_close(xent.tailr_loss(z, y, gamma=1e-300, reduction="none"), ce, rtol=1e-15, atol=0)
    torch.testing.assert_close(xent.focal_loss(z, y, gamma=0.0, reduction="none"), ce, rtol=0, atol=0)
    torch.testing.assert_close(xent.poly_loss(z, y, epsilon=0.0, reduction="none"), ce, rtol=0, atol=1e-15)
    # GOLD = TaiLr at γ=1, and each loss is ≤ CE up to its own weight (≥ 0 always).
    torch.testing.assert_close(xent.gold_loss(z, y, reduction="none"),
                               xent.tailr_loss(z, y, gamma=1.0, reduction="none"))
    for fn in (xent.tailr_loss, xent.gold_loss):
        kw = {"gamma": 0.5} if fn is xent.tailr_loss else {}
        per = fn(z, y, reduction="none", **kw)
        assert bool((per >= 0).all() and (per <= ce + 1e-12).all())


def test_tailr_label_smoothing_matches_cross_entropy_smoothing_at_gamma_zero():
    got = xent.tailr_loss(X, Y, gamma=1e-12, label_smoothing=0.1)
    assert got.item() == pytest.approx(xent.cross_entropy(X, Y, label_smoothing=0.1).item(), abs=1e-10)
    assert got.item() == pytest.approx(0.5922469775, abs=1e-9)  # REFERENCE.md §2


def test_focal_detach_factor_changes_gradient_not_value():
    z = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 7, (5,))
    a = xent.focal_loss(z, y, reduction="none")
    b = xent.focal_loss(z, y, reduction="none", detach_factor=True)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    (ga,) = torch.autograd.grad(a.sum(), z)
    (gb,) = torch.autograd.grad(b.sum(), z)
    # detached: the gradient is the fixed weight times CE's gradient.
    q = torch.softmax(z.detach(), -1)
    w = (1 - q.gather(-1, y[:, None])) ** 2
    torch.testing.assert_close(gb, w * (q - torch.nn.functional.one_hot(y, 7)), atol=1e-12, rtol=1e-10)
    assert not torch.allclose(ga, gb)


def test_focal_near_certain_token_is_exact():
    # 1 − q_y for q_y ≈ 1 − 1e-12: −expm1(−nll) keeps it; 1 − exp(−nll) would lose most digits in float32.
    z = torch.tensor([[30.0, 0.0, 0.0]])
    y = torch.tensor([0])
    got = xent.focal_loss(z, y, gamma=1.0)
    exact = 2 * math.exp(-30.0) * 2 * math.exp(-30.0)  # (1 − q_y) ≈ 2e^{−30}, −log q_y ≈ 2e^{−30}
    assert got.item() == pytest.approx(exact, rel=1e-5)


@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0])
def test_focal_gradient_finite_when_q_rounds_to_one(gamma):
    # float32 q_y == 1 exactly: (1−q)^γ has an infinite slope at 0 for γ < 1; the loss's true gradient is 0.
    z = torch.tensor([[100.0, 0.0, 0.0], [1.0, 2.0, 3.0]], requires_grad=True)
    y = torch.tensor([0, 1])
    (grad,) = torch.autograd.grad(xent.focal_loss(z, y, gamma=gamma, reduction="sum"), z)
    assert bool(torch.isfinite(grad).all()) and not grad[0].any()
    (grad_row,) = torch.autograd.grad(xent.focal_loss(z[1:], y[1:], gamma=gamma, reduction="sum"), z)
    torch.testing.assert_close(grad[1], grad_row[1])


@pytest.mark.parametrize("fn, options, loss_obj, ref", CASES[::2], ids=IDS[::2])
def test_masking_num_items_and_all_ignored(fn, options, loss_obj, ref):
    g = torch.Generator().manual_seed(2)
    z = torch.randn(2, 6, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (2, 6), generator=g)
    y[1, 3:] = -100
    base = fn(z, y, **options)
    z2 = z.clone()
    z2[1, 3:] = 1e4 * torch.randn(3, 5, generator=g, dtype=torch.float64)  # garbage where ignored
    assert fn(z2, y, **options).item() == pytest.approx(base.item(), abs=1e-14)
    total = fn(z, y, reduction="sum", **options)
    assert fn(z, y, num_items=17, **options).item() == pytest.approx(total.item() / 17, abs=1e-14)
    zz = z.clone().requires_grad_()
    out = fn(zz, torch.full((2, 6), -100), **options)
    out.backward()
    assert out.item() == 0.0 and not zz.grad.any()


def test_bfloat16_is_computed_in_float32():
    got = xent.tailr_loss(X.bfloat16(), Y, gamma=0.1)
    assert got.dtype == torch.float32
    expected = xent.tailr_loss(X.bfloat16().double(), Y, gamma=0.1)
    assert got.item() == pytest.approx(expected.item(), abs=1e-6)


def test_softcap_is_applied_first():
    got = xent.focal_loss(X, Y, softcap=3.0)
    assert got.item() == pytest.approx(xent.focal_loss(3.0 * torch.tanh(X / 3.0), Y).item(), abs=1e-14)


# ---------- bad input ----------

@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: xent.tailr_loss(X, Y, gamma=0.0), r"gamma must be in \(0\.0, 1\.0\], got 0\.0"),
        (lambda: xent.tailr_loss(X, Y, gamma=1.5), r"gamma must be in \(0\.0, 1\.0\], got 1\.5"),
        (lambda: xent.tailr_loss(X, Y, gamma=-0.1), r"gamma must be in \(0\.0, 1\.0\], got -0\.1"),
        (lambda: xent.tailr_loss(X, Y, gamma=float("nan")), r"gamma must be in .* got nan"),
        (lambda: xent.tailr_loss(X, Y, gamma=0.1, threshold=1.2),
         r"threshold must be in \[0\.0, 1\.0\], got 1\.2"),
        (lambda: xent.tailr_loss(X, Y, gamma=0.1, label_smoothing=-0.1), r"label_smoothing .* got -0\.1"),
        (lambda: xent.gold_loss(X, Y, threshold=-1.0), r"threshold must be in \[0\.0, 1\.0\], got -1\.0"),
        (lambda: xent.focal_loss(X, Y, gamma=-1.0), r"gamma must be a finite number >= 0, got -1\.0"),
        (lambda: xent.focal_loss(X, Y, alpha=0.0), r"alpha must be a finite number > 0, got 0\.0"),
        (lambda: xent.poly_loss(X, Y, epsilon=-2.0), r"epsilon must be a finite number >= -1, got -2\.0"),
        (lambda: xent.poly_loss(X, Y, softcap=0.0), r"softcap must be None or a finite number > 0, got 0\.0"),
        (lambda: xent.focal_loss(X, torch.tensor([0, 3, 1])), r"target has 1 id\(s\) outside \[0, 3\)"),
        (lambda: xent.gold_loss(X, Y, reduction="avg"), r"reduction must be one of .* got 'avg'"),
        (lambda: xent.tailr_loss(X, Y, gamma=0.1, reduction="sum", num_items=3),
         r"num_items .* reduction='sum'"),
    ],
)
def test_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_gamma_is_keyword_and_required():
    with pytest.raises(TypeError):
        xent.tailr_loss(X, Y)  # no default γ: the right value depends on the task
    with pytest.raises(TypeError):
        xent.tailr_loss(X, Y, 0.1)
