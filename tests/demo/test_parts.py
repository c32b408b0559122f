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


# -- paired differences, findings, the curves' sequences, the passage cut (items 14, 16, 17) --------------

def _paired_reference(a, b, n):
    """Paired difference Δ = Σ_d (a_d − b_d) / Σ_d n_d and its document-clustered SE, in float64 loops."""
    e = [x - y for x, y in zip(a, b)]
    N, D = sum(n), len(n)
    delta = math.fsum(e) / N
    se = math.sqrt(D / (D - 1) * math.fsum((ed - delta * nd) ** 2 for ed, nd in zip(e, n))) / N
    return delta, se


def _doc_sums(gen, D, shift, noise):
    """Per-document summed losses of two models on D documents: B = A + shift·n_d + noise·√n_d·N(0,1)."""
    n = torch.randint(20, 400, (D,), generator=gen).tolist()
    a = [nd * (3 + torch.rand(1, generator=gen).item()) for nd in n]
    b = [x + shift * nd + noise * math.sqrt(nd) * torch.randn(1, generator=gen).item() for x, nd in zip(a, n)]
    return a, b, n


def test_paired_difference_matches_a_float64_reference():
    from xent.demo._compare import paired_difference

    gen = torch.Generator().manual_seed(0)
    for shift, noise in ((0.0, 0.5), (0.01, 0.05), (-0.2, 1.0)):
        a, b, n = _doc_sums(gen, 50, shift, noise)
        got = paired_difference(b, a, n)
        delta, se = _paired_reference(b, a, n)
        assert got["diff"] == pytest.approx(delta, rel=1e-9, abs=1e-12)
        assert got["se"] == pytest.approx(se, rel=1e-9)
        assert got["z"] == pytest.approx(delta / se, rel=1e-8)
        assert got["significant"] == (abs(delta) > 1.96 * se)
    # the nearly-tied case of the issue: +0.0013 ± 0.0054 is not significant; a document with no tokens
    # is left out; identical models are not significantly different (z undefined)
    a, b, n = _doc_sums(gen, 40, 0.0013, 0.11)
    got = paired_difference(b + [0.0], a + [0.0], n + [0])
    delta, se = _paired_reference(b, a, n)
    assert got["diff"] == pytest.approx(delta, rel=1e-9) and got["se"] == pytest.approx(se, rel=1e-9)
    same = paired_difference(a, a, n)
    assert same["diff"] == 0 and same["se"] == 0 and math.isnan(same["z"]) and not same["significant"]
    assert math.isnan(paired_difference([1.0], [2.0], [3])["se"])  # one document: no SE
    with pytest.raises(ValueError, match="one entry per document"):
        paired_difference([1.0, 2.0], [1.0], [3, 4])


def _summary(objectives: dict) -> dict:
    """A demo summary with the per-document sums of each objective: name -> (heldout, synthetic) lists,
    documents of 100 tokens (held out) and 64 words (Markov)."""
    from xent.demo._compare import compare_with_baseline

    words = ["a" + " a" * 63] * len(next(iter(objectives.values()))[1])
    summary = {"objectives": {
        name: {"ece": 0.01 * (i + 1),
               "heldout": {"doc_nll": h, "doc_tokens": [100] * len(h)},
               "synthetic": {"doc_nll": s, "doc_tokens": [80] * len(s)}}
        for i, (name, (h, s)) in enumerate(objectives.items())}}
    summary["baseline"] = compare_with_baseline(summary, words)
    return summary


def test_findings_name_a_winner_only_where_the_paired_difference_is_significant():
    from xent.demo._report import findings, table_rows

    gen = torch.Generator().manual_seed(1)
    ce = [400 + 50 * torch.rand(1, generator=gen).item() for _ in range(30)]
    syn = [120 + 10 * torch.rand(1, generator=gen).item() for _ in range(30)]
    wiggle = [(-1) ** d * 0.5 + 0.02 for d in range(30)]  # mean +0.02 nats/doc: tiny, noisy

    def shifted(xs, per_doc):
        return [x + p for x, p in zip(xs, per_doc)]

    tied = _summary({"ce": (ce, syn), "ce_ls": (shifted(ce, wiggle), shifted(syn, wiggle))})
    d = tied["objectives"]["ce_ls"]["vs_baseline"]["heldout_nll_nats_per_token"]
    delta, se = _paired_reference(shifted(ce, wiggle), ce, [100] * 30)
    assert d["diff"] == pytest.approx(delta) and d["se"] == pytest.approx(se) and abs(delta) < 1.96 * se
    held, markov, ece = findings(tied)
    assert held.startswith("No objective has a significantly lower held-out perplexity than ce")
    assert markov.startswith("No objective is significantly closer to the Markov source than ce")
    assert "ce_ls (+0.0002 ± " in held and "Significantly worse" not in held
    assert "no objective is named the best calibrated" in ece

    better = [-3.0 + 0.1 * (-1) ** d for d in range(30)]  # −0.03 nats/token on every document
    worse = [2.0 + 0.3 * (-1) ** d for d in range(30)]
    s = _summary({"ce": (ce, syn), "emo": (shifted(ce, better), shifted(syn, wiggle)),
                  "tailr": (shifted(ce, worse), shifted(syn, better))})
    held, markov, _ = findings(s)
    assert held.startswith("Significantly lower held-out perplexity than ce: emo (-0.0300 ± ")
    assert "Significantly worse than ce: tailr (+0.0200 ± " in held
    assert markov.startswith("Significantly closer to the Markov source than ce (lower loss on its text): "
                             "tailr (-0.0469 ± ")  # −3 nats per 64-word document
    assert "emo" not in markov.split("Significantly worse")[0].split(":")[1]
    rows = {r[0]: r for r in table_rows({**s, "objectives": {
        n: {**o, "perplexity": 1.0, "perplexity_ci95": [1.0, 1.0], "bits_per_byte": 1.0,
            "synthetic_kl_nats_per_word": 0.1, "synthetic_gap_bits_per_byte": 0.1, "train_cpu_seconds": 1.0}
        for n, o in s["objectives"].items()}})}
    assert rows["ce"][3] == "(baseline)"
    assert rows["emo"][3].startswith("-0.0300 ± ") and rows["emo"][3].endswith(" *")
    tied_row = table_rows({**tied, "objectives": {
        n: {**o, "perplexity": 1.0, "perplexity_ci95": [1.0, 1.0], "bits_per_byte": 1.0,
            "synthetic_kl_nats_per_word": 0.1, "synthetic_gap_bits_per_byte": 0.1, "train_cpu_seconds": 1.0}
        for n, o in tied["objectives"].items()}})[1]
    assert not tied_row[3].endswith("*")


def test_word_cut_never_splits_a_word():
    from xent.demo._run import word_cut

    tokens = ["The", " optional", " s", "ki", "p", " argument", ".", "\n", "mo", "dule", " name"]
    text = "".join(tokens)
    for limit in range(1, len(tokens) + 3):
        k = word_cut(tokens, limit)
        assert k <= max(limit, 1)
        cut = len("".join(tokens[:k]))
        if k < len(tokens):  # the characters either side of the cut are not both parts of a word
            assert not (text[cut - 1].isalnum() and text[cut].isalnum()), (limit, k)
    assert [word_cut(tokens, k) for k in (2, 3, 4, 5, 6, 9, 10)] == [2, 2, 2, 5, 6, 8, 10]
    assert word_cut(["abc", "def"], 1) == 1  # no boundary at all: the limit


def test_curve_sequences_score_every_heldout_token_once_from_its_own_document(corpus):
    pytest.importorskip("transformers")
    from xent.demo import tokenize_documents, train_tokenizer
    from xent.demo._run import curve_sequences

    train, held = corpus
    tok = train_tokenizer([d.text for d in train[:60]], vocab_size=300)
    texts = [d.text for d in held[:6]] + ["x"]  # a one-token document too
    seqs = curve_sequences(tok, texts, 16)
    assert seqs.shape[1] == 16
    docs = tokenize_documents(tok, texts)
    predicted, d, pos = [], 0, 0  # walk the documents: each sequence continues one of them
    for row in seqs.tolist():
        real = [t for t in row if t != -100]
        assert row[len(real):] == [-100] * (16 - len(real))  # padding only at the end
        if pos + 1 >= len(docs[d]):
            d, pos = d + 1, 0
        assert real == docs[d][pos : pos + len(real)]  # inputs from one document, its eot first
        predicted.extend(real[1:])
        pos += len(real) - 1
    assert d == len(docs) - 1
    assert predicted == [t for doc in docs for t in doc[1:]]  # every token once, in order


def test_reliability_counts_never_overlap_a_bar():
    """Every bin's count is drawn above its bar, within the axes, clear of every bar (full bins too)."""
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from xent.eval._html import draw_reliability

    accuracy = [0.0, 0.3, 0.81, 0.95, 1.0, 1.0, 0.99]
    counts = [12, 400, 5000, 123456, 30000, 999, 7]
    bins = [{"bin": [(8 + b) / 15, (9 + b) / 15], "tokens": n, "confidence": (8.5 + b) / 15, "accuracy": a}
            for b, (n, a) in enumerate(zip(counts, accuracy))]
    fig, ax = plt.subplots(figsize=(3.6, 3.6))
    draw_reliability(ax, bins)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    axes_box = ax.get_window_extent(renderer)
    texts = [t.get_window_extent(renderer) for t in ax.texts]
    bars = [p.get_window_extent(renderer) for p in ax.patches]
    assert len(texts) == len(bars) == len(counts)
    for i, t in enumerate(texts):
        assert all(not t.overlaps(b) for b in bars), (counts[i], accuracy[i])
        assert axes_box.y0 <= t.y0 and t.y1 <= axes_box.y1, counts[i]  # not cut off above the axes
    plt.close(fig)


def _with_pretrained(objectives: dict, pretrained: tuple) -> dict:
    """_summary's demo summary with a pre-trained model (the one every fine-tune started from)."""
    from xent.demo._compare import compare_with_baseline

    summary = _summary(objectives)
    h, s = pretrained
    summary["pretrained"] = {"ece": 0.5, "heldout": {"doc_nll": h, "doc_tokens": [100] * len(h)},
                             "synthetic": {"doc_nll": s, "doc_tokens": [80] * len(s)}}
    for entry in summary["objectives"].values():
        entry.pop("vs_baseline", None)
    words = ["a" + " a" * 63] * len(s)
    summary["baseline"] = compare_with_baseline(summary, words)
    summary["data"] = {"finetune_tokens": 5288}
    return summary


def test_a_fine_tune_worse_than_the_pretrained_model_is_no_win():
    """The overfit case: both fine-tunes end above the pre-trained model's held-out loss; emo is
    significantly below ce, but is named no winner; the finding, the table and the claim say WORSE."""
    from xent.demo._claims import NOT_A_WIN, REPRODUCED, claims
    from xent.demo._report import WORSE, findings, table_rows

    gen = torch.Generator().manual_seed(2)
    pre = [300 + 50 * torch.rand(1, generator=gen).item() for _ in range(30)]
    syn = [120 + 10 * torch.rand(1, generator=gen).item() for _ in range(30)]
    ce = [x + 100 + (-1) ** d for d, x in enumerate(pre)]  # +1 nat/token on every 100-token document
    emo = [x + 80 + (-1) ** d for d, x in enumerate(pre)]  # +0.8: better than ce, worse than pretrained
    s = _with_pretrained({"ce": (ce, syn), "emo": (emo, syn)}, (pre, syn))
    for name, shift in (("ce", 1.0), ("emo", 0.8)):
        d = s["objectives"][name]["vs_pretrained"]["heldout_nll_nats_per_token"]
        delta, se = _paired_reference(s["objectives"][name]["heldout"]["doc_nll"], pre, [100] * 30)
        assert d["diff"] == pytest.approx(delta) == pytest.approx(shift) and d["se"] == pytest.approx(se)
    first, held, *_ = findings(s)
    assert first.startswith("Fine-tuning made the held-out loss WORSE than the pre-trained model's for ce "
                            "(+1.0000 ± ") and "emo (+0.8000 ± " in first and "5,288" in first
    assert held.startswith("No objective has a significantly lower held-out perplexity than ce")
    assert "but worse than the pre-trained model, so no win: emo (-0.2000 ± " in held
    plain = {n: {**o, "perplexity": 1.0, "perplexity_ci95": [1.0, 1.0], "bits_per_byte": 1.0, "ece": 0.1,
                 "synthetic_kl_nats_per_word": 0.1, "synthetic_gap_bits_per_byte": 0.1,
                 "train_cpu_seconds": 1.0} for n, o in s["objectives"].items()}
    rows = {r[0]: r for r in table_rows({**s, "objectives": plain, "pretrained": {
        **s["pretrained"], "perplexity": 1.0, "perplexity_ci95": [1.0, 1.0], "bits_per_byte": 1.0,
        "synthetic_kl_nats_per_word": 0.1, "synthetic_gap_bits_per_byte": 0.1, "train_cpu_seconds": 1.0}})}
    assert rows["pretrained"][3] == "(the start)"
    assert rows["emo"][3].startswith("+0.8000 ± ") and rows["emo"][3].endswith(f"* {WORSE}")
    # the EMO perplexity claim reproduces against ce, but emo is worse than where it started
    s["objectives"]["emo"]["generation"] = s["objectives"]["ce"]["generation"] = {"mauve_by_seed": [0.5, 0.5]}
    rows = claims(s)
    nll = next(r for r in rows if r["measure"] == "Δ held-out NLL")
    assert nll["diff"] < 0 and nll["called"] and nll["verdict"] == NOT_A_WIN != REPRODUCED
    # below the pre-trained model, the same difference is a win
    better = [x - 20 + (-1) ** d for d, x in enumerate(pre)]
    s2 = _with_pretrained({"ce": (ce, syn), "emo": (better, syn)}, (pre, syn))
    first, held, *_ = findings(s2)
    assert first.startswith("Fine-tuning made the held-out loss WORSE than the pre-trained model's for ce")
    assert "emo" not in first.split(":")[0] and held.startswith("Significantly lower held-out perplexity "
                                                                "than ce: emo (-1.2000 ± ")


def test_loss_vs_p_caption_names_the_curves_it_plots():
    from xent.demo import DemoConfig
    from xent.demo._config import runs
    from xent.demo._report import loss_vs_p_caption

    for cfg in (DemoConfig(), DemoConfig(objectives=("ce", "gold", "rho1"), tailr_gammas=())):
        plan = runs(cfg)
        caption = loss_vs_p_caption({"runs": {n: {"objective": o, "options": opts}
                                              for n, (o, opts) in plan.items()}})
        curves = caption.split("Curves: ")[1].split(" (legend)")[0].split(", ")
        assert curves == [n for n, (o, _) in plan.items() if o != "rho1"]
        assert ("GOLD" in caption) == ("gold" in cfg.objectives)
        assert ("TaiLr" in caption) == ("tailr" in cfg.objectives)
        assert ("rho1 is not drawn" in caption) == ("rho1" in cfg.objectives)


def test_a_markov_win_says_when_every_fine_tune_forgot_the_source():
    from xent.demo._report import findings

    gen = torch.Generator().manual_seed(3)
    pre_h = [300 + 50 * torch.rand(1, generator=gen).item() for _ in range(30)]
    pre_s = [120 + 10 * torch.rand(1, generator=gen).item() for _ in range(30)]
    ce_h = [x - 20 + (-1) ** d for d, x in enumerate(pre_h)]
    ce_s = [x + 60 + (-1) ** d for d, x in enumerate(pre_s)]  # forgot the Markov text
    emo_s = [x + 40 + (-1) ** d for d, x in enumerate(pre_s)]  # forgot less
    s = _with_pretrained({"ce": (ce_h, ce_s), "emo": (ce_h, emo_s)}, (pre_h, pre_s))
    d = s["objectives"]["emo"]["vs_pretrained"]["synthetic_nats_per_word"]
    assert d["diff"] == pytest.approx(40 / 64)  # 40 nats per 64-word document
    markov = findings(s)[2]
    assert markov.startswith("Significantly closer to the Markov source than ce (lower loss on its text): "
                             "emo")
    assert "each of them has a higher loss on the Markov text than the pre-trained model" in markov
    s2 = _with_pretrained({"ce": (ce_h, ce_s), "emo": (ce_h, [x - 5 for x in pre_s])}, (pre_h, pre_s))
    assert "higher loss on the Markov text than the pre-trained" not in findings(s2)[2]
