"""xent.linear_distill_loss == xent.distill_loss on materialised logits, without either full logits."""

import pytest
import torch

import xent
from test_linear import _Recorder

KINDS = ["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd"]


def _heads(B=2, T=7, Ds=8, Dt=5, V=30, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(B, T, Ds, generator=g, dtype=dtype).requires_grad_(True)
    Ws = torch.randn(V, Ds, generator=g, dtype=dtype).requires_grad_(True)
    bs = torch.randn(V, generator=g, dtype=dtype).requires_grad_(True)
    ht = torch.randn(B, T, Dt, generator=g, dtype=dtype).requires_grad_(True)
    Wt = torch.randn(V, Dt, generator=g, dtype=dtype).requires_grad_(True)
    bt = torch.randn(V, generator=g, dtype=dtype)
    y = torch.randint(0, V, (B, T), generator=g)
    y[0, 2] = y[-1, 5] = -100
    return hs, Ws, bs, ht, Wt, bt, y


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind", KINDS)
def test_fused_equals_plain(kind, reduction, shift):
    hs, Ws, bs, ht, Wt, bt, y = _heads()
    opts = {"kind": kind, "temperature": 2.0, "softcap": 5.0, "hard_weight": 0.25, "beta": 0.3, "alpha": 0.2}
    fused = xent.linear_distill_loss(hs, Ws, ht, Wt, y, student_bias=bs, teacher_bias=bt, shift=shift,
                                     chunk_size=3, reduction=reduction, **opts)
    zs, zt = hs @ Ws.T + bs, ht @ Wt.T + bt
    if shift:
        zs, zt, tgt = zs[:, :-1], zt[:, :-1], y[:, 1:]
    else:
        tgt = y
    plain = xent.distill_loss(zs, zt, tgt, reduction=reduction, **opts)
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-12)
    g = torch.randn(fused.shape, dtype=fused.dtype, generator=torch.Generator().manual_seed(1))
    for a, b in zip(torch.autograd.grad(fused, (hs, Ws, bs), g), torch.autograd.grad(plain, (hs, Ws, bs), g)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_no_target_and_no_gradient_to_the_teacher():
    hs, Ws, _, ht, Wt, _, _ = _heads(seed=2)
    fused = xent.linear_distill_loss(hs, Ws, ht, Wt, kind="jsd")
    plain = xent.distill_loss(hs @ Ws.T, ht @ Wt.T, kind="jsd")
    torch.testing.assert_close(fused, plain)
    fused.backward()
    assert ht.grad is None and Wt.grad is None and hs.grad is not None


def test_student_equals_teacher_gives_zero():
    hs, Ws, _, _, _, _, y = _heads(seed=3)
    for kind in KINDS:
        out = xent.linear_distill_loss(hs, Ws, hs.detach(), Ws.detach(), y, kind=kind)
        assert abs(out.item()) < 1e-12


def test_never_holds_full_logits():
    N, V = 64, 300
    hs, Ws, _, ht, Wt, _, y = _heads(B=1, T=N, V=V, seed=4, dtype=torch.float32)
    with _Recorder() as rec:
        out = xent.linear_distill_loss(hs, Ws, ht, Wt, y, chunk_size=8)
        out.backward()
    assert rec.max_numel < N * V


def test_bad_input():
    hs, Ws, _, ht, Wt, _, y = _heads()
    with pytest.raises(ValueError, match="teacher_weight vocabulary size 29 does not match student_weight"):
        xent.linear_distill_loss(hs, Ws, ht, Wt[:29], y)
    with pytest.raises(ValueError, match=r"teacher_hidden shape \(2, 6, 5\) and student_hidden shape"):
        xent.linear_distill_loss(hs, Ws, ht[:, :6], Wt, y)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0, got 0.0"):
        xent.linear_distill_loss(hs, Ws, ht, Wt, y, temperature=0.0)
    with pytest.raises(ValueError, match="hard_weight=0.5 needs target"):
        xent.linear_distill_loss(hs, Ws, ht, Wt, hard_weight=0.5)


@pytest.mark.parametrize("kind", ["forward_kl", "jsd"])
def test_bfloat16_heads_equal_the_plain_path_on_bfloat16_logits(kind):
    """Both heads are projected in bfloat16 (as addmm on the inputs would), the loss in float32."""
    *floats, y = _heads(B=3, T=9, Ds=16, Dt=12, V=50, seed=4)
    hs, Ws, bs, ht, Wt, bt = (t.detach().to(torch.bfloat16).requires_grad_() for t in floats)
    fused = xent.linear_distill_loss(hs, Ws, ht, Wt, y, student_bias=bs, teacher_bias=bt, kind=kind,
                                     chunk_size=5)
    assert fused.dtype == torch.float32
    zs = torch.addmm(bs, hs.reshape(-1, 16), Ws.T)
    zt = torch.addmm(bt, ht.reshape(-1, 12), Wt.T)
    plain = xent.distill_loss(zs, zt, y.reshape(-1), kind=kind)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    for a, b in zip(torch.autograd.grad(fused, (hs, Ws, bs)), torch.autograd.grad(plain, (hs, Ws, bs))):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2 * b.abs().max().item())
