"""Sampling continuations from a causal LM, deterministically, and the repetition statistics of samples.

The sampler is plain ancestral sampling (top-p 1, no top-k): at each step the next token is drawn from
softmax(z / temperature) of the last position, in float32, by ``torch.multinomial`` with a seeded
``torch.Generator``, over the model's forward with its KV cache. The same seed, prefixes and model
give the same samples; two models sampled with the same seed share the generator's stream (common
random numbers), which makes their samples' differences less noisy.
"""

from __future__ import annotations

import inspect
import math


def sample_continuations(model, prefixes, *, max_new_tokens: int, temperature: float = 1.0, seed: int = 0,
                         batch_size: int = 64):
    """[B, max_new_tokens] int64 tokens sampled after ``prefixes`` ([B, P] ids, one length: no padding).

    Exactly ``max_new_tokens`` per row (an end-of-text token is sampled like any other and does not
    stop the row). Batches of ``batch_size`` rows each take the generator's next draws, in order.
    """
    import torch

    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    prefixes = torch.as_tensor(prefixes, dtype=torch.long)
    if prefixes.dim() != 2 or prefixes.shape[1] == 0:
        raise ValueError(f"prefixes must be a [B, P] tensor with P >= 1, got shape {tuple(prefixes.shape)}")
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    # transformers 5 renamed the cache argument and output (past_key_values -> cache)
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.no_grad():
            for start in range(0, len(prefixes), batch_size):
                x = prefixes[start : start + batch_size].to(device)
                new, past, seen = [], None, 0
                for _ in range(max_new_tokens):
                    seen += x.shape[1]  # every position is real: no padding
                    mask = torch.ones(x.shape[0], seen, dtype=torch.long, device=device)
                    o = model(input_ids=x, attention_mask=mask, use_cache=True, **{key: past})
                    past = getattr(o, key)
                    probs = torch.softmax(o.logits[:, -1].float() / temperature, dim=-1).cpu()  # [b, V]
                    x = torch.multinomial(probs, 1, generator=gen)  # [b, 1]
                    new.append(x)
                    x = x.to(device)
                out.append(torch.cat(new, dim=1))
    finally:
        model.train(was_training)
    return torch.cat(out)


def ngrams(tokens, n: int) -> list[tuple]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def generation_stats(samples) -> dict:
    """Repetition and diversity of a set of token sequences (lists of ids):

    - ``repetition_4``: seq-rep-4 (Welleck et al., ICLR 2020): per sample, the share of its 4-grams that
      repeat an earlier 4-gram of the same sample, 1 − unique/total, averaged over the samples that
      have a 4-gram;
    - ``distinct_1..3``: distinct-n (Li et al., NAACL 2016): unique n-grams / all n-grams, pooled over
      every sample.
    """
    samples = [list(s) for s in samples]
    reps = []
    for s in samples:
        grams = ngrams(s, 4)
        if grams:
            reps.append(1 - len(set(grams)) / len(grams))
    out = {"samples": len(samples), "repetition_4": sum(reps) / len(reps) if reps else math.nan}
    for n in (1, 2, 3):
        grams = [g for s in samples for g in ngrams(s, n)]
        out[f"distinct_{n}"] = len(set(grams)) / len(grams) if grams else math.nan
    return out
