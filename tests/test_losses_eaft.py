"""EAFT against a float64 loop reference written as the authors' code reads (top-k by sorting, softmax
over it, entropy / normaliser, power α, times the token's CE, mean over valid tokens); the weight is a
stop-gradient; fused == plain."""

import math

import pytest
import torch

import xent
from reference import X, Y, assert_closed_form_grad

V_, D_ = 31, 6


def ref_eaft(logits, target, *, k=20, alpha=1.0, normalizer=3.0, softcap=None, reduction="mean"):
    rows, ys = logits.detach().double().reshape(-1, logits.shape[-1]).tolist(), target.reshape(-1).tolist()
    out, n = [], 0
    for row, y in zip(rows, ys):
        if y == -100:
            out.append(0.0)
            continue
        if softcap is not None:
            row = [softcap * math.tanh(v / softcap) for v in row]
        top = sorted(row, reverse=True)[:k]
        zt = sum(math.exp(v) for v in top)
        ent = -sum((math.exp(v) / zt) * math.log(math.exp(v) / zt) for v in top)
        c = math.log(len(top)) if normalizer is None else normalizer
        w = (ent / c) ** alpha
        ce = math.log(sum(math.exp(v) for v in row)) - row[y]
        out.append(w * ce)
        n += 1
    t = torch.tensor(out, dtype=torch.float64)
    if reduction == "none":
        return t.reshape(target.shape)
    return t.sum() / max(n, 1) if reduction == "mean" else t.sum()


def test_worked_numbers():
    x, y = torch.tensor(X, dtype=torch.float64), torch.tensor(Y)
    # k ≥ V: the entropy of the whole softmax; normaliser 1 (axolotl's), 3.0 (the authors'), ln V
    assert xent.eaft_loss(x, y, normalizer=1.0).item() == pytest.approx(0.4643677234, abs=1e-10)
    assert xent.eaft_loss(x, y).item() == pytest.approx(0.4643677234 / 3.0, abs=1e-10)
    ln_v = xent.eaft_loss(x, y, normalizer=None).item()
    assert ln_v == pytest.approx(0.4643677234 / math.log(3), abs=1e-10)


OPTIONS = [{}, {"k": 5, "alpha": 0.5}, {"k": 3, "alpha": 2.0, "normalizer": None, "softcap": 2.0}, {"k": 1}]


@pytest.mark.parametrize("opts", OPTIONS, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_plain_matches_loop_reference(opts, reduction):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 9, V_, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, V_, (4, 9), generator=g)
    y[1, 3:] = -100
    got = xent.eaft_loss(x, y, reduction=reduction, **opts)
    torch.testing.assert_close(got, ref_eaft(x, y, reduction=reduction, **opts), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("opts", OPTIONS, ids=str)
def test_gradient_is_weight_times_softmax_minus_onehot(opts):
    """Stop-gradient weight: autograd through the plain path gives sg(H̃)^α (q − onehot), and the fused
    closed form agrees with autograd through the per-token definition."""
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(6, V_, generator=g, dtype=torch.float64) * 2).requires_grad_()
    y = torch.randint(0, V_, (6,), generator=g)
    xent.eaft_loss(x, y, reduction="sum", **opts).backward()
    loss = xent.losses.EAFT(**opts)
    z = x.detach() if loss.softcap is None else loss.softcap * torch.tanh(x.detach() / loss.softcap)
    w = ref_eaft(x, y, reduction="none", **opts) / (torch.logsumexp(z, -1) - z[torch.arange(6), y])
    expected = w.unsqueeze(-1) * (torch.softmax(z, -1) - torch.nn.functional.one_hot(y, V_))
    if loss.softcap is not None:
        expected = expected * (1 - torch.tanh(x.detach() / loss.softcap) ** 2)
    torch.testing.assert_close(x.grad, expected, rtol=1e-10, atol=1e-12)
    scale = torch.rand(6, generator=g, dtype=torch.float64)
    assert_closed_form_grad(loss, x.detach() * 1.0, y, scale, value_rtol=1e-12)


@pytest.mark.parametrize("chunk_size", [1, 4, "auto"])
def test_fused_equals_plain(chunk_size):
    g = torch.Generator().manual_seed(2)
    h = torch.randn(3, 8, D_, generator=g, dtype=torch.float64).requires_grad_()
    W = torch.randn(V_, D_, generator=g, dtype=torch.float64).requires_grad_()
    y = torch.randint(0, V_, (3, 8), generator=g)
    y[0, :3] = -100
    tw = torch.rand(3, 8, generator=g, dtype=torch.float64)
    loss = xent.losses.EAFT(k=7, softcap=3.0)
    fused = xent.linear_loss(h, W, y, loss=loss, shift=True, chunk_size=chunk_size, token_weights=tw)
    gf = torch.autograd.grad(fused, (h, W))
    plain = xent.eaft_loss((h @ W.T)[:, :-1], y[:, 1:], k=7, softcap=3.0, token_weights=tw[:, 1:])
    gp = torch.autograd.grad(plain, (h, W))
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-12)
    for a, b in zip(gf, gp):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_bad_options():
    with pytest.raises(ValueError, match="k must be an int >= 1, got 0"):
        xent.losses.EAFT(k=0)
    with pytest.raises(ValueError, match="alpha must be a finite number >= 0, got -1"):
        xent.losses.EAFT(alpha=-1)
    with pytest.raises(ValueError, match="normalizer must be None"):
        xent.losses.EAFT(normalizer=0.0)
