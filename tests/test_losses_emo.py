"""EMO: against a direct O(V²) cost-matrix computation, the closed-form DEMD gradient, float32 numerics
and errors. The references build C(i, j) = 1 − cos(e_i, e_j) explicitly, which xent never does."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import xent
from reference import assert_closed_form_grad
from xent import losses

X = torch.tensor([[2.0, 1.0, 0.1], [0.5, 2.5, 0.3], [1.5, 0.5, 2.0]], dtype=torch.float64)
Y = torch.tensor([0, -100, 2])
E = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)


def cost_matrix(e):
    """C [V, V] with a double loop over pairs: 1 − e_i·e_j / (‖e_i‖‖e_j‖)."""
    v = e.shape[0]
    c = torch.empty(v, v, dtype=torch.float64)
    for i in range(v):
        for j in range(v):
            c[i, j] = 1 - torch.dot(e[i], e[j]) / (e[i].norm() * e[j].norm())
    return c


def emo_ref(logits, target, e, mode, ratio_cap=None):
    """Per-token EMO from the paper: DEMD = Σ_i q_i C(i, y) with the explicit cost matrix; 0 where ignored."""
    c = cost_matrix(e.double())
    out = []
    for z, y in zip(logits.reshape(-1, logits.shape[-1]), target.reshape(-1).tolist()):
        if y == -100:
            out.append(z.sum() * 0.0)
            continue
        q = torch.exp(z) / torch.exp(z).sum()
        demd = (q * c[:, y]).sum()
        mle = -torch.log(q[y])
        if mode == "demd":
            out.append(demd)
        elif mode == "emo1":
            ratio = (mle / (demd + 1e-10)).detach()
            ratio = ratio if ratio_cap is None else ratio.clamp(max=ratio_cap)
            out.append(0.5 * (mle + ratio * demd))
        else:
            ratio = (demd / (mle + 1e-10)).detach()
            ratio = ratio if ratio_cap is None else ratio.clamp(max=ratio_cap)
            out.append(ratio * mle + demd)
    return torch.stack(out).reshape(target.shape)


def test_reference_emo1_value_equals_cross_entropy():
    # REFERENCE.md §3: EMO-1's value equals CE (0.5105803108 on X, y), whatever the embedding.
    for mode_e in (E, torch.randn(3, 5, dtype=torch.float64)):
        got = xent.emo_loss(X, Y, cost_embedding=mode_e)
        assert got.item() == pytest.approx(0.5105803108, abs=1e-9)


def test_worked_demd_and_its_gradient():
    # On X, y with E: the cost column for y=0 is [0, 1, 1 − 1/√2] and for y=2 is [1 − 1/√2, 1 − 1/√2, 0].
    z = X.clone().requires_grad_()
    per = xent.emo_loss(z, Y, cost_embedding=E, mode="demd", reduction="none")
    c = cost_matrix(E)
    torch.testing.assert_close(c[:, 0], torch.tensor([0.0, 1.0, 1 - 2**-0.5], dtype=torch.float64))
    q = torch.softmax(X, -1)
    for row, y in ((0, 0), (2, 2)):
        demd = (q[row] * c[:, y]).sum()
        assert per[row].item() == pytest.approx(demd.item(), abs=1e-14)
        (grad,) = torch.autograd.grad(per[row], z, retain_graph=True)
        # ∂DEMD/∂z_j = q_j (C(j, y) − DEMD): Ren et al., the reason EMO moves mass toward near synonyms.
        torch.testing.assert_close(grad[row], q[row] * (c[:, y] - demd), atol=1e-14, rtol=0)
    assert per[1].item() == 0.0
    assert xent.emo_loss(X, Y, cost_embedding=E, mode="demd").item() == pytest.approx(0.2020574306, abs=1e-9)


@pytest.mark.parametrize("mode, ratio_cap", [("demd", None), ("emo1", None), ("emo1", 0.5), ("emo2", None),
                                             ("emo2", 0.3)])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_matches_cost_matrix_reference(mode, ratio_cap, reduction):
    g = torch.Generator().manual_seed(0)
    v, d = 13, 4
    e = torch.randn(v, d, generator=g, dtype=torch.float64)
    logits = (2 * torch.randn(3, 5, v, generator=g, dtype=torch.float64)).requires_grad_()
    target = torch.randint(0, v, (3, 5), generator=g)
    target[1, 1:3] = -100
    got = xent.emo_loss(logits, target, cost_embedding=e, mode=mode, ratio_cap=ratio_cap, reduction=reduction)
    ref_logits = logits.detach().clone().requires_grad_()
    per = emo_ref(ref_logits, target, e, mode, ratio_cap)
    n_valid = (target != -100).sum()
    expected = {"none": per, "sum": per.sum(), "mean": per.sum() / n_valid}[reduction]
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)
    upstream = torch.randn(got.shape, generator=g, dtype=torch.float64)
    (grad,) = torch.autograd.grad(got, logits, upstream)
    (grad_ref,) = torch.autograd.grad(expected, ref_logits, upstream)
    torch.testing.assert_close(grad, grad_ref, atol=1e-12, rtol=1e-10)


CLOSED_FORM_OPTIONS = [dict(mode="demd"), dict(mode="emo1"), dict(mode="emo1", ratio_cap=0.5),
                       dict(mode="emo2", softcap=2.0), dict(mode="emo2", ratio_cap=0.2)]


@pytest.mark.parametrize("options", CLOSED_FORM_OPTIONS, ids=str)
def test_closed_form_gradient_matches_autograd(options):
    # value_and_grad (the fused path) against autograd of the per-token definition, scaled per token.
    g = torch.Generator().manual_seed(6)
    v = 17
    loss = losses.EMO(cost_embedding=torch.randn(v, 6, generator=g, dtype=torch.float64), **options)
    z = 3 * torch.randn(8, v, generator=g, dtype=torch.float64)
    y = torch.randint(0, v, (8,), generator=g)
    z[0, y[0]] = 60.0  # q_y ≈ 1: DEMD ≈ 0
    scale = torch.rand(8, generator=g, dtype=torch.float64)
    assert_closed_form_grad(loss, z, y, scale, value_rtol=1e-11)


def test_gradcheck_demd_and_no_gradient_to_the_embedding():
    g = torch.Generator().manual_seed(1)
    e = torch.randn(7, 3, generator=g, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(4, 7, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 6, -100, 3])
    assert torch.autograd.gradcheck(
        lambda z: xent.emo_loss(z, target, cost_embedding=e, mode="demd", reduction="sum"), (logits,))
    out = xent.emo_loss(logits, target, cost_embedding=e)
    assert out.grad_fn is not None
    out.backward()
    assert e.grad is None  # frozen: EMO detaches the cost embedding


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), v=st.integers(2, 30), d=st.integers(1, 8))
def test_demd_is_a_bounded_expected_cost(seed, v, d):
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(v, d, generator=g)
    z = 5 * torch.randn(6, v, generator=g)
    y = torch.randint(0, v, (6,), generator=g)
    demd = xent.emo_loss(z, y, cost_embedding=e, mode="demd", reduction="none")
    # C ∈ [0, 2], so DEMD = E_q[C(·, y)] ∈ [0, 2]; the clamp keeps float32 rounding from going below 0.
    assert bool((demd >= 0).all() and (demd <= 2 + 1e-6).all())
    ref = emo_ref(z.double(), y, e, "demd")
    torch.testing.assert_close(demd.double(), ref, atol=2e-6, rtol=0)


def test_scaling_an_embedding_row_changes_nothing():
    # Row-normalised inside: only directions matter (the paper's cosine cost).
    g = torch.Generator().manual_seed(3)
    e = torch.randn(9, 4, generator=g, dtype=torch.float64)
    z = torch.randn(5, 9, generator=g, dtype=torch.float64)
    y = torch.randint(0, 9, (5,), generator=g)
    scaled = e * torch.rand(9, 1, generator=g, dtype=torch.float64).add(0.1) * 50
    a = xent.emo_loss(z, y, cost_embedding=e, mode="emo2")
    b = xent.emo_loss(z, y, cost_embedding=scaled, mode="emo2")
    assert a.item() == pytest.approx(b.item(), abs=1e-13)


def test_bfloat16_logits_computed_in_float32_never_negative():
    # The reference implementation's bf16 path gives negative or NaN losses; xent upcasts.
    g = torch.Generator().manual_seed(4)
    v = 61
    e = torch.randn(v, 16, generator=g).bfloat16()
    z = (8 * torch.randn(64, v, generator=g)).bfloat16()
    y = torch.randint(0, v, (64,), generator=g)
    z[:8] = -30.0
    z[torch.arange(8), y[:8]] = 30.0  # near-certain correct tokens: DEMD ~ 0
    for mode in ("demd", "emo1", "emo2"):
        got = xent.emo_loss(z, y, cost_embedding=e, mode=mode, reduction="none")
        assert got.dtype == torch.float32
        assert bool(torch.isfinite(got).all() and (got >= 0).all())
        ref = emo_ref(z.double(), y, e.float(), mode)
        torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)


def test_loss_object_holds_options_and_embedding_once():
    loss = losses.EMO(cost_embedding=E, mode="emo2", ratio_cap=3.0)
    assert "mode='emo2'" in repr(loss) and "ratio_cap=3.0" in repr(loss)
    safe = Y.clamp(min=0)
    torch.testing.assert_close(loss(X, safe), emo_ref(X, safe, E, "emo2", 3.0), atol=1e-14, rtol=0)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(cost_embedding=torch.randn(4, 2)), ValueError,
         r"cost_embedding must have shape \[V, d\] with V = 3 .* got shape \(4, 2\)"),
        (dict(cost_embedding=torch.randn(3)), ValueError,
         r"cost_embedding must have shape \[V, d\], got shape \(3,\)"),
        (dict(cost_embedding=torch.ones(3, 2, dtype=torch.long)), TypeError,
         r"cost_embedding must be a floating-point tensor .* torch.int64"),
        (dict(cost_embedding=E, mode="emo3"), ValueError, r"mode must be one of .* got 'emo3'"),
        (dict(cost_embedding=E, ratio_cap=0.0), ValueError, r"ratio_cap must be None or > 0, got 0.0"),
        (dict(cost_embedding=E, mode="demd", ratio_cap=3.0), ValueError,
         r"ratio_cap applies to .* got mode='demd'"),
    ],
)
def test_bad_input(kwargs, error, message):
    with pytest.raises(error, match=message):
        xent.emo_loss(X, Y, **kwargs)


def test_ignored_tokens_num_items_and_all_ignored():
    g = torch.Generator().manual_seed(7)
    e = torch.randn(6, 3, generator=g, dtype=torch.float64)
    z = torch.randn(2, 5, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 6, (2, 5), generator=g)
    y[0, 1:4] = -100
    base = xent.emo_loss(z, y, cost_embedding=e)
    z2 = z.clone()
    z2[0, 1:4] = 1e4 * torch.randn(3, 6, generator=g, dtype=torch.float64)  # garbage where ignored
    assert xent.emo_loss(z2, y, cost_embedding=e).item() == pytest.approx(base.item(), abs=1e-14)
    total = xent.emo_loss(z, y, cost_embedding=e, reduction="sum")
    per_item = xent.emo_loss(z, y, cost_embedding=e, num_items=9)
    assert per_item.item() == pytest.approx(total.item() / 9, abs=1e-14)
    zz = z.clone().requires_grad_()
    out = xent.emo_loss(zz, torch.full((2, 5), -100), cost_embedding=e, mode="emo2")
    out.backward()
    assert out.item() == 0.0 and not zz.grad.any()


def test_embedding_is_converted_once_per_device_and_dtype():
    # The fused path calls the loss once per chunk; Ê must not be copied again each time.
    loss = losses.EMO(cost_embedding=torch.randn(5, 3))
    z64 = torch.randn(2, 5, dtype=torch.float64)
    first = loss._unit_embedding_like(z64)
    assert first.dtype == torch.float64 and loss._unit_embedding_like(z64) is first
    assert loss._unit_embedding_like(z64.float()) is loss.unit_embedding  # already float32: no copy
