"""Temperature: scoring softmax(z / T), and the fitted T* against a scalar minimiser of the same float64
corpus NLL."""

from __future__ import annotations

import math

import pytest
import torch
from eval_reference import metrics

import xent.eval

DOCS = ["The quick brown fox jumps over the lazy dog.", "Hi.", "Cross-entropy measures how well a model",
        "Perplexity is the exponential of the mean negative log-likelihood", "A sliding window"]


def _logits(model, tok):
    """Per document, the model's float64 logits [n, V] at each scored position and the targets."""
    out = []
    with torch.no_grad():
        for doc in DOCS:
            ids = tok(doc, add_special_tokens=False)["input_ids"]
            src = torch.tensor([[tok.bos_token_id] + ids])
            out.append((model(input_ids=src).logits[0, :-1].double(), torch.tensor(ids)))
    return out


def _records(per_doc, T):
    recs = []
    for z, y in per_doc:
        logp = torch.log_softmax(z / T, -1)
        recs.append([(logp[t], int(y[t]), t + 1) for t in range(len(y))])
    return recs


def _nll(per_doc, T):
    total = n = 0
    for z, y in per_doc:
        logp = torch.log_softmax(z / T, -1)
        total += float(-logp.gather(-1, y[:, None]).sum())
        n += len(y)
    return total / n


def _golden(f, lo, hi, tol=1e-10):
    """A scalar minimiser: golden-section search of a unimodal f on [lo, hi]."""
    r = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - r * (b - a), a + r * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tol:
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - r * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + r * (b - a)
            fd = f(d)
    return (a + b) / 2


@pytest.mark.parametrize("T", [0.5, 2.0])
def test_temperature_scores_softmax_of_z_over_t(model_and_tokenizer, T):
    model, tok = model_and_tokenizer
    want = metrics(_records(_logits(model, tok), T), DOCS)
    got = xent.eval.evaluate(model, tok, DOCS, max_length=64, batch_size=2, model_sha256="-", temperature=T)
    assert got.config["temperature"] == T
    for k in ("nll_mean", "entropy_mean", "ece", "brier", "top1_accuracy", "nll_se_document"):
        assert getattr(got, k) == pytest.approx(want[k], rel=1e-5, abs=1e-7), k


def test_fit_temperature_matches_a_scalar_minimiser(model_and_tokenizer):
    model, tok = model_and_tokenizer
    per_doc = _logits(model, tok)
    t_ref = _golden(lambda T: _nll(per_doc, T), 0.05, 20.0)
    got = xent.eval.evaluate(model, tok, DOCS, max_length=64, batch_size=2, model_sha256="-",
                             fit_temperature=True)
    fit = got.temperature_fit
    assert abs(t_ref - 1) > 0.05  # the fit moves T: a test that T = 1 would fail
    assert fit["temperature"] == pytest.approx(t_ref, rel=1e-4)
    want = metrics(_records(per_doc, fit["temperature"]), DOCS)
    for k in ("nll_mean", "ece", "entropy_mean", "brier", "top1_accuracy"):
        assert fit[k] == pytest.approx(want[k], rel=1e-5, abs=1e-7), k
    assert fit["nll_mean"] < got.nll_mean  # T* lowers the NLL below T = 1's
    # at the optimum d/dβ Σ ℓ(βz) = Σ (E_q[z] − z_y) = 0, so the mean NLL equals the mean entropy
    assert fit["entropy_mean"] == pytest.approx(fit["nll_mean"], rel=1e-6)
    assert fit["passes"] <= 8
    one = metrics(_records(per_doc, 1.0), DOCS)
    assert got.nll_mean == pytest.approx(one["nll_mean"], rel=1e-6)  # the run itself stays at T = 1


def test_temperature_options_are_checked(model_and_tokenizer):
    model, tok = model_and_tokenizer
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(xent.eval.EvalError, match="temperature must be a finite number > 0"):
            xent.eval.evaluate(model, tok, DOCS, temperature=bad, model_sha256="-")
    with pytest.raises(xent.eval.EvalError, match="do not pass temperature"):
        xent.eval.evaluate(model, tok, DOCS, temperature=2.0, fit_temperature=True, model_sha256="-")


def test_cli_fit_temperature(model_dir, tmp_path, capsys):
    import json

    from xent.cli import main

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS))
    assert main(["eval", "--model", str(model_dir), "--data", str(data), "--fit-temperature",
                 "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    fit = json.loads((tmp_path / "o" / "summary.json").read_text())["temperature_fit"]
    assert f"T* = {fit['temperature']:.4f}" in out
    code = main(["eval", "--model", str(model_dir), "--data", str(data), "--temperature", "0"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--temperature must be a finite number > 0, got 0.0" in err
