"""xent.cross_entropy against REFERENCE.md's worked numbers, torch, and a float64 loop reference."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import xent
from reference import X, Y, close, ref_cross_entropy

W123 = [1.0, 2.0, 3.0]

# (options, per-token "none" values, mean) from docs/REFERENCE.md §2
GOLDEN = [
    ({}, [0.4170300163, 0, 0.6041306053], 0.5105803108),
    ({"weight": W123}, [0.4170300163, 0, 1.8123918160], 0.5573554581),
    ({"label_smoothing": 0.1}, [0.5136966829, 0, 0.6707972720], 0.5922469775),
    ({"weight": W123, "label_smoothing": 0.1}, [0.7153996846, 0, 1.8686454221], 0.6460112767),
    ({"softcap": 30.0}, [0.4179496244, 0, 0.6050527498], 0.5115011871),
]


def _opts(opts, dtype):
    return {k: torch.tensor(v, dtype=dtype) if k == "weight" else v for k, v in opts.items()}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("opts,none,mean", GOLDEN)
def test_reference_worked_numbers(opts, none, mean, dtype):
    x, y = torch.tensor(X, dtype=dtype), torch.tensor(Y)
    tol = 1e-9 if dtype == torch.float64 else 2e-7
    got_none = xent.cross_entropy(x, y, reduction="none", **_opts(opts, dtype))
    got_mean = xent.cross_entropy(x, y, **_opts(opts, dtype))
    assert got_none.dtype == dtype and got_none.shape == y.shape
    assert close(got_none, none, rtol=tol, atol=tol)
    assert close(got_mean, mean, rtol=tol, atol=tol)


def test_reference_z_loss_terms():
    x, y = torch.tensor(X, dtype=torch.float64), torch.tensor(Y)
    lse = torch.logsumexp(x, -1)
    assert close(1e-4 * lse[[0, 2]] ** 2, [0.0005842034, 0.0006781496], atol=1e-10)
    assert close(xent.cross_entropy(x, y, z_loss=1e-4), 0.5112114873, atol=1e-10)


def test_float32_prints_reference_value():
    got = xent.cross_entropy(torch.tensor(X), torch.tensor(Y))
    assert got.dtype == torch.float32 and got.item() == pytest.approx(0.51058030128479, abs=1e-7)


def test_all_ignored_is_zero_with_zero_gradient():
    x = torch.tensor(X, requires_grad=True)
    y = torch.full((3,), -100)
    assert torch.isnan(F.cross_entropy(x, y))  # what torch does
    for reduction in ("mean", "sum"):
        loss = xent.cross_entropy(x, y, reduction=reduction, weight=torch.tensor(W123), label_smoothing=0.1)
        (g,) = torch.autograd.grad(loss, x)
        assert loss.item() == 0.0 and torch.equal(g, torch.zeros_like(x))
    assert torch.equal(xent.cross_entropy(x, y, reduction="none"), torch.zeros(3))


SHAPES = [(7, 13), (2, 5, 11), (3, 47, 1001)]
TORCH_OPTIONS = [
    {},
    {"weight": "rand"},
    {"label_smoothing": 0.15},
    {"weight": "rand", "label_smoothing": 0.3},
]


def _case(shape, seed=0, ignore_frac=0.3, dtype=torch.float32, ignore_index=-100):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(shape, generator=g)).to(dtype)
    target = torch.randint(0, shape[-1], shape[:-1], generator=g)
    target[torch.rand(shape[:-1], generator=g) < ignore_frac] = ignore_index
    return logits, target


def _materialise(opts, V, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.rand(V, generator=g) + 0.1 if v == "rand" else v) for k, v in opts.items()}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", TORCH_OPTIONS, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_torch_float32(shape, opts, reduction):
    logits, target = _case(shape)
    o = _materialise(opts, shape[-1])
    ours = xent.cross_entropy(logits, target, reduction=reduction, **o)
    theirs = F.cross_entropy(logits.reshape(-1, shape[-1]), target.reshape(-1), reduction=reduction, **o)
    assert ours.shape == (target.shape if reduction == "none" else ())
    torch.testing.assert_close(ours.reshape(-1), theirs.reshape(-1), rtol=2e-6, atol=2e-6)


ALL_OPTIONS = TORCH_OPTIONS + [
    {"z_loss": 1e-3},
    {"softcap": 5.0},
    {"weight": "rand", "label_smoothing": 0.2, "z_loss": 1e-2, "softcap": 4.0},
]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", ALL_OPTIONS, ids=str)
@pytest.mark.parametrize("ignore_frac", [0.0, 0.4, 1.0])
def test_matches_float64_reference(opts, reduction, ignore_frac):
    logits, target = _case((3, 17, 29), seed=3, ignore_frac=ignore_frac)
    o = _materialise(opts, 29)
    ours = xent.cross_entropy(logits.double(), target, reduction=reduction, **o)
    ref = ref_cross_entropy(logits, target, reduction=reduction, **o)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    ours32 = xent.cross_entropy(logits, target, reduction=reduction, **o)
    assert ours32.dtype == torch.float32
    torch.testing.assert_close(ours32.double(), ref, rtol=3e-6, atol=3e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("opts", TORCH_OPTIONS, ids=str)
def test_half_precision_no_worse_than_torch(dtype, opts):
    logits, target = _case((3, 47, 1001), seed=5, dtype=dtype)
    o = _materialise(opts, 1001)
    truth = ref_cross_entropy(logits, target, **o)  # the float64 truth of the same half values
    ours = xent.cross_entropy(logits, target, **o)
    assert ours.dtype == torch.float32
    # exactly torch on the upcast input (the definition) ...
    upcast = F.cross_entropy(logits.float().reshape(-1, 1001), target.reshape(-1), **o)
    torch.testing.assert_close(ours, upcast, rtol=1e-6, atol=1e-6)
    # ... and no worse than torch's own half-precision computation.
    torch_half = F.cross_entropy(logits.reshape(-1, 1001), target.reshape(-1),
                                 **{k: v.to(dtype) if torch.is_tensor(v) else v for k, v in o.items()})
    assert abs(ours.double() - truth) <= abs(torch_half.double() - truth) + 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_gradient_dtype_and_value(dtype):
    logits, target = _case((4, 9, 33), seed=6, dtype=dtype)
    logits.requires_grad_(True)
    (g,) = torch.autograd.grad(xent.cross_entropy(logits, target, label_smoothing=0.1), logits)
    assert g.dtype == dtype
    x32 = logits.detach().float().requires_grad_(True)
    (g32,) = torch.autograd.grad(F.cross_entropy(x32.reshape(-1, 33), target.reshape(-1),
                                                 label_smoothing=0.1), x32)
    torch.testing.assert_close(g.float(), g32, rtol=1e-2, atol=1e-4)


@pytest.mark.parametrize("opts", ALL_OPTIONS, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck(opts, reduction):
    logits, target = _case((2, 3, 5), seed=7, ignore_frac=0.3, dtype=torch.float64)
    o = _materialise(opts, 5)
    o = {k: v.double() if torch.is_tensor(v) else v for k, v in o.items()}
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: xent.cross_entropy(x, target, reduction=reduction, **o), logits)


def test_gradient_matches_torch():
    logits, target = _case((5, 8, 37), seed=8)
    w = torch.rand(37) + 0.5
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    xent.cross_entropy(a, target, weight=w, label_smoothing=0.2).backward()
    F.cross_entropy(b.reshape(-1, 37), target.reshape(-1), weight=w, label_smoothing=0.2).backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("opts", [{}, {"label_smoothing": 0.2}, {"weight": "rand"}], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_probability_targets_match_torch(opts, reduction):
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(6, 10, generator=g)
    probs = torch.softmax(torch.randn(6, 10, generator=g), -1)
    o = _materialise(opts, 10)
    ours = xent.cross_entropy(logits, probs, reduction=reduction, **o)
    theirs = F.cross_entropy(logits, probs, reduction=reduction, **o)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_custom_ignore_index():
    logits, target = _case((4, 6, 9), seed=10, ignore_index=3)
    torch.testing.assert_close(
        xent.cross_entropy(logits, target, ignore_index=3),
        F.cross_entropy(logits.reshape(-1, 9), target.reshape(-1), ignore_index=3),
    )


@settings(max_examples=30, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 4), min_size=1, max_size=5),
    seed=st.integers(0, 2**16),
    smoothing=st.sampled_from([0.0, 0.1]),
    z=st.sampled_from([0.0, 1e-3]),
)
def test_microbatch_split_sums_to_full_batch(sizes, seed, smoothing, z):
    """Any split into micro-batches with num_items = count over the full batch sums to the full loss."""
    B, T, V = sum(sizes), 6, 11
    logits, labels = _case((B, T, V), seed=seed, ignore_frac=0.5)
    logits.requires_grad_(True)
    opts = {"label_smoothing": smoothing, "z_loss": z}
    full = xent.causal_lm_loss(logits, labels, **opts)
    (g_full,) = torch.autograd.grad(full, logits)
    n = xent.count_items(labels)
    total, start = 0.0, 0
    for size in sizes:
        sl = slice(start, start + size)
        total = total + xent.causal_lm_loss(logits[sl], labels[sl], num_items_in_batch=n, **opts)
        start += size
    (g_split,) = torch.autograd.grad(total, logits)
    torch.testing.assert_close(total, full, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g_split, g_full, rtol=1e-5, atol=1e-8)


def test_num_items_int_and_tensor():
    logits, target = _case((2, 7, 5), seed=11)
    s = xent.cross_entropy(logits, target, reduction="sum")
    torch.testing.assert_close(xent.cross_entropy(logits, target, num_items=13), s / 13)
    torch.testing.assert_close(xent.cross_entropy(logits, target, num_items=torch.tensor(13)), s / 13)


# ---- bad input: a clear error before any work ----

BAD = [
    (lambda: xent.cross_entropy(torch.randn(4, 5), torch.tensor([0, 7, 1, 9])),
     ValueError, r"target has 2 id\(s\) outside \[0, 5\).*the first is 7"),
    (lambda: xent.cross_entropy(torch.randn(3, 5), torch.tensor([0, -5, 1])),
     ValueError, r"target has 1 id\(s\) outside \[0, 5\).*ignore_index=-100.*the first is -5"),
    (lambda: xent.cross_entropy(torch.randn(4, 5), torch.tensor([0, 1, 2])),
     ValueError, r"target shape \(3,\) does not match logits shape without its last dimension \(4,\)"),
    (lambda: xent.cross_entropy(torch.randint(0, 3, (4, 5)), torch.zeros(4, dtype=torch.long)),
     TypeError, r"logits must be a floating-point tensor, got dtype=torch.int64"),
    (lambda: xent.cross_entropy(torch.randn(4, 5), torch.zeros(4, dtype=torch.bool)),
     TypeError, r"target must hold integer class ids, got dtype=torch.bool"),
    (lambda: xent.cross_entropy(torch.randn(4, 5), torch.zeros(4, dtype=torch.long), label_smoothing=1.5),
     ValueError, r"label_smoothing must be in \[0.0, 1.0\], got 1.5"),
    (lambda: xent.cross_entropy(torch.randn(4, 5), torch.zeros(4, dtype=torch.long), z_loss=-1e-4),
     ValueError, r"z_loss must be a finite number >= 0, got -0.0001"),
    (lambda: xent.cross_entropy(torch.randn(4, 5), torch.zeros(4, dtype=torch.long), z_loss=float("inf")),
     ValueError, r"z_loss must be a finite number, got inf"),
    (lambda: xent.cross_entropy(torch.randn(4, 5), torch.zeros(4, dtype=torch.long), softcap=float("inf")),
     ValueError, r"softcap must be a finite number, got inf"),
    (lambda: xent.cross_entropy(torch.randn(4, 5), torch.zeros(4, dtype=torch.long), softcap="30"),
     TypeError, r"softcap must be a number, got '30' of type str"),
    (lambda: xent.cross_entropy(torch.randn(4, 5), torch.zeros(4, dtype=torch.long), label_smoothing="0.1"),
     TypeError, r"label_smoothing must be a number, got '0.1' of type str"),
    (lambda: xent.cross_entropy(torch.randn(4, 5), torch.zeros(4, dtype=torch.long), ignore_index=None),
     TypeError, r"ignore_index must be an int, got None"),
    (lambda: xent.cross_entropy(torch.randn(4, 5), torch.zeros(4, dtype=torch.long), num_items="3"),
     TypeError, r"num_items must be a number or a scalar tensor, got '3'"),
    (lambda: xent.cross_entropy(torch.randn(4, 5), torch.zeros(4, dtype=torch.long), num_items=0),
     ValueError, r"num_items is 0 but 4 target\(s\) are valid"),
    (lambda: xent.cross_entropy(torch.randn(4, 5), torch.zeros(4, dtype=torch.long), softcap=0.0),
     ValueError, r"softcap must be None or a finite number > 0, got 0.0"),
    (lambda: xent.cross_entropy(torch.randn(4, 5), torch.zeros(4, dtype=torch.long), reduction="avg"),
     ValueError, r"reduction must be one of \('mean', 'sum', 'none'\), got 'avg'"),
    (lambda: xent.cross_entropy(torch.randn(4, 5), torch.zeros(4, dtype=torch.long), weight=torch.ones(4)),
     ValueError, r"weight must have shape \[V\] = \[5\], got shape \(4,\)"),
    (lambda: xent.cross_entropy(torch.randn(4, 5), torch.zeros(4, dtype=torch.long),
                                num_items=torch.tensor(-3)),
     ValueError, r"num_items must be a finite number >= 0, got -3"),
    (lambda: xent.cross_entropy(torch.randn(4, 5), torch.zeros(4, dtype=torch.long), reduction="sum",
                                num_items=3),
     ValueError, r"num_items replaces the denominator of reduction='mean'"),
    (lambda: xent.cross_entropy(torch.randn(4, 5), torch.rand(4, 6)),
     ValueError, r"probability target shape \(4, 6\) must equal logits shape \(4, 5\)"),
]


@pytest.mark.parametrize("call,exc,message", BAD, ids=[b[2][:40] for b in BAD])
def test_bad_input(call, exc, message):
    with pytest.raises(exc, match=message):
        call()


def test_module_holds_options():
    logits, target = _case((3, 4, 7), seed=12)
    mod = xent.nn.CrossEntropyLoss(label_smoothing=0.1, z_loss=1e-3)
    torch.testing.assert_close(mod(logits, target),
                               xent.cross_entropy(logits, target, label_smoothing=0.1, z_loss=1e-3))
    torch.testing.assert_close(mod(logits, target, num_items=5),
                               xent.cross_entropy(logits, target, label_smoothing=0.1, z_loss=1e-3,
                                                  num_items=5))
    with pytest.raises(TypeError, match="unknown option 'smoothing'"):
        xent.nn.CrossEntropyLoss(smoothing=0.1)
