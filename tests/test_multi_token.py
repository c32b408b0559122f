"""Multi-token prediction: a float64 loop reference (explicit softmax, each stream averaged over its own
targets, λ-weighted); fused (one engine call on all streams) == plain; micro-batches with per-stream
num_items add up to the full batch; K = 1 is the causal LM loss."""

import math

import pytest
import torch

import xent

V_, D_, K_ = 19, 6, 3


def ref_mtp(logits, labels, lam, token_weights=None):
    total = 0.0
    B, T = labels.shape
    for k in range(1, logits.shape[0] + 1):
        s = n = 0.0
        for b in range(B):
            for t in range(T - k):
                y = int(labels[b, t + k])
                w = 1.0 if token_weights is None else float(token_weights[b, t + k])
                if y == -100 or w == 0:
                    continue
                row = logits[k - 1, b, t].double().tolist()
                lse = math.log(sum(math.exp(v) for v in row))
                s += w * (lse - row[y])
                n += w
        total += lam[k - 1] * (s / n if n else 0.0)
    return total


def _problem(seed=0, B=2, T=9, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(K_, B, T, D_, generator=g, dtype=dtype).requires_grad_()
    W = torch.randn(V_, D_, generator=g, dtype=dtype).requires_grad_()
    b = torch.randn(V_, generator=g, dtype=dtype).requires_grad_()
    y = torch.randint(0, V_, (B, T), generator=g)
    y[0, 3] = y[1, 6:] = -100  # the streams see different numbers of targets
    return hs, W, b, y


def test_default_weights_and_loop_reference():
    hs, W, b, y = _problem()
    logits = hs @ W.T + b
    got = xent.multi_token_loss(logits, y)
    lam = [1.0, 0.15, 0.15]  # DeepSeek-V3: λ = 0.3 shared by the K − 1 = 2 extra streams
    assert got.item() == pytest.approx(ref_mtp(logits, y, lam), rel=1e-12)
    tw = torch.rand(y.shape, dtype=torch.float64)
    got = xent.linear_multi_token_loss(hs, W, y, linear_bias=b, stream_weights=[1.0, 0.5, 0.25],
                                       token_weights=tw)
    assert got.item() == pytest.approx(ref_mtp(logits, y, [1.0, 0.5, 0.25], tw), rel=1e-12)


@pytest.mark.parametrize("chunk_size", [1, 5, "auto"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fused_equals_plain(reduction, chunk_size):
    hs, W, b, y = _problem(seed=1)
    tw = torch.rand(y.shape, dtype=torch.float64)
    opts = dict(weights=[1.0, 0.3, 0.1], loss=xent.losses.CrossEntropy(z_loss=1e-3, softcap=4.0),
                reduction=reduction, token_weights=tw)
    fused = xent.linear_multi_token_loss(list(hs.unbind(0)), W, y, linear_bias=b, chunk_size=chunk_size,
                                         **opts)
    plain = xent.multi_token_loss(hs @ W.T + b, y, **opts)
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-12)
    up = torch.rand(fused.shape, dtype=torch.float64) if fused.dim() else None
    for a, c in zip(torch.autograd.grad(fused, (hs, W, b), up), torch.autograd.grad(plain, (hs, W, b), up)):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)


def test_micro_batches_with_per_stream_num_items_add_up():
    hs, W, b, y = _problem(seed=2, B=4)
    whole = xent.linear_multi_token_loss(hs, W, y, loss=xent.losses.TaiLr(gamma=0.1))
    counts = [int((y[:, k:] != -100).sum()) for k in range(1, K_ + 1)]
    parts = sum(xent.linear_multi_token_loss(hs[:, i:i + 2], W, y[i:i + 2], num_items=counts,
                                             loss=xent.losses.TaiLr(gamma=0.1)) for i in (0, 2))
    torch.testing.assert_close(parts, whole, rtol=1e-12, atol=1e-12)


def test_one_stream_is_the_causal_lm_loss():
    hs, W, b, y = _problem(seed=3)
    got = xent.linear_multi_token_loss(hs[:1], W, y, linear_bias=b)
    torch.testing.assert_close(got, xent.linear_cross_entropy(hs[0], W, y, linear_bias=b, shift=True))


def test_bad_input():
    hs, W, b, y = _problem()
    with pytest.raises(ValueError, match="weights must be a sequence of K = 3 numbers"):
        xent.linear_multi_token_loss(hs, W, y, stream_weights=[1.0, 0.5])
    with pytest.raises(ValueError, match="num_items must hold one count per stream"):
        xent.linear_multi_token_loss(hs, W, y, num_items=10)
    with pytest.raises(ValueError, match="class weights"):
        xent.linear_multi_token_loss(hs, W, y, loss=xent.losses.CrossEntropy(weight=torch.ones(V_)))
    with pytest.raises(ValueError, match=r"hiddens shape .* must be \[K, \*labels.shape, D\]"):
        xent.linear_multi_token_loss(hs, W, y[:, :-1])
