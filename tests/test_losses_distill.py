"""Distillation: REFERENCE.md numbers, a float64 reference that forms every mixture directly in probability
space, properties of divergences, the β=0/1 convention, no gradient to the teacher, and errors."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import xent
from xent import losses

S = torch.tensor([[2.0, 1.0, 0.1], [0.5, 2.5, 0.3], [1.5, 0.5, 2.0]], dtype=torch.float64)
T = torch.tensor([[1.0, 2.0, 0.5], [0.2, 1.8, 0.9], [2.2, 0.1, 1.0]], dtype=torch.float64)
Y = torch.tensor([0, -100, 2])
KINDS = ["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd"]


def _kl(a, b):
    """Σ a log(a/b) with the ratio formed directly; a = 0 terms are 0 by convention."""
    return torch.where(a > 0, a * torch.log(a / b), torch.zeros_like(a)).sum()


def divergence_ref(p, q, kind, beta=0.5, alpha=0.1):
    """p teacher, q student: probability vectors [V] (float64); mixtures formed as plain sums."""
    if kind == "forward_kl":
        return _kl(p, q)
    if kind == "reverse_kl":
        return _kl(q, p)
    if kind == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * _kl(p, m) + (1 - beta) * _kl(q, m)
    if kind == "skew_kl":
        return _kl(p, alpha * p + (1 - alpha) * q)
    if kind == "skew_reverse_kl":
        return _kl(q, (1 - alpha) * p + alpha * q)
    return 0.5 * (p - q).abs().sum()


def distill_ref(student, teacher, target, kind, *, beta=0.5, alpha=0.1, temperature=1.0, t_squared=False,
                softcap=None, hard_weight=0.0):
    out = []
    for s, t, y in zip(student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1]),
                       target.reshape(-1).tolist()):
        if y == -100:
            out.append(s.sum() * 0.0)
            continue
        if softcap is not None:
            s, t = softcap * torch.tanh(s / softcap), softcap * torch.tanh(t / softcap)
        q = torch.exp(s / temperature) / torch.exp(s / temperature).sum()
        p = torch.exp(t / temperature) / torch.exp(t / temperature).sum()
        loss = divergence_ref(p, q, kind, beta, alpha) * (temperature**2 if t_squared else 1.0)
        if hard_weight:
            ce = -torch.log(torch.exp(s)[y] / torch.exp(s).sum())
            loss = (1 - hard_weight) * loss + hard_weight * ce
        out.append(loss)
    return torch.stack(out).reshape(target.shape)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind, expected", [("forward_kl", 0.3513478113), ("reverse_kl", 0.3684275982),
                                            ("jsd", 0.0868064984)])
def test_reference_worked_numbers(kind, expected, dtype):
    got = xent.distill_loss(S.to(dtype), T.to(dtype), Y, kind=kind, beta=0.5)
    assert got.item() == pytest.approx(expected, abs=1e-10 if dtype == torch.float64 else 1e-6)


OPTIONS = [
    dict(kind="forward_kl"),
    dict(kind="reverse_kl", temperature=2.0, t_squared=True),
    dict(kind="jsd", beta=0.5),
    dict(kind="jsd", beta=0.1, temperature=0.7),
    dict(kind="jsd", beta=0.9, softcap=2.0),
    dict(kind="skew_kl", alpha=0.1),
    dict(kind="skew_kl", alpha=0.6, hard_weight=0.3),
    dict(kind="skew_reverse_kl", alpha=0.1, softcap=1.5, temperature=3.0),
    dict(kind="tvd"),
    dict(kind="tvd", temperature=1.5, hard_weight=0.5),
    dict(kind="reverse_kl", softcap=2.0, hard_weight=0.4, temperature=2.0, t_squared=True),
    dict(kind="jsd", beta=0.3, softcap=3.0, hard_weight=0.2, temperature=0.5),
]


@pytest.mark.parametrize("options", OPTIONS, ids=[str(o) for o in OPTIONS])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_matches_float64_reference(options, reduction):
    g = torch.Generator().manual_seed(0)
    student = (3 * torch.randn(3, 4, 9, generator=g, dtype=torch.float64)).requires_grad_()
    teacher = (3 * torch.randn(3, 4, 9, generator=g, dtype=torch.float64)).requires_grad_()
    target = torch.randint(0, 9, (3, 4), generator=g)
    target[2, 1:] = -100
    got = xent.distill_loss(student, teacher, target, reduction=reduction, **options)
    ref_student = student.detach().clone().requires_grad_()
    per = distill_ref(ref_student, teacher.detach(), target, **options)
    expected = {"none": per, "sum": per.sum(), "mean": per.sum() / (target != -100).sum()}[reduction]
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-11)
    upstream = torch.randn(got.shape, generator=g, dtype=torch.float64)
    grad_s, grad_t = torch.autograd.grad(got, (student, teacher), upstream, allow_unused=True)
    (grad_ref,) = torch.autograd.grad(expected, ref_student, upstream)
    torch.testing.assert_close(grad_s, grad_ref, atol=1e-12, rtol=1e-10)
    assert grad_t is None  # no gradient reaches the teacher


GRADCHECK_OPTIONS = [OPTIONS[i] for i in (0, 6, 7, 9, 10, 11)]  # every kind, cap, hard term, T²


@pytest.mark.parametrize("options", GRADCHECK_OPTIONS, ids=[str(o) for o in GRADCHECK_OPTIONS])
def test_gradcheck(options):
    g = torch.Generator().manual_seed(1)
    student = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 5, generator=g, dtype=torch.float64)
    target = torch.tensor([4, -100, 0])
    assert torch.autograd.gradcheck(
        lambda s: xent.distill_loss(s, teacher, target, reduction="sum", **options), (student,))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), kind=st.sampled_from(KINDS), v=st.integers(2, 50),
       scale=st.floats(0.01, 30.0), beta=st.floats(0.0, 1.0), alpha=st.floats(0.0, 1.0),
       temperature=st.floats(0.1, 10.0))
def test_zero_iff_equal_and_nonnegative(seed, kind, v, scale, beta, alpha, temperature):
    g = torch.Generator().manual_seed(seed)
    student = scale * torch.randn(4, v, generator=g)
    teacher = scale * torch.randn(4, v, generator=g)
    options = dict(kind=kind, beta=beta, alpha=alpha, temperature=temperature, reduction="none")
    same = xent.distill_loss(student, student.clone(), **options)
    torch.testing.assert_close(same, torch.zeros(4), atol=1e-6, rtol=0)
    diff = xent.distill_loss(student, teacher, **options)
    assert bool(torch.isfinite(diff).all() and (diff >= -1e-6).all())


def test_jsd_beta_zero_and_one_follow_trl():
    # Documented convention (as TRL and Liger): β=0 is KL(P‖Q), β=1 is KL(Q‖P); between them the mixture.
    for beta, kind in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
        got = xent.distill_loss(S, T, Y, kind="jsd", beta=beta)
        assert got.item() == pytest.approx(xent.distill_loss(S, T, Y, kind=kind).item(), abs=1e-15)
    # ... which are the limits of JSD(β)/β and JSD(β)/(1−β).
    small = 1e-6
    assert (xent.distill_loss(S, T, Y, kind="jsd", beta=small).item() / small
            == pytest.approx(0.3513478113, rel=1e-4))
    assert (xent.distill_loss(S, T, Y, kind="jsd", beta=1 - small).item() / small
            == pytest.approx(0.3684275982, rel=1e-4))


def test_symmetries_and_limits():
    swap = xent.distill_loss(T, S, Y, kind="jsd", beta=0.5)
    forward = xent.distill_loss(S, T, Y, kind="jsd", beta=0.5)
    assert swap.item() == pytest.approx(forward.item(), abs=1e-15)  # JSD(0.5) is symmetric
    for kind, plain in (("skew_kl", "forward_kl"), ("skew_reverse_kl", "reverse_kl")):
        at0 = xent.distill_loss(S, T, Y, kind=kind, alpha=0.0)
        assert at0.item() == pytest.approx(xent.distill_loss(S, T, Y, kind=plain).item(), abs=1e-15)
        at1 = xent.distill_loss(S, T, Y, kind=kind, alpha=1.0)
        assert at1.item() == pytest.approx(0.0, abs=1e-15)
    hard = xent.distill_loss(S, T, Y, hard_weight=1.0, temperature=4.0)
    assert hard.item() == pytest.approx(0.5105803108, abs=1e-9)  # pure CE at temperature 1


def test_softcap_before_temperature_and_t_squared():
    capped = xent.distill_loss(S * 10, T * 10, Y, kind="jsd", softcap=3.0, temperature=2.0)
    manual = xent.distill_loss(3.0 * torch.tanh(S * 10 / 3.0) / 2.0, 3.0 * torch.tanh(T * 10 / 3.0) / 2.0, Y,
                               kind="jsd")
    assert capped.item() == pytest.approx(manual.item(), abs=1e-14)
    squared = xent.distill_loss(S, T, Y, temperature=2.0, t_squared=True)
    assert squared.item() == pytest.approx(4 * xent.distill_loss(S, T, Y, temperature=2.0).item(), abs=1e-14)


def test_target_none_counts_every_token_and_target_only_masks():
    all_tokens = xent.distill_loss(S, T, reduction="none")
    masked = xent.distill_loss(S, T, Y, reduction="none")
    torch.testing.assert_close(masked, all_tokens * torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64))
    assert xent.distill_loss(S, T).item() == pytest.approx(all_tokens.mean().item(), abs=1e-15)
    # Any in-range label gives the same divergence: the target does not enter it.
    other = xent.distill_loss(S, T, torch.tensor([1, 1, 1]))
    assert other.item() == pytest.approx(all_tokens.mean().item(), abs=1e-15)
    s = S.clone().requires_grad_()
    out = xent.distill_loss(s, T, torch.full((3,), -100))
    out.backward()
    assert out.item() == 0.0 and not s.grad.any()


def test_masked_vocabulary_entries_stay_finite():
    # A teacher that rules tokens out with −inf (e.g. padded vocabulary rows): 0·log 0 terms are 0.
    teacher = T.clone()
    teacher[:, 1] = -math.inf
    student = S.clone().requires_grad_()
    for kind in ("forward_kl", "jsd", "skew_kl", "tvd"):
        out = xent.distill_loss(student, teacher, Y, kind=kind)
        (grad,) = torch.autograd.grad(out, student)
        assert math.isfinite(out.item()) and bool(torch.isfinite(grad).all()), kind
        ref = distill_ref(S, teacher, Y, kind)[[0, 2]].mean()
        assert out.item() == pytest.approx(ref.item(), abs=1e-12), kind


def test_half_inputs_computed_in_float32():
    got = xent.distill_loss(S.bfloat16(), T.half(), Y, kind="jsd")
    assert got.dtype == torch.float32
    expected = xent.distill_loss(S.bfloat16().double(), T.half().double(), Y, kind="jsd")
    assert got.item() == pytest.approx(expected.item(), abs=1e-6)


def test_loss_object_caps_both_inputs():
    loss = losses.Distill(kind="reverse_kl", softcap=1.0, temperature=2.0)
    assert loss.num_extra == 1 and "kind='reverse_kl'" in repr(loss)
    safe = Y.clamp(min=0)
    torch.testing.assert_close(loss(S, safe, T), distill_ref(S, T, safe, "reverse_kl", softcap=1.0,
                                                             temperature=2.0), atol=1e-14, rtol=0)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: xent.distill_loss(S, T[:, :2], Y),
         r"teacher_logits vocabulary size 2 does not match student_logits vocabulary size 3"),
        (lambda: xent.distill_loss(S, T[:2], Y), r"teacher_logits shape \(2, 3\) must equal student_logits"),
        (lambda: xent.distill_loss(S, T, Y, kind="jsd", beta=1.5),
         r"beta must be in \[0\.0, 1\.0\], got 1\.5"),
        (lambda: xent.distill_loss(S, T, Y, beta=-0.1), r"beta must be in \[0\.0, 1\.0\], got -0\.1"),
        (lambda: xent.distill_loss(S, T, Y, kind="skew_kl", alpha=2.0),
         r"alpha must be in \[0\.0, 1\.0\], got 2\.0"),
        (lambda: xent.distill_loss(S, T, Y, temperature=0.0), r"temperature must be .* > 0, got 0\.0"),
        (lambda: xent.distill_loss(S, T, Y, temperature=-1.0), r"temperature must be .* > 0, got -1\.0"),
        (lambda: xent.distill_loss(S, T, Y, kind="kl"), r"kind must be one of .* got 'kl'"),
        (lambda: xent.distill_loss(S, T, hard_weight=0.5), r"hard_weight=0\.5 needs target"),
        (lambda: xent.distill_loss(S, T, Y, hard_weight=1.5),
         r"hard_weight must be in \[0\.0, 1\.0\], got 1\.5"),
        (lambda: xent.distill_loss(S, T, Y[:2]), r"target shape \(2,\) does not match student_logits shape"),
        (lambda: xent.distill_loss(S, T, Y, softcap=-1.0),
         r"softcap must be None or a finite number > 0, got -1\.0"),
    ],
)
def test_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_teacher_must_be_floating():
    with pytest.raises(TypeError, match=r"teacher_logits must be a floating-point tensor"):
        xent.distill_loss(S, torch.ones(3, 3, dtype=torch.long), Y)


def test_ignored_tokens_and_num_items():
    g = torch.Generator().manual_seed(8)
    s = torch.randn(2, 5, 7, generator=g, dtype=torch.float64)
    t = torch.randn(2, 5, 7, generator=g, dtype=torch.float64)
    y = torch.randint(0, 7, (2, 5), generator=g)
    y[1, :3] = -100
    base = xent.distill_loss(s, t, y, kind="jsd")
    s2, t2 = s.clone(), t.clone()
    s2[1, :3], t2[1, :3] = 1e4, -math.inf  # garbage (even inf) where ignored changes nothing
    assert xent.distill_loss(s2, t2, y, kind="jsd").item() == pytest.approx(base.item(), abs=1e-14)
    total = xent.distill_loss(s, t, y, kind="jsd", reduction="sum")
    per_item = xent.distill_loss(s, t, y, kind="jsd", num_items=4)
    assert per_item.item() == pytest.approx(total.item() / 4, abs=1e-14)
