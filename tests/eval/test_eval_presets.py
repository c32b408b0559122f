"""--preset lm-eval, llama.cpp and transformers against re-implementations of those tools' loops
(lm-evaluation-harness 0.4.13, llama.cpp tools/perplexity and common/arg.cpp, as read from their source)."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from eval_builders import CORPUS
from eval_reference import scored_text_size

import xent.eval
from xent.cli import main


def _logprobs(model, inp):
    with torch.no_grad():
        z = model(input_ids=torch.tensor([inp])).logits[0].double()
    return z - torch.logsumexp(z, -1, keepdim=True)


def lm_eval_loglikelihood_rolling(model, tokens, prefix, L):
    """lm-evaluation-harness: utils.get_rolling_token_windows(context_len=1) + make_disjoint_window, then
    HFLM._loglikelihood_tokens on each (context, continuation) pair; no token, no window: 0."""
    if not tokens:
        return 0.0
    windows = []
    first = min(L, len(tokens))
    windows.append(([prefix] + tokens[: first - 1], tokens[:first]))
    predicted = first
    while predicted < len(tokens):
        wpl = min(len(tokens) - predicted, L)
        end = predicted + wpl
        windows.append((tokens[end - L - 1 : end - 1], tokens[end - wpl : end]))
        predicted += wpl
    total = 0.0
    for a, b in windows:
        ctx, cont = a[: len(a) - (len(b) - 1)], b
        inp = (ctx + cont)[-(L + 1) :][:-1]
        logp = _logprobs(model, inp)[-len(cont) :]
        total += sum(logp[i, y].item() for i, y in enumerate(cont))
    return total


def test_lm_eval_preset_reproduces_rolling_loglikelihood(model_and_tokenizer, documents):
    model, tok = model_and_tokenizer
    L = 24
    ll, words, nbytes, n = 0.0, 0, 0, 0
    for doc in documents:
        ids = tok(doc, add_special_tokens=False)["input_ids"]
        ll += lm_eval_loglikelihood_rolling(model, ids, tok.bos_token_id, L)
        words += len(re.split(r"\s+", doc))
        nbytes += len(doc.encode("utf-8"))
        n += len(ids)
    r = xent.eval.evaluate(model, tok, documents, max_length=L, preset="lm-eval", batch_size=4)
    assert r.tokens == n and r.words == words and r.bytes == nbytes
    assert r.word_perplexity == pytest.approx(math.exp(-ll / words), rel=1e-5)
    assert r.byte_perplexity == pytest.approx(math.exp(-ll / nbytes), rel=1e-5)
    assert r.bits_per_byte == pytest.approx(-ll / nbytes / math.log(2), rel=1e-5)
    plain = xent.eval.evaluate(model, tok, documents, max_length=L, batch_size=4)
    assert plain.tokens == r.tokens and plain.nll_mean != r.nll_mean  # the last windows differ


def _lm_eval_reference(model, tok, docs, L):
    """(Σ log-likelihood, tokens, words, bytes) as lm-evaluation-harness sums them over documents."""
    ll, n, words, nbytes = 0.0, 0, 0, 0
    for doc in docs:
        ids = tok(doc, add_special_tokens=False)["input_ids"]
        ll += lm_eval_loglikelihood_rolling(model, ids, tok.bos_token_id, L)
        n += len(ids)
        words += len(re.split(r"\s+", doc))
        nbytes += len(doc.encode("utf-8"))
    return ll, n, words, nbytes


def test_lm_eval_preset_scores_blank_documents_as_lm_eval(capsys, model_dir, model_and_tokenizer, tmp_path):
    # lm-eval scores a whitespace-only document like any other (its tokens, bytes and re.split words)
    # and counts an empty one's word (re.split gives [""]) and 0 bytes, with no tokens (no window)
    model, tok = model_and_tokenizer
    docs = ["The river and the stone.", " \n", ""]
    ll, n, words, nbytes = _lm_eval_reference(model, tok, docs, 16)
    assert (words, nbytes) == (5 + 2 + 1, 24 + 2 + 0)
    assert n > len(tok(docs[0], add_special_tokens=False)["input_ids"])  # " \n" has tokens
    r = xent.eval.evaluate(model, tok, docs, max_length=16, preset="lm-eval")
    assert (r.tokens, r.words, r.bytes) == (n, words, nbytes)
    assert r.bits_per_byte == pytest.approx(-ll / nbytes / math.log(2), rel=1e-5)
    assert r.word_perplexity == pytest.approx(math.exp(-ll / words), rel=1e-5)
    assert (r.documents, r.skipped_empty) == (2, 1)
    # the two documents, from a .jsonl on the command line (the empty one has no line here)
    data = tmp_path / "blank.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:2]))
    code = main(["eval", "--model", str(model_dir), "--data", str(data), "--max-length", "16",
                 "--preset", "lm-eval", "--json"])
    s = json.loads(capsys.readouterr().out)
    assert code == 0 and (s["tokens"], s["words"], s["bytes"]) == (n, 7, 26)
    assert s["bits_per_byte"] == pytest.approx(-ll / nbytes / math.log(2), rel=1e-5)


def _llama_cpp_reference(model, tok, text, n_ctx):
    """llama-perplexity on a text (BOS added, as for a model whose GGUF says add_bos): None when it
    refuses (fewer than 2·n_ctx tokens), else (Σ nll, count)."""
    tokens = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
    if len(tokens) < 2 * n_ctx:
        return None
    nll, count = 0.0, 0
    for i in range(len(tokens) // n_ctx):
        chunk = tokens[i * n_ctx : (i + 1) * n_ctx]
        chunk[0] = tok.bos_token_id
        logp = _logprobs(model, chunk)
        for j in range(n_ctx // 2, n_ctx - 1):
            nll -= logp[j, chunk[j + 1]].item()
            count += 1
    return nll, count


def test_llama_cpp_preset_drops_one_trailing_newline_of_a_txt_file(model_and_tokenizer, tmp_path):
    # llama-perplexity -f FILE: common/arg.cpp reads the file and pops one trailing '\n'. A text whose
    # BOS + tokens is exactly 3 chunks with its final newline is 2 chunks without it.
    model, tok = model_and_tokenizer
    L = 16
    joined = " ".join(CORPUS)
    nl = tok("\n", add_special_tokens=False)["input_ids"]
    text = next(joined[:c] for c in range(len(joined)) if not joined[c - 1].isspace()
                and 1 + len(tok(joined[:c] + "\n", add_special_tokens=False)["input_ids"]) == 3 * L
                and tok(joined[:c] + "\n", add_special_tokens=False)["input_ids"][-1:] == nl)
    path = tmp_path / "file.txt"
    path.write_text(text + "\n", encoding="utf-8")
    nll, count = _llama_cpp_reference(model, tok, text, L)
    assert count == 2 * (L - L // 2 - 1)  # 2 chunks, not 3
    r = xent.eval.evaluate(model, tok, xent.eval.Corpus([str(path)]), max_length=L, preset="llama.cpp")
    assert r.tokens == count
    assert r.perplexity == pytest.approx(math.exp(nll / count), rel=1e-5)
    # only a whole .txt file is read as llama.cpp reads -f; other presets keep the newline
    plain = xent.eval.evaluate(model, tok, xent.eval.Corpus([str(path)]), max_length=L)
    assert plain.tokens == 3 * L - 1


def test_llama_cpp_preset_refuses_texts_under_two_chunks(capsys, model_dir, model_and_tokenizer, tmp_path):
    # "you need at least 2*n_ctx tokens to evaluate perplexity with a context of n_ctx"
    model, tok = model_and_tokenizer
    L = 32
    short, long = CORPUS[0], " ".join(CORPUS)
    assert _llama_cpp_reference(model, tok, short, L) is None
    assert L < 1 + len(tok(short, add_special_tokens=False)["input_ids"])  # one chunk, which was scored
    (tmp_path / "short.txt").write_text(short)
    argv = ["eval", "--model", str(model_dir), "--max-length", str(L), "--preset", "llama.cpp"]
    code = main([*argv, "--data", str(tmp_path / "short.txt")])
    _, err = capsys.readouterr()
    assert code == 2 and "fewer than 2 × 32 tokens, which llama-perplexity refuses" in err
    (tmp_path / "long.txt").write_text(long)
    code = main([*argv, "--data", str(tmp_path / "short.txt"), str(tmp_path / "long.txt"), "--json"])
    out, err = capsys.readouterr()
    nll, count = _llama_cpp_reference(model, tok, long, L)
    s = json.loads(out)
    assert code == 0 and s["tokens"] == count and s["skipped_unscored"] == 1
    assert s["nll_mean"] == pytest.approx(nll / count, rel=1e-5)
    assert "warning: 1 documents not scored (--preset llama.cpp: fewer than 2 × 32 tokens" in err


@pytest.mark.parametrize("add_bos", [True, False])
def test_llama_cpp_preset_reproduces_perplexity(model_and_tokenizer, documents, add_bos):
    # llama-perplexity: tokens = [BOS] + text if add_bos; fewer than 2·n_ctx tokens: refused ("you need
    # at least 2*n_ctx tokens"); n_chunk = len // n_ctx; with add_bos each chunk's first token is set to
    # BOS; nll over j in [n_ctx/2, n_ctx − 1) of −log p(tokens[start + j + 1] | chunk[: j + 1]).
    # Bits per byte and word perplexity divide by the bytes and words of those scored tokens only.
    model, tok = model_and_tokenizer
    n_ctx = 32
    nll, count, nbytes, words, refused = 0.0, 0, 0, 0, 0
    for doc in documents:
        ids = tok(doc, add_special_tokens=False)["input_ids"]
        tokens = [tok.bos_token_id] * add_bos + ids
        if len(tokens) < 2 * n_ctx:
            refused += 1
            continue
        scored = []
        for i in range(len(tokens) // n_ctx):
            start = i * n_ctx
            chunk = tokens[start : start + n_ctx]
            if add_bos:
                chunk[0] = tok.bos_token_id
            logp = _logprobs(model, chunk)
            for j in range(n_ctx // 2, n_ctx - 1):
                nll -= logp[j, tokens[start + j + 1]].item()
                count += 1
                scored.append(start + j + 1 - add_bos)
        b, w = scored_text_size(tok, doc, ids, scored)
        nbytes, words = nbytes + b, words + w
    r = xent.eval.evaluate(model, tok, documents, max_length=n_ctx, preset="llama.cpp", batch_size=3,
                           bos="first" if add_bos else "none")
    assert r.tokens == count and count > 0 and refused > 0
    assert r.perplexity == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert r.skipped_unscored == refused
    assert (r.bytes, r.words) == (nbytes, words)
    assert r.bits_per_byte == pytest.approx(nll / nbytes / math.log(2), rel=1e-5)
    assert r.word_perplexity == pytest.approx(math.exp(nll / words), rel=1e-5)
    # about half of each scored document's text: bits per byte near the default run's, not half of it
    whole = sum(len(d.encode()) for d in documents if len(tok(d)["input_ids"]) + add_bos >= 2 * n_ctx)
    assert 0.35 * whole < nbytes < 0.65 * whole


@pytest.mark.parametrize("L,S", [(32, 32), (32, 12)])
def test_transformers_preset_reproduces_the_page_loop(model_and_tokenizer, documents, L, S):
    # "Perplexity of fixed-length models" (transformers docs), its loop on one long sequence, with the
    # tokens counted from the labels the model actually predicts (labels[:, 1:] != -100)
    model, tok = model_and_tokenizer
    text = documents[1]
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    seq_len = ids.size(1)
    nll_sum, n_tokens, prev_end_loc, scored = 0.0, 0, 0, []
    for begin_loc in range(0, seq_len, S):
        end_loc = min(begin_loc + L, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = ids[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss
        n = int((target_ids[:, 1:] != -100).sum())
        scored += [begin_loc + 1 + j for j in (target_ids[0, 1:] != -100).nonzero()[:, 0].tolist()]
        nll_sum += loss.item() * n
        n_tokens += n
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    r = xent.eval.evaluate(model, tok, [text], max_length=L, stride=S, preset="transformers", batch_size=3)
    assert r.tokens == n_tokens
    assert r.nll_mean == pytest.approx(nll_sum / n_tokens, rel=2e-6)
    windows = -(-(seq_len - L) // S) + 1
    assert n_tokens == (seq_len - 1 - (windows - 1) if S == L else seq_len - 1)
    # bits per byte: the bytes of the scored tokens (not the first, nor each window's first with S = L)
    nbytes, words = scored_text_size(tok, text, ids[0].tolist(), scored)
    assert (r.bytes, r.words) == (nbytes, words) and nbytes < len(text.encode())
    assert r.bits_per_byte == pytest.approx(nll_sum / nbytes / math.log(2), rel=2e-6)


def test_a_preset_fixes_stride_and_bos(model_and_tokenizer):
    model, tok = model_and_tokenizer
    lm_eval = "^preset lm-eval fixes the stride and BOS: do not pass stride or bos$"
    with pytest.raises(xent.eval.EvalError, match=lm_eval):
        xent.eval.evaluate(model, tok, ["text"], max_length=16, stride=8, preset="lm-eval")
    with pytest.raises(xent.eval.EvalError, match="^preset llama.cpp fixes the stride: do not pass stride$"):
        xent.eval.evaluate(model, tok, ["text"], max_length=16, stride=8, preset="llama.cpp")
