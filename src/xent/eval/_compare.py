"""``xent.eval.compare``: two causal LMs on the same tokens (as llama.cpp ``--kl-divergence``).

Per scored token, with p = softmax(base logits), q = softmax(model logits) in float32 and y the target:
KL(p‖q) = Σ_c p_c (log p_c − log q_c); same top = [argmax p = argmax q]; Δp = q_y − p_y;
Δℓ = ℓ_model − ℓ_base. Means are exact integer sums (see _sums). Each mean ± has two standard errors:
``*_se`` treats tokens as independent, s/√N (what llama.cpp prints); ``*_se_document`` clusters by
document, √(D/(D−1)·Σ_d (S_d − m·n_d)²)/N with S_d the document's sum (REFERENCE.md §4), honest when
tokens of a document are correlated, and often several times larger. (The paired SE of Δℓ is far smaller
than the SEs of the two NLLs: the models err on the same tokens.) Percentiles (numpy's linear
interpolation) need every value: 8 bytes per token.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from fractions import Fraction

import torch

from . import _distributed as dist
from ._data import Corpus
from ._errors import EvalError
from ._evaluate import document_stream
from ._files import state_dict_sha256
from ._head import ModelHead, chunk_rows
from ._options import resolve_options
from ._runner import ChunkedScorer, check_finite, eval_mode
from ._score import row_blocks, scored_index
from ._sums import SCALE, clustered_se, fixed, fixed_sum

PERCENTILES = (99.9, 99, 95, 90, 50, 10, 1, 0.1)
_SUMS = ("tokens", "documents", "skipped_empty", "skipped_unscored", "same_top", "kl", "kl_sq", "dp",
         "dp_sq", "nll_base", "nll_model", "dnll", "dnll_sq",
         # per-document sums S_d (fixed point) for the clustered SEs: Σ S_d², Σ S_d·n_d, and Σ n_d²
         "doc_kl_sq", "doc_kl_n", "doc_dnll_sq", "doc_dnll_n", "doc_top_sq", "doc_top_n", "doc_n_sq")
# the per-document quantities, in the column order of CompareRunner's per-document accumulator
_PER_DOC = ("kl", "dnll", "top")


@dataclass
class CompareResult:
    tokens: int
    documents: int
    kl_mean: float
    kl_se: float  # tokens iid
    kl_se_document: float  # clustered by document
    kl_max: float
    kl_percentiles: dict[str, float]
    same_top_rate: float
    same_top_rate_se: float
    same_top_rate_se_document: float
    delta_p_mean: float
    delta_p_rms: float
    delta_p_percentiles: dict[str, float]
    nll_base: float
    nll_model: float
    delta_nll_mean: float
    delta_nll_se: float
    delta_nll_se_document: float
    ppl_ratio: float
    skipped_empty: int = 0
    skipped_unscored: int = 0
    config: dict = field(default_factory=dict)
    model_sha256: dict = field(default_factory=dict)
    data_sha256: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def pair_stats(base_logits: torch.Tensor, model_logits: torch.Tensor, targets: torch.Tensor) -> dict:
    """Per-token comparison of logits [N, V] (any dtype; not changed) against targets [N], in float32."""
    if base_logits.shape[-1] != model_logits.shape[-1]:
        raise EvalError(f"the models' vocabularies differ: {base_logits.shape[-1]} vs "
                        f"{model_logits.shape[-1]} logits")
    return pair_logit_stats(base_logits.float().clone(), model_logits.float().clone(), targets)


@torch.no_grad()
def pair_logit_stats(zb: torch.Tensor, zm: torch.Tensor, targets: torch.Tensor) -> dict:
    """pair_stats of final logits zb, zm [C, V] float32 (both overwritten), a block of rows at a time."""
    parts = [_pair_block(zb[b], zm[b], targets[b]) for b in row_blocks(zb)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _pair_block(zb: torch.Tensor, zm: torch.Tensor, y: torch.Tensor) -> dict:
    # one logsumexp per model: log p = (zb − mb) − log Sb, log q = (zm − mm) − log Sm
    mb, mm = zb.amax(-1), zm.amax(-1)
    top_b = zb.argmax(-1)
    # the same top token: the base's top token is a top token of the model (amax and one argmax are
    # cheaper than two max-with-index passes)
    same_top = zm.gather(-1, top_b[:, None]).squeeze(-1) == mm
    zb_y = zb.gather(-1, y[:, None]).squeeze(-1)
    zm_y = zm.gather(-1, y[:, None]).squeeze(-1)
    zb.sub_(mb[:, None])
    zm.sub_(mm[:, None])
    p = torch.exp(zb)
    Sb = p.sum(-1)
    Sm = torch.exp(zm).sum(-1)
    log_sb, log_sm = Sb.log(), Sm.log()
    p.div_(Sb[:, None])  # p = softmax(base)
    d = zb.sub_(zm).sub_((log_sb - log_sm)[:, None])  # log p − log q (zb's buffer)
    kl = torch.linalg.vecdot(p, d)
    bad = ~torch.isfinite(kl) & torch.isfinite(mb) & torch.isfinite(mm)
    if bad.any():  # −inf logits: p = 0 times log p − log q = NaN or −inf; 0 · anything = 0 there
        kl[bad] = torch.where(p[bad] > 0, p[bad] * d[bad], torch.zeros_like(d[bad])).sum(-1)
    nll_b = (mb - zb_y) + log_sb
    nll_m = (mm - zm_y) + log_sm
    return {"kl": kl.clamp(min=0), "same_top": same_top, "dp": torch.exp(-nll_m) - torch.exp(-nll_b),
            "nll_base": nll_b, "nll_model": nll_m}


class CompareRunner(ChunkedScorer):
    def __init__(self, base, model, tokenizer, model_tokenizer, opts, *, rank=0, world=1, head="auto"):
        super().__init__(tokenizer, opts, rank=rank, world=world)
        self.base, self.model, self.model_tokenizer = base, model, model_tokenizer
        self.heads = (ModelHead(base, head=head, name="the base model"), ModelHead(model, head=head))
        if self.heads[0].vocab != self.heads[1].vocab:
            raise EvalError(f"the models' vocabularies differ: {self.heads[0].vocab} vs "
                            f"{self.heads[1].vocab} logits")
        self.sums = dict.fromkeys(_SUMS, 0)
        self.kl_values: list[torch.Tensor] = []
        self.dp_values: list[torch.Tensor] = []

    def _encode(self, texts):
        ids, offsets = super()._encode(texts)
        if self.model_tokenizer is not None and texts:
            other = self.model_tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
            for text, a, b in zip(texts, ids, other):
                if a != b:
                    i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                    got = [a[i] if i < len(a) else "end", b[i] if i < len(b) else "end"]
                    raise EvalError(f"the two tokenizers give different token ids (token {i} of the text "
                                    f"{text[:30]!r}: {got[0]} vs {got[1]}); compare needs the same tokens")
        return ids, offsets

    def _count_skip(self, file, kind, text):
        self.sums[kind] += 1

    def _score_batch(self, docs, batch, slots, on_tokens, progress):
        rows, cols = scored_index(batch)
        if len(rows) == 0:
            return
        targets = batch["labels"][rows, cols]
        hb, hm = self.heads
        size = chunk_rows(len(rows), hb.vocab, hm.device, buffers=3)
        parts = []
        for (s0, zb), (_, zm) in zip(hb.chunks(batch, rows, cols, size), hm.chunks(batch, rows, cols, size)):
            y = targets[s0 : s0 + len(zb)].to(zm.device)
            stats = pair_logit_stats(zb.to(zm.device), zm, y)
            parts.append({k: v.cpu() for k, v in stats.items()})
        st = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        doc = torch.tensor([docs[k].index for k in slots[rows].tolist()], dtype=torch.long)
        check_finite({k: st[k] for k in ("nll_base", "nll_model", "kl", "dp")}, doc,
                     batch["positions"][rows, cols])
        s = self.sums
        s["tokens"] += len(targets)
        s["same_top"] += int(st["same_top"].sum())
        dnll = st["nll_model"].double() - st["nll_base"].double()
        for name, v in (("kl", st["kl"]), ("dp", st["dp"]), ("dnll", dnll)):
            s[name] += fixed_sum(v)
            s[name + "_sq"] += fixed_sum(v.double().square())
        s["nll_base"] += fixed_sum(st["nll_base"])
        s["nll_model"] += fixed_sum(st["nll_model"])
        self.kl_values.append(st["kl"].float())
        self.dp_values.append(st["dp"].float())
        # per document: Σ KL, Σ Δℓ, Σ same-top (fixed point) and the token count, for the clustered SEs;
        # partial on this rank until the chunk's exchange sums them over the ranks
        slot = slots[rows]
        cols = [fixed(st["kl"]), fixed(dnll), fixed(st["same_top"].double()), torch.ones_like(targets)]
        per_doc = torch.zeros(len(docs), len(_PER_DOC) + 1, dtype=torch.int64)
        per_doc.index_add_(0, slot, torch.stack(cols, 1))
        for k in slot.unique().tolist():
            *sums, n = per_doc[k].tolist()
            d = docs[k]
            d.sums = [a + b for a, b in zip(d.sums, sums)] if d.sums else sums
            d.n += n
        if progress is not None:
            progress(len(targets))

    def _finish(self, d):
        if d.n == 0:
            self.sums["skipped_unscored"] += 1
            return
        s, n = self.sums, d.n
        s["documents"] += 1
        s["doc_n_sq"] += n * n
        for name, S in zip(_PER_DOC, d.sums):
            s[f"doc_{name}_sq"] += S * S
            s[f"doc_{name}_n"] += S * n


def _mean_se(total: int, total_sq: int, n: int) -> tuple[float, float]:
    mean = Fraction(total, SCALE) / n
    var = Fraction(total_sq, SCALE) / n - mean * mean
    return float(mean), math.sqrt(max(float(var), 0.0) / (n - 1)) if n > 1 else math.nan


def _percentiles(values) -> dict[str, float]:
    import numpy as np

    return {f"{q:g}": float(np.percentile(values, q)) for q in PERCENTILES}


def compare(base, model, tokenizer, documents, *, model_tokenizer=None, max_length=None, stride=None,
            bos=None, preset=None, batch_size: int = 8, padding_side: str = "right", progress=None,
            model_sha256: dict | None = None, data_sha256: str | None = None,
            extra_config: dict | None = None, head: str = "auto") -> CompareResult:
    """Compare ``model`` with ``base`` on the same tokens; windows and options as :func:`evaluate`.

    ``model_tokenizer``, when given, must produce the same ids as ``tokenizer`` on every document
    (EvalError otherwise). Under torch.distributed the batches are shared out across ranks, as in
    evaluate. A non-finite per-token value of either model raises EvalError (nothing is summed).
    ``head`` as in :func:`evaluate`, for both models (each projects only the scored positions, a chunk
    at a time; the chunks' statistics come from one pass over both models' float32 logits).
    """
    import numpy as np

    opts = resolve_options(base, tokenizer, max_length=max_length, stride=stride, bos=bos, preset=preset,
                           batch_size=batch_size, padding_side=padding_side)
    resolve_options(model, tokenizer, max_length=opts.max_length, stride=None if preset else opts.stride,
                    bos=None if preset else opts.bos, preset=preset)  # the model must take these windows too
    corpus = documents if isinstance(documents, Corpus) else None
    stream = document_stream(documents, opts.preset)
    rank, world = dist.rank_and_world()
    runner = CompareRunner(base, model, tokenizer, model_tokenizer, opts, rank=rank, world=world, head=head)
    with eval_mode(base, model):
        runner.run(stream, progress=progress)
    gathered = dist.all_gather((runner.sums, torch.cat(runner.kl_values or [torch.zeros(0)]).numpy(),
                                torch.cat(runner.dp_values or [torch.zeros(0)]).numpy()))
    s = dict.fromkeys(_SUMS, 0)
    for sums, _, _ in gathered:
        for k in _SUMS:
            s[k] += sums[k]
    kl_all = np.concatenate([g[1] for g in gathered])
    dp_all = np.concatenate([g[2] for g in gathered])
    N = s["tokens"]
    if N == 0:
        short = (f" (--preset llama.cpp: fewer than 2 × {opts.max_length} tokens, which llama-perplexity "
                 "refuses)") if opts.preset == "llama.cpp" and s["skipped_unscored"] else ""
        raise EvalError(f"no tokens to score: {s['skipped_empty']} empty and {s['skipped_unscored']} "
                        f"too-short documents{short}")
    kl_mean, kl_se = _mean_se(s["kl"], s["kl_sq"], N)
    dp_mean, _ = _mean_se(s["dp"], s["dp_sq"], N)
    dnll_mean, dnll_se = _mean_se(s["dnll"], s["dnll_sq"], N)
    same = s["same_top"] / N
    D = s["documents"]

    def se_document(name: str, total: int) -> float:
        return clustered_se(total, s[f"doc_{name}_sq"], s[f"doc_{name}_n"], s["doc_n_sq"], N, D)
    if model_sha256 is None:
        model_sha256 = {"base": state_dict_sha256(base), "model": state_dict_sha256(model)}
    if data_sha256 is None and corpus is not None:
        data_sha256 = corpus.sha256()
    return CompareResult(
        tokens=N, documents=D, kl_mean=kl_mean, kl_se=kl_se, kl_se_document=se_document("kl", s["kl"]),
        kl_max=float(kl_all.max()), kl_percentiles=_percentiles(kl_all), same_top_rate=same,
        same_top_rate_se=math.sqrt(same * (1 - same) / (N - 1)) if N > 1 else math.nan,
        same_top_rate_se_document=se_document("top", s["same_top"] * SCALE), delta_p_mean=dp_mean,
        delta_p_rms=math.sqrt(float(Fraction(s["dp_sq"], SCALE) / N)),
        delta_p_percentiles=_percentiles(dp_all),
        nll_base=float(Fraction(s["nll_base"], SCALE) / N),
        nll_model=float(Fraction(s["nll_model"], SCALE) / N),
        delta_nll_mean=dnll_mean, delta_nll_se=dnll_se, delta_nll_se_document=se_document("dnll", s["dnll"]),
        ppl_ratio=math.exp(dnll_mean),
        skipped_empty=s["skipped_empty"], skipped_unscored=s["skipped_unscored"],
        config={**opts.config(), "world_size": world, **(extra_config or {}),
                "head": {"base": runner.heads[0].kind, "model": runner.heads[1].kind}},
        model_sha256=model_sha256, data_sha256=data_sha256,
    )


def print_compare(summary: dict, file=None) -> None:
    """A report laid out like llama.cpp's ``--kl-divergence`` output, each ± with both standard errors
    named: tokens iid (llama.cpp's) and clustered by document."""
    import sys

    out = file or sys.stdout
    n = summary["tokens"]
    ratio = summary["ppl_ratio"]

    def pm(se_iid: float, se_doc: float, width: int = 10, digits: int = 6, unit: str = "") -> str:
        return (f" ± {se_iid:{width}.{digits}f}{unit} (SE, tokens iid)"
                f" ± {se_doc:{width}.{digits}f}{unit} (SE, by document)")

    lines = [
        f"tokens: {n} in {summary['documents']} documents",
        "",
        "====== Perplexity statistics ======",
        f"Mean PPL(Q)                   : {math.exp(summary['nll_model']):12.6f}",
        f"Mean PPL(base)                : {math.exp(summary['nll_base']):12.6f}",
        f"Mean ln(PPL(Q)/PPL(base))     : {summary['delta_nll_mean']:12.6f}"
        + pm(summary["delta_nll_se"], summary["delta_nll_se_document"]),
        f"Mean PPL(Q)/PPL(base)         : {ratio:12.6f}"
        + pm(ratio * summary["delta_nll_se"], ratio * summary["delta_nll_se_document"]),
        "",
        "====== KL divergence statistics ======",
        f"Mean    KLD: {summary['kl_mean']:10.6f}" + pm(summary["kl_se"], summary["kl_se_document"]),
        f"Maximum KLD: {summary['kl_max']:10.6f}",
        *(f"{q + '%':<7} KLD: {v:10.6f}" for q, v in summary["kl_percentiles"].items()),
        "",
        "====== Token probability statistics ======",
        f"Mean    Δp: {100 * summary['delta_p_mean']:8.3f} %",
        *(f"{q + '%':<7} Δp: {100 * v:8.3f} %" for q, v in summary["delta_p_percentiles"].items()),
        f"RMS Δp    : {100 * summary['delta_p_rms']:8.3f} %",
        f"Same top p: {100 * summary['same_top_rate']:8.3f} %"
        + pm(100 * summary["same_top_rate_se"], 100 * summary["same_top_rate_se_document"], 6, 3, " %"),
    ]
    print("\n".join(lines), file=out)
