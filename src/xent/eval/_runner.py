"""The evaluation loop: documents in, exact totals out, in chunks of ``checkpoint_every`` documents.

Documents are numbered in corpus order; chunk k holds documents [kK, (k+1)K). A chunk is tokenized,
cut into windows, scored in batches and folded into the totals; then ``on_chunk`` may checkpoint. Batches
never cross a chunk boundary, so a run resumed at a chunk boundary computes exactly the same batches
as an uninterrupted one. Under data parallelism rank r scores the documents with index ≡ r (mod world).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import torch

from . import _data
from ._options import Options
from ._score import batch_token_stats, collate, forward_logits
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


class ChunkedScorer:
    """The loop shared by evaluate and compare: chunks of documents, tokenized, windowed, batched.
    Subclasses score batches (``_score_chunk``) and count skipped documents (``_skip``)."""

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
            mine = [c for c in chunk if c[0] >= start and c[0] % self.world == self.rank]
            docs_, items = self._prepare(mine)
            self._score_chunk(docs_, items, on_tokens, progress)
            if on_chunk is not None:
                on_chunk(end)
            if stop_after is not None and end >= stop_after:
                return

    def _prepare(self, chunk):
        """(docs, items): docs[k] = (doc index, file, text, [Σ loss fixed, tokens]) for the documents
        with something to score; items = [(k, window)] in document order."""
        items, docs = [], []
        texts = [text for _, _, text in chunk]
        ids = self._encode(texts)
        for (index, file, text), doc_ids in zip(chunk, ids):
            if not text.strip():
                self._skip(file, "skipped_empty")
                continue
            windows = document_windows(doc_ids, self.opts)
            if not windows:
                self._skip(file, "skipped_unscored")
                continue
            docs.append((index, file, text, [0, 0]))
            items.extend((len(docs) - 1, w) for w in windows)
        return docs, items

    def _encode(self, texts: list[str]) -> list[list[int]]:
        # verbose=False: documents longer than the model's context are expected (they are windowed)
        return self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else []

    def _batches(self, items):
        """(batch, slots [B]) for groups of batch_size windows."""
        for s in range(0, len(items), self.opts.batch_size):
            group = items[s : s + self.opts.batch_size]
            batch = collate([w for _, w in group], pad_id=self.pad_id, padding_side=self.opts.padding_side)
            yield batch, torch.tensor([k for k, _ in group])

    def _skip(self, file: int, kind: str) -> None:
        raise NotImplementedError

    def _score_chunk(self, docs, items, on_tokens, progress) -> None:
        raise NotImplementedError


class Runner(ChunkedScorer):
    """Scores documents with one model; holds the per-file totals."""

    def __init__(self, model, tokenizer, opts: Options, n_files: int, *, rank: int = 0, world: int = 1):
        super().__init__(tokenizer, opts, rank=rank, world=world)
        self.model = model
        self.device = next(model.parameters()).device
        self.totals = [Totals(opts.max_length) for _ in range(n_files)]
        self.count_words = _data.count_words_lm_eval if opts.words == "lm-eval" else _data.count_words

    def _skip(self, file: int, kind: str) -> None:
        setattr(self.totals[file], kind, getattr(self.totals[file], kind) + 1)

    def _score_chunk(self, docs, items, on_tokens, progress) -> None:
        for batch, slots in self._batches(items):
            logits = forward_logits(self.model, batch, self.device)
            stats = batch_token_stats(logits, batch, exact_rank=on_tokens is not None)
            del logits
            slot = slots[stats["row"]]
            file = torch.tensor([docs[k][1] for k in slots.tolist()])[stats["row"]]
            for f in file.unique().tolist():
                mask = file == f
                self.totals[f].add_tokens({k: v[mask] for k, v in stats.items()})
            for k, v, n in zip(*_group_sums(slot, fixed(stats["loss"]))):
                docs[k][3][0] += v
                docs[k][3][1] += n
            if on_tokens is not None:
                doc = torch.tensor([docs[k][0] for k in slot.tolist()], dtype=torch.long)
                on_tokens({**stats, "doc": doc})
            if progress is not None:
                progress(int(stats["loss"].numel()))
        for _, file, text, (nll, n) in docs:
            if n == 0:
                self._skip(file, "skipped_unscored")
                continue
            self.totals[file].add_document(nll, n, len(text.encode("utf-8")), self.count_words(text))


def _group_sums(keys: torch.Tensor, values: torch.Tensor):
    """(unique keys, Σ values per key, count per key) as Python lists."""
    uniq, inv = keys.unique(return_inverse=True)
    sums = torch.zeros(len(uniq), dtype=values.dtype).index_add_(0, inv, values)
    counts = torch.bincount(inv, minlength=len(uniq))
    return uniq.tolist(), sums.tolist(), counts.tolist()
