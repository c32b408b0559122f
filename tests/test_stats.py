"""return_stats: the training statistics (loss sum, token count, top-1 correct, entropy, z-loss terms,
logsumexp) against a float64 loop reference with an explicit softmax; fused == plain; the sums add up
over micro-batches; they change neither the loss nor its gradient."""

import math

import pytest
import torch

import xent
from xent.losses._base import TokenLoss
from xent.losses._focal import plain_loss

V_, D_ = 23, 7


def ref_stats(logits, target, *, z_loss=0.0, softcap=None, token_weights=None, per_token_loss=None):
    """Sums over the valid tokens by an explicit loop; logits [N, V] float64."""
    rows, ys = logits.detach().double().reshape(-1, logits.shape[-1]), target.reshape(-1).tolist()
    tw = None if token_weights is None else token_weights.reshape(-1).tolist()
    out = {"tokens": 0, "correct": 0, "entropy_sum": 0.0, "z_loss_sum": 0.0, "lse_sum": 0.0}
    for i, (row, y) in enumerate(zip(rows, ys)):
        if y == -100 or (tw is not None and tw[i] == 0):
            continue
        z = row if softcap is None else softcap * torch.tanh(row / softcap)
        lse = math.log(sum(math.exp(v) for v in z.tolist()))
        q = [math.exp(v - lse) for v in z.tolist()]
        out["tokens"] += 1
        out["correct"] += int(all(z[y] >= v for v in z.tolist()))
        out["entropy_sum"] += -sum(p * math.log(p) for p in q if p > 0)
        out["z_loss_sum"] += z_loss * lse * lse
        out["lse_sum"] += lse
    return out


def check(stats, ref, loss_sum, rtol=1e-10):
    assert int(stats.tokens) == ref["tokens"] and stats.tokens.dtype == torch.int64
    assert int(stats.correct) == ref["correct"]
    for name in ("entropy_sum", "z_loss_sum", "lse_sum"):
        assert math.isclose(float(getattr(stats, name)), ref[name], rel_tol=rtol, abs_tol=1e-12), name
    assert math.isclose(float(stats.loss_sum), float(loss_sum), rel_tol=rtol, abs_tol=1e-12)
    for f in ("loss_sum", "tokens", "correct", "entropy_sum", "z_loss_sum", "lse_sum"):
        assert not getattr(stats, f).requires_grad and getattr(stats, f).dim() == 0


def _head(seed=0, dtype=torch.float64, shape=(3, 8)):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, D_, generator=g, dtype=dtype).requires_grad_()
    W = torch.randn(V_, D_, generator=g, dtype=dtype).requires_grad_()
    y = torch.randint(0, V_, shape, generator=g)
    y[0, 2] = y[2, :3] = -100
    return h, W, y


OPTIONS = [{}, {"z_loss": 1e-3}, {"softcap": 2.5, "label_smoothing": 0.1}]


@pytest.mark.parametrize("opts", OPTIONS, ids=str)
def test_plain_matches_loop_reference(opts):
    h, W, y = _head()
    x = (h @ W.T).detach()
    loss, stats = xent.cross_entropy(x, y, reduction="sum", return_stats=True, **opts)
    ref = ref_stats(x, y, z_loss=opts.get("z_loss", 0.0), softcap=opts.get("softcap"))
    check(stats, ref, loss)
    assert ref["correct"] > 0  # the case is not vacuous


def test_ties_count_as_correct_and_masked_logits_stay_finite():
    x = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 1.0, -math.inf], [0.0, 1.0, -math.inf, 5.0]])
    y = torch.tensor([2, 0, 1])
    _, stats = xent.cross_entropy(x, y, return_stats=True)
    assert int(stats.correct) == 2  # rows 0 and 1: the target ties for the maximum
    assert math.isfinite(float(stats.entropy_sum))
    # the fused path on the same (finite) logits: h @ W.T = x with h the identity
    x = torch.where(torch.isfinite(x), x, -30.0)
    h, W = torch.eye(3).requires_grad_(), x.T.contiguous().requires_grad_()
    _, fused = xent.linear_cross_entropy(h, W, y, return_stats=True)
    _, plain = xent.cross_entropy(x, y, return_stats=True)
    assert int(fused.correct) == 2
    torch.testing.assert_close(fused.entropy_sum, plain.entropy_sum)


@pytest.mark.parametrize("chunk_size", [1, 3, "auto"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", OPTIONS, ids=str)
def test_fused_equals_plain(opts, reduction, chunk_size):
    h, W, y = _head(seed=1)
    tw = torch.rand(y.shape, dtype=torch.float64)
    tw[1, 1] = 0.0
    loss, stats = xent.linear_cross_entropy(h, W, y, shift=True, reduction=reduction, chunk_size=chunk_size,
                                            token_weights=tw, return_stats=True, **opts)
    plain, pstats = xent.causal_lm_loss(h @ W.T, y, reduction=reduction, token_weights=tw, return_stats=True,
                                        **opts)
    torch.testing.assert_close(loss, plain)
    for name in ("loss_sum", "entropy_sum", "z_loss_sum", "lse_sum"):
        torch.testing.assert_close(getattr(stats, name), getattr(pstats, name), rtol=1e-12, atol=1e-12)
    assert int(stats.tokens) == int(pstats.tokens) and int(stats.correct) == int(pstats.correct)
    ref = ref_stats((h @ W.T)[:, :-1], y[:, 1:], z_loss=opts.get("z_loss", 0.0), softcap=opts.get("softcap"),
                    token_weights=tw[:, 1:])
    check(stats, ref, plain.detach().sum() if reduction != "mean" else pstats.loss_sum)


@pytest.mark.parametrize("loss", [xent.losses.TaiLr(gamma=0.1), xent.losses.Focal(gamma=2.0),
                                  xent.losses.EntropyRegularized(beta=0.1, softcap=3.0)], ids=repr)
def test_fused_other_losses(loss):
    """Autograd losses (TaiLr) and closed-form ones without their own statistics pass (Focal)."""
    h, W, y = _head(seed=2)
    fused, stats = xent.linear_loss(h, W, y, loss=loss, chunk_size=4, return_stats=True)
    plain, pstats = plain_loss(loss, h @ W.T, y, ignore_index=-100, reduction="mean", num_items=None,
                               return_stats=True)
    torch.testing.assert_close(fused, plain)
    torch.testing.assert_close(stats.to_tensor(), pstats.to_tensor(), rtol=1e-12, atol=1e-12)
    check(stats, ref_stats(h @ W.T, y, softcap=loss.softcap), pstats.loss_sum)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stats_change_neither_loss_nor_gradient(dtype):
    h, W, y = _head(seed=3, dtype=dtype, shape=(4, 40))
    grads = []
    for return_stats in (False, True):
        h.grad = W.grad = None
        out = xent.linear_cross_entropy(h, W, y, z_loss=1e-4, chunk_size=16, return_stats=return_stats)
        loss = out[0] if return_stats else out
        loss.backward()
        grads.append((loss.detach(), h.grad.clone(), W.grad.clone()))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_sums_add_up_over_micro_batches():
    """The rule: sum the stats of the micro-batches (and ranks), divide at the end."""
    h, W, y = _head(seed=4, shape=(6, 8))
    _, whole = xent.linear_cross_entropy(h, W, y, shift=True, z_loss=1e-3, return_stats=True)
    parts = [xent.linear_cross_entropy(h[i:i + 2], W, y[i:i + 2], shift=True, z_loss=1e-3,
                                       return_stats=True)[1] for i in (0, 2, 4)]
    total = parts[0] + parts[1] + parts[2]
    torch.testing.assert_close(total.to_tensor(), whole.to_tensor(), rtol=1e-12, atol=1e-12)
    back = xent.TokenStats.from_tensor(total.to_tensor())
    assert int(back.tokens) == int(total.tokens) and back.tokens.dtype == torch.int64
    means = total.means()
    assert math.isclose(means["accuracy"], int(whole.correct) / int(whole.tokens))
    assert math.isclose(means["loss"], float(xent.linear_cross_entropy(h, W, y, shift=True, z_loss=1e-3)))


def test_all_ignored_gives_zero_stats():
    h, W, y = _head()
    y[:] = -100
    loss, stats = xent.linear_cross_entropy(h, W, y, return_stats=True)
    assert float(loss) == 0.0 and int(stats.tokens) == 0 and float(stats.to_tensor().abs().sum()) == 0.0
    assert stats.means() == {"loss": 0.0, "accuracy": 0.0, "entropy": 0.0, "z_loss": 0.0, "lse": 0.0}


def test_bad_requests():
    h, W, y = _head()

    class TwoValues(TokenLoss):
        num_outputs = 2

        def token_loss(self, logits, target):
            return torch.stack([logits[..., 0], logits[..., 1]], dim=-1)

    with pytest.raises(ValueError, match="return_stats needs a loss with one value per token"):
        xent.linear_loss(h, W, y, loss=TwoValues(), return_stats=True)
    with pytest.raises(ValueError, match="return_stats needs class-id targets"):
        xent.cross_entropy(torch.randn(3, 4), torch.softmax(torch.randn(3, 4), -1), return_stats=True)
