"""Temperature scan and the fitted temperature T* against float64 references written differently."""

from __future__ import annotations

import math

import pytest
import torch

from xent.demo._temperature import ece, fit_temperature, temperature_scan


def _logits(seed=0, n=300, V=11, sharp=3.0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, V, generator=g) * sharp
    # targets drawn from a softer distribution than the logits say: the model is over-confident, T* > 1
    y = torch.multinomial(torch.softmax(z / 2.5, -1), 1, generator=g).squeeze(-1)
    return z, y


def _mean_loss(z, y, T):
    total = 0.0
    for row, t in zip(z.double().tolist(), y.tolist()):
        m = max(r / T for r in row)
        lse = m + math.log(math.fsum(math.exp(r / T - m) for r in row))
        total += lse - row[t] / T
    return total / len(y)


def test_fitted_temperature_is_the_argmin_of_the_loss():
    z, y = _logits()
    t_star = fit_temperature(z, y)
    assert t_star > 1.5  # over-confident logits are softened
    # golden-section search on T in float64, on the loss written as explicit log-sum-exp loops
    lo, hi = 0.5, 6.0
    r = (math.sqrt(5) - 1) / 2
    for _ in range(60):
        a, b = hi - r * (hi - lo), lo + r * (hi - lo)
        if _mean_loss(z, y, a) < _mean_loss(z, y, b):
            hi = b
        else:
            lo = a
    assert t_star == pytest.approx((lo + hi) / 2, rel=1e-5)
    # and an under-confident model is sharpened
    z2, y2 = z / 6, y
    assert fit_temperature(z2, y2) < 1


def test_scan_by_explicit_loops():
    z, y = _logits(1, n=200)
    rows = temperature_scan(z, y, [0.5, 1.0, 2.0])
    for row in rows:
        T = row["temperature"]
        assert row["nll_mean"] == pytest.approx(_mean_loss(z, y, T), rel=1e-6)  # float32 inside
        ent, conf, right = [], [], []
        for zr, t in zip(z.double().tolist(), y.tolist()):
            e = [math.exp(v / T) for v in zr]
            s = math.fsum(e)
            q = [v / s for v in e]
            ent.append(-math.fsum(p * math.log(p) for p in q if p > 0))
            conf.append(max(q))
            right.append(1.0 if zr[t] == max(zr) else 0.0)
        assert row["entropy_mean"] == pytest.approx(sum(ent) / len(ent), rel=1e-6)
        assert row["accuracy"] == pytest.approx(sum(right) / len(right))
        bins = {}
        for c, k in zip(conf, right):
            b = min(int(c * 15), 14)
            bins.setdefault(b, []).append((c, k))
        expected = sum(abs(sum(k for _, k in v) - sum(c for c, _ in v)) for v in bins.values()) / len(conf)
        assert row["ece"] == pytest.approx(expected, rel=1e-5, abs=1e-7)
    entropies = [r["entropy_mean"] for r in rows]
    assert entropies == sorted(entropies)  # entropy rises with τ
    assert rows[0]["accuracy"] == rows[1]["accuracy"] == rows[2]["accuracy"]


def test_ece_edges_and_bad_input():
    conf = torch.tensor([1.0, 0.0, 14 / 15, 0.5])
    correct = torch.tensor([1.0, 0.0, 0.0, 1.0])
    # 1.0 falls in the last bin with 14/15; 0 and 0.5 in their own bins
    assert ece(conf, correct) == pytest.approx((abs(1 - (1 + 14 / 15)) + 0 + 0.5) / 4)
    with pytest.raises(ValueError, match="temperature must be"):
        temperature_scan(*_logits(), [0.0])
    with pytest.raises(ValueError, match="logits must be"):
        fit_temperature(torch.zeros(3), torch.zeros(3, dtype=torch.long))
