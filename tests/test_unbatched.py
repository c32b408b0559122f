"""Unbatched input, as torch takes it: logits [C] and a 0-d class id (reduction="none" gives a 0-d loss).

Judged against torch itself on torch's own OpInfo samples of ``cross_entropy`` and ``nll_loss`` (batched
and unbatched, with their class dimension moved last), on a grid of every torch option for the unbatched
form, and, for every xent loss that takes logits, against the same loss on the one-row batch [1, C].
"""

import math

import pytest
import torch
import torch.nn.functional as F

import xent


def _op_samples(name, dtype):
    # imported here: op_db takes seconds to build, and only these tests need it
    from torch.testing._internal.common_methods_invocations import op_db

    (op,) = [o for o in op_db if o.name == name and o.variant_test_name == ""]
    return list(op.sample_inputs("cpu", dtype, requires_grad=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("op", ["nn.functional.cross_entropy", "nn.functional.nll_loss"])
def test_torch_opinfo_samples(op, dtype):
    samples = _op_samples(op, dtype)
    assert any(s.input.dim() == 1 for s in samples) or op.endswith("cross_entropy")
    for s in samples:
        x, (target,), kw = s.input, s.args, dict(s.kwargs)
        class_dim = 1 if x.dim() >= 2 else 0
        if op.endswith("cross_entropy"):
            want = F.cross_entropy(x, target, **kw)
        else:  # nll_loss of log-softmax is cross-entropy of the logits
            want = F.nll_loss(torch.log_softmax(x, dim=class_dim), target, **kw)
        xt = target.movedim(class_dim, -1) if target.is_floating_point() else target
        got = xent.cross_entropy(x.movedim(class_dim, -1), xt, **kw)
        where = f"{op} input {tuple(x.shape)} target {tuple(target.shape)} {kw}"
        assert got.shape == want.shape and got.dtype == want.dtype, where
        if want.dim() == 0 and torch.isnan(want):
            # every target ignored under "mean": torch divides 0 by 0, xent gives 0 (REFERENCE.md §1)
            assert got.item() == 0.0 and kw.get("ignore_index") is not None, where
            continue
        torch.testing.assert_close(got, want, msg=where)
        (g_got,) = torch.autograd.grad(got.sum(), x)
        (g_want,) = torch.autograd.grad(want.sum(), x)
        torch.testing.assert_close(g_got, g_want, msg=where)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("target,ignore_index", [(1, -100), (0, -100), (-100, -100), (2, 2), (3, 2)])
def test_unbatched_equals_torch(target, ignore_index, weighted, label_smoothing, reduction, dtype):
    x = torch.tensor([0.3, -1.2, 2.0, 0.7], dtype=dtype, requires_grad=True)
    y = torch.tensor(target)
    kw = dict(ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
              weight=torch.tensor([0.5, 2.0, 1.5, 3.0], dtype=dtype) if weighted else None)
    want = F.cross_entropy(x, y, **kw)
    got = xent.cross_entropy(x, y, **kw)
    assert got.shape == want.shape == () and got.dtype == dtype
    if target == ignore_index and reduction == "mean":
        assert math.isnan(want.item()) and got.item() == 0.0  # torch 0/0; xent's all-ignored 0
        (g,) = torch.autograd.grad(got, x)
        assert torch.equal(g, torch.zeros_like(x))
        return
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, x)[0], torch.autograd.grad(want, x)[0])


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_unbatched_probability_target(reduction):
    x = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    w = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    kw = dict(reduction=reduction, label_smoothing=0.1, weight=w)
    got, want = xent.cross_entropy(x, t, **kw), F.cross_entropy(x, t, **kw)
    assert got.shape == want.shape == ()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, x)[0], torch.autograd.grad(want, x)[0])


def test_issue_example_and_stats():
    x, y = torch.tensor([0.1, 2.0, -0.5]), torch.tensor(1)
    torch.testing.assert_close(xent.cross_entropy(x, y), F.cross_entropy(x, y))
    loss, stats = xent.cross_entropy(x, y, return_stats=True)
    assert int(stats.tokens) == 1 and int(stats.correct) == 1
    torch.testing.assert_close(stats.loss_sum, loss.double())


V = 6
_E = torch.randn(V, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
_TEACHER = torch.randn(V, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
_IDS = torch.tensor([3, 0, 5])
_TEACHER_LP = torch.log_softmax(_TEACHER, -1)[_IDS]
_HEAD = torch.randn(9, V, generator=torch.Generator().manual_seed(3), dtype=torch.float64)  # x as hidden

# name -> f(logits [..., V], target [...], batched: bool, **kw): every xent loss on logits and class ids
LOSSES = {
    "cross_entropy": lambda x, y, b, **kw: xent.cross_entropy(x, y, z_loss=1e-3, **kw),
    "cross_entropy_weighted": lambda x, y, b, **kw: xent.cross_entropy(
        x, y, weight=torch.linspace(0.5, 2.0, V, dtype=x.dtype), label_smoothing=0.1, **kw),
    "focal": lambda x, y, b, **kw: xent.focal_loss(x, y, gamma=2.0, alpha=0.7, **kw),
    "poly": lambda x, y, b, **kw: xent.poly_loss(x, y, **kw),
    "tailr": lambda x, y, b, **kw: xent.tailr_loss(x, y, gamma=0.1, threshold=0.2, **kw),
    "gold": lambda x, y, b, **kw: xent.gold_loss(x, y, **kw),
    "dft": lambda x, y, b, **kw: xent.dft_loss(x, y, **kw),
    "entropy_regularized": lambda x, y, b, **kw: xent.entropy_regularized_loss(x, y, beta=0.1, **kw),
    "eaft": lambda x, y, b, **kw: xent.eaft_loss(x, y, k=3, **kw),
    "emo": lambda x, y, b, **kw: xent.emo_loss(x, y, cost_embedding=_E, **kw),
    "distill": lambda x, y, b, **kw: xent.distill_loss(
        x, _TEACHER.expand_as(x), y, kind="jsd", hard_weight=0.5, **kw),
    "sparse_distill": lambda x, y, b, **kw: xent.sparse_distill_loss(
        x, _IDS.expand(*x.shape[:-1], 3), _TEACHER_LP.expand(*x.shape[:-1], 3), y, **kw),
    "rho1": lambda x, y, b, **kw: xent.rho1_loss(
        x, y, torch.full(y.shape, 0.25, dtype=torch.float64), ratio=1.0, **kw),
    "log_probs": lambda x, y, b, **kw: xent.log_probs(x, y, temperature=0.7),
    "log_probs_entropy": lambda x, y, b, **kw: torch.stack(xent.log_probs(x, y, with_entropy=True), -1),
    "nn.CrossEntropyLoss": lambda x, y, b, **kw: xent.nn.CrossEntropyLoss(**kw)(x, y),
    # the fused head on hidden [D] (x) and a 0-d target
    "linear_cross_entropy": lambda x, y, b, **kw: xent.linear_cross_entropy(x, _HEAD, y, z_loss=1e-3, **kw),
    "linear_loss_focal": lambda x, y, b, **kw: xent.linear_loss(x, _HEAD, y, loss=xent.losses.Focal(), **kw),
    "linear_log_probs": lambda x, y, b, **kw: torch.stack(
        xent.linear_log_probs(x, _HEAD, y, with_entropy=True), -1),
}
REDUCED = {"log_probs", "log_probs_entropy", "linear_log_probs"}  # per-token only: no reduction argument


@pytest.mark.parametrize("target", [4, -100])
@pytest.mark.parametrize("name,reduction", [(name, reduction) for name in sorted(LOSSES)
                                            for reduction in ("none", "mean", "sum")
                                            if reduction == "none" or name not in REDUCED])
def test_every_loss_takes_unbatched(name, reduction, target):
    """logits [V] with a 0-d target equals the one-row batch [1, V] (values and gradients), an ignored
    0-d target included; reduction="none" gives a 0-d tensor, as torch does."""
    f, kw = LOSSES[name], ({} if name in REDUCED else {"reduction": reduction})
    x = torch.linspace(-1.5, 2.5, V, dtype=torch.float64).roll(2).requires_grad_()
    y = torch.tensor(target)
    got = f(x, y, False, **kw)
    want = f(x.unsqueeze(0), y.unsqueeze(0), True, **kw)
    if reduction == "none":
        want = want[0]
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    (g_got,) = torch.autograd.grad(got.sum(), x)
    (g_want,) = torch.autograd.grad(want.sum(), x)
    torch.testing.assert_close(g_got, g_want, rtol=1e-12, atol=1e-12)
    if target == -100:
        assert torch.all(got == 0) and torch.all(g_got == 0)
