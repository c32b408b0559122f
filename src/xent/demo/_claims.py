"""The claims table: each paper's claim, the difference measured here against the cross-entropy fine-tune,
and whether the claim reproduces at this scale, is contradicted, or is inconclusive.

Every number comes from summary.json: the paired per-document differences (``vs_baseline``, with their
document-clustered SE, from :func:`xent.demo._compare.paired_difference`) and, for MAUVE, the per-seed scores
(seed k samples every model with the same random stream: paired). A claim is called (reproduced or
contradicted) only when the difference is outside its noise: |Δ| > 1.96 SE, or a 95 % t interval over
the seeds that excludes 0. A claim that reproduces against the cross-entropy fine-tune is still not a
win when its run ends with a higher held-out loss than the pre-trained model it started from (both
fine-tunes overfit): its verdict says so.

That the entropy of softmax(z/τ) falls as τ → 0 is an identity, not a paper's claim: it is a sanity
check of the temperature scan (:func:`sanity_checks`), shown beside it.
"""

from __future__ import annotations

import math

from ._compare import paired_difference, seeds_interval, worse_than_pretrained
from ._config import PRETRAINED

REPRODUCED, CONTRADICTED, INCONCLUSIVE = "reproduces", "contradicted", "inconclusive"
NOT_A_WIN = "not a win: worse than the pre-trained model"  # reproduces against ce, but both overfit


def verdict(diff: float, called: bool, sign: int) -> str:
    """``sign`` is the direction the claim predicts (−1: lower, +1: higher)."""
    if not called or math.isnan(diff):
        return INCONCLUSIVE
    return REPRODUCED if diff * sign > 0 else CONTRADICTED


def _se_row(paper, claim, run, measure, unit, d, sign):
    lo, hi = d["diff"] - 1.96 * d["se"], d["diff"] + 1.96 * d["se"]
    return {"paper": paper, "claim": claim, "run": run, "measure": measure, "unit": unit, "diff": d["diff"],
            "se": d["se"], "ci95": [lo, hi], "noise": "document-clustered SE", "called": d["significant"],
            "verdict": verdict(d["diff"], d["significant"], sign)}


def mauve_difference(entry: dict, base: dict) -> dict:
    """Δ MAUVE = entry − base: the mean over the seeds of the per-seed differences (paired: seed k gave
    both models the same random stream), with its 95 % t interval."""
    a, b = entry["mauve_by_seed"], base["mauve_by_seed"]
    if len(a) != len(b):
        raise ValueError(f"the two models have {len(a)} and {len(b)} MAUVE seeds")
    deltas = [x - y for x, y in zip(a, b)]
    lo, hi = seeds_interval(deltas)
    return {"diff": math.fsum(deltas) / len(deltas), "ci95": [lo, hi], "by_seed": deltas,
            "called": bool(lo > 0 or hi < 0)}


def _mauve_row(paper, claim, run, entry, base, sign):
    d = mauve_difference(entry, base)
    return {"paper": paper, "claim": claim, "run": run, "measure": "Δ MAUVE (temperature 1)", "unit": "",
            "diff": d["diff"], "se": None, "ci95": d["ci95"],
            "noise": "t interval over paired sampling seeds",
            "called": d["called"], "verdict": verdict(d["diff"], d["called"], sign)}


def claims(summary: dict) -> list[dict]:
    """The rows of the claims table (see the module's docstring); only for the runs that were made."""
    objs = summary["objectives"]
    if "ce" not in objs or summary.get("baseline") != "ce":
        return []
    ce = objs["ce"]
    rows = []
    emo = "EMO (Ren et al., ICLR 2024)"
    if "emo" in objs:
        rows.append(_mauve_row(emo, "fine-tuning with EMO gives generations closer to human text than MLE: "
                               "higher MAUVE (by up to ~10 points)", "emo", objs["emo"]["generation"],
                               ce["generation"], +1))
        rows.append(_se_row(emo, "... and a lower perplexity than MLE", "emo", "Δ held-out NLL",
                            "nats/token", objs["emo"]["vs_baseline"]["heldout_nll_nats_per_token"], -1))
    tailr = "TaiLr (Ji et al., ICLR 2023)"
    for name, run in summary.get("runs", {}).items():
        if run["objective"] != "tailr" or name not in objs or "heldout_overconfidence" not in objs[name].get(
                "vs_baseline", {}):
            continue
        gamma = run["options"].get("gamma", 0.1)
        rows.append(_se_row(tailr, f"TaiLr (γ = {gamma:g}) counters MLE's over-confidence: its top-1 "
                            "probability exceeds its accuracy by less", name,
                            "Δ over-confidence (mean top-1 probability − accuracy)", "",
                            objs[name]["vs_baseline"]["heldout_overconfidence"], -1))
    for row in rows:
        if row["verdict"] == REPRODUCED and worse_than_pretrained(objs[row["run"]]):
            row["verdict"] = NOT_A_WIN
    return rows


def sanity_checks(summary: dict) -> list[dict]:
    """Rows like the claims' for what must hold by construction: the ce fine-tune's mean predictive
    entropy is lower at τ = 0.5 and higher at τ = 2 than at τ = 1 (paired per document)."""
    temp = summary["objectives"].get("ce", {}).get("temperature")
    if not temp:
        return []
    rows = []
    n, h = temp["doc_tokens"], temp["doc_entropy"]
    for tau, sign, text in (("0.5", -1, "the predictive entropy falls as τ → 0 (τ = 0.5 vs 1)"),
                            ("2", +1, "and rises for τ > 1 (τ = 2 vs 1)")):
        d = paired_difference(h[tau], h["1"], n)
        rows.append(_se_row("identity of softmax(z/τ)", text, f"ce, τ = {tau}", "Δ mean entropy",
                            "nats/token", d, sign))
    return rows


def pretrained_mauve_difference(summary: dict) -> dict | None:
    """Δ MAUVE of the cross-entropy fine-tune against the pre-trained model (does fine-tuning help?)."""
    if PRETRAINED not in summary or "ce" not in summary["objectives"]:
        return None
    return mauve_difference(summary["objectives"]["ce"]["generation"], summary[PRETRAINED]["generation"])
