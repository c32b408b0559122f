"""The demo's parts: the Markov source's exact quantities, the stdlib corpus, the tokenizer."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from xent.demo import MarkovSource, stdlib_documents, synthetic_gap
from xent.demo._text import HELD_OUT_EVERY, MODULES, module_documents


@pytest.fixture(scope="module")
def corpus():
    return stdlib_documents()


@pytest.fixture(scope="module")
def source():
    return MarkovSource(num_words=24, seed=3)


def test_stationary_distribution_and_entropy_rate_by_explicit_loops(source):
    P, pi = source.P.tolist(), source.pi.tolist()
    K = len(P)
    assert all(abs(sum(row) - 1) < 1e-12 for row in P)
    for j in range(K):  # π P = π
        assert sum(pi[i] * P[i][j] for i in range(K)) == pytest.approx(pi[j], abs=1e-12)
    h = 0.0
    for i in range(K):
        for j in range(K):
            if P[i][j] > 0:
                h -= pi[i] * P[i][j] * math.log(P[i][j])
    assert source.entropy_rate == pytest.approx(h, rel=1e-12)
    # power iteration from uniform on the lazy chain (½(I + P) has the same π and converges)
    v = [1 / K] * K
    for _ in range(3000):
        v = [0.5 * v[j] + 0.5 * sum(v[i] * P[i][j] for i in range(K)) for j in range(K)]
    assert v == pytest.approx(pi, abs=1e-9)


def test_nll_of_a_document_and_the_sampler_agree_with_the_entropy_rate(source):
    docs = source.sample(400, 50, seed=7)
    assert all(len(d.split(" ")) == 50 for d in docs)
    d = docs[0].split(" ")
    ids = [source.index[w] for w in d]
    manual = -math.log(source.pi[ids[0]]) - sum(math.log(source.P[a, b]) for a, b in zip(ids, ids[1:]))
    assert source.nll(docs[0]) == pytest.approx(manual, rel=1e-12)
    # per-transition NLL of stationary samples averages to the entropy rate (within 4 standard errors)
    per_doc = torch.tensor([(source.nll(x) + math.log(source.pi[source.index[x.split(' ')[0]]])) / 49
                            for x in docs], dtype=torch.float64)
    se = per_doc.std() / math.sqrt(len(docs))
    assert abs(per_doc.mean().item() - source.entropy_rate) < 4 * se.item()
    assert source.sample(3, 10, seed=7) == source.sample(3, 10, seed=7)
    assert source.sample(3, 10, seed=7) != source.sample(3, 10, seed=8)


def test_synthetic_gap_is_zero_for_the_true_loss_and_counts_bytes(source):
    docs = source.sample(5, 20, seed=1)
    true_total = sum(source.nll(t) for t in docs)
    nbytes = sum(len(t.encode()) for t in docs)
    fake = SimpleNamespace(nll_mean=true_total / 123, tokens=123,
                           bits_per_byte=true_total / nbytes / math.log(2))
    gap = synthetic_gap(fake, docs, source)
    assert gap["kl_nats_per_word"] == pytest.approx(0, abs=1e-12)
    assert gap["gap_bits_per_byte"] == pytest.approx(0, abs=1e-12)
    assert gap["words"] == 100 and gap["bytes"] == nbytes
    assert gap["true_bits_per_byte"] == pytest.approx(fake.bits_per_byte)
    assert math.isnan(gap["kl_nats_per_word_se"])  # no per-document losses given
    # clustered SE by hand: documents 0.5 and 1.5 nats/word above the truth, 20 words each
    true_nll = [source.nll(t) for t in docs]
    doc_nll = [t + g * 20 for t, g in zip(true_nll, [0.5, 1.5, 0.5, 1.5, 1.0])]
    fake = SimpleNamespace(nll_mean=sum(doc_nll) / 100, tokens=100, bits_per_byte=0.0)
    gap = synthetic_gap(fake, docs, source, doc_nll)
    assert gap["kl_nats_per_word"] == pytest.approx(1.0)
    deviations = [(g - 1.0) * 20 for g in [0.5, 1.5, 0.5, 1.5, 1.0]]
    expected = math.sqrt(5 / 4 * sum(d * d for d in deviations)) / 100
    assert gap["kl_nats_per_word_se"] == pytest.approx(expected)


def test_stdlib_corpus_is_deterministic_and_split_by_module(corpus):
    assert list(MODULES) == sorted(MODULES)
    train, held = corpus
    name = held[0].source.split(".")[0]
    assert [d for d in module_documents(name) if len(d.text) >= 200] == [
        d for d in held if d.source.split(".")[0] == name]  # re-parsed: the same documents
    assert len(train) > 100 and len(held) > 20
    held_modules = {m for i, m in enumerate(MODULES) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1}
    assert {d.source.split(".")[0] for d in held} <= held_modules
    assert not {d.source.split(".")[0] for d in train} & held_modules
    assert all(len(d.text) >= 200 for d in train + held)


def test_tokenizer_round_trips_and_reloads(tmp_path, source, corpus):
    transformers = pytest.importorskip("transformers")
    from xent.demo import tokenize_documents, train_tokenizer

    train, held = corpus
    texts = [d.text for d in train[:80]] + source.sample(100, 30, seed=0)
    tok = train_tokenizer(texts, vocab_size=400)
    assert len(tok) == 400
    assert tok.bos_token == tok.eos_token == "<|endoftext|>"
    for text in (held[0].text, source.sample(1, 30, seed=9)[0], "ünïcode ✓ \t tabs\n"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    [doc] = tokenize_documents(tok, [held[0].text])
    assert doc[0] == tok.bos_token_id
    tok.save_pretrained(tmp_path)
    again = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert again(held[1].text, add_special_tokens=False)["input_ids"] == \
        tok(held[1].text, add_special_tokens=False)["input_ids"]
