"""The demo's comparisons: paired per-document differences between two models scored on the same
documents (document-clustered SE), each fine-tune against the baseline and the pre-trained model, and
the t interval of replicates (MAUVE over seeds)."""

from __future__ import annotations

import math

from ._config import PRETRAINED


def clustered_mean(values: list[float], counts: list[int]) -> tuple[float, float]:
    """(m, SE): the ratio mean m = Σ_d v_d / Σ_d n_d of per-document sums v_d over n_d units (tokens,
    words) and its document-clustered standard error √(D/(D−1)·Σ_d (v_d − m·n_d)²) / Σ_d n_d
    (REFERENCE.md §4), with xent.eval's exact arithmetic: each v_d is rounded to a multiple of 2^-32
    (1e-10 nats) and everything after that is integer sums. SE is NaN for fewer than two documents."""
    import torch

    from ..eval._sums import SCALE, clustered_se, fixed

    v = fixed(torch.tensor(values, dtype=torch.float64)).tolist()
    n = [int(c) for c in counts]
    N, total = sum(n), sum(v)
    if N == 0:
        return math.nan, math.nan
    se = clustered_se(total, sum(x * x for x in v), sum(x * c for x, c in zip(v, n)), sum(c * c for c in n),
                      N, len(n))
    return total / SCALE / N, se


def paired_difference(a: list[float], b: list[float], counts: list[int]) -> dict:
    """A minus B on the same documents (the same tokens): Δ = Σ_d (a_d − b_d) / Σ_d n_d from the summed
    losses a_d, b_d of document d over its n_d units, its document-clustered SE (the documents are
    the independent units; pairing removes what the two models share), z = Δ/SE and
    ``significant`` = |z| > 1.96 (two-sided, 5 %). Documents with n_d = 0 are left out."""
    if not len(a) == len(b) == len(counts):
        raise ValueError(f"a, b and counts must have one entry per document, got {len(a)}, {len(b)} "
                         f"and {len(counts)}")
    keep = [i for i, n in enumerate(counts) if n > 0]
    diff, se = clustered_mean([a[i] - b[i] for i in keep], [counts[i] for i in keep])
    if math.isnan(se) or math.isnan(diff):
        z = math.nan
    elif se > 0:
        z = diff / se
    else:  # identical on every document (z = 0/0), or a shift with no spread at all
        z = math.nan if diff == 0 else math.copysign(math.inf, diff)
    return {"diff": diff, "se": se, "z": z, "significant": bool(abs(z) > 1.96)}


def compare_with_baseline(summary: dict, synthetic_texts: list[str]) -> str:
    """Adds ``vs_baseline`` to each objective of ``summary`` but the baseline (ce when it was trained,
    else the first objective), and to the pre-trained model's entry when there is one, and returns the
    baseline's name: the paired per-document differences of the held-out loss (nats/token), of the loss
    on the Markov text (nats/word, which is the difference of the two KL estimates: the source's −log p
    cancels) and, where recorded, of the over-confidence (mean top-1 probability − top-1 accuracy).
    With a pre-trained model, each objective also gets ``vs_pretrained``: the paired difference of its
    held-out loss from the model every fine-tune started from (> 0: fine-tuning made it worse)."""
    objs = summary["objectives"]
    baseline = "ce" if "ce" in objs else next(iter(objs))
    base = objs[baseline]
    words = [len(t.split(" ")) for t in synthetic_texts]
    entries = list(objs.items())
    if summary.get(PRETRAINED):
        entries.append((PRETRAINED, summary[PRETRAINED]))
    for name, entry in entries:
        for key in ("heldout", "synthetic"):
            if entry[key]["doc_tokens"] != base[key]["doc_tokens"]:  # one tokenizer: never, unless a bug
                raise RuntimeError(f"{name} and {baseline} scored different tokens of the {key} documents")
        if name == baseline:
            continue
        entry["vs_baseline"] = {
            "baseline": baseline,
            "heldout_nll_nats_per_token": paired_difference(
                entry["heldout"]["doc_nll"], base["heldout"]["doc_nll"], base["heldout"]["doc_tokens"]),
            "synthetic_nats_per_word": paired_difference(
                entry["synthetic"]["doc_nll"], base["synthetic"]["doc_nll"], words),
        }
        if "doc_overconfidence" in entry["heldout"] and "doc_overconfidence" in base["heldout"]:
            entry["vs_baseline"]["heldout_overconfidence"] = paired_difference(
                entry["heldout"]["doc_overconfidence"], base["heldout"]["doc_overconfidence"],
                base["heldout"]["doc_tokens"])
    pre = summary.get(PRETRAINED)
    if pre:
        for entry in objs.values():
            entry["vs_pretrained"] = {
                "heldout_nll_nats_per_token": paired_difference(
                    entry["heldout"]["doc_nll"], pre["heldout"]["doc_nll"], pre["heldout"]["doc_tokens"]),
                "synthetic_nats_per_word": paired_difference(
                    entry["synthetic"]["doc_nll"], pre["synthetic"]["doc_nll"], words),
            }
    return baseline


def worse_than_pretrained(entry: dict, key: str = "heldout_nll_nats_per_token") -> bool:
    """Whether fine-tuning raised the loss ``key`` (held-out by default, or "synthetic_nats_per_word")
    above the pre-trained model's (the point estimate of the paired difference; False when there is no
    pre-trained model to compare with)."""
    d = entry.get("vs_pretrained", {}).get(key)
    return d is not None and d["diff"] > 0


def seeds_interval(values: list[float]) -> list[float]:
    """The 95 % t interval of the mean of independent replicates: mean ± t_{0.975, k−1} · sd / √k."""
    from scipy.stats import t  # scikit-learn's dependency, so present wherever mauve-text is

    k = len(values)
    if k < 2:
        return [math.nan, math.nan]
    mean = math.fsum(values) / k
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (k - 1))
    half = float(t.ppf(0.975, k - 1)) * sd / math.sqrt(k)
    return [mean - half, mean + half]
