"""xent.eval.evaluate against a direct float64 computation with the transformers model."""

from __future__ import annotations

import math

import pytest
from eval_reference import metrics, records_one_window, scored_text_size, token_records

import xent.eval

KEYS = ["nll_mean", "nll_se_token", "nll_se_document", "perplexity", "bits_per_token", "bits_per_byte",
        "byte_perplexity", "word_perplexity", "top1_accuracy", "top5_accuracy", "entropy_mean", "ece",
        "brier"]


def _close(got: dict, want: dict, rel=2e-6, keys=KEYS):
    for k in ("tokens", "documents", "bytes", "words"):
        assert got[k] == want[k], k
    for k in keys:
        assert got[k] == pytest.approx(want[k], rel=rel, abs=1e-9), k
    assert got["perplexity_ci95"] == pytest.approx(want["perplexity_ci95"], rel=rel, nan_ok=True)


def test_every_metric_matches_a_direct_computation(model_and_tokenizer, documents):
    model, tok = model_and_tokenizer
    docs = [d for d in documents if len(tok(d, add_special_tokens=False)["input_ids"]) < 64]
    ids = [tok(d, add_special_tokens=False)["input_ids"] for d in docs]
    want = metrics(records_one_window(model, ids, tok.bos_token_id), docs)
    got = xent.eval.evaluate(model, tok, docs, batch_size=2).to_dict()
    _close(got, want)
    assert got["tokens"] == sum(len(i) for i in ids)  # bos first: every token scored
    assert 0.05 < got["top1_accuracy"] < 0.95 and got["nll_se_document"] > 0  # not a degenerate case
    # loss by position: the buckets of context length hold the mean of their tokens
    for bucket in got["nll_by_position"]:
        sel = [x for x, c in zip(want["losses"], want["contexts"]) if bucket["start"] <= c < bucket["end"]]
        assert bucket["tokens"] == len(sel)
        if sel:
            assert bucket["nll_mean"] == pytest.approx(sum(sel) / len(sel), rel=2e-6)


def test_long_document_sliding_window_numbers(model_and_tokenizer, documents):
    # One long document, L = 16, S = 6, no BOS: the reference runs the model on each token's context,
    # from the rule: target t is predicted in the first window (starts 0, S, 2S, ...) whose inputs
    # [kS, kS + L) contain t − 1, from the inputs kS .. t − 1.
    model, tok = model_and_tokenizer
    text = documents[1][:400]
    x = tok(text, add_special_tokens=False)["input_ids"]
    L, S = 16, 6
    pairs = []
    for t in range(1, len(x)):
        k = next(k for k in range(len(x)) if k * S <= t - 1 < k * S + L)
        pairs.append((x[k * S : t], x[t]))
    # bos "none" leaves the first token unscored: its text is not in the bytes and words
    want = metrics([token_records(model, pairs)], [text],
                   size=scored_text_size(tok, text, x, range(1, len(x))))
    got = xent.eval.evaluate(model, tok, [text], max_length=L, stride=S, bos="none", batch_size=3)
    assert got.tokens == len(x) - 1
    assert got.documents == 1 and math.isnan(got.nll_se_document)
    _close(got.to_dict(), {**want, "perplexity_ci95": got.perplexity_ci95}, keys=[
        k for k in KEYS if k != "nll_se_document"])


def test_bos_every_window_numbers(model_and_tokenizer, documents):
    # bos every, L = 12, S = 5: window k predicts targets [kS, kS + L) from [BOS] + x[kS : kS + L − 1];
    # target t is scored by the first window that reaches it, with context [BOS] + x[kS : t].
    model, tok = model_and_tokenizer
    text = documents[1][:200]
    x = tok(text, add_special_tokens=False)["input_ids"]
    L, S = 12, 5
    pairs = []
    for t in range(len(x)):
        k = next(k for k in range(len(x)) if k * S <= t < k * S + L)
        pairs.append(([tok.bos_token_id] + x[k * S : t], x[t]))
    want = metrics([token_records(model, pairs)], [text])
    got = xent.eval.evaluate(model, tok, [text], max_length=L, stride=S, bos="every", batch_size=4)
    assert got.tokens == len(x)
    assert got.nll_mean == pytest.approx(want["nll_mean"], rel=2e-6)
    assert got.top5_accuracy == want["top5_accuracy"] and got.brier == pytest.approx(want["brier"], rel=2e-6)


@pytest.mark.parametrize("batch_size,padding_side", [(1, "right"), (3, "left"), (4, "right"), (7, "left")])
def test_batch_size_and_padding_side_do_not_change_the_numbers(model_and_tokenizer, documents,
                                                               batch_size, padding_side):
    model, tok = model_and_tokenizer
    kw = dict(max_length=24, stride=10)
    ref = xent.eval.evaluate(model, tok, documents, batch_size=2, padding_side="right", **kw).to_dict()
    got = xent.eval.evaluate(model, tok, documents, batch_size=batch_size, padding_side=padding_side,
                             **kw).to_dict()
    assert got["tokens"] == ref["tokens"] and got["nll_by_position"][0]["tokens"] > 0
    for k in KEYS:
        assert got[k] == pytest.approx(ref[k], rel=1e-6, abs=1e-9), k


def test_corpus_level_mean_is_not_a_mean_of_document_means(model_and_tokenizer, documents):
    model, tok = model_and_tokenizer
    r = xent.eval.evaluate(model, tok, documents, max_length=32)
    per_doc = [xent.eval.evaluate(model, tok, [d], max_length=32) for d in documents]
    pooled = sum(p.nll_mean * p.tokens for p in per_doc) / sum(p.tokens for p in per_doc)
    assert r.nll_mean == pytest.approx(pooled, rel=1e-7)
    assert abs(r.nll_mean - sum(p.nll_mean for p in per_doc) / len(per_doc)) > 1e-3
    assert r.perplexity == pytest.approx(math.exp(r.nll_mean))
    assert r.bits_per_token == pytest.approx(r.nll_mean / math.log(2))


def test_bfloat16_model_is_scored_in_float32(model_and_tokenizer, documents):
    # the reference upcasts the bf16 logits to float64; a softmax in bf16 would be off by ~1e-2
    import copy

    import torch

    model, tok = model_and_tokenizer
    bf = copy.deepcopy(model).to(torch.bfloat16)
    docs = [d for d in documents if len(tok(d, add_special_tokens=False)["input_ids"]) < 64]
    ids = [tok(d, add_special_tokens=False)["input_ids"] for d in docs]
    want = metrics(records_one_window(bf, ids, tok.bos_token_id), docs)
    got = xent.eval.evaluate(bf, tok, docs, batch_size=1)
    _close(got.to_dict(), want, rel=1e-5, keys=["nll_mean", "entropy_mean", "brier", "top5_accuracy"])


def test_documents_must_be_strings(model_and_tokenizer):
    model, tok = model_and_tokenizer
    with pytest.raises(xent.eval.EvalError, match="not a single string"):
        xent.eval.evaluate(model, tok, "one text", max_length=16)
    with pytest.raises(xent.eval.EvalError, match="document 1 is int, not a string"):
        xent.eval.evaluate(model, tok, ["fine", 3], max_length=16)


def test_a_model_in_training_mode_is_evaluated_without_dropout(model_and_tokenizer, documents):
    model, tok = model_and_tokenizer
    ref = xent.eval.evaluate(model, tok, documents[:3], max_length=32)
    assert model.config.resid_pdrop > 0
    model.train()
    try:
        got = xent.eval.evaluate(model, tok, documents[:3], max_length=32)
        assert model.training  # given back as it came
    finally:
        model.eval()
    assert got.nll_mean == ref.nll_mean


class _NoOffsets:
    """The test tokenizer seen as a slow one: no character offsets."""

    is_fast = False

    def __init__(self, tok):
        self._tok = tok

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __len__(self):
        return len(self._tok)

    def __call__(self, texts, **kwargs):
        assert "return_offsets_mapping" not in kwargs
        return self._tok(texts, **kwargs)


def test_bytes_of_a_partly_scored_text_are_omitted_without_offsets(model_and_tokenizer, documents):
    model, tok = model_and_tokenizer
    slow = _NoOffsets(tok)
    whole = xent.eval.evaluate(model, slow, documents, max_length=32)  # bos first: every token scored
    assert whole.bytes == sum(len(d.encode("utf-8")) for d in documents) and whole.bytes_omitted is None
    part = xent.eval.evaluate(model, slow, documents, max_length=32, bos="none")
    assert part.bytes is None and part.words is None
    assert math.isnan(part.bits_per_byte) and math.isnan(part.word_perplexity)
    assert "gives no character offsets" in part.bytes_omitted
    assert part.nll_mean == xent.eval.evaluate(model, tok, documents, max_length=32, bos="none").nll_mean
