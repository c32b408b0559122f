"""Every loss object through the fused engine equals its plain functional on materialised logits:
values and gradients for hidden, weight and bias, every reduction, chunk sizes 1, 7 and all-in-one."""

from functools import partial

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import xent
from xent import losses

V_, D_ = 23, 8
_E = torch.randn(V_, 5, generator=torch.Generator().manual_seed(9), dtype=torch.float64)

# (loss object, the same loss as a plain functional of materialised logits)
LOSSES = [
    (losses.CrossEntropy(label_smoothing=0.1), partial(xent.cross_entropy, label_smoothing=0.1)),
    (losses.EMO(cost_embedding=_E, mode="demd"), partial(xent.emo_loss, cost_embedding=_E, mode="demd")),
    (losses.EMO(cost_embedding=_E, mode="emo1", ratio_cap=3.0),
     partial(xent.emo_loss, cost_embedding=_E, ratio_cap=3.0)),
    (losses.EMO(cost_embedding=_E, mode="emo2", softcap=4.0),
     partial(xent.emo_loss, cost_embedding=_E, mode="emo2", softcap=4.0)),
    (losses.TaiLr(gamma=0.1, threshold=0.3, label_smoothing=0.1),
     partial(xent.tailr_loss, gamma=0.1, threshold=0.3, label_smoothing=0.1)),
    (losses.GOLD(threshold=0.05), partial(xent.gold_loss, threshold=0.05)),
    (losses.Focal(gamma=2.0, alpha=0.5), partial(xent.focal_loss, gamma=2.0, alpha=0.5)),
    (losses.Focal(detach_factor=True), partial(xent.focal_loss, detach_factor=True)),
    (losses.Poly(epsilon=2.0), partial(xent.poly_loss, epsilon=2.0)),
    # soft-capping through the closed-form gradients (chain factor 1 − tanh²)
    (losses.Focal(gamma=0.5, softcap=3.0), partial(xent.focal_loss, gamma=0.5, softcap=3.0)),
    (losses.TaiLr(gamma=0.5, label_smoothing=0.2, softcap=2.0),
     partial(xent.tailr_loss, gamma=0.5, label_smoothing=0.2, softcap=2.0)),
]
IDS = [repr(obj) for obj, _ in LOSSES]


def _data(dtype=torch.float64, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 7, D_, generator=g, dtype=dtype).to(device).requires_grad_()
    weight = (torch.randn(V_, D_, generator=g, dtype=dtype) / 2).to(device).requires_grad_()
    bias = (torch.randn(V_, generator=g, dtype=dtype) / 3).to(device).requires_grad_()
    target = torch.randint(0, V_, (3, 7), generator=g)
    target[0, :3] = -100
    target[2, 5] = -100
    return hidden, weight, bias, target.to(device)


def _grads(out, inputs, seed=1):
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    upstream = upstream.to(out.device)
    return torch.autograd.grad(out, inputs, upstream)


@pytest.mark.parametrize("loss, plain", LOSSES, ids=IDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_fused_equals_plain(loss, plain, reduction, chunk_size, device):
    hidden, weight, bias, target = _data(device=device)
    fused = xent.linear_loss(hidden, weight, target, loss=loss, linear_bias=bias, chunk_size=chunk_size,
                             reduction=reduction)
    expected = plain(hidden @ weight.T + bias, target, reduction=reduction)
    torch.testing.assert_close(fused, expected, atol=1e-12, rtol=1e-12)
    inputs = (hidden, weight, bias)
    for g_fused, g_plain in zip(_grads(fused, inputs), _grads(expected, inputs)):
        torch.testing.assert_close(g_fused, g_plain, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("loss, plain", LOSSES[1::2], ids=IDS[1::2])
def test_fused_float32_shift_and_num_items(loss, plain, device):
    hidden, weight, _, target = _data(torch.float32, seed=3, device=device)
    fused = xent.linear_loss(hidden, weight, target, loss=loss, shift=True, chunk_size=5, num_items=11)
    logits = (hidden @ weight.T)[:, :-1]
    expected = plain(logits, target[:, 1:], num_items=11)
    torch.testing.assert_close(fused, expected, atol=1e-6, rtol=1e-5)
    for g_fused, g_plain in zip(_grads(fused, (hidden, weight)), _grads(expected, (hidden, weight))):
        torch.testing.assert_close(g_fused, g_plain, atol=1e-5, rtol=1e-4)


def test_fused_without_grad_and_all_ignored():
    hidden, weight, _, target = _data()
    loss = losses.TaiLr(gamma=0.1)
    with torch.no_grad():
        got = xent.linear_loss(hidden, weight, target, loss=loss, chunk_size=4)
    expected = xent.tailr_loss(hidden @ weight.T, target, gamma=0.1)
    assert got.item() == pytest.approx(expected.item(), abs=1e-12)
    out = xent.linear_loss(hidden, weight, torch.full_like(target, -100), loss=loss)
    gh, gw = torch.autograd.grad(out, (hidden, weight))
    assert out.item() == 0.0 and not gh.any() and not gw.any()


def test_emo_fused_checks_the_embedding_vocabulary():
    hidden, weight, _, target = _data()
    with pytest.raises(ValueError, match=r"cost_embedding must have shape \[V, d\] with V = 23"):
        xent.linear_loss(hidden, weight, target, loss=losses.EMO(cost_embedding=torch.randn(22, 4)))


@pytest.mark.parametrize("kind", ["forward_kl", "jsd", "skew_reverse_kl", "tvd"])
@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_linear_distill_equals_plain_for_every_chunk_size(kind, chunk_size, device):
    hidden, weight, bias, target = _data(seed=4, device=device)
    g = torch.Generator().manual_seed(5)
    teacher_hidden = torch.randn(3, 7, 6, generator=g, dtype=torch.float64).to(device)
    teacher_weight = torch.randn(V_, 6, generator=g, dtype=torch.float64).to(device)
    options = dict(kind=kind, beta=0.2, alpha=0.3, temperature=1.5, softcap=4.0, hard_weight=0.1)
    fused = xent.linear_distill_loss(hidden, weight, teacher_hidden, teacher_weight, target,
                                     student_bias=bias, chunk_size=chunk_size, **options)
    plain = xent.distill_loss(hidden @ weight.T + bias, teacher_hidden @ teacher_weight.T, target, **options)
    torch.testing.assert_close(fused, plain, atol=1e-12, rtol=1e-12)
    inputs = (hidden, weight, bias)
    for g_fused, g_plain in zip(_grads(fused, inputs), _grads(plain, inputs)):
        torch.testing.assert_close(g_fused, g_plain, atol=1e-12, rtol=1e-10)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), which=st.integers(0, len(LOSSES) - 1), chunk_size=st.integers(1, 40),
       n_ignored=st.integers(0, 21))
def test_chunk_size_and_padding_never_change_the_result(seed, which, chunk_size, n_ignored):
    loss, plain = LOSSES[which]
    hidden, weight, bias, target = _data(seed=seed % 1000)
    flat = target.view(-1)
    flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(seed))[:n_ignored]] = -100
    fused = xent.linear_loss(hidden, weight, target, loss=loss, linear_bias=bias, chunk_size=chunk_size)
    expected = plain(hidden @ weight.T + bias, target)
    torch.testing.assert_close(fused, expected, atol=1e-12, rtol=1e-12)
