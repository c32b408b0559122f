"""Temperature scaling's fit (Guo et al. 2017): T* = argmin_T Σ_t ℓ_t(z_t / T), by Newton's method on
β = 1/T. Written once, for ``xent eval --fit-temperature`` (xent.eval._temperature: the logits re-projected
from kept hidden states, the sums added over the ranks) and the demo (xent.demo._temperature: logits in
memory).

With β = 1/T the corpus NLL F(β) = Σ_t [logsumexp(β z_t) − β z_{t,y}] is convex in β, with
F'(β) = Σ_t (E_q[z] − z_y) and F''(β) = Σ_t Var_q[z] (q = softmax(β z_t)). :func:`nll_derivatives` sums
the three over chunks of float32 logits; :func:`fit_inverse_temperature` runs Newton's method on β from
β = 1 given a function that returns those sums at any β (one pass over the tokens per call).
"""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def nll_derivatives(chunks, beta: float) -> tuple[float, float, float, int]:
    """(F(β), F'(β), F''(β), tokens) summed in float64 over ``chunks``: pairs of float32 logits at T = 1
    [C, V] and targets [C]. Each logits chunk is scratch: it is scaled in place (no second [C, V]
    buffer), so pass a copy of logits that must be kept."""
    f = g = h = 0.0
    n = 0
    for z, y in chunks:
        z_y = z.gather(-1, y[:, None]).squeeze(-1).double()
        z.mul_(beta)
        m = z.amax(-1)
        e = torch.exp(z - m[:, None])
        S = e.sum(-1)
        z.div_(beta)  # back to z: the derivatives are in z
        mean = torch.linalg.vecdot(e, z) / S  # E_q[z]
        var = torch.linalg.vecdot(e, (z - mean[:, None]).square_()) / S  # Var_q[z]
        f += float(((m.double() + S.double().log()) - beta * z_y).sum())
        g += float((mean.double() - z_y).sum())
        h += float(var.double().sum())
        n += len(y)
    return f, g, h, n


def fit_inverse_temperature(sums, *, max_passes: int = 30, tol: float = 1e-7) -> tuple[float, int]:
    """(T*, passes) for ``sums(β) -> (F, F', F'', tokens)``, each call one pass over the tokens.

    Newton steps on β from β = 1, each halved while it would leave β > 0 and halved again (one more
    pass) while it raises F beyond the float32 rounding of the sum (1e-7·|F|); stops when a step is
    below ``tol``·β (the per-token values are float32: F' is known to about 1e-7) and returns 1/β.
    ValueError when there are no tokens, when the loss is flat in β (every row's logits equal), when
    the minimum is at T → 0 or T → ∞ (β past 1e6 or below 1e-6: every target the top token, or logits
    that say nothing of the targets), when F is not finite, or when ``max_passes`` passes do not
    converge (Newton's steps grow only linearly in β where the loss decays exponentially, as it does
    when every target is the top token: then the message says T is still falling)."""
    beta = 1.0
    f, g, h, n = _finite(sums(beta), beta)
    passes = 1
    if n == 0:
        raise ValueError("no tokens to fit a temperature on")
    if not h > 0:
        raise ValueError("the loss is flat in the temperature at T = 1 (every row's logits are equal, or "
                         "every row's softmax is one-hot in float32)")
    while True:
        step = -g / h
        if abs(step) <= tol * beta:
            return 1.0 / beta, passes
        while beta + step <= 0:  # stay at β > 0
            step /= 2
        while True:
            if passes == max_passes:
                trend = "falling (every target the top token?)" if g < 0 else "rising"
                raise ValueError(f"the fitted temperature did not converge in {max_passes} passes: "
                                 f"T = {1 / beta:.6g} and still {trend}")
            f2, g2, h2, _ = _finite(sums(beta + step), beta + step)
            passes += 1
            if f2 <= f + 1e-7 * abs(f):  # not higher, up to the float32 rounding of the sum: accept
                break
            step /= 2
        beta, f, g, h = beta + step, f2, g2, h2
        if beta > 1e6 or not h > 0:  # q one-hot in float32: the loss falls as T → 0
            raise ValueError("the fitted temperature goes to 0: every target is the top token")
        if beta < 1e-6:
            raise ValueError("the fitted temperature goes to infinity: the logits say nothing of the targets")


def _finite(values: tuple, beta: float) -> tuple:
    if not all(math.isfinite(v) for v in values[:3]):
        raise ValueError(f"the loss or its derivatives are not finite at T = {1 / beta:.6g}: non-finite "
                         "logits, or logits too large for float32 at that temperature")
    return values
