"""Binary cross-entropy under torch's two names. xent.binary_cross_entropy_with_logits: equal to torch's
function of that name for every option torch has (values and gradients), a float64 reference written with
explicit sigmoids, and xent's own rules (ignore_index, num_items, all-ignored → 0, label smoothing as
Keras). xent.binary_cross_entropy: probabilities, equal to torch's (its clamp of the log at −100)."""

import math

import pytest
import torch
import torch.nn.functional as F

import xent

D = torch.float64


def _inputs(shape=(4, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=D) * 3).requires_grad_(True)
    y = torch.rand(shape, generator=g, dtype=D)  # soft targets
    return x, y


def _ref(x, y, weight=None, pos_weight=None, eps=0.0):
    """ℓ = −w[pw·y·log σ(x) + (1−y)·log(1−σ(x))] with σ formed explicitly, in float64 (moderate x only)."""
    s = 1.0 / (1.0 + torch.exp(-x.detach().to(D)))
    y = y.to(D) * (1 - eps) + eps / 2
    pw = 1.0 if pos_weight is None else pos_weight.to(D)
    w = 1.0 if weight is None else weight.to(D)
    return -w * (pw * y * torch.log(s) + (1 - y) * torch.log(1 - s))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"weight": "C"},
        {"weight": "NC"},
        {"pos_weight": "C"},
        {"weight": "NC", "pos_weight": "C"},
        {"weight": "1", "pos_weight": "1"},
    ],
    ids=["plain", "weight[C]", "weight[N,C]", "pos_weight[C]", "both", "scalar-like"],
)
def test_equals_torch_values_and_gradients(options, reduction):
    x, y = _inputs()
    g = torch.Generator().manual_seed(1)
    shapes = {"C": (5,), "NC": (4, 5), "1": (1,)}
    # torch differentiates with respect to the logits and the (soft) target, not the weights
    y.requires_grad_(True)
    opts = {k: torch.rand(shapes[v], generator=g, dtype=D) * 2 + 0.1 for k, v in options.items()}
    ours = xent.binary_cross_entropy_with_logits(x, y, reduction=reduction, **opts)
    theirs = F.binary_cross_entropy_with_logits(x, y, reduction=reduction, **opts)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    up = torch.randn(ours.shape, generator=g, dtype=D)
    leaves = [x, y]
    g_ours = torch.autograd.grad((ours * up).sum(), leaves)
    g_theirs = torch.autograd.grad((theirs * up).sum(), leaves)
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    ref = _ref(x, y.detach(), opts.get("weight"), opts.get("pos_weight"))
    expected = {"none": ref, "sum": ref.sum(), "mean": ref.mean()}[reduction]
    torch.testing.assert_close(ours.detach(), expected, rtol=1e-10, atol=1e-12)


def test_float32_and_bfloat16_are_computed_in_float32():
    x, y = _inputs()
    exact = xent.binary_cross_entropy_with_logits(x, y)
    for dt in (torch.float32, torch.bfloat16):
        got = xent.binary_cross_entropy_with_logits(x.detach().to(dt), y.to(dt))
        assert got.dtype == torch.float32
        # the same rounded inputs
        ref = xent.binary_cross_entropy_with_logits(x.detach().to(dt).to(D), y.to(dt).to(D))
        assert abs(got.item() - ref.item()) < 1e-6
    assert exact.dtype == D


def test_label_smoothing_as_keras():
    x, y = _inputs()
    y = (y > 0.5).to(D)
    for eps in (0.1, 0.5, 1.0):
        got = xent.binary_cross_entropy_with_logits(x, y, label_smoothing=eps, reduction="none")
        torch.testing.assert_close(got.detach(), _ref(x, y, eps=eps), rtol=1e-10, atol=1e-12)
        # smoothing is the same as the smoothed soft target without smoothing
        same = xent.binary_cross_entropy_with_logits(x, y * (1 - eps) + eps / 2, reduction="none")
        torch.testing.assert_close(got, same, rtol=1e-12, atol=1e-14)


def test_extreme_logits_are_exact_without_epsilon():
    # σ(±200) is 1 or 0 in float64: log(σ) formed from σ (with or without a clip) is wrong there.
    x = torch.tensor([200.0, -200.0, 40.0, -40.0], dtype=D, requires_grad=True)
    y = torch.tensor([0.0, 1.0, 1.0, 0.0], dtype=D)
    got = xent.binary_cross_entropy_with_logits(x, y, reduction="none")
    # softplus(200) = 200 + log1p(e^-200); softplus(-40) = log1p(e^-40) = e^-40 to 1e-35
    expected = torch.tensor([200.0, 200.0, math.exp(-40.0), math.exp(-40.0)], dtype=D)
    torch.testing.assert_close(got.detach(), expected, rtol=1e-14, atol=0.0)
    (gx,) = torch.autograd.grad(got.sum(), x)
    torch.testing.assert_close(gx, torch.tensor([1.0, -1.0, -math.exp(-40.0), math.exp(-40.0)], dtype=D),
                               rtol=1e-12, atol=0.0)
    # float32 keeps them too
    got32 = xent.binary_cross_entropy_with_logits(x.detach().float(), y.float(), reduction="none")
    assert torch.allclose(got32.double(), expected, rtol=1e-6, atol=1e-30)


def test_ignore_index_skips_elements_and_counts_only_valid():
    x, y = _inputs((3, 4))
    y = y.clone()
    y[0, 1] = -100.0
    y[2, :] = -100.0
    valid = y != -100
    got = xent.binary_cross_entropy_with_logits(x, y)
    expected = F.binary_cross_entropy_with_logits(x[valid], y[valid])
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    (gx,) = torch.autograd.grad(got, x)
    assert torch.all(gx[~valid] == 0)
    none = xent.binary_cross_entropy_with_logits(x, y, reduction="none")
    assert torch.all(none[~valid] == 0)
    # integer targets with an integer ignore_index of another value
    yi = (y > 0.5).long()
    yi[~valid] = -1
    got_i = xent.binary_cross_entropy_with_logits(x, yi, ignore_index=-1)
    torch.testing.assert_close(got_i, F.binary_cross_entropy_with_logits(x[valid], yi[valid].to(D)),
                               rtol=1e-12, atol=1e-12)
    yb = torch.rand(3, 4) > 0.5  # bool targets
    torch.testing.assert_close(xent.binary_cross_entropy_with_logits(x, yb),
                               F.binary_cross_entropy_with_logits(x, yb.to(D)), rtol=1e-12, atol=1e-12)


def test_all_ignored_gives_zero_with_zero_gradient():
    x, _ = _inputs((2, 3))
    y = torch.full((2, 3), -100.0, dtype=D)
    for kw in ({}, {"num_items": 0}):
        loss = xent.binary_cross_entropy_with_logits(x, y, **kw)
        assert loss.item() == 0.0
        (gx,) = torch.autograd.grad(loss, x)
        assert torch.all(gx == 0)
    # torch on the (empty) valid subset: NaN
    assert torch.isnan(F.binary_cross_entropy_with_logits(x[y != -100], y[y != -100]))


def test_num_items_micro_batches_sum_to_the_full_mean():
    x, y = _inputs((6, 4))
    y = y.clone()
    y[:2, 1:] = -100.0  # uneven padding between micro-batches
    full = xent.binary_cross_entropy_with_logits(x, y)
    n = int((y != -100).sum())
    bce = xent.binary_cross_entropy_with_logits
    parts = [bce(x[i : i + 2], y[i : i + 2], num_items=n) for i in (0, 2, 4)]
    torch.testing.assert_close(sum(parts), full, rtol=1e-12, atol=1e-14)
    mean_of_means = sum(bce(x[i : i + 2], y[i : i + 2]) for i in (0, 2, 4)) / 3
    assert abs(mean_of_means.item() - full.item()) > 1e-3  # what averaging per-micro-batch means gets


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"target": torch.zeros(3)}, ValueError, r"target shape \(3,\) must equal input shape \(2, 3\)"),
        ({"target": torch.full((2, 3), 1.5)}, ValueError, r"outside \[0, 1\].*the first is 1.5"),
        ({"target": torch.full((2, 3), float("nan"))}, ValueError, "outside"),
        ({"ignore_index": 0}, ValueError, r"ignore_index must lie outside \[0, 1\]"),
        ({"ignore_index": "x"}, TypeError, "ignore_index must be a number"),
        ({"reduction": "avg"}, ValueError, "reduction must be one of"),
        ({"num_items": 3, "reduction": "sum"}, ValueError, "num_items"),
        ({"weight": torch.ones(4)}, ValueError, r"weight shape \(4,\) does not broadcast"),
        ({"pos_weight": torch.ones(2)}, ValueError, r"pos_weight shape \(2,\) does not broadcast"),
        ({"pos_weight": torch.ones(3, dtype=torch.long)}, TypeError, "pos_weight must be a floating"),
        ({"label_smoothing": 1.5}, ValueError, "label_smoothing"),
        ({"input": torch.zeros(2, 3, dtype=torch.long)}, TypeError, "input must be a floating"),
        ({"num_items": 0}, ValueError, "num_items is 0 but 6 target"),
    ],
)
def test_bad_input_names_the_argument(kwargs, error, match):
    args = {"input": torch.zeros(2, 3), "target": torch.ones(2, 3)}
    args.update(kwargs)
    logits, target = args.pop("input"), args.pop("target")
    with pytest.raises(error, match=match):
        xent.binary_cross_entropy_with_logits(logits, target, **args)


# ---------- binary_cross_entropy: probabilities, as torch's function of that name ----------

def _probs(shape=(4, 5), seed=3):
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(shape, generator=g, dtype=D)
    p[0, :3] = torch.tensor([0.0, 1.0, 1e-60], dtype=D)  # the clamp of the log at −100
    y = torch.rand(shape, generator=g, dtype=D)
    y[0, :3] = torch.tensor([1.0, 0.0, 1.0], dtype=D)  # confident and wrong
    return p.requires_grad_(True), y


def _ref_probs(p, y, weight=None, eps=0.0):
    """ℓ = −w[y·max(log p, −100) + (1−y)·max(log(1−p), −100)] element by element in float64."""
    y = y.to(D) * (1 - eps) + eps / 2
    out = torch.empty_like(p, dtype=D)
    for i, (pi, yi) in enumerate(zip(p.detach().reshape(-1).tolist(), y.reshape(-1).tolist())):
        log_p = max(math.log(pi), -100.0) if pi > 0 else -100.0
        log_1mp = max(math.log1p(-pi), -100.0) if pi < 1 else -100.0
        out.view(-1)[i] = -(yi * log_p + (1 - yi) * log_1mp)
    return out if weight is None else out * weight.to(D)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weight", [None, "C", "NC"])
def test_probabilities_equal_torch_values_and_gradients(weight, reduction):
    p, y = _probs()
    y.requires_grad_(True)
    g = torch.Generator().manual_seed(4)
    w = None if weight is None else torch.rand({"C": (5,), "NC": (4, 5)}[weight], generator=g, dtype=D) + 0.1
    ours = xent.binary_cross_entropy(p, y, w, reduction=reduction)
    theirs = F.binary_cross_entropy(p, y, None if w is None else w.expand(4, 5), reduction=reduction)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    ref = _ref_probs(p, y.detach(), w)
    torch.testing.assert_close(ours.detach(), {"none": ref, "sum": ref.sum(), "mean": ref.mean()}[reduction],
                               rtol=1e-12, atol=1e-12)
    assert torch.isfinite(ours).all()
    if reduction == "none":  # p = 0 with y = 1 and p = 1 with y = 0: 100·w, not inf
        torch.testing.assert_close(ours.detach()[0, :2], 100.0 * (torch.ones(2, dtype=D) if w is None
                                                                    else w.expand(4, 5)[0, :2]))
    up = torch.randn(ours.shape, generator=g, dtype=D)
    g_ours = torch.autograd.grad((ours * up).sum(), [p, y])
    g_theirs = torch.autograd.grad((theirs * up).sum(), [p, y])
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_probabilities_are_not_logits():
    """The probability function is torch's: the same probabilities give torch's number, and logits
    (outside [0, 1]) are refused, pointing to the logits function."""
    x = torch.tensor([2.0, -1.0, 0.5])
    y = torch.tensor([1.0, 0.0, 1.0])
    p = torch.sigmoid(x)
    torch.testing.assert_close(xent.binary_cross_entropy(p, y), F.binary_cross_entropy(p, y))
    torch.testing.assert_close(xent.binary_cross_entropy(p, y), xent.binary_cross_entropy_with_logits(x, y))
    with pytest.raises(ValueError, match=r"input must hold probabilities in \[0, 1\] \(use "
                                         r"binary_cross_entropy_with_logits.*the first is 2.0"):
        xent.binary_cross_entropy(x, y)
    with pytest.raises(ValueError, match="input must hold probabilities"):
        xent.binary_cross_entropy(torch.tensor([float("nan")]), torch.tensor([1.0]))
    with pytest.raises(TypeError, match="pos_weight"):
        xent.binary_cross_entropy(p, y, pos_weight=torch.ones(3))


def test_probabilities_with_xent_rules():
    p, y = _probs((3, 4))
    y = y.clone()
    y[0, 0] = -100.0  # ignored where p = 0 and y would be 1: never read, no gradient
    y[2, :] = -100.0
    p.data[2, 1] = 7.0  # out of range, but ignored
    valid = y != -100
    got = xent.binary_cross_entropy(p, y)
    torch.testing.assert_close(got, F.binary_cross_entropy(p[valid], y[valid]), rtol=1e-12, atol=1e-12)
    (gp,) = torch.autograd.grad(got, p)
    assert torch.all(gp[~valid] == 0) and torch.isfinite(gp).all()
    n = int(valid.sum())
    parts = [xent.binary_cross_entropy(p[i : i + 1], y[i : i + 1], num_items=n) for i in range(3)]
    torch.testing.assert_close(sum(parts), got, rtol=1e-12, atol=1e-14)
    all_ignored = xent.binary_cross_entropy(p, torch.full_like(y, -100.0))
    assert all_ignored.item() == 0.0
    pv, yv = p.detach()[:2, 1:], y[:2, 1:]  # valid elements only (p = 1 and p = 1e-60 among them)
    for eps in (0.1, 1.0):
        smoothed = xent.binary_cross_entropy(pv, yv, label_smoothing=eps, reduction="none")
        torch.testing.assert_close(smoothed, _ref_probs(pv, yv, eps=eps), rtol=1e-12, atol=1e-12)
    half = xent.binary_cross_entropy(p.detach()[:2].to(torch.bfloat16), y[:2].to(torch.bfloat16))
    assert half.dtype == torch.float32


def test_unbatched_and_empty():
    p, y = torch.tensor(0.25, dtype=D), torch.tensor(1.0, dtype=D)
    for f, a in ((xent.binary_cross_entropy, p), (xent.binary_cross_entropy_with_logits, torch.logit(p))):
        got = f(a, y, reduction="none")
        assert got.shape == () and abs(got.item() - math.log(4.0)) < 1e-12
    assert xent.binary_cross_entropy(torch.zeros(0, 3), torch.zeros(0, 3)).item() == 0.0


def test_reference_worked_number():
    """docs/REFERENCE.md, binary cross-entropy: p = (0.9, 0.2), y = (1, 0), mean 0.1642520335."""
    p, y = torch.tensor([0.9, 0.2], dtype=D), torch.tensor([1.0, 0.0], dtype=D)
    assert xent.binary_cross_entropy(p, y).item() == pytest.approx(0.1642520335, abs=1e-10)
    x = torch.log(p) - torch.log1p(-p)
    assert xent.binary_cross_entropy_with_logits(x, y).item() == pytest.approx(0.1642520335, abs=1e-10)


def test_probabilities_weight_may_require_grad():
    """torch's binary_cross_entropy refuses a weight that requires grad; here it is a factor like any
    other: d(mean w·ℓ)/dw = ℓ / n."""
    p, y = _probs((2, 3))
    w = (torch.rand(2, 3, dtype=D) + 0.5).requires_grad_(True)
    loss = xent.binary_cross_entropy(p, y, w)
    (gw,) = torch.autograd.grad(loss, w)
    torch.testing.assert_close(gw, _ref_probs(p, y) / 6, rtol=1e-12, atol=1e-12)
