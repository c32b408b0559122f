"""``xent.eval.compare``: two causal LMs on the same tokens (as llama.cpp ``--kl-divergence``).

Per scored token, with p = softmax(base logits), q = softmax(model logits) in float32 and y the target:
KL(p‖q) = Σ_c p_c (log p_c − log q_c); the reverse KL(q‖p); JSD = ½ KL(p‖m) + ½ KL(q‖m) with
m = (p + q)/2 (in nats, at most ln 2); same top = [the base's top token is a top token of the model];
Δp = q_y − p_y; Δℓ = ℓ_model − ℓ_base. Means are exact integer sums (see _sums). Each mean ± has two
standard errors:
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
from ._compare_bytes import (
    ByteCompareResult,
    compare_bytes,
    ids_differ,
    print_byte_compare,
    same_serialisation,
)
from ._data import Corpus
from ._errors import EvalError
from ._evaluate import document_stream, texts
from ._files import state_dict_sha256
from ._head import ModelHead, chunk_rows
from ._options import check_options, resolve_options
from ._runner import ChunkedScorer, check_finite, eval_mode
from ._score import eval_stats, row_blocks, scored_index
from ._sums import SCALE, clustered_se, exp_or_inf, fixed, fixed_sum

PERCENTILES = (99.9, 99, 95, 90, 75, 50, 25, 10, 5, 1, 0.1)  # llama.cpp's, and the quartiles
# the per-token quantities whose mean gets both standard errors (per-document sums for the clustered one)
_PER_DOC = ("kl", "rkl", "jsd", "dnll", "dp", "top", "nll_base", "nll_model")
_SUMS = ("tokens", "documents", "skipped_empty", "skipped_unscored", "same_top", "nll_cross",
         *(f"{name}{suffix}" for name in _PER_DOC if name != "top" for suffix in ("", "_sq")),
         # per-document sums S_d (fixed point) for the clustered SEs: Σ S_d², Σ S_d·n_d, and Σ n_d²
         *(f"doc_{name}{suffix}" for name in _PER_DOC for suffix in ("_sq", "_n")), "doc_n_sq",
         "doc_nll_cross")  # Σ_d S_base,d · S_model,d


@dataclass
class CompareResult:
    tokens: int
    documents: int
    kl_mean: float
    kl_se: float  # tokens iid
    kl_se_document: float  # clustered by document
    kl_max: float
    kl_min: float
    kl_percentiles: dict[str, float]
    reverse_kl_mean: float  # KL(model‖base)
    reverse_kl_se: float
    reverse_kl_se_document: float
    jsd_mean: float  # Jensen-Shannon divergence, nats (≤ ln 2)
    jsd_se: float
    jsd_se_document: float
    same_top_rate: float
    same_top_rate_se: float
    same_top_rate_se_document: float
    delta_p_mean: float
    delta_p_se: float
    delta_p_se_document: float
    delta_p_rms: float
    delta_p_max: float
    delta_p_min: float
    delta_p_percentiles: dict[str, float]
    nll_base: float
    nll_base_se: float
    nll_base_se_document: float
    nll_model: float
    nll_model_se: float
    nll_model_se_document: float
    nll_correlation: float  # Pearson's r of the two models' per-token log-probs (llama.cpp's Cor)
    delta_nll_mean: float
    delta_nll_se: float
    delta_nll_se_document: float
    ppl_ratio: float
    ppl_base: float
    ppl_model: float
    ppl_diff: float  # PPL(model) − PPL(base)
    ppl_diff_se: float  # tokens iid, with the covariance of the two NLLs (as llama.cpp)
    ppl_diff_se_document: float  # clustered by document, with the documents' covariance
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
    """pair_stats of final logits zb, zm [C, V] float32 (both overwritten), a block of rows at a time;
    each model's loss is the evaluation's own (xent.eval._score.eval_stats, the same backend), so that it
    equals what evaluate gives the model, to the bit."""
    nll_b, nll_m = eval_stats(zb, targets)["loss"], eval_stats(zm, targets)["loss"]
    parts = [_pair_block(zb[b], zm[b]) for b in row_blocks(zb)]
    out = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    out.update(dp=torch.exp(-nll_m) - torch.exp(-nll_b), nll_base=nll_b, nll_model=nll_m)
    return out


def _pair_block(zb: torch.Tensor, zm: torch.Tensor) -> dict:
    # one logsumexp per model: log p = (zb − mb) − log Sb, log q = (zm − mm) − log Sm
    mb, mm = zb.amax(-1), zm.amax(-1)
    top_b = zb.argmax(-1)
    # the same top token: the base's top token is a top token of the model (amax and one argmax are
    # cheaper than two max-with-index passes)
    same_top = zm.gather(-1, top_b[:, None]).squeeze(-1) == mm
    zb.sub_(mb[:, None])
    zm.sub_(mm[:, None])
    p, q = torch.exp(zb), torch.exp(zm)
    Sb, Sm = p.sum(-1), q.sum(-1)
    log_sb, log_sm = Sb.log(), Sm.log()
    p.div_(Sb[:, None])  # softmax(base)
    q.div_(Sm[:, None])  # softmax(model)
    d = zb.sub_(zm).sub_((log_sb - log_sm)[:, None])  # log p − log q (in zb's buffer)
    kl = torch.linalg.vecdot(p, d)
    rkl = -torch.linalg.vecdot(q, d)
    # JSD in log space: log q − log m = ln 2 − softplus(d), log p − log m = ln 2 − softplus(d) + d, so
    # JSD = ½ (Σ p t + KL + Σ q t) with t = ln 2 − softplus(d) (zm's buffer)
    t = torch.nn.functional.softplus(d)
    t.neg_().add_(math.log(2.0))
    jsd = 0.5 * (torch.linalg.vecdot(p, t) + kl + torch.linalg.vecdot(q, t))
    bad = ~(torch.isfinite(kl) & torch.isfinite(rkl) & torch.isfinite(jsd)) & torch.isfinite(mb) & \
        torch.isfinite(mm)
    if bad.any():  # a class with p = 0 or q = 0 (−inf logits): 0 · log 0 = 0, written out for those rows
        kl[bad], rkl[bad], jsd[bad] = _divergences_masked(p[bad], q[bad])
    return {"kl": kl.clamp(min=0), "rkl": rkl.clamp(min=0), "jsd": jsd.clamp(min=0), "same_top": same_top}


def _divergences_masked(p: torch.Tensor, q: torch.Tensor):
    """(KL(p‖q), KL(q‖p), JSD) of probability rows where some p or q are 0 (terms 0·log 0 = 0)."""
    lp, lq = p.log(), q.log()
    lm = torch.logaddexp(lp, lq) - math.log(2.0)
    zero = torch.zeros_like(p)

    def term(w, a, b):  # Σ w (a − b) over w > 0
        return torch.where(w > 0, w * (a - b), zero).sum(-1)

    return term(p, lp, lq), term(q, lq, lp), 0.5 * (term(p, lp, lm) + term(q, lq, lm))


class CompareRunner(ChunkedScorer):
    def __init__(self, base, model, tokenizer, model_tokenizer, opts, *, rank=0, world=1, head="auto",
                 base_head=None):
        super().__init__(tokenizer, opts, rank=rank, world=world)
        self.base, self.model, self.model_tokenizer = base, model, model_tokenizer
        batching = dict(batch_size=opts.batch_size, padding_side=opts.padding_side, pad_id=self.pad_id)
        self.heads = (base_head or ModelHead(base, head=head, name="the base model", **batching),
                      ModelHead(model, head=head, **batching))
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
        check_finite({k: st[k] for k in ("nll_base", "nll_model", "kl", "rkl", "jsd", "dp")}, doc,
                     batch["positions"][rows, cols])
        st["dnll"] = st["nll_model"].double() - st["nll_base"].double()
        st["top"] = st["same_top"].double()
        s = self.sums
        s["tokens"] += len(targets)
        s["same_top"] += int(st["same_top"].sum())
        for name in _PER_DOC:
            if name != "top":
                s[name] += fixed_sum(st[name])
                s[name + "_sq"] += fixed_sum(st[name].double().square())
        s["nll_cross"] += fixed_sum(st["nll_base"].double() * st["nll_model"].double())
        self.kl_values.append(st["kl"].float())
        self.dp_values.append(st["dp"].float())
        # per document: the sums of each _PER_DOC quantity (fixed point) and the token count, for the
        # clustered SEs; partial on this rank until the chunk's exchange sums them over the ranks
        slot = slots[rows]
        cols = [fixed(st[name]) for name in _PER_DOC] + [torch.ones_like(targets)]
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
        per = dict(zip(_PER_DOC, d.sums))
        s["doc_nll_cross"] += per["nll_base"] * per["nll_model"]


def _mean_se(total: int, total_sq: int, n: int) -> tuple[float, float]:
    mean = Fraction(total, SCALE) / n
    var = Fraction(total_sq, SCALE) / n - mean * mean
    return float(mean), math.sqrt(max(float(var), 0.0) / (n - 1)) if n > 1 else math.nan


def _sqrt(x: float) -> float:
    """√x, 0 for a rounding-negative x, NaN for NaN."""
    return math.sqrt(max(x, 0.0)) if x == x else math.nan


def _percentiles(values) -> dict[str, float]:
    import numpy as np

    return {f"{q:g}": float(np.percentile(values, q)) for q in PERCENTILES}


def compare(base, model, tokenizer, documents, *, model_tokenizer=None, max_length=None, stride=None,
            bos=None, preset=None, batch_size: int = 8, padding_side: str = "right", progress=None,
            model_sha256: dict | None = None, data_sha256: str | None = None,
            extra_config: dict | None = None, head: str = "auto",
            base_cache: str | None = None) -> CompareResult | ByteCompareResult:
    """Compare ``model`` with ``base`` on the same tokens; windows and options as :func:`evaluate`.

    ``model_tokenizer``, when given, is the model's tokenizer. Where it gives other ids than
    ``tokenizer`` on some document, the models cannot be compared token by token (nor by KL, which needs
    a shared vocabulary): each then scores every document with its own tokenizer and windows and the
    result is a :class:`ByteCompareResult`, the paired per-document difference of bits per byte (see
    _compare_bytes; an in-memory iterable of documents is then held as a list, since it is read once per
    model and once to compare the ids). Under torch.distributed the batches are shared out across ranks, as in
    evaluate. A non-finite per-token value of either model raises EvalError (nothing is summed).
    ``head`` as in :func:`evaluate`, for both models (each projects only the scored positions, a chunk
    at a time; the chunks' statistics come from one pass over both models' float32 logits).
    ``base_cache``: a directory written by ``evaluate(base, ..., save_base=DIR)``; then ``base`` is None,
    only ``model`` is run and the base's logits come from the cached hidden states: the very numbers of
    the two-model compare (the texts, tokenizer, windows and batches must be the cache's, else EvalError).
    """
    # the options of both models' runs, checked once here (and the windows' in resolve_options)
    check_options(max_length=max_length, stride=stride, bos=bos, preset=preset, batch_size=batch_size,
                  padding_side=padding_side, head=head)
    if base_cache is not None:
        return _compare_cached(model, tokenizer, documents, base_cache, model_tokenizer=model_tokenizer,
                               max_length=max_length, stride=stride, bos=bos, preset=preset,
                               batch_size=batch_size, padding_side=padding_side, progress=progress,
                               model_sha256=model_sha256, data_sha256=data_sha256,
                               extra_config=extra_config, head=head)
    opts = resolve_options(base, tokenizer, max_length=max_length, stride=stride, bos=bos, preset=preset,
                           batch_size=batch_size, padding_side=padding_side)
    if not same_serialisation(tokenizer, model_tokenizer):
        if not isinstance(documents, Corpus):
            documents = [text for _, text in texts(documents)]
        if ids_differ(tokenizer, model_tokenizer, documents, opts.preset):
            model_opts = resolve_options(model, model_tokenizer, max_length=max_length, stride=stride,
                                         bos=bos, preset=preset, batch_size=batch_size,
                                         padding_side=padding_side)
            return compare_bytes(base, model, tokenizer, model_tokenizer, documents,
                                 options=(opts, model_opts), head=head, progress=progress,
                                 model_sha256=model_sha256, data_sha256=data_sha256,
                                 extra_config=extra_config)
    resolve_options(model, tokenizer, max_length=opts.max_length, stride=None if preset else opts.stride,
                    bos=None if preset else opts.bos, preset=preset)  # the model must take these windows too
    corpus = documents if isinstance(documents, Corpus) else None
    stream = document_stream(documents, opts.preset)
    rank, world = dist.rank_and_world()
    runner = CompareRunner(base, model, tokenizer, model_tokenizer, opts, rank=rank, world=world, head=head)
    with eval_mode(base, model):
        runner.run(stream, progress=progress)
    if model_sha256 is None:
        model_sha256 = {"base": state_dict_sha256(base), "model": state_dict_sha256(model)}
    return _compare_result(runner, opts, world, corpus, model_sha256=model_sha256, data_sha256=data_sha256,
                           extra_config=extra_config)


def _compare_cached(model, tokenizer, documents, base_cache, *, model_tokenizer, max_length, stride, bos,
                    preset, batch_size, padding_side, progress, model_sha256, data_sha256, extra_config,
                    head) -> CompareResult:
    """compare() with the base's logits projected from a base cache (see _base_cache)."""
    from . import _base_cache

    manifest = _base_cache.load_manifest(base_cache)
    opts = resolve_options(model, tokenizer, max_length=max_length, stride=stride, bos=bos, preset=preset,
                           batch_size=batch_size, padding_side=padding_side,
                           checkpoint_every=manifest["options"]["checkpoint_every"])
    _base_cache.check_run(manifest, tokenizer=tokenizer, opts=opts)
    rank, world = dist.rank_and_world()
    if world > 1:
        raise EvalError("base-cache: one process only (the cache holds one process's batches)")
    corpus = documents if isinstance(documents, Corpus) else None
    if data_sha256 is None and corpus is not None:
        data_sha256 = corpus.sha256()
    if None not in (manifest["data_sha256"], data_sha256) and manifest["data_sha256"] != data_sha256:
        raise EvalError("base-cache: the data files differ from the cache's (SHA-256)")
    device = next(model.parameters()).device
    cached = _base_cache.CachedHead(base_cache, manifest, device)
    stream = _base_cache.TextHash(document_stream(documents, opts.preset))
    runner = CompareRunner(None, model, tokenizer, model_tokenizer, opts, head=head, base_head=cached)
    with eval_mode(model):
        runner.run(stream, progress=progress)
    cached.check_done()
    if stream.hexdigest() != manifest["texts_sha256"]:
        raise EvalError("base-cache: the texts differ from the cache's (SHA-256 of the documents read)")
    if model_sha256 is None:
        model_sha256 = {"base": manifest["base_model_sha256"], "model": state_dict_sha256(model)}
    return _compare_result(runner, opts, world, corpus, model_sha256=model_sha256, data_sha256=data_sha256,
                           extra_config={**(extra_config or {}), "base_cache": base_cache})


def _compare_result(runner, opts, world, corpus, *, model_sha256, data_sha256, extra_config):
    import numpy as np

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
    D = s["documents"]

    def mean_se(name: str, total: int | None = None) -> tuple[float, float, float]:
        """(mean, SE tokens iid, SE by document) of a per-token quantity."""
        total = s[name] if total is None else total
        mean, se = _mean_se(total, s[name + "_sq"], N) if name != "top" else (math.nan, math.nan)
        return mean, se, clustered_se(total, s[f"doc_{name}_sq"], s[f"doc_{name}_n"], s["doc_n_sq"], N, D)

    kl = mean_se("kl")
    rkl, jsd, dp, dnll = mean_se("rkl"), mean_se("jsd"), mean_se("dp"), mean_se("dnll")
    nb, nm = mean_se("nll_base"), mean_se("nll_model")
    same = s["same_top"] / N
    # Pearson's r of the per-token losses and the covariance of their means, from the exact sums
    mb_, mm_ = Fraction(s["nll_base"], SCALE) / N, Fraction(s["nll_model"], SCALE) / N
    cov = Fraction(s["nll_cross"], SCALE) / N - mb_ * mm_
    var_b = Fraction(s["nll_base_sq"], SCALE) / N - mb_ * mb_
    var_m = Fraction(s["nll_model_sq"], SCALE) / N - mm_ * mm_
    corr = float(cov) / math.sqrt(float(var_b) * float(var_m)) if var_b > 0 and var_m > 0 else math.nan
    ppl_b, ppl_m = exp_or_inf(nb[0]), exp_or_inf(nm[0])
    # PPL(model) − PPL(base) ± by the delta method with the covariance of the two means (as llama.cpp)
    cov_means = float(cov) / (N - 1) if N > 1 else math.nan
    diff_var = (ppl_m * nm[1]) ** 2 + (ppl_b * nb[1]) ** 2 - 2 * ppl_m * ppl_b * cov_means
    # the same with the clustered variances and covariance D/(D−1)·Σ_d (S_bd − m_b n_d)(S_md − m_m n_d)/N²
    cross = (Fraction(s["doc_nll_cross"], SCALE * SCALE) - mm_ * Fraction(s["doc_nll_base_n"], SCALE)
             - mb_ * Fraction(s["doc_nll_model_n"], SCALE) + mb_ * mm_ * s["doc_n_sq"])
    cov_doc = D / (D - 1) * float(cross) / (N * N) if D > 1 else math.nan
    diff_var_doc = (ppl_m * nm[2]) ** 2 + (ppl_b * nb[2]) ** 2 - 2 * ppl_m * ppl_b * cov_doc
    if data_sha256 is None and corpus is not None:
        data_sha256 = corpus.sha256()
    return CompareResult(
        tokens=N, documents=D, kl_mean=kl[0], kl_se=kl[1], kl_se_document=kl[2],
        kl_max=float(kl_all.max()), kl_min=float(kl_all.min()), kl_percentiles=_percentiles(kl_all),
        reverse_kl_mean=rkl[0], reverse_kl_se=rkl[1], reverse_kl_se_document=rkl[2],
        jsd_mean=jsd[0], jsd_se=jsd[1], jsd_se_document=jsd[2],
        same_top_rate=same, same_top_rate_se=math.sqrt(same * (1 - same) / (N - 1)) if N > 1 else math.nan,
        same_top_rate_se_document=mean_se("top", s["same_top"] * SCALE)[2],
        delta_p_mean=dp[0], delta_p_se=dp[1], delta_p_se_document=dp[2],
        delta_p_rms=math.sqrt(float(Fraction(s["dp_sq"], SCALE) / N)),
        delta_p_max=float(dp_all.max()), delta_p_min=float(dp_all.min()),
        delta_p_percentiles=_percentiles(dp_all),
        nll_base=nb[0], nll_base_se=nb[1], nll_base_se_document=nb[2],
        nll_model=nm[0], nll_model_se=nm[1], nll_model_se_document=nm[2], nll_correlation=corr,
        delta_nll_mean=dnll[0], delta_nll_se=dnll[1], delta_nll_se_document=dnll[2],
        ppl_ratio=math.exp(dnll[0]), ppl_base=ppl_b, ppl_model=ppl_m, ppl_diff=ppl_m - ppl_b,
        ppl_diff_se=_sqrt(diff_var), ppl_diff_se_document=_sqrt(diff_var_doc),
        skipped_empty=s["skipped_empty"], skipped_unscored=s["skipped_unscored"],
        config={**opts.config(), "world_size": world, **(extra_config or {}),
                "head": {"base": runner.heads[0].kind, "model": runner.heads[1].kind}},
        model_sha256=model_sha256, data_sha256=data_sha256,
    )


def print_compare(summary: dict, file=None) -> None:
    """A report laid out like llama.cpp's ``--kl-divergence`` output, each ± with both standard errors
    named: tokens iid (llama.cpp's) and clustered by document; the reverse KL and the JSD after the KL."""
    import sys

    if "delta_bits_per_byte" in summary:  # different tokenizers: bits per byte
        print_byte_compare(summary, file)
        return
    out = file or sys.stdout
    n = summary["tokens"]
    ratio = summary["ppl_ratio"]

    def pm(se_iid: float, se_doc: float, width: int = 10, digits: int = 6, unit: str = "") -> str:
        return (f" ± {se_iid:{width}.{digits}f}{unit} (SE, tokens iid)"
                f" ± {se_doc:{width}.{digits}f}{unit} (SE, by document)")

    def label(q: str) -> str:  # llama.cpp's "99.9%", " 5.0%", "Median"
        return "Median" if q == "50" else f"{float(q):4.1f}%"

    def mean(key: str, scale: float = 1.0, width: int = 10, digits: int = 6, unit: str = "") -> str:
        return f"{scale * summary[key + '_mean']:{width}.{digits}f}" + pm(
            scale * summary[key + "_se"], scale * summary[key + "_se_document"], width, digits, unit)

    lines = [
        f"tokens: {n} in {summary['documents']} documents",
        "",
        "====== Perplexity statistics ======",
        f"Mean PPL(Q)                   : {summary['ppl_model']:12.6f}"
        + pm(summary["ppl_model"] * summary["nll_model_se"],
             summary["ppl_model"] * summary["nll_model_se_document"]),
        f"Mean PPL(base)                : {summary['ppl_base']:12.6f}"
        + pm(summary["ppl_base"] * summary["nll_base_se"],
             summary["ppl_base"] * summary["nll_base_se_document"]),
        f"Cor(ln(PPL(Q)), ln(PPL(base))): {100 * summary['nll_correlation']:6.2f}%",
        f"Mean ln(PPL(Q)/PPL(base))     : {summary['delta_nll_mean']:12.6f}"
        + pm(summary["delta_nll_se"], summary["delta_nll_se_document"]),
        f"Mean PPL(Q)/PPL(base)         : {ratio:12.6f}"
        + pm(ratio * summary["delta_nll_se"], ratio * summary["delta_nll_se_document"]),
        f"Mean PPL(Q)-PPL(base)         : {summary['ppl_diff']:12.6f}"
        + pm(summary["ppl_diff_se"], summary["ppl_diff_se_document"]),
        "",
        "====== KL divergence statistics ======",
        f"Mean    KLD: {mean('kl')}",
        f"Maximum KLD: {summary['kl_max']:10.6f}",
        *(f"{label(q):<7} KLD: {v:10.6f}" for q, v in summary["kl_percentiles"].items()),
        f"Minimum KLD: {summary['kl_min']:10.6f}",
        f"Mean reverse KLD(Q‖base): {mean('reverse_kl')}",
        f"Mean    JSD: {mean('jsd')}",
        "",
        "====== Token probability statistics ======",
        f"Mean    Δp: {mean('delta_p', 100.0, 6, 3, ' %')}",
        f"Maximum Δp: {100 * summary['delta_p_max']:8.3f}%",
        *(f"{label(q):<7} Δp: {100 * v:8.3f}%" for q, v in summary["delta_p_percentiles"].items()),
        f"Minimum Δp: {100 * summary['delta_p_min']:8.3f}%",
        f"RMS Δp    : {100 * summary['delta_p_rms']:8.3f} %",
        f"Same top p: {100 * summary['same_top_rate']:8.3f} %"
        + pm(100 * summary["same_top_rate_se"], 100 * summary["same_top_rate_se_document"], 6, 3, " %"),
    ]
    print("\n".join(lines), file=out)
