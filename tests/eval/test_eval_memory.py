"""Streaming: the memory held while scoring does not grow with the number of documents."""

from __future__ import annotations

import gc
import tracemalloc

import pytest

import xent.eval


def _live_memory(model, tok, n_docs: int) -> int:
    """Largest Python heap held (after garbage collection) during the run, relative to its start."""
    def docs():
        for i in range(n_docs):
            yield f"Document {i}: the quick brown fox jumps over the lazy dog."

    calls, samples = [0], []

    def progress(_tokens):
        calls[0] += 1
        if calls[0] % 8 == 0:
            gc.collect()
            samples.append(tracemalloc.get_traced_memory()[0] - start)

    gc.collect()
    tracemalloc.start()
    start = tracemalloc.get_traced_memory()[0]
    try:
        r = xent.eval.evaluate(model, tok, docs(), max_length=32, batch_size=16, checkpoint_every=50,
                               model_sha256="-", progress=progress)
    finally:
        tracemalloc.stop()
    assert r.documents == n_docs
    return max(samples)


@pytest.mark.slow
def test_memory_does_not_grow_with_the_corpus(model_and_tokenizer):
    model, tok = model_and_tokenizer
    xent.eval.evaluate(model, tok, ["warm-up text"] * 4, max_length=32)
    small = _live_memory(model, tok, 100)
    large = _live_memory(model, tok, 900)
    # keeping anything per document (let alone per token) would add well over 100 kB for 800 more
    assert large < small * 1.25 + 32_000, (small, large)
