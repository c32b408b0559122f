"""xent.eval.mauve against mauve-text's own compute_mauve; the sampler and the repetition statistics."""

from __future__ import annotations

import math

import pytest
import torch

np = pytest.importorskip("numpy")
mauve_text = pytest.importorskip("mauve")

from eval_builders import CORPUS  # noqa: E402

import xent  # noqa: E402
from xent.eval import EvalError  # noqa: E402
from xent.eval._generate import generation_stats, sample_continuations  # noqa: E402
from xent.eval._mauve import mauve_from_features  # noqa: E402


def _clusters(seed, n, shift):
    """n features in 16 dimensions around 6 seeded centres, the centres moved by ``shift``."""
    rng = np.random.RandomState(seed)
    centres = np.random.RandomState(99).randn(6, 16) * 3
    labels = rng.randint(0, 6, size=n)
    return (centres[labels] + shift + rng.randn(n, 16)).astype(np.float32)


@pytest.mark.parametrize("shift", [0.0, 0.7, 3.0])
def test_wiring_equals_compute_mauve_on_fixed_features(shift):
    p, q = _clusters(0, 200, 0.0), _clusters(1, 180, shift)
    ours = mauve_from_features(p, q, seed=7, threads=1)
    # mauve-text called the documented way, its defaults, on one thread (its k-means is faiss's)
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        theirs = mauve_text.compute_mauve(p_features=p, q_features=q, seed=7, device_id=-1, verbose=False)
    finally:
        faiss.omp_set_num_threads(before)
    assert ours.mauve == theirs.mauve
    assert ours.frontier_integral == theirs.frontier_integral
    assert ours.num_buckets == theirs.num_buckets == 18  # 'auto': min(200, 180) / 10
    assert (ours.p_count, ours.q_count) == (200, 180)
    if shift == 3.0:
        assert ours.mauve < 0.5  # far apart: low
    # options reach compute_mauve: a different scaling factor, buckets and seed change the score as theirs
    alt = mauve_text.compute_mauve(p_features=p, q_features=q, seed=3, num_buckets=9, mauve_scaling_factor=2,
                                   device_id=-1)
    ours_alt = mauve_from_features(p, q, seed=3, num_buckets=9, mauve_scaling_factor=2, threads=1)
    assert ours_alt.mauve == pytest.approx(alt.mauve, rel=1e-12) and ours_alt.num_buckets == 9


def test_identical_feature_sets_give_one():
    p = _clusters(2, 120, 0.0)
    r = mauve_from_features(p, p.copy(), seed=0, threads=1)
    assert r.mauve == pytest.approx(1.0, abs=1e-12)
    assert r.frontier_integral == pytest.approx(0.0, abs=1e-12)


def _reference_features(model, tok, texts):
    """One text at a time, no padding: hidden_states[-1] at the last token of [BOS] + tokens."""
    rows = []
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor([[tok.bos_token_id, *tok(t, add_special_tokens=False)["input_ids"]]])
            h = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
            rows.append(h[0, -1].numpy())
    return np.stack(rows)


def test_texts_featurised_by_the_local_model_then_compute_mauve(model_and_tokenizer):
    model, tok = model_and_tokenizer
    words = " ".join(CORPUS).split()
    p_texts = [" ".join(words[i : i + 5 + i % 7]) for i in range(0, 60)]
    q_texts = [" ".join(words[i + 3 : i + 4 + i % 3]) for i in range(0, 50)]
    r = xent.eval.mauve(p_texts, q_texts, model=model, tokenizer=tok, seed=4, batch_size=7)
    ref_p, ref_q = _reference_features(model, tok, p_texts), _reference_features(model, tok, q_texts)
    from xent.eval._mauve import text_features

    got = text_features(model, tok, p_texts, max_length=64, batch_size=7)
    np.testing.assert_allclose(got, ref_p, rtol=1e-5, atol=1e-5)  # padding changes nothing
    theirs = mauve_text.compute_mauve(p_features=ref_p, q_features=ref_q, seed=4, device_id=-1)
    assert r.mauve == pytest.approx(theirs.mauve, abs=1e-6)
    assert r.num_buckets == 5 and (r.p_count, r.q_count) == (60, 50)
    assert "hidden_states[-1]" in r.features and "last token" in r.features and "64 tokens" in r.features
    same = xent.eval.mauve(p_texts, list(p_texts), model=model, tokenizer=tok, seed=0)
    assert same.mauve == pytest.approx(1.0, abs=1e-12)


def test_bad_input_is_named(model_and_tokenizer):
    model, tok = model_and_tokenizer
    with pytest.raises(EvalError, match="p_texts is empty"):
        xent.eval.mauve([], ["a"], model=model, tokenizer=tok)
    with pytest.raises(EvalError, match=r"q_texts\[1\] is an empty string"):
        xent.eval.mauve(["a b"], ["a", ""], model=model, tokenizer=tok)
    with pytest.raises(EvalError, match="q_texts must be a list of strings"):
        xent.eval.mauve(["a"], "abc", model=model, tokenizer=tok)
    with pytest.raises(EvalError, match="num_buckets must be"):
        mauve_from_features(np.zeros((4, 2)), np.ones((4, 2)), num_buckets=1)
    with pytest.raises(EvalError, match="different widths"):
        mauve_from_features(np.zeros((4, 2)), np.ones((4, 3)))


def test_sampler_is_seeded_and_equals_sampling_without_the_cache(model_and_tokenizer):
    model, tok = model_and_tokenizer
    ids = tok(" ".join(CORPUS), add_special_tokens=False)["input_ids"]
    prefixes = torch.tensor([ids[i : i + 6] for i in range(0, 60, 6)])  # [10, 6]
    a = sample_continuations(model, prefixes, max_new_tokens=12, seed=5, batch_size=4)
    assert a.shape == (10, 12)
    assert torch.equal(a, sample_continuations(model, prefixes, max_new_tokens=12, seed=5, batch_size=4))
    assert not torch.equal(a, sample_continuations(model, prefixes, max_new_tokens=12, seed=6, batch_size=4))
    # reference: the whole sequence re-run at every step (no KV cache), the same generator stream
    gen = torch.Generator().manual_seed(5)
    ref = []
    with torch.no_grad():
        for start in range(0, 10, 4):
            x = prefixes[start : start + 4]
            for _ in range(12):
                q = torch.softmax(model(input_ids=x).logits[:, -1].double(), -1)
                x = torch.cat([x, torch.multinomial(q.float(), 1, generator=gen)], 1)
            ref.append(x[:, 6:])
    assert torch.equal(a, torch.cat(ref))
    # temperature → 0 is greedy decoding
    cold = sample_continuations(model, prefixes[:3], max_new_tokens=5, temperature=1e-4, seed=1)
    x = prefixes[:3]
    with torch.no_grad():
        for _ in range(5):
            x = torch.cat([x, model(input_ids=x).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(cold, x[:, 6:])
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="temperature must be"):
            sample_continuations(model, prefixes, max_new_tokens=2, temperature=bad)


def test_repetition_and_distinct_n_by_hand():
    samples = [[1, 2, 3, 4, 1, 2, 3, 4, 1], [5, 5, 5, 5, 5], [7, 8]]
    s = generation_stats(samples)
    # sample 0: 4-grams 1234 2341 3412 4123 1234 2341 → 4 unique of 6; sample 1: 5555 ×2 → 1 of 2;
    # sample 2 has no 4-gram
    assert s["repetition_4"] == pytest.approx(((1 - 4 / 6) + (1 - 1 / 2)) / 2)
    assert s["distinct_1"] == pytest.approx(len({1, 2, 3, 4, 5, 7, 8}) / 16)
    # bigrams: 12 23 34 41 12 23 34 41 | 55 55 55 55 | 78 → unique {12,23,34,41,55,78} of 13
    assert s["distinct_2"] == pytest.approx(6 / 13)
    # trigrams: 123 234 341 412 123 234 341 | 555 555 555 → 5 unique of 10
    assert s["distinct_3"] == pytest.approx(5 / 10)
    assert s["samples"] == 3


def test_sizes_are_checked_before_faiss():
    """More buckets than points is a faiss traceback inside compute_mauve; one text a side has no
    distribution; a handful a side gives a number that is mostly noise: refused, refused, warned."""
    p, q = _clusters(3, 3, 0.0), _clusters(4, 3, 0.5)
    with pytest.raises(EvalError, match=r"^num_buckets=7 is more than the 6 texts \(3 in P, 3 in Q\)"):
        mauve_from_features(p, q, num_buckets=7, threads=1)
    with pytest.raises(EvalError, match=r"^MAUVE needs at least 2 texts on each side .* 1 in P and 3 in Q"):
        mauve_from_features(p[:1], q, threads=1)
    with pytest.warns(UserWarning, match=r"^MAUVE of 3 and 3 texts: under 10 on a side"):
        r = mauve_from_features(p, q, num_buckets=6, threads=1)
    assert 0.0 < r.mauve <= 1.0 and r.num_buckets == 6
    with pytest.warns(UserWarning, match=r"^MAUVE of 2 and 40 texts"):
        mauve_from_features(p[:2], _clusters(5, 40, 0.0), threads=1)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # enough texts: no warning
        mauve_from_features(_clusters(6, 10, 0.0), _clusters(7, 12, 0.0), threads=1)
