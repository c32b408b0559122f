"""``xent demo``: train one tiny model per objective on the same data, evaluate, plot, report.

Everything is built here, offline: the corpus (standard-library docstrings + a Markov source whose
entropy is known), the tokenizer, the models. Same seed, data, initial weights and budget for every
objective, so the differences in the report are the objectives' own.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass

DEFAULT_OBJECTIVES = ("ce", "ce_ls", "emo", "tailr", "focal")
QUICK_OBJECTIVES = ("ce", "ce_ls", "emo", "tailr")


@dataclass
class DemoConfig:
    """The demo's sizes. The default trains each objective on ~820k tokens (400 steps of 32×64, about
    four passes over the stream) in about 45 CPU-seconds on one thread, 7 of them for the training
    curves (every held-out token, at 8 points): enough for the 2-layer model to get within ~0.11
    nats/word of the Markov source with cross-entropy. :meth:`quick` (d = 64, an
    eighth of the tokens) is for tests. ``jobs`` changes only the speed; ``threads`` > 1 can change
    the last digits (another order of float reductions).
    """

    preset: str = "default"  # or "quick"
    objectives: tuple[str, ...] = DEFAULT_OBJECTIVES
    seed: int = 0
    vocab_size: int = 1024
    seq_len: int = 64
    d_model: int = 96
    n_layer: int = 2
    n_head: int = 4
    steps: int = 400
    batch_size: int = 32
    lr: float = 1e-2
    warmup_steps: int = 20
    eval_every: int = 50
    markov_words: int = 64
    words_per_doc: int = 64
    synthetic_train_docs: int = 1000  # about 30% of the training tokens
    synthetic_eval_docs: int = 100
    heldout_docs: int | None = None  # None: every held-out docstring document
    threads: int = 1  # torch threads: no dependence on the thread count, and robust on a busy machine
    jobs: int = 1  # objectives trained at once, in worker processes (the numbers do not change)

    @classmethod
    def quick(cls, **overrides) -> DemoConfig:
        base = dict(preset="quick", objectives=QUICK_OBJECTIVES, d_model=64, n_head=2, steps=100,
                    batch_size=16, warmup_steps=5, eval_every=25, synthetic_eval_docs=40, heldout_docs=40)
        return cls(**{**base, **overrides})


@dataclass
class DemoData:
    train_texts: list[str]  # natural and synthetic, interleaved (seeded)
    heldout: list[str]  # natural held-out documents
    heldout_sources: list[str]
    synthetic: list[str]  # held-out documents of the Markov source
    source: object  # the MarkovSource


def build_data(cfg: DemoConfig) -> DemoData:
    import torch

    from ._markov import MarkovSource
    from ._text import stdlib_documents

    natural_train, natural_heldout = stdlib_documents()
    if cfg.heldout_docs is not None:
        natural_heldout = natural_heldout[: cfg.heldout_docs]
    source = MarkovSource(num_words=cfg.markov_words, seed=cfg.seed)
    syn_train = source.sample(cfg.synthetic_train_docs, cfg.words_per_doc, seed=cfg.seed + 1)
    syn_eval = source.sample(cfg.synthetic_eval_docs, cfg.words_per_doc, seed=cfg.seed + 2)
    texts = [d.text for d in natural_train] + syn_train
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    return DemoData([texts[i] for i in order], [d.text for d in natural_heldout],
                    [d.source for d in natural_heldout], syn_eval, source)


def _write_jsonl(path: str, texts: list[str]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")


def curve_sequences(tokenizer, texts: list[str], seq_len: int):
    """Every held-out document as training-loop sequences [S, seq_len] (−100 pads), for the curves.

    Document d is [eot, x_1 … x_n]; its sequences start every seq_len − 1 tokens and overlap by one, so
    each of the n tokens is predicted exactly once, from its own document only: the curves score the
    same tokens as the table. A sequence of seq_len inputs predicts seq_len − 1 of them, one fewer than
    the evaluator's windows of seq_len inputs (which also predict the next window's first token), so
    the contexts restart at other places and the last curve point is close to the table, not equal.
    """
    import torch

    from ._model import tokenize_documents

    rows = []
    for doc in tokenize_documents(tokenizer, texts):
        for start in range(0, len(doc) - 1, seq_len - 1):
            piece = doc[start : start + seq_len]
            rows.append(piece + [-100] * (seq_len - len(piece)))
    return torch.tensor(rows, dtype=torch.long)


def synthetic_gap(result, texts: list[str], source, doc_nll: list[float] | None = None) -> dict:
    """The model's loss on the Markov documents against the source's exact −log p of the same text.

    The evaluator scores every token of each document after a BOS; the source's −log p covers the
    same string (first word from π, then transitions). Their difference per word estimates the KL
    divergence from the source to the model (≥ 0 in expectation); per byte it is the bits-per-byte gap.
    With ``doc_nll`` (the model's summed loss per document) the KL gets its document-clustered
    standard error, √(D/(D−1)·Σ_d (g_d − K̄·n_d)²) / Σ_d n_d with g_d the document's gap in nats and
    n_d its words (the ratio-estimator form of REFERENCE.md §4).
    """
    model_total = result.nll_mean * result.tokens  # nats, summed over the scored tokens
    true_nll = [source.nll(t) for t in texts]
    true_total = sum(true_nll)
    n_words = [len(t.split(" ")) for t in texts]
    words = sum(n_words)
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    ln2 = math.log(2)
    kl = (model_total - true_total) / words
    se = math.nan
    if doc_nll is not None:
        _, se = clustered_mean([m - t for m, t in zip(doc_nll, true_nll)], n_words)
    return {
        "documents": len(texts), "words": words, "bytes": nbytes,
        "entropy_rate_nats_per_word": source.entropy_rate,
        "true_nll_nats_per_word": true_total / words,
        "model_nll_nats_per_word": model_total / words,
        "kl_nats_per_word": kl,
        "kl_nats_per_word_se": se,
        "true_bits_per_byte": true_total / (nbytes * ln2),
        "model_bits_per_byte": result.bits_per_byte,
        "gap_bits_per_byte": (model_total - true_total) / (nbytes * ln2),
    }


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
    else the first objective), and returns the baseline's name: the paired per-document differences of
    the held-out loss (nats/token) and of the loss on the Markov text (nats/word, which is the difference
    of the two KL estimates: the source's −log p cancels)."""
    objs = summary["objectives"]
    baseline = "ce" if "ce" in objs else next(iter(objs))
    base = objs[baseline]
    words = [len(t.split(" ")) for t in synthetic_texts]
    for name, entry in objs.items():
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
    return baseline


def _metrics(r) -> dict:
    keys = ("tokens", "documents", "bytes", "nll_mean", "nll_se_document", "perplexity", "perplexity_ci95",
            "bits_per_token", "bits_per_byte", "top1_accuracy", "ece", "brier", "entropy_mean", "calibration")
    d = r.to_dict()
    return {k: d[k] for k in keys}


def run_demo(out: str = "xent-demo", cfg: DemoConfig | None = None, *, log=print,
             progress: bool = True) -> dict:
    """Runs the demo into ``out`` and returns the summary (also written to ``out/summary.json``).

    With ``cfg.jobs > 1`` the objectives train in spawned worker processes: call this from a script
    under ``if __name__ == "__main__":``, as for any multiprocessing code.
    """
    import torch
    from transformers.utils import logging as hf_logging

    cfg = cfg or DemoConfig()
    threads, hf_bars = torch.get_num_threads(), hf_logging.is_progress_bar_enabled()
    torch.set_num_threads(cfg.threads)
    hf_logging.disable_progress_bar()  # "Writing model shards" bars, once per checkpoint
    try:
        return _run(out, cfg, log, progress)
    finally:
        torch.set_num_threads(threads)
        if hf_bars:
            hf_logging.enable_progress_bar()


def _run(out: str, cfg: DemoConfig, log, progress: bool) -> dict:
    import torch

    import xent

    from ..training._loop import json_safe
    from . import _report
    from ._model import tokenize_documents, train_tokenizer

    t_start, cpu_start = time.perf_counter(), _cpu_seconds()
    torch.manual_seed(cfg.seed)
    os.makedirs(os.path.join(out, "data"), exist_ok=True)
    os.makedirs(os.path.join(out, "models"), exist_ok=True)

    log(f"building the data: standard-library docstrings + a {cfg.markov_words}-word Markov source")
    data = build_data(cfg)
    _write_jsonl(os.path.join(out, "data", "heldout.jsonl"), data.heldout)
    _write_jsonl(os.path.join(out, "data", "synthetic.jsonl"), data.synthetic)
    tokenizer = train_tokenizer(data.train_texts, cfg.vocab_size)
    stream = torch.tensor([t for doc in tokenize_documents(tokenizer, data.train_texts) for t in doc])
    eval_sets = {"heldout": curve_sequences(tokenizer, data.heldout, cfg.seq_len),
                 "synthetic": curve_sequences(tokenizer, data.synthetic, cfg.seq_len)}
    log(f"tokenizer: {len(tokenizer)} tokens; training stream {stream.numel():,} tokens "
        f"({len(data.train_texts)} documents); held out: {len(data.heldout)} docstring documents, "
        f"{len(data.synthetic)} Markov documents")

    summary = {
        "seed": cfg.seed,
        "config": _jsonable(asdict(cfg)),
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "xent": xent.__version__, "threads": torch.get_num_threads()},
        "data": {
            "train_documents": len(data.train_texts), "train_tokens": stream.numel(),
            "heldout_documents": len(data.heldout), "synthetic_documents": len(data.synthetic),
            "markov_words": cfg.markov_words, "words_per_doc": cfg.words_per_doc,
            "entropy_rate_nats_per_word": data.source.entropy_rate,
            "files": {"heldout": "data/heldout.jsonl", "synthetic": "data/synthetic.jsonl"},
        },
        "objectives": {},
    }
    passage_doc, passage = _pick_passage(data.heldout)
    job = _Job(cfg, out, tokenizer, stream, eval_sets, data.heldout, data.synthetic, data.source, passage,
               progress and cfg.jobs == 1)
    passage_losses = {}
    workers = min(cfg.jobs, len(cfg.objectives))
    log(f"training {', '.join(cfg.objectives)}: {cfg.steps} steps of {cfg.batch_size}×{cfg.seq_len} "
        "tokens each" + (f", {workers} at a time" if workers > 1 else ""))
    for name, entry, losses in _map(job, cfg.objectives, cfg.jobs):
        summary["objectives"][name] = entry
        passage_losses[name] = losses
        log(f"  {name:<9} trained in {entry['train_cpu_seconds']:5.1f} CPU-s: "
            f"held-out ppl {entry['perplexity']:7.2f}, "
            f"synthetic KL {entry['synthetic_kl_nats_per_word']:.4f} nats/word")

    summary["baseline"] = compare_with_baseline(summary, data.synthetic)
    log("plotting")
    summary["passage"] = {"source": data.heldout_sources[passage_doc], "text": passage,
                          "tokens": passage_losses[cfg.objectives[0]]["tokens"]}
    summary["total_seconds"] = time.perf_counter() - t_start
    # CPU time of this process and its finished workers: the wall time on an idle machine, times the
    # parallelism (about 1 with jobs=1)
    summary["total_cpu_seconds"] = _cpu_seconds() - cpu_start
    summary["files"] = _report.write_all(out, summary, passage_losses, tokenizer, data, cfg)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(json_safe(summary), f, indent=1, allow_nan=False)
    return summary


@dataclass
class _Job:
    """Everything one objective's run needs; picklable, so it can go to a worker process."""

    cfg: DemoConfig
    out: str
    tokenizer: object
    stream: object  # the training token stream, a 1-D tensor
    eval_sets: dict
    heldout: list[str]
    synthetic: list[str]
    source: object
    passage: str
    progress: bool


def _map(job: _Job, names, jobs: int):
    """(name, summary entry, passage losses) per objective, in order; in ``jobs`` processes if > 1.

    Each run is independent and single-threaded, so the numbers do not depend on ``jobs``.
    """
    if jobs <= 1 or len(names) <= 1:
        yield from (_train_one(job, name) for name in names)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("spawn")  # no fork of a process that holds torch threads
    with ProcessPoolExecutor(max_workers=min(jobs, len(names)), mp_context=ctx) as pool:
        yield from pool.map(_train_one, [job] * len(names), names)


def _train_one(job: _Job, name: str):
    """Train, save and evaluate one objective (in this process or a worker)."""
    import torch
    from transformers.utils import logging as hf_logging

    import xent

    from ..training import OBJECTIVES
    from ._model import build_model

    cfg, tokenizer = job.cfg, job.tokenizer
    torch.set_num_threads(cfg.threads)
    hf_logging.disable_progress_bar()
    model = build_model(len(tokenizer), seq_len=cfg.seq_len, d_model=cfg.d_model, n_layer=cfg.n_layer,
                        n_head=cfg.n_head, eot_id=tokenizer.eos_token_id, seed=cfg.seed)
    cpu_start = time.process_time()  # this process's CPU time: the work, not the wait for a busy core
    result = xent.train(
        model, job.stream, objective=name, steps=cfg.steps, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
        lr=cfg.lr, min_lr=cfg.lr / 10, warmup_steps=cfg.warmup_steps, seed=cfg.seed,
        eval_every=cfg.eval_every, save_dir=os.path.join(job.out, "models", name), progress=job.progress,
        eval_data=job.eval_sets, tokenizer=tokenizer,
    )
    train_cpu = time.process_time() - cpu_start
    model.eval()
    heldout, heldout_docs = _evaluate_by_document(model, tokenizer, job.heldout, cfg.seq_len)
    synthetic, synthetic_docs = _evaluate_by_document(model, tokenizer, job.synthetic, cfg.seq_len)
    gap = synthetic_gap(synthetic, job.synthetic, job.source, synthetic_docs["doc_nll"])
    entry = {
        "description": OBJECTIVES[name][0],
        "loss": result.objective,
        "checkpoint": f"models/{name}",
        "train_seconds": result.seconds,  # wall clock: includes any wait for a core
        "train_cpu_seconds": train_cpu,
        "train_tokens": result.tokens,
        "final_train_loss": result.final_loss,
        "nll_mean": heldout.nll_mean,
        "perplexity": heldout.perplexity,
        "perplexity_ci95": heldout.perplexity_ci95,
        "bits_per_byte": heldout.bits_per_byte,
        "ece": heldout.ece,
        "synthetic_gap_bits_per_byte": gap["gap_bits_per_byte"],
        "synthetic_kl_nats_per_word": gap["kl_nats_per_word"],
        "synthetic_kl_nats_per_word_se": gap["kl_nats_per_word_se"],
        "heldout": {**_metrics(heldout), **heldout_docs},
        "synthetic": {**_metrics(synthetic), **gap, **synthetic_docs},
        "history": result.history,
        "eval_history": result.eval_history,
    }
    return name, entry, _token_losses(model, tokenizer, job.passage, cfg.seq_len)


def _evaluate_by_document(model, tokenizer, texts: list[str], max_length: int):
    """(xent.eval.evaluate's result, {"doc_nll": summed loss of each document in nats, "doc_tokens":
    its scored tokens}): the per-document sums are the evaluator's own, exact (multiples of 2^-32)."""
    import torch

    from ..eval import evaluate
    from ..eval._sums import SCALE, fixed

    sums = torch.zeros(len(texts), dtype=torch.int64)
    counts = torch.zeros(len(texts), dtype=torch.int64)

    def add(stats):
        sums.index_add_(0, stats["doc"], fixed(stats["loss"]))
        counts.index_add_(0, stats["doc"], torch.ones_like(stats["doc"]))

    result = evaluate(model, tokenizer, texts, max_length=max_length, on_tokens=add)
    return result, {"doc_nll": [k / SCALE for k in sums.tolist()], "doc_tokens": counts.tolist()}


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _pick_passage(texts: list[str]) -> tuple[int, str]:
    """(document index, paragraph): held-out prose (no doctest) for the per-token plot."""
    for i, t in enumerate(texts):
        for para in t.split("\n\n"):
            if 200 <= len(para) <= 400 and ">>>" not in para and para.count("\n") >= 2:
                return i, para
    return 0, texts[0][:300]


def word_cut(tokens: list[str], limit: int) -> int:
    """The largest k ≤ limit such that tokens[:k] ends at a word boundary (the next token starts with
    whitespace or punctuation, or the k-th ends with either, or nothing follows); limit if there is none."""
    if limit >= len(tokens):
        return len(tokens)

    def boundary(k: int) -> bool:
        before, after = tokens[k - 1][-1:], tokens[k][:1]
        return not (before.isalnum() or before == "_") or not (after.isalnum() or after == "_")

    return next((k for k in range(limit, 0, -1) if boundary(k)), limit)


def _token_losses(model, tokenizer, text: str, seq_len: int) -> dict:
    """Per-token −log q_y (nats) of ``text`` after eot, in one window of ``seq_len``, cut at the end of a
    word (or of the text)."""
    import torch

    from ._model import tokenize_documents

    ids = tokenize_documents(tokenizer, [text])[0]
    tokens = [tokenizer.decode([i]) for i in ids[1:]]
    k = word_cut(tokens, seq_len - 1)
    x = torch.tensor([ids[: k + 1]])
    with torch.no_grad():
        logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits
        logp = torch.log_softmax(logits[0, :-1].float(), dim=-1)
    nll = -logp.gather(-1, x[0, 1:].unsqueeze(-1)).squeeze(-1)
    return {"tokens": tokens[:k], "nll": nll.tolist()}


def _jsonable(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
