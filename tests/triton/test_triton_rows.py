"""The Triton row kernel (xent._triton.ce_rows_) under the interpreter harness, against float64: losses
against the loop-by-token reference (tests/reference.py), gradients against autograd through torch's own
cross-entropy in float64, statistics against logit_stats in float64; every option, several tiles per row
(narrow tiles forced), V not a multiple of the tile, float32, bf16 and float16."""

from __future__ import annotations

import pytest

pytest.importorskip("triton.language", reason="triton is not installed (pip install -c constraints.txt "
                                                "-e '.[test]')")
import torch  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from triton_harness import assert_rounded  # noqa: E402
from triton_reference import ref_rows  # noqa: E402

import xent._triton._rows as rows_module  # noqa: E402
from xent._triton import ce_rows_  # noqa: E402
from xent._triton._config import RowConfig, row_config  # noqa: E402
from xent.losses._base import logit_stats  # noqa: E402

HALF = (torch.bfloat16, torch.float16)


@pytest.fixture
def narrow(monkeypatch):
    """128-column tiles: a row of a few hundred logits spans several, the last one ragged."""
    monkeypatch.setattr(rows_module, "row_config", lambda num_classes, itemsize: RowConfig(128, 4))


def make(dtype, rows=7, num_classes=300, seed=0, spread=4.0):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(rows, num_classes, generator=g) * spread).to(dtype)
    z[:, 150:170] += 6.0  # the maximum in a later tile than the first: the running max must rescale
    y = torch.randint(0, num_classes, (rows,), generator=g)
    y[0] = 160
    scale = torch.rand(rows, generator=g) + 0.5
    weight = torch.rand(num_classes, generator=g) * 2 + 0.1
    return z, y, scale, weight


def check(z, y, scale, *, weight=None, z_coef=0.0, softcap=None, eps=0.0, stats=True, pass_cw=True):
    w_y = None if weight is None else weight[y]
    st = torch.full((z.shape[0], 3), float("nan")) if stats else None
    buf = z.clone()
    target, scale_in = y.clone(), None if scale is None else scale.clone()
    loss = ce_rows_(buf, y, scale, w_y, z_coef, st, softcap=softcap, label_smoothing=eps,
                    class_weight=weight if pass_cw else None)
    assert torch.equal(y, target) and (scale is None or torch.equal(scale, scale_in))  # inputs untouched
    ref_loss, ref_grad = ref_rows(z, y, scale, weight=weight, z_coef=z_coef, softcap=softcap, eps=eps)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref_loss, rtol=2e-6, atol=2e-6)
    if scale is None:
        assert torch.equal(buf, z)  # the no-grad variant leaves the logits alone
    elif z.dtype == torch.float32:
        torch.testing.assert_close(buf.double(), ref_grad, rtol=1e-5, atol=2e-7 * float(scale.max()))
    else:
        assert_rounded(buf, ref_grad)
    if stats:
        x = z.double()
        x = x if softcap is None else softcap * torch.tanh(x / softcap)
        ref_st = logit_stats(x, y)
        assert torch.equal(st[:, 0].double(), ref_st[:, 0])
        torch.testing.assert_close(st[:, 1:].double(), ref_st[:, 1:], rtol=2e-6, atol=2e-6)
    return loss, buf, st


OPTIONS = {
    "plain": {},
    "class_weights": {"weight": True},
    "z_loss": {"z_coef": 1e-3},
    "softcap": {"softcap": 5.0},
    "smoothing": {"eps": 0.1},
    "weights_smoothing": {"weight": True, "eps": 0.2},
    "everything": {"weight": True, "eps": 0.1, "z_coef": 1e-3, "softcap": 8.0},
}


@pytest.mark.parametrize("dtype", [torch.float32, *HALF], ids=str)
@pytest.mark.parametrize("option", list(OPTIONS))
def test_rows_match_float64(narrow, harness, dtype, option):
    kw = dict(OPTIONS[option])
    z, y, scale, weight = make(dtype)
    kw["weight"] = weight if kw.get("weight") else None
    check(z, y, scale, **kw)
    assert harness.launches == 1 and harness.loads > 3 * 7  # several tiles per row, each load checked


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_no_grad_variant(narrow, dtype):
    z, y, _, weight = make(dtype)
    check(z, y, None, weight=weight, eps=0.1, z_coef=1e-3, softcap=6.0)


def test_statistics_do_not_change_the_results(narrow):
    z, y, scale, weight = make(torch.float32)
    with_st = check(z, y, scale, weight=weight, z_coef=1e-3, stats=True)
    without = check(z, y, scale, weight=weight, z_coef=1e-3, stats=False)
    assert torch.equal(with_st[0], without[0]) and torch.equal(with_st[1], without[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_default_tiles_several_per_row(harness, dtype):
    """The launcher's own configuration at a V just past its widest tile: two tiles, the second ragged."""
    num_classes = row_config(1 << 20, torch.empty((), dtype=dtype).element_size()).block_v + 37
    z, y, scale, _ = make(dtype, rows=3, num_classes=num_classes)
    check(z, y, scale, z_coef=1e-4)


def test_uniform_scale_expanded_and_strided_rows(narrow):
    """An expanded scalar upstream gradient (stride 0, as reduction="mean" gives) and rows with a stride
    wider than V (a view into a wider buffer): every address the kernel touches is an element of them."""
    z, y, _, _ = make(torch.float32)
    wide = torch.full((7, 333), float("nan"))
    wide[:, :300] = z
    view = wide[:, :300]
    scale = torch.tensor(0.25).expand(7)
    loss = ce_rows_(view, y, scale, None, 0.0)
    ref_loss, ref_grad = ref_rows(z, y, torch.full((7,), 0.25))
    torch.testing.assert_close(loss.double(), ref_loss, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(view.double(), ref_grad, rtol=1e-5, atol=1e-7)
    assert wide[:, 300:].isnan().all()  # the gap between rows untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_finite_rows(narrow, dtype):
    """NaN anywhere, +inf, or only -inf: that row NaN (loss, statistics, gradient), the others exact; a
    single -inf logit is an ordinary zero-probability class; under soft-capping ±inf are capped to ±c."""
    z, y, scale, _ = make(dtype, rows=6)
    z[1, 200] = float("nan")
    z[2, 5] = float("inf")
    z[3] = float("-inf")
    z[4, 7] = float("-inf")
    y[4] = 8
    st = torch.zeros(6, 3)
    buf = z.clone()
    loss = ce_rows_(buf, y, scale, None, 1e-3, st)
    for r in (1, 2, 3):
        assert loss[r].isnan() and st[r].isnan().all() and buf[r].isnan().all()
    good = [0, 4, 5]
    ref_loss, ref_grad = ref_rows(z[good], y[good], scale[good], z_coef=1e-3, loop=False)
    torch.testing.assert_close(loss[good].double(), ref_loss, rtol=2e-6, atol=2e-6)
    assert buf[4, 7] == 0 and torch.isfinite(buf[good]).all()
    if dtype == torch.float32:
        torch.testing.assert_close(buf[good].double(), ref_grad, rtol=1e-5, atol=1e-7)
    else:
        assert_rounded(buf[good], ref_grad)
    # soft-capped: +inf is c, -inf is -c; only the NaN row stays NaN
    buf = z.clone()
    loss = ce_rows_(buf, y, scale, None, 0.0, softcap=10.0)
    assert loss[1].isnan() and torch.isfinite(loss[[0, 2, 3, 4, 5]]).all()
    ref_loss, _ = ref_rows(z[[2, 3]], y[[2, 3]], None, softcap=10.0)
    torch.testing.assert_close(loss[[2, 3]].double(), ref_loss, rtol=2e-6, atol=2e-6)


def test_large_logits_keep_their_precision(narrow):
    """Logits around 1e4 (the shift keeps lse − z_y exact) and a dominant class (loss ~ 1e-6)."""
    z, y, scale, _ = make(torch.float32)
    z = z + 1e4
    check(z, y, scale)
    sharp = torch.zeros(3, 300)
    sharp[:, 11] = 20.0
    check(sharp, torch.full((3,), 11), torch.ones(3))


def test_reference_numbers():
    """REFERENCE.md §2's worked numbers row by row (valid rows 0 and 2 of X)."""
    x = torch.tensor([[2.0, 1.0, 0.1], [1.5, 0.5, 2.0]])
    y = torch.tensor([0, 2])
    loss = ce_rows_(x.clone(), y, None, None, 0.0)
    torch.testing.assert_close(loss, torch.tensor([0.4170300163, 0.6041306053]), rtol=1e-6, atol=1e-7)
    w = torch.tensor([1.0, 2.0, 3.0])
    loss = ce_rows_(x.clone(), y, None, w[y], 0.0, label_smoothing=0.1, class_weight=w)
    torch.testing.assert_close(loss, torch.tensor([0.7153996846, 1.8686454221]), rtol=1e-6, atol=1e-7)
    loss = ce_rows_(x.clone(), y, None, None, 0.0, softcap=30.0)
    torch.testing.assert_close(loss, torch.tensor([0.4179496244, 0.6050527498]), rtol=1e-6, atol=1e-7)


def test_bad_arguments_are_named():
    z = torch.zeros(2, 5)
    with pytest.raises(ValueError, match="target"):
        ce_rows_(z, torch.zeros(3, dtype=torch.long), None, None, 0.0)
    with pytest.raises(TypeError, match="float64"):
        ce_rows_(z.double(), torch.zeros(2, dtype=torch.long), None, None, 0.0)
    with pytest.raises(ValueError, match="softcap"):
        ce_rows_(z, torch.zeros(2, dtype=torch.long), None, None, 0.0, softcap=-1.0)
    with pytest.raises(ValueError, match="class_weight"):
        ce_rows_(z, torch.zeros(2, dtype=torch.long), None, torch.ones(2), 0.0, label_smoothing=0.1)


def test_out_of_range_target_asserts():
    """The kernel's device_assert fires under the harness (the bare interpreter never evaluates it)."""
    with pytest.raises(Exception, match="target out of range"):
        ce_rows_(torch.zeros(2, 5), torch.tensor([1, 5]), None, None, 0.0)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.integers(1, 9), num_classes=st.integers(1, 700), tile=st.sampled_from([128, 256, None]),
       seed=st.integers(0, 2**16), smooth=st.booleans())
def test_any_shape_any_tile(monkeypatch, rows, num_classes, tile, seed, smooth):
    """Random row counts, vocabulary sizes (1 included) and tiles: every address checked, float64 exact."""
    # set for every example (a function-scoped monkeypatch outlives one hypothesis example)
    monkeypatch.setattr(rows_module, "row_config",
                        row_config if tile is None else (lambda v, size, tile=tile: RowConfig(tile, 4)))
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, num_classes, generator=g) * 3
    y = torch.randint(0, num_classes, (rows,), generator=g)
    check(z, y, torch.rand(rows, generator=g) + 0.5, eps=0.1 if smooth else 0.0, z_coef=1e-3)
