"""``xent demo``: pre-train a tiny model with cross-entropy, fine-tune a copy of it with each objective
on another domain, evaluate, sample, plot, report.

Everything is built here, offline: the corpus (standard-library docstrings + a Markov source whose
entropy is known), the tokenizer, the models. Phase 1 trains one model with cross-entropy (the
"pre-trained" model: its LM head is EMO's cost embedding). Phase 2 fine-tunes a copy of it with each
objective on the target domain (docstrings of modules phase 1 never saw), from the same weights
(checked by hash) on the same batches, so the differences in the report are the objectives' own.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass

from ._compare import clustered_mean, compare_with_baseline, seeds_interval
from ._config import PRETRAINED, DemoConfig, runs


@dataclass
class DemoData:
    train_texts: list[str]  # phase 1: the training modules' docstrings and Markov text, interleaved (seeded)
    finetune_texts: list[str]  # phase 2: the target domain's fine-tuning documents
    heldout: list[str]  # the target domain's held-out documents
    heldout_sources: list[str]
    synthetic: list[str]  # held-out documents of the Markov source
    source: object  # the MarkovSource


def build_data(cfg: DemoConfig) -> DemoData:
    """The target domain is the docstrings of the held-out modules (every 5th module): phase 1 never
    sees them. Its documents, in source order, alternate between fine-tuning (even) and held out (odd)."""
    import torch

    from ._markov import MarkovSource
    from ._text import stdlib_documents

    natural_train, target = stdlib_documents()
    finetune, heldout = list(target[0::2]), list(target[1::2])
    if cfg.heldout_docs is not None:
        heldout = heldout[: cfg.heldout_docs]
    source = MarkovSource(num_words=cfg.markov_words, seed=cfg.seed)
    syn_train = source.sample(cfg.synthetic_train_docs, cfg.words_per_doc, seed=cfg.seed + 1)
    syn_eval = source.sample(cfg.synthetic_eval_docs, cfg.words_per_doc, seed=cfg.seed + 2)
    texts = [d.text for d in natural_train] + syn_train
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    return DemoData([texts[i] for i in order], [d.text for d in finetune], [d.text for d in heldout],
                    [d.source for d in heldout], syn_eval, source)


def _write_jsonl(path: str, texts: list[str]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")


def curve_sequences(tokenizer, texts: list[str], seq_len: int, *, with_documents: bool = False):
    """Every held-out document as training-loop sequences [S, seq_len] (−100 pads), for the curves.

    Document d is [eot, x_1 … x_n]; its sequences start every seq_len − 1 tokens and overlap by one, so
    each of the n tokens is predicted exactly once, from its own document only: the curves score the
    same tokens as the table. A sequence of seq_len inputs predicts seq_len − 1 of them, one fewer than
    the evaluator's windows of seq_len inputs (which also predict the next window's first token), so
    the contexts restart at other places and the last curve point is close to the table, not equal.
    With ``with_documents``: (sequences, the document index of each sequence).
    """
    import torch

    from ._model import tokenize_documents

    rows, owner = [], []
    for d, doc in enumerate(tokenize_documents(tokenizer, texts)):
        for start in range(0, len(doc) - 1, seq_len - 1):
            piece = doc[start : start + seq_len]
            rows.append(piece + [-100] * (seq_len - len(piece)))
            owner.append(d)
    seqs = torch.tensor(rows, dtype=torch.long)
    return (seqs, torch.tensor(owner, dtype=torch.long)) if with_documents else seqs


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


def _metrics(r) -> dict:
    keys = ("tokens", "documents", "bytes", "nll_mean", "nll_se_document", "perplexity", "perplexity_ci95",
            "bits_per_token", "bits_per_byte", "top1_accuracy", "ece", "brier", "entropy_mean", "calibration")
    d = r.to_dict()
    return {k: d[k] for k in keys}


def run_demo(out: str = "xent-demo", cfg: DemoConfig | None = None, *, log=print,
             progress: bool = True) -> dict:
    """Runs the demo into ``out`` and returns the summary (also written to ``out/summary.json``).

    With ``cfg.jobs > 1`` the fine-tuning runs go to spawned worker processes: call this from a script
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


def generation_pairs(tokenizer, texts: list[str], prefix_tokens: int, new_tokens: int,
                     per_doc: int) -> tuple[list[list[int]], list[list[int]], list[int]]:
    """(prefixes, true continuations, document index of each): each held-out document [eot, x_1 …] is cut
    into consecutive pieces of prefix_tokens + new_tokens tokens, at most ``per_doc`` of them (a partial
    last piece is dropped); a piece's first prefix_tokens are the prompt, the rest its true continuation."""
    from ._model import tokenize_documents

    prefixes, continuations, docs = [], [], []
    width = prefix_tokens + new_tokens
    for d, doc in enumerate(tokenize_documents(tokenizer, texts)):
        for k, start in enumerate(range(0, len(doc) - width + 1, width)):
            if k == per_doc:
                break
            prefixes.append(doc[start : start + prefix_tokens])
            continuations.append(doc[start + prefix_tokens : start + width])
            docs.append(d)
    return prefixes, continuations, docs


def _run(out: str, cfg: DemoConfig, log, progress: bool) -> dict:
    import torch

    import xent

    from ..eval._files import json_safe, state_dict_sha256
    from ..eval._generate import generation_stats
    from ..eval._mauve import feature_description, text_features
    from . import _report
    from ._model import build_model, tokenize_documents, train_tokenizer

    t_start, cpu_start = time.perf_counter(), _cpu_seconds()
    torch.manual_seed(cfg.seed)
    os.makedirs(os.path.join(out, "data"), exist_ok=True)
    os.makedirs(os.path.join(out, "models"), exist_ok=True)
    plan = runs(cfg)

    log(f"building the data: standard-library docstrings + a {cfg.markov_words}-word Markov source")
    data = build_data(cfg)
    _write_jsonl(os.path.join(out, "data", "heldout.jsonl"), data.heldout)
    _write_jsonl(os.path.join(out, "data", "synthetic.jsonl"), data.synthetic)
    _write_jsonl(os.path.join(out, "data", "finetune.jsonl"), data.finetune_texts)
    tokenizer = train_tokenizer(data.train_texts + data.finetune_texts, cfg.vocab_size)
    stream = torch.tensor([t for doc in tokenize_documents(tokenizer, data.train_texts) for t in doc])
    target = torch.tensor([t for doc in tokenize_documents(tokenizer, data.finetune_texts) for t in doc])
    eval_sets = {"heldout": curve_sequences(tokenizer, data.heldout, cfg.seq_len),
                 "synthetic": curve_sequences(tokenizer, data.synthetic, cfg.seq_len)}
    log(f"tokenizer: {len(tokenizer)} tokens; phase 1 (pre-training) stream {stream.numel():,} tokens "
        f"({len(data.train_texts)} documents); phase 2 (fine-tuning) stream {target.numel():,} tokens "
        f"({len(data.finetune_texts)} documents of the target domain); held out: {len(data.heldout)} target "
        f"documents, {len(data.synthetic)} Markov documents")

    summary = {
        "seed": cfg.seed,
        "config": _jsonable(asdict(cfg)),
        "runs": {name: {"objective": o, "options": opts} for name, (o, opts) in plan.items()},
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "xent": xent.__version__, "threads": torch.get_num_threads()},
        "data": {
            "train_documents": len(data.train_texts), "train_tokens": stream.numel(),
            "finetune_documents": len(data.finetune_texts), "finetune_tokens": target.numel(),
            "heldout_documents": len(data.heldout), "synthetic_documents": len(data.synthetic),
            "markov_words": cfg.markov_words, "words_per_doc": cfg.words_per_doc,
            "entropy_rate_nats_per_word": data.source.entropy_rate,
            "files": {"heldout": "data/heldout.jsonl", "synthetic": "data/synthetic.jsonl",
                      "finetune": "data/finetune.jsonl"},
        },
        "objectives": {},
    }

    # -- phase 1: cross-entropy from scratch (in this process, one thread: the same weights for any --jobs)
    log(f"phase 1: pre-training with cross-entropy, {cfg.pretrain_steps} steps of "
        f"{cfg.pretrain_batch_size}×{cfg.seq_len} tokens")
    model = build_model(len(tokenizer), seq_len=cfg.seq_len, d_model=cfg.d_model, n_layer=cfg.n_layer,
                        n_head=cfg.n_head, eot_id=tokenizer.eos_token_id, seed=cfg.seed)
    cpu0 = time.process_time()
    result = xent.train(
        model, stream, objective="ce", steps=cfg.pretrain_steps, batch_size=cfg.pretrain_batch_size,
        seq_len=cfg.seq_len, lr=cfg.pretrain_lr, min_lr=cfg.pretrain_lr / 10,
        warmup_steps=cfg.pretrain_warmup_steps, seed=cfg.seed, eval_every=cfg.pretrain_steps // 4,
        save_dir=os.path.join(out, "models", PRETRAINED), progress=progress, eval_data=eval_sets,
        tokenizer=tokenizer, threads=cfg.threads, restore_best=False)  # see _run_one on restore_best
    pretrain_cpu = time.process_time() - cpu0
    model.eval()
    pretrained_sha = state_dict_sha256(model)

    # -- the generation set: held-out prefixes, the true continuations and their features
    prefixes, continuations, pair_docs = generation_pairs(tokenizer, data.heldout, cfg.prefix_tokens,
                                                          cfg.new_tokens, cfg.prefixes_per_doc)
    if len(prefixes) < 10:
        raise ValueError(f"only {len(prefixes)} held-out prefixes of {cfg.prefix_tokens}+{cfg.new_tokens} "
                         "tokens: too few for MAUVE (use more held-out documents or shorter pieces)")
    human_texts = [tokenizer.decode(c) for c in continuations]
    human_features = text_features(model, tokenizer, human_texts, max_length=cfg.seq_len)
    summary["generation"] = {
        "pairs": len(prefixes), "documents": len(set(pair_docs)), "prefix_tokens": cfg.prefix_tokens,
        "new_tokens": cfg.new_tokens, "temperature": 1.0, "top_p": 1.0,
        "sampling_seeds": [cfg.seed + 1000 + k for k in range(cfg.mauve_seeds)],
        "mauve_seeds": [cfg.seed + k for k in range(cfg.mauve_seeds)],
        "features": f"the phase-1 model (models/{PRETRAINED}): "
                    + feature_description(model, cfg.seq_len).split(": ", 1)[1],
        "reference": generation_stats(continuations),  # the true continuations' tokens
        "examples": [{"prefix": tokenizer.decode(prefixes[i]), "reference": human_texts[i]}
                     for i in range(3)],
    }
    del model

    # -- phase 2: each objective fine-tunes a copy of the phase-1 model; the pre-trained model is evaluated
    passage_doc, passage = _pick_passage(data.heldout)
    job = _Job(cfg, out, tokenizer, target, eval_sets, data.heldout, data.synthetic, data.source, passage,
               progress, plan, pretrained_sha, prefixes, human_features)
    names = list(plan) + [PRETRAINED]  # ce first: it also scans the temperature
    passage_losses = {}
    workers = min(cfg.jobs, len(names))
    log(f"phase 2: fine-tuning {', '.join(plan)} from the phase-1 weights: {cfg.steps} steps of "
        f"{cfg.batch_size}×{cfg.seq_len} tokens each; then {len(prefixes)} samples of {cfg.new_tokens} tokens"
        " "
        "per model, MAUVE" + (f"; {workers} at a time" if workers > 1 else ""))
    for name, entry, losses in _map(job, names, cfg.jobs):
        passage_losses[name] = losses
        g = entry["generation"]
        if name == PRETRAINED:
            summary[PRETRAINED] = {**entry, "train_cpu_seconds": pretrain_cpu,
                                   "train_seconds": result.seconds,
                                   "train_tokens": result.tokens, "final_train_loss": result.final_loss,
                                   "history": result.history, "eval_history": result.eval_history,
                                   "loss": result.objective, "sha256": pretrained_sha}
            log(f"  {name:<10} (phase 1, {pretrain_cpu:5.1f} CPU-s): held-out ppl "
                f"{entry['perplexity']:7.2f}, "
                f"MAUVE {g['mauve']:.3f}")
        else:
            summary["objectives"][name] = entry
            log(f"  {name:<10} fine-tuned in {entry['train_cpu_seconds']:5.1f} CPU-s: held-out ppl "
                f"{entry['perplexity']:7.2f}, Markov KL {entry['synthetic_kl_nats_per_word']:.4f} nats/word, "
                f"MAUVE {g['mauve']:.3f}")
        if entry["initial_sha256"] != pretrained_sha:
            raise RuntimeError(f"{name} did not start from the phase-1 weights")

    summary["baseline"] = compare_with_baseline(summary, data.synthetic)
    from ._claims import claims, sanity_checks

    summary["claims"] = claims(summary)
    summary["sanity_checks"] = sanity_checks(summary)
    log("plotting")
    summary["passage"] = {"source": data.heldout_sources[passage_doc], "text": passage,
                          "tokens": passage_losses[names[0]]["tokens"]}
    passage_losses = {n: passage_losses[n] for n in [PRETRAINED, *plan]}
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
    """Everything one model's run needs; picklable, so it can go to a worker process."""

    cfg: DemoConfig
    out: str
    tokenizer: object
    stream: object  # phase 2's training token stream, a 1-D tensor
    eval_sets: dict
    heldout: list[str]
    synthetic: list[str]
    source: object
    passage: str
    progress: bool
    plan: dict
    pretrained_sha: str
    prefixes: list
    human_features: object  # [pairs, D] numpy features of the true continuations


def _map(job: _Job, names, jobs: int):
    """(name, summary entry, passage losses) per run, in order; in ``jobs`` processes if > 1.

    Each run is independent and single-threaded, so the numbers do not depend on ``jobs``.
    """
    if jobs <= 1 or len(names) <= 1:
        yield from (_run_one(job, name) for name in names)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("spawn")  # no fork of a process that holds torch threads
    with ProcessPoolExecutor(max_workers=min(jobs, len(names)), mp_context=ctx) as pool:
        yield from pool.map(_run_one, [job] * len(names), names)


def _load_pretrained(job: _Job):
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(os.path.join(job.out, "models", PRETRAINED), use_safetensors=True)


def _run_one(job: _Job, name: str):
    """Fine-tune (unless ``name`` is the pre-trained model), save, evaluate, sample and score one model
    (in this process or a worker)."""
    import torch
    from transformers.utils import logging as hf_logging

    import xent

    from ..eval._files import state_dict_sha256
    from ..training import OBJECTIVES

    cfg, tokenizer = job.cfg, job.tokenizer
    torch.set_num_threads(cfg.threads)
    hf_logging.disable_progress_bar()
    features_model = _load_pretrained(job).eval()  # MAUVE's feature model: the phase-1 model, untouched
    model = _load_pretrained(job)
    entry = {"initial_sha256": state_dict_sha256(model)}
    cpu_start = time.process_time()  # this process's CPU time: the work, not the wait for a busy core
    if name != PRETRAINED:
        objective, options = job.plan[name]
        # restore_best=False: every objective trains the same steps, and the curves' held-out documents
        # are the table's, so choosing weights by them would select on the test set
        result = xent.train(
            model, job.stream, objective=objective, objective_options=options, steps=cfg.steps,
            batch_size=cfg.batch_size, seq_len=cfg.seq_len, lr=cfg.lr, min_lr=cfg.lr / 10,
            warmup_steps=cfg.warmup_steps, seed=cfg.seed + 1, eval_every=cfg.eval_every,
            save_dir=os.path.join(job.out, "models", name), progress=job.progress, eval_data=job.eval_sets,
            tokenizer=tokenizer, threads=cfg.threads, restore_best=False,
            ref_model=features_model if objective == "rho1" else None,  # Rho-1's reference: phase 1's
        )
        desc = OBJECTIVES[objective][0]
        if options:
            desc = f"{desc.split(', γ')[0]}, γ = {options['gamma']:g}, b = 0.3"
        entry.update({
            "description": desc,
            "loss": result.objective,
            "checkpoint": f"models/{name}",
            "train_seconds": result.seconds,  # wall clock: includes any wait for a core
            "train_cpu_seconds": time.process_time() - cpu_start,
            "train_tokens": result.tokens,
            "final_train_loss": result.final_loss,
            "history": result.history,
            "eval_history": result.eval_history,
        })
    else:
        entry.update({"description": "the phase-1 model (cross-entropy from scratch), not fine-tuned",
                      "checkpoint": f"models/{PRETRAINED}"})
    model.eval()
    if job.progress:  # what runs next takes a while and prints nothing of its own
        import sys

        print(f"  {name}: evaluating, sampling {cfg.mauve_seeds} × {len(job.prefixes)} continuations, MAUVE",
              file=sys.stderr, flush=True)
    heldout, heldout_docs = _evaluate_by_document(model, tokenizer, job.heldout, cfg.seq_len)
    synthetic, synthetic_docs = _evaluate_by_document(model, tokenizer, job.synthetic, cfg.seq_len)
    gap = synthetic_gap(synthetic, job.synthetic, job.source, synthetic_docs["doc_nll"])
    entry.update({
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
    })
    entry["generation"] = _generate_and_score(job, model, features_model, 1.0)
    if name == "ce":
        entry["temperature"] = _temperature_study(job, model, features_model)
    entry["eval_cpu_seconds"] = time.process_time() - cpu_start - entry.get("train_cpu_seconds", 0.0)
    return name, entry, _token_losses(model, tokenizer, job.passage, cfg.seq_len)


def _generate_and_score(job: _Job, model, features_model, temperature: float) -> dict:
    """``mauve_seeds`` sets of samples for the held-out prefixes (seed k: the same random stream for every
    model, so the differences are paired), the MAUVE of each against the true continuations (features
    from the phase-1 model; k-means seeded by k too), their mean with a 95 % t interval, and the first
    set's repetition and distinct-n."""
    import torch

    from ..eval._generate import generation_stats, sample_continuations
    from ..eval._mauve import mauve_from_features, text_features

    cfg, tok = job.cfg, job.tokenizer
    scores, first = [], None
    for k in range(cfg.mauve_seeds):
        samples = sample_continuations(model, torch.tensor(job.prefixes), max_new_tokens=cfg.new_tokens,
                                       temperature=temperature, seed=cfg.seed + 1000 + k).tolist()
        texts = [tok.decode(s) for s in samples]
        q = text_features(features_model, tok, texts, max_length=cfg.seq_len)
        r = mauve_from_features(job.human_features, q, seed=cfg.seed + k)
        scores.append(r.mauve)
        if first is None:
            first = {**generation_stats(samples), "examples": texts[:3]}
    return {"temperature": temperature, "mauve": math.fsum(scores) / len(scores), "mauve_by_seed": scores,
            "mauve_ci95": seeds_interval(scores), "mauve_num_buckets": r.num_buckets, **first}


TEMPERATURE_GRID = tuple(round(0.5 + 0.05 * i, 2) for i in range(31))  # 0.5, 0.55, …, 2.0


def _temperature_study(job: _Job, model, features_model) -> dict:
    """The ce model on the held-out target text as the temperature τ varies: mean loss, entropy and ECE
    of softmax(z/τ) (every token scored once, in the curves' sequences), the fitted T*, the per-document
    summed entropy at τ = 0.5, 1 and 2 (for the claims' paired differences), and samples at
    cfg.sample_temperatures with their MAUVE."""
    import torch

    from ._temperature import fit_temperature, temperature_scan, token_stats_at

    cfg = job.cfg
    seqs, owner = curve_sequences(job.tokenizer, job.heldout, cfg.seq_len, with_documents=True)
    zs, ys, ds = [], [], []
    with torch.no_grad():
        for s in range(0, len(seqs), 32):
            x = seqs[s : s + 32]
            logits = model(input_ids=x.clamp(min=0), attention_mask=(x != -100).long()).logits[:, :-1]
            y = x[:, 1:]
            keep = y != -100
            zs.append(logits[keep].float())
            ys.append(y[keep])
            ds.append(owner[s : s + 32, None].expand_as(y)[keep])
    z, y, d = torch.cat(zs), torch.cat(ys), torch.cat(ds)
    t_star = fit_temperature(z, y)
    scan = temperature_scan(z, y, TEMPERATURE_GRID)
    at_star = temperature_scan(z, y, [t_star])[0]
    doc_entropy, doc_tokens = {}, torch.bincount(d, minlength=len(job.heldout)).tolist()
    for tau in (0.5, 1.0, 2.0):
        ent = token_stats_at(z, y, tau)["entropy"]
        sums = torch.zeros(len(job.heldout), dtype=torch.float64).index_add_(0, d, ent)
        doc_entropy[f"{tau:g}"] = sums.tolist()
    samples = {f"{t:g}": _generate_and_score(job, model, features_model, t) for t in cfg.sample_temperatures}
    return {"tokens": int(len(y)), "t_star": t_star, "scan": scan, "at_t_star": at_star,
            "doc_entropy": doc_entropy, "doc_tokens": doc_tokens, "samples": samples}


def _evaluate_by_document(model, tokenizer, texts: list[str], max_length: int):
    """(xent.eval.evaluate's result, {"doc_nll": summed loss of each document in nats, "doc_tokens":
    its scored tokens, "doc_overconfidence": Σ (top-1 probability − [top-1 is right]) over its tokens}):
    the per-document loss sums are the evaluator's own, exact (multiples of 2^-32)."""
    import torch

    from ..eval import evaluate
    from ..eval._sums import SCALE, fixed

    sums = torch.zeros(len(texts), dtype=torch.int64)
    counts = torch.zeros(len(texts), dtype=torch.int64)
    over = torch.zeros(len(texts), dtype=torch.float64)

    def add(stats):
        sums.index_add_(0, stats["doc"], fixed(stats["loss"]))
        counts.index_add_(0, stats["doc"], torch.ones_like(stats["doc"]))
        over.index_add_(0, stats["doc"], stats["top1_prob"].double() - (stats["rank"] == 1).double())

    result = evaluate(model, tokenizer, texts, max_length=max_length, on_tokens=add)
    return result, {"doc_nll": [k / SCALE for k in sums.tolist()], "doc_tokens": counts.tolist(),
                    "doc_overconfidence": over.tolist()}


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
