"""Rho-1 selective LM: a loop reference (explicit CE, excess, a stable sort, ⌊k·n⌋ tokens, mean CE over
them); ties in stable order; fused (two passes) == plain; a reference head == its per-token losses; the
unselected tokens get no gradient."""

import math

import pytest
import torch

import xent

V_, D_ = 17, 6


def ref_rho1(logits, target, ref_losses, ratio):
    rows, ys, refs = logits.double().reshape(-1, V_).tolist(), target.reshape(-1).tolist(), \
        ref_losses.double().reshape(-1).tolist()
    ce = {}
    for i, (row, y) in enumerate(zip(rows, ys)):
        if y != -100:
            ce[i] = math.log(sum(math.exp(v) for v in row)) - row[y]
    order = sorted(ce, key=lambda i: -(ce[i] - refs[i]))  # Python's sort is stable: ties keep index order
    chosen = order[: max(1, math.floor(ratio * len(ce) + 1e-6))]
    return sum(ce[i] for i in chosen) / len(chosen), set(chosen)


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(3, 10, D_, generator=g, dtype=torch.float64).requires_grad_()
    W = torch.randn(V_, D_, generator=g, dtype=torch.float64).requires_grad_()
    y = torch.randint(0, V_, (3, 10), generator=g)
    y[0, 4] = y[2, 7:] = -100
    ref = torch.rand(3, 10, generator=g, dtype=torch.float64) * 3
    return h, W, y, ref


@pytest.mark.parametrize("ratio", [0.6, 0.29, 1.0, 0.01])
def test_plain_matches_loop_reference(ratio):
    h, W, y, ref = _problem()
    x = h @ W.T
    got = xent.rho1_loss(x, y, ref, ratio=ratio)
    assert got.item() == pytest.approx(ref_rho1(x, y, ref, ratio)[0], rel=1e-12)


def test_ties_are_taken_in_stable_order():
    x = torch.zeros(6, 4, dtype=torch.float64)  # every CE is log 4
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    ref = torch.zeros(6, dtype=torch.float64)  # every excess ties
    x.requires_grad_()
    xent.rho1_loss(x, y, ref, ratio=0.5).backward()
    assert x.grad.abs().sum(-1).ne(0).tolist() == [True, True, True, False, False, False]


@pytest.mark.parametrize("chunk_size", [1, 4, "auto"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fused_equals_plain_and_only_selected_tokens_get_gradient(reduction, chunk_size):
    h, W, y, ref = _problem(seed=1)
    tw = torch.rand(y.shape, dtype=torch.float64) + 0.5
    fused = xent.linear_rho1_loss(h, W, y, ref_losses=ref, shift=True, chunk_size=chunk_size,
                                  reduction=reduction, token_weights=tw)
    plain = xent.rho1_loss((h @ W.T)[:, :-1], y[:, 1:], ref[:, 1:], reduction=reduction,
                           token_weights=tw[:, 1:])
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-12)
    up = torch.rand(fused.shape, dtype=torch.float64) if fused.dim() else None
    gf = torch.autograd.grad(fused, (h, W), up)
    for a, c in zip(gf, torch.autograd.grad(plain, (h, W), up)):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)
    _, chosen = ref_rho1((h @ W.T)[:, :-1].detach(), y[:, 1:], ref[:, 1:], 0.6)
    rows_with_grad = set(gf[0][:, :-1].reshape(-1, D_).abs().sum(-1).nonzero().squeeze(-1).tolist())
    assert rows_with_grad == chosen


def test_reference_head_equals_its_per_token_losses():
    h, W, y, _ = _problem(seed=2)
    g = torch.Generator().manual_seed(9)
    h_ref = torch.randn(3, 10, 4, generator=g, dtype=torch.float64)
    W_ref = torch.randn(V_, 4, generator=g, dtype=torch.float64)
    ref_losses = xent.cross_entropy(h_ref @ W_ref.T, y, reduction="none", softcap=5.0)
    a = xent.linear_rho1_loss(h, W, y, ref_hidden=h_ref, ref_weight=W_ref, softcap=5.0, chunk_size=7)
    b = xent.linear_rho1_loss(h, W, y, ref_losses=ref_losses, softcap=5.0)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_refusals():
    h, W, y, ref = _problem()
    with pytest.raises(TypeError, match="selects tokens over the whole call"):
        xent.linear_loss(h, W, y, loss=xent.losses.Rho1())
    with pytest.raises(ValueError, match="give the reference as ref_losses"):
        xent.linear_rho1_loss(h, W, y)
    with pytest.raises(ValueError, match="ratio must be in"):
        xent.rho1_loss(h @ W.T, y, ref, ratio=1.5)
