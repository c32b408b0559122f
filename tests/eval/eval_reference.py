"""Independent float64 references for the eval tests: the model run on each token's context, explicit
log-softmax, explicit loops over tokens, classes and bins (nothing from xent.eval)."""

from __future__ import annotations

import math

import torch


def token_records(model, context_and_targets):
    """[(log-probs float64 [V], target, context length)] for each (context ids, target) pair, running the
    model on exactly that context."""
    out = []
    with torch.no_grad():
        for context, target in context_and_targets:
            logits = model(input_ids=torch.tensor([context])).logits[0, -1].double()
            logp = logits - torch.logsumexp(logits, 0)
            out.append((logp, target, len(context)))
    return out


def records_one_window(model, docs_ids, bos_id):
    """Per document, records with the full past as context ([BOS] + x[:t]), from one forward each."""
    per_doc = []
    with torch.no_grad():
        for ids in docs_ids:
            src = [bos_id] + ids
            logits = model(input_ids=torch.tensor([src])).logits[0].double()
            recs = []
            for t in range(len(ids)):
                logp = logits[t] - torch.logsumexp(logits[t], 0)
                recs.append((logp, ids[t], t + 1))
            per_doc.append(recs)
    return per_doc


def metrics(per_doc, texts, *, bins=15, size=None):
    """Every metric of REFERENCE.md §4 from per-document records, by explicit loops. Bytes and words are
    those of the whole texts, or ``size`` = (bytes, words) of the scored text when given."""
    losses, doc_sums, doc_counts = [], [], []
    ent, top1, top5, brier, conf, correct, ctx = [], [], [], [], [], [], []
    for recs in per_doc:
        s = 0.0
        for logp, y, c in recs:
            p = [math.exp(v) for v in logp.tolist()]
            loss = -logp[y].item()
            losses.append(loss)
            s += loss
            ent.append(-sum(pi * math.log(pi) for pi in p if pi > 0))
            order = sorted(range(len(p)), key=lambda i: -p[i])
            rank = 1 + sum(1 for pi in p if pi > p[y])
            top1.append(rank == 1)
            top5.append(rank <= 5)
            brier.append(sum((pi - (1.0 if i == y else 0.0)) ** 2 for i, pi in enumerate(p)))
            conf.append(p[order[0]])
            correct.append(rank == 1)
            ctx.append(c)
        doc_sums.append(s)
        doc_counts.append(len(recs))
    N, D = len(losses), len(per_doc)
    mean = sum(losses) / N
    s2 = sum((x - mean) ** 2 for x in losses) / (N - 1)
    se_tok = math.sqrt(s2 / N)
    resid = sum((S - mean * n) ** 2 for S, n in zip(doc_sums, doc_counts))
    se_doc = math.sqrt(D / (D - 1) * resid) / N if D > 1 else math.nan
    B = sum(len(t.encode("utf-8")) for t in texts)
    W = sum(len(t.split()) for t in texts)
    if size is not None:
        B, W = size
    ece = 0.0
    for b in range(bins):
        idx = [i for i, c in enumerate(conf) if min(int(c * bins), bins - 1) == b]
        if idx:
            acc = sum(correct[i] for i in idx) / len(idx)
            avg = sum(conf[i] for i in idx) / len(idx)
            ece += len(idx) / N * abs(acc - avg)
    return {
        "tokens": N, "documents": D, "bytes": B, "words": W,
        "nll_mean": mean, "nll_se_token": se_tok, "nll_se_document": se_doc,
        "perplexity": math.exp(mean),
        "perplexity_ci95": [math.exp(mean - 1.96 * se_doc), math.exp(mean + 1.96 * se_doc)],
        "bits_per_token": mean / math.log(2),
        "bits_per_byte": sum(losses) / B / math.log(2),
        "byte_perplexity": 2 ** (sum(losses) / B / math.log(2)),
        "word_perplexity": math.exp(sum(losses) / W),
        "top1_accuracy": sum(top1) / N, "top5_accuracy": sum(top5) / N,
        "entropy_mean": sum(ent) / N, "ece": ece, "brier": sum(brier) / N,
        "losses": losses, "contexts": ctx,
    }


def scored_text_size(tok, text, ids, positions):
    """(UTF-8 bytes, words) of the text of the tokens at ``positions``, by decoding prefixes: token i
    stands for the characters that decoding ids[: i + 1] adds to decoding ids[: i] (a trailing U+FFFD is
    an incomplete character, left to the token that completes it); a word (str.split) counts with the
    token that adds its first character."""
    ends = []
    for i in range(1, len(ids) + 1):
        piece = tok.decode(ids[:i])
        while piece.endswith("\ufffd") and i < len(ids):
            piece = piece[:-1]
        assert text.startswith(piece), "decoding is not prefix-consistent for this tokenizer"
        ends.append(len(piece))
    assert ends[-1] == len(text)
    starts = [0] + ends[:-1]
    nbytes = words = 0
    for p in positions:
        a, b = starts[p], ends[p]
        nbytes += len(text[a:b].encode("utf-8"))
        words += sum(1 for c in range(a, b) if not text[c].isspace() and (c == 0 or text[c - 1].isspace()))
    return nbytes, words
