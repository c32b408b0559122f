"""The evaluation loop: documents in, exact totals out, in chunks of ``checkpoint_every`` documents.

Documents are numbered in corpus order; chunk k holds documents [kK, (k+1)K). A chunk is tokenized,
cut into windows, its windows sorted by length (so that a batch holds windows of similar lengths),
scored in batches and folded into the totals; then ``on_chunk`` may checkpoint. Batches never cross a
chunk boundary, so a run resumed at a chunk boundary computes exactly the same batches
as an uninterrupted one.

Data parallelism: every rank forms the chunk's batches exactly as one process does and rank r runs
batches r, r + world, r + 2·world, ... Each batch is then the very forward pass one process runs, so the
per-token values, and with them the integer totals, do not depend on the number of ranks (the batch
composition would change the float rounding of the logits). At the end of a chunk the ranks exchange
each document's partial sums (and any error, so that all stop together); document d is counted by rank
d mod world.

A non-finite per-token value (NaN or ±inf: a broken model) is never summed: the batch raises EvalError
naming how many of its tokens are affected and the first document and position.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from . import _data
from . import _distributed as dist
from ._errors import EvalError
from ._head import ModelHead
from ._options import Options
from ._score import batch_token_stats, collate
from ._sums import Totals, fixed
from ._windows import llama_cpp_windows, sliding_windows, transformers_windows


def document_windows(ids: list[int], opts: Options):
    if opts.preset == "llama.cpp":
        return llama_cpp_windows(ids, max_length=opts.max_length, bos_id=opts.bos_id)
    if opts.preset == "transformers":
        return transformers_windows(ids, max_length=opts.max_length, stride=opts.stride, bos_id=opts.bos_id)
    return sliding_windows(ids, max_length=opts.max_length, stride=opts.stride, bos=opts.bos,
                           bos_id=opts.bos_id, extend_last=opts.extend_last)


@contextlib.contextmanager
def eval_mode(*models):
    """Models in eval mode (no dropout) for the block, their training flags restored after."""
    flags = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, flag in zip(models, flags):
            m.train(flag)


def _chunks(docs: Iterable[tuple[int, str]], size: int):
    chunk: list[tuple[int, int, str]] = []
    for index, (file, text) in enumerate(docs):
        chunk.append((index, file, text))
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@dataclass
class Doc:
    """A document with something to score, while its chunk is scored."""

    index: int  # in corpus order
    file: int
    size: tuple[int, int] | None  # (UTF-8 bytes, words) of its scored text; None: cannot be counted
    nll: int = 0  # Σ loss, fixed point (this rank's batches until the chunk's exchange)
    n: int = 0  # tokens scored (likewise)
    sums: list[int] = field(default_factory=list)  # a scorer's other per-document sums (likewise)


def check_finite(values: dict[str, torch.Tensor], doc: torch.Tensor, position: torch.Tensor) -> None:
    """EvalError unless every per-token value [N] is finite: names the values, how many of the batch's
    tokens are affected, and the first (document, position) in corpus order."""
    bad = torch.zeros(doc.shape, dtype=torch.bool)
    names = []
    for name, v in values.items():
        nonfinite = ~torch.isfinite(v)
        if bool(nonfinite.any()):
            bad |= nonfinite
            names.append(name)
    if names:
        first = min(zip(doc[bad].tolist(), position[bad].tolist()))
        raise EvalError(f"non-finite {', '.join(names)} (NaN or ±inf) at {int(bad.sum())} of the "
                        f"{len(doc)} tokens of a batch, the first at document {first[0]} token {first[1]} "
                        "(0-based): the model's logits are not finite; nothing was summed")


class ChunkedScorer:
    """The loop shared by evaluate and compare: chunks of documents, tokenized, windowed, batched.
    Subclasses score one batch (``_score_batch``), count a skipped document (``_count_skip``) and
    a finished one (``_finish``)."""

    offsets = False  # ask a fast tokenizer for character offsets (to count the scored text)

    def __init__(self, tokenizer, opts: Options, *, rank: int = 0, world: int = 1):
        self.tokenizer, self.opts = tokenizer, opts
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.rank, self.world = rank, world

    def run(
        self,
        docs: Iterable[tuple[int, str]],
        *,
        start: int = 0,
        on_chunk: Callable[[int], None] | None = None,
        on_tokens: Callable[[dict], None] | None = None,
        progress: Callable[[int], None] | None = None,
        stop_after: int | None = None,
    ) -> None:
        """Score every document with index ≥ start. on_chunk(next index) after each chunk;
        on_tokens(per-token dict with "doc") after each batch; progress(tokens) after each batch.
        stop_after: return once that many documents (counted from 0) are done (to test resuming)."""
        K = self.opts.checkpoint_every
        for chunk in _chunks(docs, K):
            end = chunk[-1][0] + 1
            if end <= start:
                continue
            docs_, items = self._prepare([c for c in chunk if c[0] >= start])
            self._score_chunk(docs_, items, on_tokens, progress)
            if on_chunk is not None:
                on_chunk(end)
            if stop_after is not None and end >= stop_after:
                return

    def _owns(self, index: int) -> bool:
        return index % self.world == self.rank

    def _prepare(self, chunk):
        """(docs, items): the Doc of each document with something to score; items = [(k, window)] in
        document order, k indexing docs."""
        items, docs = [], []
        ids, offsets = self._encode([text for _, _, text in chunk])
        for j, ((index, file, text), doc_ids) in enumerate(zip(chunk, ids)):
            blank = not text.strip()
            if blank and self.opts.preset != "lm-eval":  # lm-eval scores whitespace-only documents
                self._skip(index, file, "skipped_empty", text)
                continue
            windows = document_windows(doc_ids, self.opts)
            if not windows:
                self._skip(index, file, "skipped_empty" if blank else "skipped_unscored", text)
                continue
            size = self._text_size(text, doc_ids, offsets[j] if offsets is not None else None, windows)
            docs.append(Doc(index, file, size))
            items.extend((len(docs) - 1, w) for w in windows)
        return docs, items

    def _encode(self, texts: list[str]) -> tuple[list[list[int]], list | None]:
        """(token ids, character offsets or None) of each text, without special tokens."""
        if not texts:
            return [], None
        # verbose=False: documents longer than the model's context are expected (they are windowed)
        want = self.offsets and getattr(self.tokenizer, "is_fast", False)
        enc = self.tokenizer(texts, add_special_tokens=False, verbose=False,
                             **({"return_offsets_mapping": True} if want else {}))
        return enc["input_ids"], (enc["offset_mapping"] if want else None)

    def _batches(self, items):
        """(batch, slots [B]) for this rank's batches of the chunk: the chunk's items sorted by window
        length, longest first (a stable sort: ties keep document order), and cut into groups of
        batch_size as one process cuts them; rank r takes groups r, r + world, ... Sorting leaves little
        padding in a batch, and it changes no total: they are integer sums. (The longest windows come
        first, so a batch too large for the device fails at once.)"""
        size = self.opts.batch_size
        items = sorted(items, key=lambda item: -len(item[1].input_ids))
        for b, s in enumerate(range(0, len(items), size)):
            if b % self.world != self.rank:
                continue
            group = items[s : s + size]
            batch = collate([w for _, w in group], pad_id=self.pad_id, padding_side=self.opts.padding_side)
            yield batch, torch.tensor([k for k, _ in group])

    def _score_chunk(self, docs: list[Doc], items, on_tokens, progress) -> None:
        error = None
        try:
            for batch, slots in self._batches(items):
                self._score_batch(docs, batch, slots, on_tokens, progress)
        except EvalError as err:
            if self.world == 1:
                raise
            error = str(err)  # raised below on every rank, so that none waits for the others forever
        self._exchange(docs, error)
        for d in docs:
            if self._owns(d.index):
                self._finish(d)

    def _exchange(self, docs: list[Doc], error: str | None) -> None:
        """Sum each document's partial (Σ loss, tokens) over the ranks; raise the first rank's error."""
        if self.world == 1:
            return
        gathered = dist.all_gather(([(d.nll, d.n, d.sums) for d in docs], error))
        for _, err in gathered:
            if err is not None:
                raise EvalError(err)
        for i, d in enumerate(docs):
            d.nll = sum(parts[i][0] for parts, _ in gathered)
            d.n = sum(parts[i][1] for parts, _ in gathered)
            partial = [parts[i][2] for parts, _ in gathered if parts[i][2]]
            d.sums = [sum(col) for col in zip(*partial)] if partial else []

    def _skip(self, index: int, file: int, kind: str, text: str) -> None:
        if self._owns(index):
            self._count_skip(file, kind, text)

    def _text_size(self, text, ids, offsets, windows) -> tuple[int, int] | None:
        return None

    def _score_batch(self, docs, batch, slots, on_tokens, progress) -> None:
        raise NotImplementedError

    def _count_skip(self, file: int, kind: str, text: str) -> None:
        raise NotImplementedError

    def _finish(self, doc: Doc) -> None:
        raise NotImplementedError


class Runner(ChunkedScorer):
    """Scores documents with one model; holds the per-file totals."""

    def __init__(self, model, tokenizer, opts: Options, n_files: int, *, rank: int = 0, world: int = 1,
                 head: str = "auto", temperature: float = 1.0, keep_hidden: bool = False):
        super().__init__(tokenizer, opts, rank=rank, world=world)
        self.model = model
        self.head = ModelHead(model, head=head, temperature=temperature, batch_size=opts.batch_size,
                              padding_side=opts.padding_side, pad_id=self.pad_id)
        self.keep_hidden = keep_hidden  # keep each batch's scored hidden states (to fit a temperature)
        self.kept: list = []
        self.totals = [Totals(opts.max_length) for _ in range(n_files)]
        self.count_words = _data.count_words_lm_eval if opts.words == "lm-eval" else _data.count_words
        # offsets are needed where some tokens of a document may go unscored
        self.offsets = opts.preset in ("llama.cpp", "transformers") or opts.bos == "none"

    def _count_skip(self, file: int, kind: str, text: str) -> None:
        t = self.totals[file]
        setattr(t, kind, getattr(t, kind) + 1)
        if self.opts.preset == "lm-eval":  # lm-eval counts the words and bytes of every document
            t.add_text(len(text.encode("utf-8")), self.count_words(text))

    def _text_size(self, text, ids, offsets, windows) -> tuple[int, int] | None:
        """(UTF-8 bytes, words) of the document's scored tokens (see _data.token_text_sizes); the whole
        document when every token is scored; None when some are not and offsets are missing."""
        scored = {p for w in windows for p in w.positions if p >= 0}
        if len(scored) == len(ids):
            return len(text.encode("utf-8")), self.count_words(text)
        if offsets is None:
            return None
        nbytes, words = _data.token_text_sizes(text, offsets)
        return sum(nbytes[p] for p in scored), sum(words[p] for p in scored)

    def _score_batch(self, docs, batch, slots, on_tokens, progress) -> None:
        stats = batch_token_stats(self.head, batch, keep_hidden=self.keep_hidden)
        hidden = stats.pop("hidden", None)
        if self.keep_hidden and len(stats["target"]):
            from ._temperature import Kept

            if not self.head.fused:
                raise EvalError("keeping the hidden states (to fit a temperature, or save_base) needs the "
                                f"fused head; {self.head.reason}")
            self.kept.append(Kept(hidden.cpu(), stats["target"], stats["context"]))
        slot = slots[stats["row"]]
        doc = torch.tensor([docs[k].index for k in slot.tolist()], dtype=torch.long)
        check_finite({k: stats[k] for k in ("loss", "entropy", "top1_prob", "brier")}, doc, stats["position"])
        file = torch.tensor([docs[k].file for k in slots.tolist()])[stats["row"]]
        for f in file.unique().tolist():
            mask = file == f
            self.totals[f].add_tokens({k: v[mask] for k, v in stats.items()})
        for k, v, n in zip(*_group_sums(slot, fixed(stats["loss"]))):
            docs[k].nll += v
            docs[k].n += n
        if on_tokens is not None:
            on_tokens({**stats, "doc": doc})
        if progress is not None:
            progress(int(stats["loss"].numel()))

    def _finish(self, d: Doc) -> None:
        if d.n == 0:  # windows, but none with a label (a one-token document, transformers preset)
            self.totals[d.file].skipped_unscored += 1
        else:
            self.totals[d.file].add_document(d.nll, d.n, d.size)


def _group_sums(keys: torch.Tensor, values: torch.Tensor):
    """(unique keys, Σ values per key, count per key) as Python lists."""
    uniq, inv = keys.unique(return_inverse=True)
    sums = torch.zeros(len(uniq), dtype=values.dtype).index_add_(0, inv, values)
    counts = torch.bincount(inv, minlength=len(uniq))
    return uniq.tolist(), sums.tolist(), counts.tolist()
