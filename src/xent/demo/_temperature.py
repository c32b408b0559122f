"""The demo's temperature study on logits held in memory (a tiny model): softmax(z / τ) as τ varies, and
the fitted T* = argmin_T Σ_t ℓ_t(z_t / T) (docs/REFERENCE.md §4). `xent eval --fit-temperature`
(xent.eval._temperature) fits T* at scale from the scored hidden states; this one needs the logits.
Both run the same fit, xent._temperature_fit: on the same logits they give the same T*.

Dividing the logits by τ changes neither the ranking nor the top-1 token (so the accuracy), only the
probabilities: the entropy rises with τ (from 0 at τ → 0 to log V at τ → ∞), the loss is convex in
1/τ, and the confidence falls as τ grows.
"""

from __future__ import annotations

import math

from .._temperature_fit import fit_inverse_temperature, nll_derivatives
from ..eval._sums import ECE_BINS

_ROWS = 4096  # rows of logits per chunk (float32 [rows, V] temporaries)


def _check(logits, targets):
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"logits must be [N, V] and targets [N], got {tuple(logits.shape)} and "
                         f"{tuple(targets.shape)}")
    if len(targets) == 0:
        raise ValueError("no tokens: logits has zero rows")


def token_stats_at(logits, targets, temperature: float) -> dict:
    """Per-token [N] tensors of softmax(z / τ), computed in float32 and returned in float64: ``loss``
    −log q_y, ``entropy`` −Σ q log q, ``confidence`` max q, and ``correct`` (1 if no logit exceeds the
    target's: independent of τ)."""
    import torch

    _check(logits, targets)
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    parts = []
    for s in range(0, len(targets), _ROWS):
        z = logits[s : s + _ROWS].float() / temperature  # [n, V]
        y = targets[s : s + _ROWS]
        logq = torch.log_softmax(z, dim=-1)
        q = logq.exp()
        z_y = z.gather(-1, y[:, None])
        parts.append({
            "loss": -logq.gather(-1, y[:, None]).squeeze(-1).double(),
            "entropy": -(q * logq).nan_to_num(0.0).sum(-1).double(),  # 0·log 0 = 0
            "confidence": q.amax(-1).double(),
            "correct": ((z > z_y).sum(-1) == 0).double(),
        })
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def ece(confidence, correct) -> float:
    """Expected calibration error with 15 equal-width bins [b/15, (b+1)/15) (the last closed), as
    xent.eval: Σ_b |Σ_{t∈b} (correct_t − confidence_t)| / N."""
    import torch

    b = torch.clamp((confidence * ECE_BINS).floor().long(), 0, ECE_BINS - 1)
    gap = torch.zeros(ECE_BINS, dtype=torch.float64).index_add_(0, b, correct.double() - confidence.double())
    return float(gap.abs().sum() / len(confidence))


def temperature_scan(logits, targets, temperatures) -> list[dict]:
    """For each τ: the mean loss (nats/token), mean entropy (nats), ECE, mean confidence and accuracy of
    softmax(z / τ) over the N tokens."""
    rows = []
    for t in temperatures:
        s = token_stats_at(logits, targets, float(t))
        rows.append({"temperature": float(t), "nll_mean": float(s["loss"].mean()),
                     "entropy_mean": float(s["entropy"].mean()), "ece": ece(s["confidence"], s["correct"]),
                     "confidence_mean": float(s["confidence"].mean()),
                     "accuracy": float(s["correct"].mean())})
    return rows


def fit_temperature(logits, targets, *, max_passes: int = 100) -> float:
    """T* = argmin_T Σ_t ℓ_t(z_t / T), by :func:`xent._temperature_fit.fit_inverse_temperature` (Newton's
    method on β = 1/T, where the loss is convex) on float32 copies of the logits, a chunk at a time.
    ValueError if the minimum is at T → 0 or T → ∞ (every target the top token, or none), the logits
    are flat, or the fit does not converge in ``max_passes`` passes over the tokens."""
    import torch

    _check(logits, targets)

    def sums(beta):
        chunks = ((logits[s : s + _ROWS].to(torch.float32, copy=True), targets[s : s + _ROWS])
                  for s in range(0, len(targets), _ROWS))  # copies: nll_derivatives scales them in place
        return nll_derivatives(chunks, beta)

    return fit_inverse_temperature(sums, max_passes=max_passes)[0]
