"""Corpus totals, summed exactly, and the metrics of REFERENCE.md §4 computed from them.

Every per-token value (a float32 loss, entropy, probability...) is rounded to a multiple of 2^-32
(error below 1.2e-10 per token, under the float32 resolution of a loss) and summed as an integer.
A non-finite value is never summed (as int64 it would become −2^63 and an even count of them would
wrap to nothing): ``fixed`` raises EvalError, and so it does for values too large for int64 sums.
Integer sums are exact and associative, so the totals do not depend on batch size, order, sharding
across ranks or a resume from a checkpoint; they are also stored exactly in JSON. Memory is a fixed
set of integers: the document-clustered SE needs only Σ S_d², Σ S_d·n_d and Σ n_d² (expanded exactly).
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

from ._errors import EvalError

SCALE = 1 << 32  # fixed point: an integer k stands for k / 2^32
ECE_BINS = 15
_INT64_SAFE = float(1 << 62)  # a bound on Σ|k| that leaves int64 sums room for rounding


def fixed(x: torch.Tensor) -> torch.Tensor:
    """float tensor -> int64 multiples of 2^-32 (round to nearest), small enough that any sum of its
    elements fits in int64. EvalError for a NaN or ±inf, or when Σ|x| reaches 2^30."""
    xd = x.double()
    finite = torch.isfinite(xd)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise EvalError(f"{bad} non-finite value(s) (NaN or ±inf) out of {xd.numel()} cannot be summed")
    if float(xd.abs().sum()) * SCALE >= _INT64_SAFE:
        raise EvalError(f"per-token values up to {float(xd.abs().max()):.6g} are too large to sum exactly "
                        "(fixed point 2^-32 in int64)")
    return torch.round(xd * SCALE).to(torch.int64)


def fixed_sum(x: torch.Tensor) -> int:
    """Σ fixed(x) as a Python int; x is halved until each part's int64 sum is safe, so only a single
    value of 2^30 or more (or a non-finite one) raises."""
    xd = x.double().reshape(-1)
    if xd.numel() > 1 and bool(torch.isfinite(xd).all()) and float(xd.abs().sum()) * SCALE >= _INT64_SAFE:
        half = xd.numel() // 2
        return fixed_sum(xd[:half]) + fixed_sum(xd[half:])
    return int(fixed(xd).sum())


def exp_or_inf(x: float) -> float:
    """e^x, inf past the float range (a word perplexity of text with few spaces can get there)."""
    return math.exp(x) if x < 709.78 else math.inf


def position_buckets(max_length: int) -> list[tuple[int, int]]:
    """Context-length buckets [1,2), [2,4), [4,8), ... up to max_length (inclusive)."""
    edges, lo = [], 1
    while lo <= max_length:
        edges.append((lo, min(2 * lo, max_length + 1)))
        lo *= 2
    return edges


def clustered_se(total: int, doc_sq: int, doc_cross: int, doc_n_sq: int, n: int, d: int) -> float:
    """Document-clustered standard error of the mean m = Σ_d S_d / N (REFERENCE.md §4):
    √(D/(D−1) · Σ_d (S_d − m·n_d)²) / N, the square expanded and computed exactly from the integer
    sums total = Σ S_d, doc_sq = Σ S_d², doc_cross = Σ S_d·n_d (S_d in fixed point, k / 2^32),
    doc_n_sq = Σ n_d², n = N = Σ n_d and d = D. NaN when D < 2 or N = 0."""
    if d < 2 or n == 0:
        return math.nan
    mean = Fraction(total, SCALE) / n
    resid = Fraction(doc_sq, SCALE * SCALE) - 2 * mean * Fraction(doc_cross, SCALE) + mean * mean * doc_n_sq
    return math.sqrt(d / (d - 1) * max(float(resid), 0.0)) / n


FIELDS = (
    "tokens", "documents", "bytes", "words", "skipped_empty", "skipped_unscored",
    "nll", "nll_sq", "entropy", "brier", "top1", "top5",
    "doc_nll_sq", "doc_nll_n", "doc_n_sq", "bytes_unknown",
)


class Totals:
    """Running integer sums for one set of documents (a file, or the pooled corpus)."""

    def __init__(self, max_length: int):
        self.max_length = max_length
        for name in FIELDS:
            setattr(self, name, 0)
        self.ece_count = [0] * ECE_BINS
        self.ece_conf = [0] * ECE_BINS
        self.ece_correct = [0] * ECE_BINS
        nb = len(position_buckets(max_length))
        self.pos_count = [0] * nb
        self.pos_nll = [0] * nb

    # -- accumulation -------------------------------------------------------------------------------
    def add_tokens(self, stats: dict[str, torch.Tensor]) -> None:
        """stats: per-token tensors [N] of one batch (see _score.token_stats), all from this set."""
        loss = stats["loss"]
        self.tokens += int(loss.numel())
        self.nll += fixed_sum(loss)
        self.nll_sq += fixed_sum(loss.double().square())
        self.entropy += fixed_sum(stats["entropy"])
        self.brier += fixed_sum(stats["brier"])
        self.top1 += int((stats["rank"] == 1).sum())
        self.top5 += int((stats["rank"] <= 5).sum())
        conf = stats["top1_prob"].double()
        b = torch.clamp((conf * ECE_BINS).floor().long(), 0, ECE_BINS - 1)  # [b/15, (b+1)/15), last closed
        self._add(self.ece_count, torch.bincount(b, minlength=ECE_BINS))
        self._add(self.ece_conf, torch.zeros(ECE_BINS, dtype=torch.int64).index_add_(0, b, fixed(conf)))
        correct = (stats["rank"] == 1).long()
        self._add(self.ece_correct, torch.zeros(ECE_BINS, dtype=torch.int64).index_add_(0, b, correct))
        ctx = stats["context"].clamp(min=1)  # tokens of context (BOS included)
        pb = torch.floor(torch.log2(ctx.double())).long().clamp(max=len(self.pos_count) - 1)
        nb = len(self.pos_count)
        self._add(self.pos_count, torch.bincount(pb, minlength=nb))
        self._add(self.pos_nll, torch.zeros(nb, dtype=torch.int64).index_add_(0, pb, fixed(loss)))

    @staticmethod
    def _add(acc: list[int], values: torch.Tensor) -> None:
        for i, v in enumerate(values.tolist()):
            acc[i] += v

    def add_document(self, nll_fixed: int, n: int, size: tuple[int, int] | None) -> None:
        """A finished document: its summed loss (fixed point), scored-token count, and the (UTF-8 bytes,
        words) of its scored text (None where they cannot be counted: bytes and words are then omitted)."""
        self.documents += 1
        if size is None:
            self.bytes_unknown += 1
        else:
            self.add_text(*size)
        self.doc_nll_sq += nll_fixed * nll_fixed
        self.doc_nll_n += nll_fixed * n
        self.doc_n_sq += n * n

    def add_text(self, nbytes: int, nwords: int) -> None:
        """Bytes and words that count in bits/byte and word perplexity (lm-eval counts an empty
        document's one word)."""
        self.bytes += nbytes
        self.words += nwords

    def merge(self, other: Totals) -> Totals:
        for name in FIELDS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in ("ece_count", "ece_conf", "ece_correct", "pos_count", "pos_nll"):
            acc = getattr(self, name)
            for i, v in enumerate(getattr(other, name)):
                acc[i] += v
        return self

    # -- (de)serialisation: plain ints, exact in JSON ------------------------------------------------
    def state(self) -> dict:
        lists = ("ece_count", "ece_conf", "ece_correct", "pos_count", "pos_nll")
        return {"max_length": self.max_length, **{k: getattr(self, k) for k in FIELDS + lists}}

    @classmethod
    def from_state(cls, state: dict) -> Totals:
        t = cls(state["max_length"])
        for k, v in state.items():
            setattr(t, k, v)
        return t

    # -- metrics -----------------------------------------------------------------------------------
    def metrics(self) -> dict:
        """The summary keys of issue 5 (REFERENCE.md §4). NaN where undefined (no tokens, D < 2...)."""
        N, D = self.tokens, self.documents
        nan = float("nan")
        # bytes and words of the scored text; None when some document's could not be counted
        B, W = (None, None) if self.bytes_unknown else (self.bytes, self.words)
        if N == 0:
            return {"tokens": 0, "documents": D, "bytes": B, "words": W,
                    "skipped_empty": self.skipped_empty, "skipped_unscored": self.skipped_unscored}
        S = Fraction(self.nll, SCALE)
        mean = S / N
        nll_mean = float(mean)
        # iid: s/√N with the sample variance (N − 1), as llama.cpp: √((E[ℓ²] − E[ℓ]²)/(N − 1)).
        var_pop = Fraction(self.nll_sq, SCALE) / N - mean * mean
        se_token = math.sqrt(max(float(var_pop), 0.0) / (N - 1)) if N > 1 else nan
        se_doc = clustered_se(self.nll, self.doc_nll_sq, self.doc_nll_n, self.doc_n_sq, N, D)
        total = float(S)
        ln2 = math.log(2)
        ece = sum(abs(Fraction(c, 1) - Fraction(p, SCALE)) for c, p in zip(self.ece_correct, self.ece_conf))
        return {
            "tokens": N,
            "documents": D,
            "bytes": B,
            "words": W,
            "nll_mean": nll_mean,
            "nll_se_token": se_token,
            "nll_se_document": se_doc,
            "perplexity": exp_or_inf(nll_mean),
            "perplexity_ci95": [exp_or_inf(nll_mean - 1.96 * se_doc), exp_or_inf(nll_mean + 1.96 * se_doc)],
            "bits_per_token": nll_mean / ln2,
            "bits_per_byte": total / (B * ln2) if B else nan,
            "byte_perplexity": exp_or_inf(total / B) if B else nan,  # 2^bpb
            "word_perplexity": exp_or_inf(total / W) if W else nan,
            "top1_accuracy": self.top1 / N,
            "top5_accuracy": self.top5 / N,
            "entropy_mean": float(Fraction(self.entropy, SCALE) / N),
            "ece": float(ece / N),
            "brier": float(Fraction(self.brier, SCALE) / N),
            "nll_by_position": [
                {"start": lo, "end": hi, "tokens": n,
                 "nll_mean": float(Fraction(s, SCALE) / n) if n else None}
                for (lo, hi), n, s in zip(position_buckets(self.max_length), self.pos_count, self.pos_nll)
            ],
            "calibration": [
                {"bin": [b / ECE_BINS, (b + 1) / ECE_BINS], "tokens": n,
                 "confidence": float(Fraction(p, SCALE) / n) if n else None, "accuracy": c / n if n else None}
                for b, (n, p, c) in enumerate(zip(self.ece_count, self.ece_conf, self.ece_correct))
            ],
            "skipped_empty": self.skipped_empty,
            "skipped_unscored": self.skipped_unscored,
        }
