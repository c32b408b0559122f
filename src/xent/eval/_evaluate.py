"""``xent.eval.evaluate``: a causal LM's cross-entropy on a stream of documents."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

from . import _distributed as dist
from . import _files
from ._data import Corpus
from ._errors import EvalError
from ._options import OptionError, RunOptions, check_options, resolve_options
from ._rundir import RunDir
from ._runner import Runner, eval_mode
from ._sums import Totals


@dataclass
class EvalResult:
    """Corpus-level metrics (REFERENCE.md §4); ``to_dict()`` is summary.json.

    nll_mean is in nats per scored token; nll_se_token is s/√N (tokens independent, as llama.cpp
    prints) and nll_se_document the document-clustered SE; perplexity_ci95 = e^(L̄ ± 1.96·SE_doc).
    bytes and words are those of the scored text, and bits_per_byte = Σℓ / (bytes · ln 2),
    byte_perplexity = 2^bits_per_byte, word_perplexity = e^(Σℓ / words). Where every token of a
    document is scored (bos "first" or "every", the lm-eval preset) that is the whole document: its
    UTF-8 bytes, and its words as str.split() counts them (lm-eval: len(re.split(r"\\s+", text)), and
    the lm-eval preset also counts an empty document's one word). Where some are not (bos "none": the
    first token; the llama.cpp and transformers presets: the unscored parts of each window) only the
    scored tokens' text counts: each token stands for the characters between its offsets' boundaries
    (_data.token_text_sizes) and a word counts with the token holding its first character. Without
    character offsets (a slow tokenizer) bytes and words are None, the three metrics NaN (null in
    summary.json), and ``bytes_omitted`` says why.
    ece: 15 equal-width bins of the top-1 probability vs top-1 correctness.
    brier: the multi-class Brier score Σ_c (q_c − [c = y])², in [0, 2], averaged over tokens.
    nll_by_position: mean loss per bucket of context length [start, end) in tokens (BOS included).
    calibration: the 15 bins (tokens, mean confidence, accuracy) of the reliability diagram.
    temperature_fit (fit_temperature=True): {"temperature": T*, "nll_mean", "ece", "entropy_mean",
    "brier", "top1_accuracy", "passes"} at T*; the other metrics are those at T = 1.
    """

    tokens: int
    documents: int
    bytes: int | None
    words: int | None
    nll_mean: float
    nll_se_token: float
    nll_se_document: float
    perplexity: float
    perplexity_ci95: list[float]
    bits_per_token: float
    bits_per_byte: float
    byte_perplexity: float
    word_perplexity: float
    top1_accuracy: float
    top5_accuracy: float
    entropy_mean: float
    ece: float
    brier: float
    nll_by_position: list[dict]
    calibration: list[dict]
    skipped_empty: int
    skipped_unscored: int
    invalid_utf8: int = 0
    bytes_omitted: str | None = None
    config: dict = field(default_factory=dict)
    model_sha256: str | None = None
    data_sha256: str | None = None
    per_file: dict[str, dict] | None = None
    temperature_fit: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate(
    model,
    tokenizer,
    documents: Iterable[str] | Corpus,
    *,
    max_length: int | None = None,
    stride: int | None = None,
    bos: str | None = None,
    preset: str | None = None,
    batch_size: int = 8,
    padding_side: str = "right",
    checkpoint_every: int = 100,
    checkpoint_dir: str | None = None,
    resume: bool = False,
    per_token: bool = False,
    html: bool = False,
    progress: Callable[[int], None] | None = None,
    on_tokens: Callable[[dict], None] | None = None,
    on_checkpoint: Callable[[int], None] | None = None,
    model_sha256: str | None = None,
    data_sha256: str | None = None,
    extra_config: dict | None = None,
    stop_after: int | None = None,
    head: str = "auto",
    temperature: float = 1.0,
    fit_temperature: bool = False,
    save_base: str | None = None,
) -> EvalResult:
    """Cross-entropy of a causal LM on documents, with every metric of REFERENCE.md §4.

    Args:
        model: a transformers causal LM (any dtype/device; the softmax is computed in float32), run in
            eval mode (no dropout) and given back in the mode it came in.
        tokenizer: its tokenizer; documents are encoded without special tokens, BOS is added per ``bos``.
        documents: an iterable of strings (consumed lazily, once) or a :class:`Corpus` (several files:
            then ``per_file`` holds each file's metrics).
        max_length: inputs per window (default: the model's context). stride: window step (default
            max_length). bos: "first" | "every" | "none" (default "first" if the tokenizer has a BOS).
            preset: "lm-eval", "llama.cpp" or "transformers" (see xent.eval._options). See
            xent.eval._windows for the exact windowing.
        batch_size, padding_side: change speed, not results (a model whose logits change with them is
            run without padding, or a window at a time: see ``head``).
        checkpoint_every: documents per chunk. With ``checkpoint_dir`` (the run's directory, made if
            missing) the exact totals are saved to ``checkpoint_dir/checkpoint.json`` after each chunk;
            when every document is scored, ``summary.json`` (``to_dict()`` of the result) is written and
            the checkpoint removed. An interruption (Ctrl-C, a full disk, any exception but EvalError)
            keeps the checkpoint (the exception's ``__notes__`` name it), and ``resume=True`` continues
            from it: the result is that of an uninterrupted run, bit for bit (no checkpoint: it starts
            from the first document). Bad input (EvalError) removes what the run wrote, unless it
            resumed. A checkpoint resumes only the same model, data and options (its fingerprint:
            content hashes and options, not paths, device or batch size; EvalError otherwise).
        per_token: also write ``checkpoint_dir/tokens.parquet``, one row per scored token (doc,
            position, token_id, token, loss, entropy, rank, top1_prob), in corpus order; across a resume
            too. html: also write ``checkpoint_dir/report.html`` with its plots (needs matplotlib).
        progress(tokens), on_tokens(per-token dict): called after each batch; on_checkpoint(next
            document index) after each chunk, before the checkpoint is saved.
        model_sha256: recorded as is; by default the SHA-256 of the model's state dict (which copies
            the weights to the CPU once: pass any string to skip it). data_sha256 likewise (a Corpus
            hashes its files). extra_config: recorded in ``config`` (and the checkpoint's fingerprint).
        stop_after: stop after the chunk holding document ``stop_after - 1``, as an interruption would
            (the checkpoint is kept, nothing else written), and return the result so far: to test
            resuming.
        head: "auto" (default): the decoder, then the output embeddings applied to the scored positions
            only, a chunk at a time (no [B, T, V] logits), when that reproduces the model's forward on
            every position of the first batch (within the rounding of the forward's dtype) and the
            config names no transform of the logits that the head does not apply; otherwise the model's
            own forward, with a note on stderr. "fused": the fused head; EvalError when the check shows
            a difference. "forward": always the model's own forward. Whatever the head, a token's
            numbers are those of ``model(input_ids=window).logits`` on its window alone: a model whose
            logits change with the position ids, the padding or the batch (RoBERTa's positions, the
            recurrent state of RWKV or xLSTM running through pad tokens) is run without them, with a
            note (see xent.eval._head). The head used is recorded as ``config["head"]``, the notes as
            ``config["head_notes"]``.
        temperature: score softmax(z / T), z the model's final logits (after its soft-capping).
        fit_temperature: also find T* = argmin_T Σ_t ℓ_t(z_t / T) over the corpus (temperature scaling:
            Newton's method on 1/T, the NLL being convex in it) and report the NLL, ECE, entropy and
            Brier at T* in ``temperature_fit`` beside those at T = 1. Keeps the scored hidden states
            (tokens × hidden size in the model's dtype, on the CPU) for the few passes of the fit; needs
            the fused head, temperature 1 and no resume.
        save_base: a directory (new, or empty) where the model is kept as a base for
            ``compare(..., base_cache=DIR)``: its final hidden states at the scored positions (model
            dtype), its output embeddings and final-logit transform, and a manifest of what fixes them
            (see xent.eval._base_cache). Needs the fused head, one process and no resume; the states are
            held in memory until the end.

    Under torch.distributed every rank forms the batches one process would and runs every world-th of
    them (so the numbers do not depend on the number of ranks); every rank returns the pooled result
    and keeps a checkpoint of its own (rank 0 writes the outputs).

    Raises EvalError (a ValueError) for bad input: an option (before any work, the message naming it by
    its keyword, which the error's ``options`` attribute lists), a document, a checkpoint of another
    run, no token to score in the whole corpus; and when the model gives a non-finite per-token value
    (nothing is summed; the message names how many tokens of the batch are affected and the first
    document and position).

    Example:
        >>> r = xent.eval.evaluate(model, tokenizer, ["Some text.", "More text."], max_length=512)
        >>> r.nll_mean, r.perplexity, r.nll_se_document  # doctest: +SKIP
    """
    window = dict(max_length=max_length, stride=stride, bos=bos, preset=preset, batch_size=batch_size,
                  padding_side=padding_side, checkpoint_every=checkpoint_every)
    run = check_options(**window, checkpoint_dir=checkpoint_dir, resume=resume, per_token=per_token,
                        html=html, head=head, temperature=temperature, fit_temperature=fit_temperature,
                        save_base=save_base, stop_after=stop_after)
    opts = resolve_options(model, tokenizer, **window)
    rank, world = dist.rank_and_world()
    if save_base is not None and world > 1:
        raise OptionError("{0} needs one process (no torch.distributed): the cache holds every batch's "
                          "states in run order", "save_base")
    corpus = documents if isinstance(documents, Corpus) else None
    names = corpus.paths if corpus is not None else ["<documents>"]
    runner = Runner(model, tokenizer, opts, len(names), rank=rank, world=world, head=head,
                    temperature=temperature, keep_hidden=fit_temperature or save_base is not None)
    if model_sha256 is None:
        model_sha256 = _files.state_dict_sha256(model)
    if data_sha256 is None and corpus is not None:
        data_sha256 = corpus.sha256()
    config = {**opts.config(), "world_size": world, **(extra_config or {}), "per_token": bool(run.per_token),
              "html": bool(run.html)}
    if temperature != 1.0:
        config["temperature"] = float(temperature)
    out = None
    if checkpoint_dir is not None:
        # what fixes the numbers and the outputs: options and content hashes, not paths, device or
        # batch size
        fingerprint = {"config": {k: v for k, v in config.items()
                                  if k not in ("batch_size", "device", "model", "data")},
                       "model_sha256": model_sha256, "data_sha256": data_sha256}
        out = RunDir(checkpoint_dir, fingerprint, rank=rank, resume=resume, per_token=per_token, html=html,
                     tokenizer=tokenizer)
    with out if out is not None else contextlib.nullcontext():  # see _rundir: what an error leaves
        result, stopped = _run(runner, documents, corpus, names, run, out, progress=progress,
                               on_tokens=on_tokens, on_checkpoint=on_checkpoint, config=config,
                               model_sha256=model_sha256, data_sha256=data_sha256)
        if out is not None and not stopped:
            out.finish(result.to_dict())
    return result


def _run(runner: Runner, documents, corpus: Corpus | None, names: list[str], run: RunOptions,
         out: RunDir | None, *, progress, on_tokens, on_checkpoint, config: dict, model_sha256, data_sha256):
    """(the pooled result, whether ``stop_after`` stopped the run): the scoring of evaluate, resumed
    from ``out``'s checkpoint if it has one and checkpointed into it."""
    opts, rank, world, tokenizer = runner.opts, runner.rank, runner.world, runner.tokenizer
    stream = document_stream(documents, opts.preset)
    if run.save_base is not None:
        from . import _base_cache

        stream = _base_cache.TextHash(stream)
    start, ends = 0, [0]
    state = out.start() if out is not None else None
    if state is not None:
        start, runner.totals = _restore(state, opts, len(names), rank, world, out.checkpoint)

    def on_chunk(next_doc: int) -> None:
        ends[0] = next_doc
        if on_checkpoint is not None:
            on_checkpoint(next_doc)
        if out is not None:
            out.save(next_doc, {"totals": [t.state() for t in runner.totals]})

    def add_tokens(stats: dict) -> None:
        if out is not None:
            out.add_tokens(stats)
        if on_tokens is not None:
            on_tokens(stats)

    seen = _Counted(stream)
    with eval_mode(runner.model):
        runner.run(seen, start=start, on_chunk=on_chunk, on_tokens=add_tokens, progress=progress,
                   stop_after=run.stop_after)
    stopped = run.stop_after is not None and ends[0] >= run.stop_after
    if seen.exhausted and (seen.count < start or (start % opts.checkpoint_every and seen.count != start)):
        raise EvalError(f"{out.checkpoint} says {start} documents are done but the data has {seen.count}: "
                        "it belongs to other data; remove it and drop --resume")
    config["head"] = runner.head.kind
    if runner.head.notes:
        config["head_notes"] = list(runner.head.notes)
    if run.save_base is not None:
        _base_cache.save(run.save_base, runner.head, [k.hidden for k in runner.kept], {
            "tokenizer_sha256": _base_cache.tokenizer_sha256(tokenizer), "texts_sha256": stream.hexdigest(),
            "data_sha256": data_sha256, "options": opts.config(), "base_model_sha256": model_sha256})
        if not run.fit_temperature:
            runner.kept.clear()
    fitted = _fit_temperature(runner) if run.fit_temperature else None
    gathered = dist.all_gather([t.state() for t in runner.totals])
    per_file_totals = [Totals(opts.max_length) for _ in names]
    for states in gathered:
        for acc, s in zip(per_file_totals, states):
            acc.merge(Totals.from_state(s))
    pooled = Totals(opts.max_length)
    for t in per_file_totals:
        pooled.merge(t)
    invalid = corpus.invalid_utf8 if corpus is not None else 0  # every rank reads the whole corpus
    per_file = None
    if len(names) > 1:
        per_file = {name: t.metrics() for name, t in zip(names, per_file_totals)}
    omitted = None
    if pooled.bytes_unknown:
        omitted = (f"{type(tokenizer).__name__} gives no character offsets (not a fast tokenizer), so the "
                   f"bytes and words of the scored part of {pooled.bytes_unknown} partly scored documents "
                   "cannot be counted: bits per byte and word perplexity are omitted")
    result = _result(pooled.metrics(), invalid_utf8=invalid, bytes_omitted=omitted, config=config,
                     model_sha256=model_sha256, data_sha256=data_sha256, per_file=per_file,
                     temperature_fit=fitted)
    if result.tokens == 0 and not stopped:
        where = " ".join(corpus.paths) if corpus is not None else "the documents"
        raise EvalError(f"no tokens to score in {where}: {result.skipped_empty} empty and "
                        f"{result.skipped_unscored} too-short documents{too_short_note(result.to_dict())}")
    return result, stopped


def _fit_temperature(runner: Runner) -> dict:
    """temperature_fit of the result: T* and the metrics at T* over every rank's kept states."""
    from ._temperature import fit_temperature as fit
    from ._temperature import totals_at

    max_length = runner.opts.max_length
    with eval_mode(runner.model):
        t_star, passes = fit(runner.head, runner.kept)
        at = Totals(max_length)
        mine = totals_at(runner.head, runner.kept, t_star, max_length)
        for state in dist.all_gather(mine.state()):
            at.merge(Totals.from_state(state))
    runner.kept.clear()
    m = at.metrics()
    return {"temperature": t_star, **{k: m.get(k, math.nan) for k in
                                      ("nll_mean", "ece", "entropy_mean", "brier", "top1_accuracy")},
            "passes": passes}


def too_short_note(summary: dict) -> str:
    """Under preset llama.cpp, why documents went unscored (llama-perplexity refuses short texts)."""
    cfg = summary["config"]
    if cfg.get("preset") != "llama.cpp" or not summary["skipped_unscored"]:
        return ""
    return (f" (--preset llama.cpp: fewer than 2 × {cfg['max_length']} tokens, which llama-perplexity "
            "refuses)")


def document_stream(documents: Iterable[str] | Corpus, preset: str | None):
    """(file index, text) of each document. ``--preset llama.cpp`` reads a whole .txt file as
    ``llama-perplexity -f`` does: one trailing newline is dropped (llama.cpp's common argument parser)."""
    if not isinstance(documents, Corpus):
        return texts(documents)
    if preset != "llama.cpp" or documents.split != "none":
        return iter(documents)
    return ((file, text[:-1] if documents.formats[file] == "txt" and text.endswith("\n") else text)
            for file, text in documents)


class _Counted:
    """An iterator that counts what it yields and notes whether its source ran out."""

    def __init__(self, items):
        self.items, self.count, self.exhausted = iter(items), 0, False

    def __iter__(self):
        return self

    def __next__(self):
        try:
            item = next(self.items)
        except StopIteration:
            self.exhausted = True
            raise
        self.count += 1
        return item


def _restore(state: dict, opts, n_files: int, rank: int, world: int, path: str):
    """(next document, per-file Totals) from a checkpoint, after checking that they fit together:
    the next document is a positive integer, a multiple of checkpoint_every unless it is the corpus
    end (checked after the run), and the totals count exactly this rank's documents before it."""
    damaged = f"{path} is damaged"
    start = state.get("next_document")
    if isinstance(start, bool) or not isinstance(start, int) or start < 1:
        raise EvalError(f"{damaged} (next_document {start!r} is not a positive integer): remove it and "
                        "drop --resume")
    saved = state.get("totals")
    template = Totals(opts.max_length).state()
    if not isinstance(saved, list) or len(saved) != n_files or not all(_fits(s, template) for s in saved):
        raise EvalError(f"{damaged} (its totals are not those of {n_files} data file(s)): remove it and "
                        "drop --resume")
    counted = sum(s["documents"] + sum(v for k, v in s.items() if k.startswith("skipped_")) for s in saved)
    mine = len(range(rank, start, world))
    if counted != mine:
        raise EvalError(f"{damaged} (its totals count {counted} documents, next_document {start} means "
                        f"{mine}): remove it and drop --resume")
    return start, [Totals.from_state(s) for s in saved]


def _fits(saved, template: dict) -> bool:
    """saved has template's keys, with integers where it has integers and lists of as many integers."""
    if not isinstance(saved, dict) or set(saved) != set(template):
        return False
    for k, t in template.items():
        v = saved[k]
        if isinstance(t, list):
            if not isinstance(v, list) or len(v) != len(t) or not all(_is_int(x) for x in v):
                return False
        elif not _is_int(v) or (k == "max_length" and v != t):
            return False
    return True


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def texts(documents: Iterable[str]):
    """(0, text) for each document of an in-memory iterable, checking that each is a string."""
    if isinstance(documents, (str, bytes)):
        raise EvalError("documents must be an iterable of strings, not a single string")
    for i, text in enumerate(documents):
        if not isinstance(text, str):
            raise EvalError(f"document {i} is {type(text).__name__}, not a string")
        yield 0, text


def _result(metrics: dict, **extra) -> EvalResult:
    """EvalResult from Totals.metrics(); NaN for metrics that need tokens when there are none."""
    names = [f for f in EvalResult.__dataclass_fields__ if f not in extra]
    values = {name: metrics.get(name, math.nan) for name in names}
    for name in ("nll_by_position", "calibration", "perplexity_ci95"):
        if not isinstance(values[name], list):
            values[name] = []
    for name in ("skipped_empty", "skipped_unscored"):
        values[name] = metrics.get(name, 0)
    return EvalResult(**values, **extra)
