"""DFT and entropy-regularised cross-entropy: float64 references with an explicit softmax, one token at a
time; closed form == autograd; fused == plain; DFT == GOLD(threshold=0) and == TRL's loss_type="dft"."""

import math

import pytest
import torch
import torch.nn.functional as F

import xent
from reference import X, Y, assert_closed_form_grad
from xent import losses

V_, D_ = 11, 6


def _softmax(row):
    e = torch.exp(row - row.max())
    return e / e.sum()


def _per_token(logits, target, fn):
    """fn(row [V], y) for every valid token, 0 where ignored; differentiable."""
    rows, ys = logits.reshape(-1, logits.shape[-1]), target.reshape(-1).tolist()
    per = [fn(r, y) if y != -100 else r.sum() * 0.0 for r, y in zip(rows, ys)]
    return torch.stack(per).reshape(target.shape)


def dft_ref(row, y):
    p = _softmax(row)
    return -p[y].item() * torch.log(p[y])  # the weight as a plain float: no gradient through it


def entropy_ref(row, beta, softcap=None):
    if softcap is not None:
        row = softcap * torch.tanh(row / softcap)
    p = _softmax(row)
    return -sum(pi * torch.log(pi) for pi in p if pi > 0)


def entropy_reg_ref(row, y, beta, softcap=None):
    z = row if softcap is None else softcap * torch.tanh(row / softcap)
    p = _softmax(z)
    return -torch.log(p[y]) - beta * entropy_ref(row, beta, softcap)


def _data(seed=0, shape=(3, 5)):
    g = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(*shape, V_, generator=g, dtype=torch.float64)).requires_grad_()
    y = torch.randint(0, V_, shape, generator=g)
    y[0, 1] = y[2, 4] = -100
    return x, y


def _check(got, want, x, rtol=1e-10):
    torch.testing.assert_close(got, want, rtol=rtol, atol=1e-12)
    up = torch.randn(got.shape, generator=torch.Generator().manual_seed(1), dtype=got.dtype)
    (g,), (r,) = torch.autograd.grad(got, x, up), torch.autograd.grad(want, x, up)
    torch.testing.assert_close(g, r, rtol=rtol, atol=1e-12)


# ---------- DFT ----------

def test_dft_worked_number():
    """REFERENCE.md §3: GOLD-δ (reward 1) on X, Y has mean 0.3025052339; DFT is the same loss."""
    for dtype in (torch.float64, torch.float32):
        got = xent.dft_loss(torch.tensor(X, dtype=dtype), torch.tensor(Y))
        assert abs(got.item() - 0.3025052339) < (1e-10 if dtype == torch.float64 else 1e-7)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_dft_matches_loop_reference(reduction):
    x, y = _data()
    per = _per_token(x, y, dft_ref)
    want = per if reduction == "none" else per.sum() if reduction == "sum" else per.sum() / (y != -100).sum()
    _check(xent.dft_loss(x, y, reduction=reduction), want, x)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_dft_equals_gold_without_threshold(reduction):
    x, y = _data(seed=1)
    for cap in (None, 4.0):
        _check(xent.dft_loss(x, y, reduction=reduction, softcap=cap),
               xent.gold_loss(x, y, threshold=0.0, reduction=reduction, softcap=cap), x, rtol=0)


def _trl_style_dft(logits, labels, num_items_in_batch=None):
    """TRL's SFTTrainer loss_type="dft", as its source reads: labels padded with −100 at the end and
    shifted left, so logits[:, t] predict labels[:, t+1]; per token −exp(log q).detach()·log q; summed
    and divided by the count of unmasked labels (or num_items_in_batch). Written here with log_softmax."""
    shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    mask = shifted != -100
    safe = torch.where(mask, shifted, 0)
    logq = torch.log_softmax(logits, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    per_token = -logq.exp().detach() * logq
    denom = mask.sum() if num_items_in_batch is None else num_items_in_batch
    return (per_token * mask).sum() / denom


def test_dft_equals_trl_loss_type_dft():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 7, V_, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, V_, (2, 7), generator=g)
    labels[0, :3] = -100
    for num_items in (None, 20):
        want = _trl_style_dft(logits, labels, num_items)
        got = xent.dft_loss(logits[:, :-1], labels[:, 1:], num_items=num_items)
        _check(got, want, logits, rtol=1e-12)


def test_dft_class():
    assert isinstance(losses.DFT(), losses.GOLD) and losses.DFT().threshold == 0.0
    assert repr(losses.DFT(softcap=30.0)) == "DFT(softcap=30.0)"
    assert losses.DFT.has_closed_form_grad and losses.EntropyRegularized.has_closed_form_grad


# ---------- entropy regularisation ----------

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("beta, softcap", [(0.01, None), (0.5, None), (-0.3, None), (0.2, 2.5)])
def test_entropy_regularized_matches_loop_reference(beta, softcap, reduction):
    x, y = _data(seed=3)
    per = _per_token(x, y, lambda r, t: entropy_reg_ref(r, t, beta, softcap))
    want = per if reduction == "none" else per.sum() if reduction == "sum" else per.sum() / (y != -100).sum()
    _check(xent.entropy_regularized_loss(x, y, beta=beta, softcap=softcap, reduction=reduction), want, x)


def test_entropy_regularized_worked_numbers():
    """On X, Y (REFERENCE.md §2): the entropies of rows 0 and 2 by hand, mean CE 0.5105803108."""
    x, y = torch.tensor(X, dtype=torch.float64), torch.tensor(Y)
    h = [-sum(p * math.log(p) for p in _softmax(x[i]).tolist()) for i in (0, 2)]
    got = xent.entropy_regularized_loss(x, y, beta=0.1)
    assert abs(got.item() - (0.5105803108 - 0.1 * (h[0] + h[1]) / 2)) < 1e-10
    assert xent.entropy_regularized_loss(x, y, beta=0.0).item() == pytest.approx(0.5105803108, abs=1e-10)


def test_beta_zero_is_torch_cross_entropy():
    x, y = _data(seed=4)
    want = F.cross_entropy(x.reshape(-1, V_), y.reshape(-1))
    _check(xent.entropy_regularized_loss(x, y, beta=0.0), want, x)


def test_positive_beta_is_an_entropy_bonus():
    """Sign convention: a small descent step on the β-term alone raises the entropy (β > 0) or lowers it
    (β < 0), the entropy measured by the reference."""
    x, y = _data(seed=5)
    for beta, direction in ((0.5, 1.0), (-0.5, -1.0)):
        bonus = xent.entropy_regularized_loss(x, y, beta=beta, reduction="sum") - xent.cross_entropy(
            x, y, reduction="sum")
        (g,) = torch.autograd.grad(bonus, x)
        stepped = x.detach() - 1e-3 * g
        valid = (y != -100).reshape(-1)
        before = sum(entropy_ref(r, 0) for r, v in zip(x.detach().reshape(-1, V_), valid) if v)
        after = sum(entropy_ref(r, 0) for r, v in zip(stepped.reshape(-1, V_), valid) if v)
        assert direction * (after - before) > 0


def test_masked_logits_give_finite_entropy_and_gradient():
    """A −inf logit (a masked id) has q = 0 and adds 0·log 0 = 0 to H, with a zero gradient."""
    x, y = _data(seed=6)
    masked = x.detach().clone()
    masked[..., 3] = -math.inf
    y = torch.where(y == 3, 0, y)
    z = masked.clone().requires_grad_()
    got = xent.entropy_regularized_loss(z, y, beta=0.4, reduction="none")
    keep = [c for c in range(V_) if c != 3]
    sub = masked[..., keep].clone().requires_grad_()
    y_sub = torch.where(y > 3, y - 1, y)
    want = xent.entropy_regularized_loss(sub, y_sub, beta=0.4, reduction="none")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)
    up = 10 * torch.rand(got.shape, dtype=torch.float64)  # an upstream gradient > 1/β: no overflow either
    (g,), (r,) = torch.autograd.grad(got, z, up), torch.autograd.grad(want, sub, up)
    assert torch.isfinite(g).all() and not g[..., 3].any()
    torch.testing.assert_close(g[..., keep], r, rtol=1e-12, atol=1e-13)
    loss = losses.EntropyRegularized(beta=0.4)
    flat_z, flat_y = masked.reshape(-1, V_), torch.where(y == -100, 0, y).reshape(-1)
    assert_closed_form_grad(loss, flat_z, flat_y, torch.rand(flat_y.shape, dtype=torch.float64),
                            value_rtol=1e-12)


@pytest.mark.parametrize("loss", [losses.DFT(), losses.DFT(softcap=3.0), losses.EntropyRegularized(),
                                  losses.EntropyRegularized(beta=0.7, softcap=2.0),
                                  losses.EntropyRegularized(beta=-0.2)], ids=repr)
def test_closed_form_equals_autograd(loss):
    g = torch.Generator().manual_seed(7)
    z = 4 * torch.randn(9, V_, generator=g, dtype=torch.float64)
    z[0] += 60.0  # large logits: the shifted forms keep their digits
    y = torch.randint(0, V_, (9,), generator=g)
    scale = torch.randn(9, generator=g, dtype=torch.float64)
    assert_closed_form_grad(loss, z, y, scale, value_rtol=1e-12)


def test_gradcheck_entropy_regularized():
    """(DFT has a stop-gradient, so finite differences are not its gradient: it is checked against the
    loop reference and autograd instead.)"""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([[0, 4, -100], [2, 2, 1]])
    assert torch.autograd.gradcheck(lambda z: xent.entropy_regularized_loss(z, y, beta=0.3, softcap=2.0),
                                    (x,))
    h = torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    loss = losses.EntropyRegularized(beta=0.3, softcap=2.0)
    assert torch.autograd.gradcheck(
        lambda h, W: xent.linear_loss(h, W, y, loss=loss, chunk_size=2, reduction="none"), (h, W))


# ---------- fused == plain ----------

PAIRS = [
    (losses.DFT(), xent.dft_loss),
    (losses.DFT(softcap=3.0), lambda x, y, **kw: xent.dft_loss(x, y, softcap=3.0, **kw)),
    (losses.EntropyRegularized(beta=0.2),
     lambda x, y, **kw: xent.entropy_regularized_loss(x, y, beta=0.2, **kw)),
    (losses.EntropyRegularized(beta=-0.1, softcap=2.5),
     lambda x, y, **kw: xent.entropy_regularized_loss(x, y, beta=-0.1, softcap=2.5, **kw)),
]


@pytest.mark.parametrize("chunk_size", [1, 3, "auto"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none", "num_items"])
@pytest.mark.parametrize("loss, plain", PAIRS, ids=[repr(p[0]) for p in PAIRS])
def test_fused_equals_plain(loss, plain, reduction, chunk_size):
    g = torch.Generator().manual_seed(9)
    h = torch.randn(3, 6, D_, generator=g, dtype=torch.float64, requires_grad=True)
    W = (torch.randn(V_, D_, generator=g, dtype=torch.float64) / 2).requires_grad_()
    b = (torch.randn(V_, generator=g, dtype=torch.float64) / 3).requires_grad_()
    y = torch.randint(0, V_, (3, 6), generator=g)
    y[1, :2] = -100
    w = torch.rand(3, 6, generator=g, dtype=torch.float64)
    kw = {"reduction": "mean", "num_items": 13} if reduction == "num_items" else {"reduction": reduction}
    for tw in (None, w):
        fused = xent.linear_loss(h, W, y, loss=loss, linear_bias=b, chunk_size=chunk_size, token_weights=tw,
                                 **kw)
        expected = plain(h @ W.T + b, y, token_weights=tw, **kw)
        torch.testing.assert_close(fused, expected, rtol=1e-12, atol=1e-12)
        up = torch.randn(fused.shape, generator=torch.Generator().manual_seed(1), dtype=fused.dtype)
        inputs = (h, W, b)
        for a, c in zip(torch.autograd.grad(fused, inputs, up), torch.autograd.grad(expected, inputs, up)):
            torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)


def test_bad_beta():
    x, y = _data()
    with pytest.raises(ValueError, match="beta must be a finite number, got nan"):
        xent.entropy_regularized_loss(x, y, beta=float("nan"))
    with pytest.raises(TypeError, match="beta must be a number, got '0.1'"):
        losses.EntropyRegularized(beta="0.1")


def test_exported():
    for name in ("dft_loss", "entropy_regularized_loss"):
        assert name in xent.__all__
    for name in ("DFT", "EntropyRegularized"):
        assert name in losses.__all__
