"""Batching by length: the windows of a chunk of documents are sorted by length before they are cut into
batches, so a batch holds little padding; the totals do not depend on it."""

from __future__ import annotations

import json

import pytest

import xent.eval
from xent.cli import main

DOCS = ["Hi.", "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away.", "Ok.",
        "Cross-entropy measures how well a model predicts the next token of a text.", "A b.",
        "Perplexity is the exponential of the mean negative log-likelihood per token."]


def _batch_lengths(model, tok, docs, **kw):
    """The real lengths of the windows of each forward pass, and the result."""
    seen = []

    def batch(st):  # a row's real length: the context of its last scored token (one window each here)
        last = {}
        for row, context in zip(st["row"].tolist(), st["context"].tolist()):
            last[row] = max(last.get(row, 0), context)
        seen.append([last[r] for r in sorted(last)])

    result = xent.eval.evaluate(model, tok, docs, max_length=64, model_sha256="-", head="forward",
                                on_tokens=batch, **kw)
    return seen, result


def test_windows_are_batched_longest_first_within_a_chunk(model_and_tokenizer):
    model, tok = model_and_tokenizer
    # one window each: BOS and every token but the last as inputs
    lengths = [len(tok(d, add_special_tokens=False)["input_ids"]) for d in DOCS]
    batches, sorted_run = _batch_lengths(model, tok, DOCS, batch_size=2, checkpoint_every=100)
    want = sorted(lengths, reverse=True)
    assert batches == [want[i : i + 2] for i in range(0, len(want), 2)]
    padded = sum(max(b) * len(b) - sum(b) for b in batches)
    in_order = sum(max(lengths[i : i + 2]) * 2 - sum(lengths[i : i + 2]) for i in range(0, 6, 2))
    assert padded < in_order  # the corpus order would pad much more
    # sorting happens within a chunk of documents (checkpoint_every): chunks [0, 3) and [3, 6)
    batches, chunked = _batch_lengths(model, tok, DOCS, batch_size=2, checkpoint_every=3)
    first, second = sorted(lengths[:3], reverse=True), sorted(lengths[3:], reverse=True)
    assert batches == [first[:2], first[2:], second[:2], second[2:]]
    single = xent.eval.evaluate(model, tok, DOCS, max_length=64, model_sha256="-", batch_size=1)
    for r in (sorted_run, chunked):
        assert r.tokens == single.tokens and r.documents == single.documents
        assert r.nll_mean == pytest.approx(single.nll_mean, rel=1e-6)
        assert r.nll_se_document == pytest.approx(single.nll_se_document, rel=1e-5)


def test_cli_reports_tokens_per_second(model_dir, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS))
    assert main(["eval", "--model", str(model_dir), "--data", str(data), "--json"]) == 0
    out, err = capsys.readouterr()
    tokens = json.loads(out)["tokens"]
    assert f"xent eval: {tokens:,} tokens in " in err and " tokens/s)" in err
