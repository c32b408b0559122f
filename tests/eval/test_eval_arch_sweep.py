"""Every causal LM of the installed transformers (its auto mapping, not a list chosen here), tiny, through
xent.eval.evaluate at batch size 2 with left padding: each token's loss equals the float64 log-softmax of
``model(input_ids=window).logits`` of its window alone, through the fused head or through the model's own
forward with a note; never a silent difference. The models that do not build tiny from their config's
defaults are skipped with the reason (benchmarks/eval_arch_sweep.py writes the same sweep as a table:
benchmarks/results/eval_arch_sweep.md)."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from eval_arch import Unbuildable, causal_lm_types, check, tiny_model  # noqa: E402

TYPES = causal_lm_types()


@pytest.fixture(scope="module")
def tok(model_and_tokenizer):
    return model_and_tokenizer[1]


@pytest.mark.parametrize(("model_type", "class_name"), TYPES, ids=[t for t, _ in TYPES])
def test_every_causal_lm_gives_its_own_numbers(model_type, class_name, tok):
    try:
        model = tiny_model(model_type, class_name, len(tok))
        r = check(model, tok)
    except Unbuildable as why:
        pytest.skip(f"{class_name}: {why}")
    assert r["tokens"] == r["reference_tokens"] > 0
    assert r["max_abs_diff"] <= 1e-4, r
    if r["head"] == "forward":  # the fused head was not used: a note says why
        assert any("own forward" in n for n in r["notes"]), r
