"""xent compare against explicit per-token formulas on the two models."""

from __future__ import annotations

import json
import math

import pytest
import torch
from eval_builders import CORPUS

import xent.eval
from xent.cli import main


@pytest.fixture(scope="module")
def two_models(model_and_tokenizer, other_model_dir):
    from transformers import AutoModelForCausalLM

    base, tok = model_and_tokenizer
    return base, AutoModelForCausalLM.from_pretrained(other_model_dir).eval(), tok


def _percentile(values, q):
    """Linear interpolation between closest ranks, written out."""
    v = sorted(values)
    pos = q / 100 * (len(v) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def _reference(base, model, tok, docs):
    """Per-token float64 values, and the document index of each token."""
    kl, same, dp, lb, lm, doc_of = [], [], [], [], [], []
    with torch.no_grad():
        for d, doc in enumerate(docs):
            ids = tok(doc, add_special_tokens=False)["input_ids"]
            src = torch.tensor([[tok.bos_token_id] + ids])
            zb, zm = base(input_ids=src).logits[0].double(), model(input_ids=src).logits[0].double()
            for t, y in enumerate(ids):
                p = torch.softmax(zb[t], 0).tolist()
                q = torch.softmax(zm[t], 0).tolist()
                kl.append(sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0))
                same.append(max(range(len(p)), key=p.__getitem__) == max(range(len(q)), key=q.__getitem__))
                dp.append(q[y] - p[y])
                lb.append(-math.log(p[y]))
                lm.append(-math.log(q[y]))
                doc_of.append(d)
    return kl, same, dp, lb, lm, doc_of


def _clustered_se(values, doc_of):
    """√(D/(D−1)·Σ_d (S_d − m·n_d)²)/N, by explicit loops over the documents (REFERENCE.md §4)."""
    docs = sorted(set(doc_of))
    S = {d: math.fsum(v for v, e in zip(values, doc_of) if e == d) for d in docs}
    n = {d: sum(1 for e in doc_of if e == d) for d in docs}
    N, D = len(values), len(docs)
    m = math.fsum(values) / N
    return math.sqrt(D / (D - 1) * math.fsum((S[d] - m * n[d]) ** 2 for d in docs)) / N


def test_compare_matches_explicit_formulas(two_models, documents):
    base, model, tok = two_models
    docs = [d for d in documents if len(tok(d, add_special_tokens=False)["input_ids"]) < 64]
    kl, same, dp, lb, lm, doc_of = _reference(base, model, tok, docs)
    r = xent.eval.compare(base, model, tok, docs, model_tokenizer=tok, batch_size=3)
    N = len(kl)
    d = [b - a for a, b in zip(lb, lm)]
    md = sum(d) / N
    assert r.tokens == N and r.documents == len(docs)
    approx = lambda x: pytest.approx(x, rel=1e-5, abs=1e-7)  # noqa: E731
    assert r.kl_mean == approx(sum(kl) / N) and r.kl_mean > 0.01
    mk = sum(kl) / N
    assert r.kl_se == approx(math.sqrt(sum((x - mk) ** 2 for x in kl) / (N - 1) / N))
    assert r.kl_max == approx(max(kl))
    for q, v in r.kl_percentiles.items():
        assert v == approx(_percentile(kl, float(q))), q
    for q, v in r.delta_p_percentiles.items():
        assert v == approx(_percentile(dp, float(q))), q
    assert r.same_top_rate == sum(same) / N
    assert r.delta_p_mean == approx(sum(dp) / N)
    assert r.delta_p_rms == approx(math.sqrt(sum(x * x for x in dp) / N))
    assert r.nll_base == approx(sum(lb) / N) and r.nll_model == approx(sum(lm) / N)
    assert r.delta_nll_mean == approx(md)
    assert r.delta_nll_se == approx(math.sqrt(sum((x - md) ** 2 for x in d) / (N - 1) / N))
    assert r.ppl_ratio == approx(math.exp(sum(lm) / N) / math.exp(sum(lb) / N))
    # the same means' document-clustered SEs, from per-document float64 sums
    assert r.kl_se_document == approx(_clustered_se(kl, doc_of))
    assert r.delta_nll_se_document == approx(_clustered_se(d, doc_of))
    assert r.same_top_rate_se_document == approx(_clustered_se([float(x) for x in same], doc_of))
    ms = sum(same) / N
    assert r.same_top_rate_se == approx(math.sqrt(ms * (1 - ms) / (N - 1)))
    assert r.kl_se_document != approx(r.kl_se)  # a different quantity, not a copy


def test_a_model_against_itself(two_models, documents):
    base, _, tok = two_models
    r = xent.eval.compare(base, base, tok, documents, max_length=32, stride=16)
    assert r.kl_mean == 0 and r.kl_max == 0 and r.same_top_rate == 1 and r.ppl_ratio == 1
    e = xent.eval.evaluate(base, tok, documents, max_length=32, stride=16)
    assert r.tokens == e.tokens and r.nll_base == e.nll_mean  # same windows, same exact sums


def test_compare_cli_report_and_summary(capsys, model_dir, other_model_dir, tmp_path, documents):
    (tmp_path / "d.txt").write_text("\n".join(documents), encoding="utf-8")
    argv = ["compare", "--base", str(model_dir), "--model", str(other_model_dir), "--data",
            str(tmp_path / "d.txt"), "--split", "lines", "--max-length", "32", "--out", str(tmp_path / "o")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "====== KL divergence statistics ======" in out and "Same top p:" in out
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    keys = ["kl_mean", "kl_se", "kl_max", "kl_percentiles", "same_top_rate", "delta_p_mean", "delta_p_rms",
            "delta_p_percentiles", "nll_base", "nll_model", "delta_nll_mean", "delta_nll_se", "ppl_ratio"]
    assert all(k in s for k in keys)
    assert list(s["kl_percentiles"]) == ["99.9", "99", "95", "90", "75", "50", "25", "10", "5", "1", "0.1"]
    # every ± names its standard error: tokens iid (llama.cpp's) and clustered by document
    assert (f"Mean    KLD: {s['kl_mean']:10.6f} ± {s['kl_se']:10.6f} (SE, tokens iid) ± "
            f"{s['kl_se_document']:10.6f} (SE, by document)") in out
    assert (f": {s['delta_nll_mean']:12.6f} ± {s['delta_nll_se']:10.6f} (SE, tokens iid) ± "
            f"{s['delta_nll_se_document']:10.6f} (SE, by document)") in out
    assert out.count("(SE, tokens iid)") == out.count("(SE, by document)") == out.count("±") // 2 == 10
    # llama.cpp's rows: its labels, both perplexities with ±, the correlation, the extremes
    for row in ("Mean PPL(Q)                   : ", "Mean PPL(base)                : ",
                "Cor(ln(PPL(Q)), ln(PPL(base))): ", "Mean PPL(Q)-PPL(base)         : ", "Maximum KLD:",
                "99.9%   KLD:", "Median  KLD:", " 5.0%   KLD:", "Minimum KLD:", "Maximum Δp:", "75.0%   Δp:",
                "Minimum Δp:", "Mean reverse KLD(Q‖base):", "Mean    JSD:"):
        assert row in out, row


def _bits_per_byte_reference(models, docs):
    """Per model, each document's summed loss in float64 (the whole document, [BOS] + ids in one window,
    explicit log-softmax); then Δ bits/byte and its document-clustered SE by explicit loops."""
    S = []
    with torch.no_grad():
        for model, tok in models:
            sums = []
            for doc in docs:
                ids = tok(doc, add_special_tokens=False)["input_ids"]
                z = model(input_ids=torch.tensor([[tok.bos_token_id] + ids])).logits[0].double()
                sums.append(math.fsum(float(torch.logsumexp(z[t], 0) - z[t, y]) for t, y in enumerate(ids)))
            S.append(sums)
    B = [len(d.encode("utf-8")) for d in docs]
    e = [(m - b) / math.log(2) for b, m in zip(*S)]
    delta = math.fsum(e) / sum(B)
    D = len(docs)
    se = math.sqrt(D / (D - 1) * math.fsum((ed - delta * bd) ** 2 for ed, bd in zip(e, B))) / sum(B)
    bpb = [math.fsum(s) / (math.log(2) * sum(B)) for s in S]
    return bpb, delta, se


def test_different_tokenizers_compare_bits_per_byte(model_and_tokenizer, other_tokenizer_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, tok = model_and_tokenizer
    model = AutoModelForCausalLM.from_pretrained(other_tokenizer_model_dir).eval()
    mtok = AutoTokenizer.from_pretrained(other_tokenizer_model_dir)
    docs = [text[:40] for text in CORPUS] + ["Hi."]  # within one window (64 positions) under both
    assert max(len(t(d, add_special_tokens=False)["input_ids"]) for t in (tok, mtok) for d in docs) < 64
    assert len(docs) >= 3 and any(tok(d)["input_ids"] != mtok(d)["input_ids"] for d in docs)
    (bpb_b, bpb_m), delta, se = _bits_per_byte_reference([(base, tok), (model, mtok)], docs)
    r = xent.eval.compare(base, model, tok, iter(docs), model_tokenizer=mtok, batch_size=2)
    approx = lambda x: pytest.approx(x, rel=1e-5, abs=1e-7)  # noqa: E731
    assert r.documents == len(docs) and r.bytes == sum(len(d.encode("utf-8")) for d in docs)
    assert r.tokens_model == sum(len(mtok(d, add_special_tokens=False)["input_ids"]) for d in docs)
    assert (r.bits_per_byte_base, r.bits_per_byte_model) == (approx(bpb_b), approx(bpb_m))
    assert r.delta_bits_per_byte == approx(delta) and abs(delta) > 1e-3
    assert r.delta_bits_per_byte_se_document == approx(se) and se > 0
    assert "shared vocabulary" in r.note
    # each model's bits per byte is exactly that of its own xent eval (same batches, same integer sums)
    assert r.bits_per_byte_model == xent.eval.evaluate(model, mtok, docs, batch_size=2).bits_per_byte


def test_different_tokenizers_cli(capsys, model_dir, other_tokenizer_model_dir, tmp_path, documents):
    data = tmp_path / "d.txt"
    data.write_text("\n".join(documents), encoding="utf-8")
    argv = ["compare", "--base", str(model_dir), "--model", str(other_tokenizer_model_dir), "--data",
            str(data), "--split", "lines", "--max-length", "32"]
    assert main([*argv, "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert (f"bits/byte(Q) − bits/byte(base): {s['delta_bits_per_byte']:10.6f} ± "
            f"{s['delta_bits_per_byte_se_document']:10.6f} (SE, by document)") in out
    assert "KL, JSD, same top and Δp need a shared vocabulary" in out and "KLD" not in out
    assert s["config"]["compared_by"] == "bits_per_byte" and s["documents"] == len(documents)
    # windows that leave tokens unscored cannot give whole-document losses: refused, nothing written
    for extra in (["--bos", "none"], ["--preset", "transformers"]):
        code = main([*argv, *extra, "--out", str(tmp_path / "p")])
        err = capsys.readouterr().err
        assert code == 2 and "needs every token scored" in err and err.count("\n") == 1, extra
        assert not (tmp_path / "p").exists()


def test_compare_completed_matches_explicit_formulas(two_models, documents):
    """Reverse KL, JSD, the clustered SE of every paired mean, and llama.cpp's remaining rows, against
    float64 per-token values and explicit loops."""
    base, model, tok = two_models
    docs = [d for d in documents if len(tok(d, add_special_tokens=False)["input_ids"]) < 64]
    kl, _, dp, lb, lm, doc_of = _reference(base, model, tok, docs)
    rkl, jsd = [], []
    with torch.no_grad():
        for doc in docs:
            src = torch.tensor([[tok.bos_token_id] + tok(doc, add_special_tokens=False)["input_ids"]])
            P = torch.softmax(base(input_ids=src).logits[0, :-1].double(), -1).tolist()
            Q = torch.softmax(model(input_ids=src).logits[0, :-1].double(), -1).tolist()
            for p, q in zip(P, Q):
                m = [(a + b) / 2 for a, b in zip(p, q)]
                rkl.append(sum(b * math.log(b / a) for a, b in zip(p, q) if b > 0))
                jsd.append(0.5 * sum(a * math.log(a / c) for a, c in zip(p, m) if a > 0)
                           + 0.5 * sum(b * math.log(b / c) for b, c in zip(q, m) if b > 0))
    r = xent.eval.compare(base, model, tok, docs, batch_size=2)
    N, D = len(kl), len(docs)
    approx = lambda x: pytest.approx(x, rel=1e-5, abs=1e-7)  # noqa: E731

    def se(v):
        mv = sum(v) / N
        return math.sqrt(sum((x - mv) ** 2 for x in v) / (N - 1) / N)

    for name, v in (("reverse_kl", rkl), ("jsd", jsd), ("delta_p", dp), ("nll_base", lb), ("nll_model", lm)):
        key = name if name.startswith("nll") else name + "_mean"
        assert r.to_dict()[key] == approx(sum(v) / N), name
        assert r.to_dict()[name + "_se"] == approx(se(v)), name
        assert r.to_dict()[name + "_se_document"] == approx(_clustered_se(v, doc_of)), name
    assert 0 < r.jsd_mean < min(r.kl_mean, r.reverse_kl_mean) and r.reverse_kl_mean != approx(r.kl_mean)
    assert r.kl_min == approx(min(kl))
    assert r.delta_p_max == approx(max(dp)) and r.delta_p_min == approx(min(dp))
    assert list(r.delta_p_percentiles) == ["99.9", "99", "95", "90", "75", "50", "25", "10", "5", "1", "0.1"]
    for q, v in r.kl_percentiles.items():
        assert v == approx(_percentile(kl, float(q))), q
    for q, v in r.delta_p_percentiles.items():
        assert v == approx(_percentile(dp, float(q))), q
    # llama.cpp: Cor of the per-token log-probs; PPL ± PPL·SE; PPL difference ± with the covariance
    ma, mb = sum(lb) / N, sum(lm) / N
    cov = sum((a - ma) * (b - mb) for a, b in zip(lb, lm)) / N
    va, vb = sum((a - ma) ** 2 for a in lb) / N, sum((b - mb) ** 2 for b in lm) / N
    assert r.nll_correlation == approx(cov / math.sqrt(va * vb)) and 0 < r.nll_correlation < 1
    pa, pb = math.exp(ma), math.exp(mb)
    assert (r.ppl_base, r.ppl_model, r.ppl_diff) == (approx(pa), approx(pb), approx(pb - pa))
    want = math.sqrt(pb * pb * vb / (N - 1) + pa * pa * va / (N - 1) - 2 * pa * pb * cov / (N - 1))
    assert r.ppl_diff_se == approx(want)
    S = {d: (sum(a for a, e in zip(lb, doc_of) if e == d), sum(b for b, e in zip(lm, doc_of) if e == d),
             doc_of.count(d)) for d in set(doc_of)}
    cov_doc = D / (D - 1) * sum((sa - ma * n) * (sb - mb * n) for sa, sb, n in S.values()) / N ** 2
    sea, seb = _clustered_se(lb, doc_of), _clustered_se(lm, doc_of)
    assert r.ppl_diff_se_document == approx(math.sqrt(pb * pb * seb * seb + pa * pa * sea * sea
                                                      - 2 * pa * pb * cov_doc))
