"""The one temperature fit (xent._temperature_fit) that the demo and xent.eval share: against a float64
golden-section minimiser of the NLL written with explicit log-sum-exp loops, against an analytic
convex function whose Newton steps overshoot, the demo and eval entries on the same logits, and the
fits with no finite minimum."""

from __future__ import annotations

import math

import pytest
import torch

from xent._temperature_fit import fit_inverse_temperature, nll_derivatives
from xent.demo._temperature import fit_temperature as demo_fit
from xent.eval import EvalError
from xent.eval._temperature import Kept
from xent.eval._temperature import fit_temperature as eval_fit


def _logits(seed, n, V, sharp, soft):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, V, generator=g) * sharp
    y = torch.multinomial(torch.softmax(z.double() / soft, -1), 1, generator=g).squeeze(-1)
    return z, y


def _nll(z, y, T):
    """Σ_t [log Σ_v e^{z_tv/T} − z_ty/T] in float64, one row at a time."""
    total = 0.0
    for row, t in zip(z.double().tolist(), y.tolist()):
        m = max(row) / T
        total += m + math.log(math.fsum(math.exp(r / T - m) for r in row)) - row[t] / T
    return total


def _golden(f, lo, hi, steps=80):
    r = (math.sqrt(5) - 1) / 2
    for _ in range(steps):
        a, b = hi - r * (hi - lo), lo + r * (hi - lo)
        if f(a) < f(b):
            hi = b
        else:
            lo = a
    return (lo + hi) / 2


class _IdentityHead:
    """A head whose projection of the 'hidden states' z [C, V] is z itself (z @ I is exact)."""

    def __init__(self, V):
        self.vocab, self.device, self.eye = V, torch.device("cpu"), torch.eye(V)

    def project(self, h):
        return h @ self.eye


def _sums(z, y):
    return lambda beta: nll_derivatives([(z.clone(), y)], beta)


# over-confident (T* > 1), under-confident (T* < 1), and a start far from the minimum (T* ≈ 200)
@pytest.mark.parametrize("seed,n,V,sharp,soft,lo,hi", [(0, 200, 11, 3.0, 2.5, 1.0, 5.0),
                                                      (1, 150, 37, 1.0, 0.4, 0.1, 1.0),
                                                      (2, 100, 23, 20.0, 200.0, 2.0, 1000.0)])
def test_fit_is_the_float64_argmin(seed, n, V, sharp, soft, lo, hi):
    z, y = _logits(seed, n, V, sharp, soft)
    t_star, passes = fit_inverse_temperature(_sums(z, y))
    t_ref = _golden(lambda T: _nll(z, y, T), lo, hi)
    assert lo < t_ref < hi and abs(t_ref - 1) > 0.05  # a fit that stayed at T = 1 fails
    assert t_star == pytest.approx(t_ref, rel=1e-6)
    assert passes <= 12


def test_demo_and_eval_fit_the_same_temperature():
    z, y = _logits(0, 300, 11, 3.0, 2.5)
    half = 150
    kept = [Kept(z[:half], y[:half], torch.arange(half)), Kept(z[half:], y[half:], torch.arange(half))]
    t_eval, _ = eval_fit(_IdentityHead(11), kept)
    assert demo_fit(z, y) == t_eval  # one fit: the same float on the same logits
    assert torch.equal(z, _logits(0, 300, 11, 3.0, 2.5)[0])  # the demo's logits are left as they were


def test_newton_steps_that_overshoot_are_halved():
    # F(β) = √(1 + (β − 3)²): convex, minimum at β = 3, and the full Newton step from β = 1 lands at 11
    calls = []

    def sums(beta):
        d = beta - 3
        F = math.sqrt(1 + d * d)
        calls.append(F)
        return F, d / F, 1 / F**3, 1

    t_star, passes = fit_inverse_temperature(sums)
    assert t_star == pytest.approx(1 / 3, rel=1e-7) and passes == len(calls)
    assert calls[1] > calls[0] and calls[2] > calls[0]  # 11 and 6 are rejected, 3.5 is taken


def test_fits_without_a_finite_minimum_raise():
    z, _ = _logits(3, 50, 9, 2.0, 1.0)
    top = z.argmax(-1)
    with pytest.raises(ValueError, match=r"did not converge in 100 passes: T = \S+ and still falling"):
        demo_fit(z, top)  # the loss falls as T → 0, by less and less: Newton's β grows about linearly
    with pytest.raises(EvalError, match=r"did not converge in 30 passes: T = \S+ and still falling"):
        eval_fit(_IdentityHead(9), [Kept(z, top, torch.arange(50))])
    # F(β) = −log β: convex, falling for ever; each Newton step doubles β
    with pytest.raises(ValueError, match="goes to 0: every target is the top token"):
        fit_inverse_temperature(lambda beta: (-math.log(beta), -1 / beta, 1 / beta**2, 1))
    with pytest.raises(ValueError, match="goes to infinity"):
        fit_inverse_temperature(_sums(z, z.argmin(-1)))  # the bottom token every time: T* = ∞
    with pytest.raises(ValueError, match="flat in the temperature at T = 1"):
        demo_fit(torch.ones(4, 5), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="not finite at T = 1"):
        demo_fit(torch.tensor([[0.0, math.inf]]), torch.zeros(1, dtype=torch.long))
    with pytest.raises(EvalError, match="no tokens to fit a temperature on"):
        eval_fit(_IdentityHead(9), [])
    with pytest.raises(ValueError, match="did not converge in 2 passes"):
        fit_inverse_temperature(_sums(*_logits(0, 200, 11, 3.0, 2.5)), max_passes=2)
