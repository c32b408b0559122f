"""The evaluation loop: documents in, exact totals out, in chunks of ``checkpoint_every`` documents.

Documents are numbered in corpus order; chunk k holds documents [kK, (k+1)K). A chunk is tokenized,
cut into windows, scored in batches and folded into the totals; then ``on_chunk`` may checkpoint. Batches
never cross a chunk boundary, so a run resumed at a chunk boundary computes exactly the same batches
as an uninterrupted one. Under data parallelism rank r scores the documents with index ≡ r (mod world).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from . import _data
from ._options import Options
from ._score import batch_token_stats, collate, forward_logits
from ._sums import Totals, fixed
from ._windows import llama_cpp_windows, sliding_windows


def document_windows(ids: list[int], opts: Options):
    if opts.preset == "llama.cpp":
        return llama_cpp_windows(ids, max_length=opts.max_length, bos_id=opts.bos_id)
    return sliding_windows(ids, max_length=opts.max_length, stride=opts.stride, bos=opts.bos,
                           bos_id=opts.bos_id, extend_last=opts.extend_last)


def _chunks(docs: Iterable[tuple[int, str]], size: int):
    chunk: list[tuple[int, int, str]] = []
    for index, (file, text) in enumerate(docs):
        chunk.append((index, file, text))
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class Runner:
    """Scores documents with one model; holds the per-file totals."""

    def __init__(self, model, tokenizer, opts: Options, n_files: int, *, rank: int = 0, world: int = 1):
        self.model, self.tokenizer, self.opts = model, tokenizer, opts
        self.device = next(model.parameters()).device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.totals = [Totals(opts.max_length) for _ in range(n_files)]
        self.rank, self.world = rank, world
        self.count_words = _data.count_words_lm_eval if opts.words == "lm-eval" else _data.count_words

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
            self._score_chunk(mine, on_tokens, progress)
            if on_chunk is not None:
                on_chunk(end)
            if stop_after is not None and end >= stop_after:
                return

    def _score_chunk(self, chunk, on_tokens, progress) -> None:
        opts = self.opts
        items = []  # (slot, window): slot indexes `docs`
        docs = []  # (doc index, file, text, [nll fixed, tokens])
        texts = [text for _, _, text in chunk]
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        for (index, file, text), doc_ids in zip(chunk, ids):
            if not text.strip():
                self.totals[file].skipped_empty += 1
                continue
            windows = document_windows(doc_ids, opts)
            if not windows:
                self.totals[file].skipped_unscored += 1
                continue
            docs.append((index, file, text, [0, 0]))
            items.extend((len(docs) - 1, w) for w in windows)
        for s in range(0, len(items), opts.batch_size):
            group = items[s : s + opts.batch_size]
            batch = collate([w for _, w in group], pad_id=self.pad_id, padding_side=opts.padding_side)
            logits = forward_logits(self.model, batch, self.device)
            stats = batch_token_stats(logits, batch)
            del logits
            slot = torch.tensor([k for k, _ in group])[stats["row"]]
            file = torch.tensor([docs[k][1] for k, _ in group])[stats["row"]]
            for f in file.unique().tolist():
                mask = file == f
                self.totals[f].add_tokens({k: v[mask] for k, v in stats.items()})
            loss_fixed = fixed(stats["loss"])
            for k, v, n in zip(*_group_sums(slot, loss_fixed)):
                docs[k][3][0] += v
                docs[k][3][1] += n
            if on_tokens is not None:
                doc = torch.tensor([docs[k][0] for k in slot.tolist()], dtype=torch.long)
                on_tokens({**stats, "doc": doc})
            if progress is not None:
                progress(int(stats["loss"].numel()))
        for _, file, text, (nll, n) in docs:
            if n == 0:
                self.totals[file].skipped_unscored += 1
                continue
            self.totals[file].add_document(nll, n, len(text.encode("utf-8")), self.count_words(text))


def _group_sums(keys: torch.Tensor, values: torch.Tensor):
    """(unique keys, Σ values per key, count per key) as Python lists."""
    uniq, inv = keys.unique(return_inverse=True)
    sums = torch.zeros(len(uniq), dtype=values.dtype).index_add_(0, inv, values)
    counts = torch.bincount(inv, minlength=len(uniq))
    return uniq.tolist(), sums.tolist(), counts.tolist()
