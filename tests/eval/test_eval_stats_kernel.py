"""The evaluation statistics of a chunk of final logits (xent._engine.eval_rows): the CPU kernel's one pass
(_kernels/ce_rows.c, xent_eval_rows_f32) and the torch backend's reference definition, against a float64
reference written differently (explicit softmax, one-hot Brier, rank by sorting), against each other
(ranks exactly equal), on the corners that must not become plausible numbers (NaN, ±inf, masked logits,
ties, large offsets), and the choice of backend."""

from __future__ import annotations

import pytest
import torch

from xent import _cpu_kernel, _engine
from xent.eval._score import eval_stats

pytestmark = pytest.mark.skipif(_cpu_kernel._compiler() is None, reason="no C compiler to build the kernel")
FLOAT_STATS = ("loss", "entropy", "top1_prob", "brier")


@pytest.fixture
def kernel(monkeypatch):
    monkeypatch.setenv("XENT_CPU_KERNEL", "1")  # must build: a failure is an error, not a silent fallback
    assert _cpu_kernel.kernel_status().startswith("compiled")
    return _cpu_kernel


def _reference(z: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """float64, row by row: p = e / Σe with e = exp(z − max z), H = −Σ_{p>0} p log p, Brier = Σ (p − onehot)²,
    rank = the target's place among the logits sorted descending (its first tie: ties in its favour)."""
    out = {k: [] for k in (*FLOAT_STATS, "rank")}
    for row, t in zip(z.double(), y.tolist()):
        e = torch.exp(row - row.max())
        p = e / e.sum()
        onehot = torch.zeros_like(p)
        onehot[t] = 1.0
        out["loss"].append(-torch.log(p[t]))
        out["entropy"].append(-(p[p > 0] * torch.log(p[p > 0])).sum())
        out["top1_prob"].append(p.max())
        out["brier"].append(((p - onehot) ** 2).sum())
        ordered = torch.sort(row, descending=True).values
        out["rank"].append(int((ordered == row[t]).nonzero()[0]) + 1)
    return {k: torch.tensor(v) if k == "rank" else torch.stack(v) for k, v in out.items()}


def _logits(rows: int, V: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, V, generator=g) * 4
    y = torch.randint(0, V, (rows,), generator=g)
    z[1] += 1e4  # a large offset: everything is formed about the row max
    z[2, : V // 2] = -float("inf")  # masked logits add exactly nothing
    y[2] = V - 1
    y[3] = int(z[3].argmax())  # a correct prediction
    z[4, 5] = z[4, y[4]] = z[4].max() + 1  # the target tied with another class at the top: rank 1
    z[5, :] = torch.round(z[5])  # many ties: the rank counts only the logits strictly above z_y
    return z, y


@pytest.mark.parametrize("rows, V", [(13, 31), (37, 1003), (9, 50257)])
def test_kernel_matches_float64_and_torch(kernel, rows, V):
    z, y = _logits(rows, V)
    ref = _reference(z, y)
    got = kernel.eval_rows(z, y)  # the C kernel itself
    stats = dict(zip(FLOAT_STATS, got[0].unbind(0)))
    torch_stats = _engine.eval_rows(z.clone(), y, "torch")
    for k in FLOAT_STATS:
        torch.testing.assert_close(stats[k].double(), ref[k], rtol=2e-6, atol=2e-6, msg=k)
        torch.testing.assert_close(torch_stats[k].double(), ref[k], rtol=2e-6, atol=2e-6, msg=k)
        # the two backends: float32 rounding apart (measured: ≤ 3 units in the last place at V ≥ 1003, 10
        # on the entropy's cancellation log S − Σ q (z − m); absolute 1e-7 where a value is near 0)
        torch.testing.assert_close(stats[k], torch_stats[k], rtol=16 * 2**-23, atol=1e-6, msg=k)
    assert torch.equal(got[1], ref["rank"])
    assert torch.equal(torch_stats["rank"], ref["rank"])
    assert int(got[1][4]) == 1 and float(stats["loss"][1]) == pytest.approx(float(ref["loss"][1]), rel=1e-5)


def test_kernel_leaves_the_logits_alone_and_takes_strided_rows(kernel):
    z, y = _logits(8, 300)
    wide = torch.zeros(8, 320)
    wide[:, :300] = z
    before = wide.clone()
    stats, rank = kernel.eval_rows(wide[:, :300], y)  # row stride 320
    assert torch.equal(wide, before)
    ref = _reference(z, y)
    torch.testing.assert_close(stats[0].double(), ref["loss"], rtol=2e-6, atol=2e-6)
    assert torch.equal(rank, ref["rank"])


def test_rows_that_have_no_softmax_give_nan_and_never_a_hit(kernel):
    V = 40
    z = torch.randn(6, V)
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    z[0, 7] = float("nan")
    z[1, 9] = float("inf")
    z[2] = -float("inf")
    z[3, 3] = -float("inf")  # only the target masked: loss +inf, the other statistics finite
    z[4, 4] = float("nan")  # the target itself NaN (compares false: would otherwise rank first)
    for got in (_engine.eval_rows(z.clone(), y, "cpu_kernel"), _engine.eval_rows(z.clone(), y, "torch")):
        for k in FLOAT_STATS:
            assert got[k][[0, 1, 2, 4]].isnan().all(), k
        assert got["loss"][3] == float("inf")
        assert torch.isfinite(torch.stack([got[k][3] for k in ("entropy", "top1_prob", "brier")])).all()
        assert got["rank"][:5].tolist() == [V + 1] * 5
        assert torch.isfinite(got["loss"][5]) and 1 <= int(got["rank"][5]) <= V


def test_eval_stats_chooses_the_kernel_and_refuses_what_it_cannot_take(kernel, monkeypatch):
    z, y = _logits(16, 500)
    calls = []
    real = _cpu_kernel.eval_rows
    monkeypatch.setattr(_cpu_kernel, "eval_rows", lambda *a: calls.append(1) or real(*a))
    auto = eval_stats(z.clone(), y)
    assert calls, "backend='auto' on float32 CPU logits takes the CPU kernel"
    assert auto["rank"].dtype == torch.int64 and all(auto[k].dtype == torch.float32 for k in FLOAT_STATS)
    monkeypatch.setenv("XENT_CPU_KERNEL", "0")
    calls.clear()
    plain = eval_stats(z.clone(), y)  # XENT_CPU_KERNEL=0: torch ops
    assert not calls
    assert torch.equal(plain["rank"], auto["rank"])
    with pytest.raises(ValueError, match="backend='cpu_kernel' cannot"):
        eval_stats(z.clone(), y, "cpu_kernel")
    monkeypatch.setenv("XENT_CPU_KERNEL", "1")
    with pytest.raises(ValueError, match="backend='cpu_kernel' cannot.*float64"):
        eval_stats(z.double(), y, "cpu_kernel")
    with pytest.raises(ValueError, match="backend must be one of"):
        eval_stats(z.clone(), y, "cuda")
    empty = eval_stats(torch.zeros(0, 500), torch.zeros(0, dtype=torch.long))
    assert all(len(v) == 0 for v in empty.values())


def test_kernel_gives_the_same_bits_wherever_a_row_starts(kernel):
    """A token's numbers do not depend on which batch or chunk row it lands in (evaluate and compare score
    the same token in different rows): the vectorised sums must not start where the row's alignment says
    (a loop peeled for alignment would add in another order)."""
    z, y = _logits(16, 280)
    want = kernel.eval_rows(z, y)
    for offset in range(1, 16):
        flat = torch.empty(z.numel() + offset)
        moved = flat[offset:].view_as(z).copy_(z)
        got = kernel.eval_rows(moved, y)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), offset
