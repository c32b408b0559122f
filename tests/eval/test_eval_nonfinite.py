"""A non-finite per-token value is never summed: eval and compare stop, naming how many tokens and where.

As int64 fixed point a NaN became −2^63: an even count of them wrapped to nothing (a near-perfect
score), an odd count overflowed at the end. The references here count the non-finite losses with the
transformers model run directly (or from where the logits were poisoned), not with xent."""

from __future__ import annotations

import json
import math
import re
import shutil
from types import SimpleNamespace

import pytest
import torch
from eval_builders import CORPUS

import xent.eval
from xent.cli import main

DOCS = [CORPUS[0], CORPUS[1], CORPUS[2]]


class Poisoned(torch.nn.Module):
    """The tiny GPT-2 with the logits at chosen input positions replaced: "nan" (a row of NaN) or "inf"
    (p = 0 for every token but id 0, which no text token is: an infinite loss)."""

    def __init__(self, model, positions, kind):
        super().__init__()
        self.inner, self.config, self.positions, self.kind = model, model.config, positions, kind
        self.train(model.training)  # evaluate gives it back in this mode: the shared model stays in eval

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
        z = self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
        z = z.clone()
        hit = torch.isin(position_ids, torch.tensor(self.positions))
        if self.kind == "nan":
            z[hit] = math.nan
        else:
            row = torch.full((z.shape[-1],), -math.inf)
            row[0] = 0.0
            z[hit] = row
        return SimpleNamespace(logits=z)


@pytest.mark.parametrize("kind", ["nan", "inf"])
@pytest.mark.parametrize("positions", [(3,), (3, 7)])  # an odd and an even count
def test_evaluate_raises_on_a_non_finite_loss(model_and_tokenizer, kind, positions):
    model, tok = model_and_tokenizer
    n0 = len(tok(DOCS[0], add_special_tokens=False)["input_ids"])  # bos first: input j predicts token j
    bad = Poisoned(model, positions, kind)
    msg = (rf"non-finite loss\b.* at {len(positions)} of the {n0} tokens of a batch, the first at "
           rf"document 0 token {positions[0]} ")
    with pytest.raises(xent.eval.EvalError, match=msg):
        xent.eval.evaluate(bad, tok, DOCS, batch_size=1, model_sha256="-")
    # whatever the batch: in one batch of every document the count covers all three
    with pytest.raises(xent.eval.EvalError, match=rf"at {3 * len(positions)} of the \d+ tokens"):
        xent.eval.evaluate(bad, tok, DOCS, batch_size=8, model_sha256="-")


@pytest.mark.parametrize("kind", ["nan", "inf"])
@pytest.mark.parametrize("positions", [(3,), (3, 7)])
def test_compare_raises_on_a_non_finite_value_of_either_model(model_and_tokenizer, kind, positions):
    model, tok = model_and_tokenizer
    bad = Poisoned(model, positions, kind)
    first = positions[0]
    where = rf"at {len(positions)} of the \d+ tokens of a batch, the first at document 0 token {first} "
    with pytest.raises(xent.eval.EvalError, match=r"non-finite nll_model\b.*" + where):
        xent.eval.compare(model, bad, tok, DOCS, batch_size=1, model_sha256={})
    with pytest.raises(xent.eval.EvalError, match=r"non-finite nll_base\b.*" + where):
        xent.eval.compare(bad, model, tok, DOCS, batch_size=1, model_sha256={})


def test_a_nan_row_is_never_top1():
    from xent.eval._score import token_stats

    z = torch.tensor([[math.nan] * 4, [1.0, 2.0, 0.0, -1.0]])
    stats = token_stats(z, torch.tensor([2, 1]))
    assert stats["rank"].tolist() == [5, 1]  # V + 1 for the NaN row (NaN > z_y is false everywhere)


def test_fixed_point_refuses_what_int64_cannot_hold():
    from xent.eval._sums import SCALE, fixed, fixed_sum

    for bad in ([1.0, math.nan], [math.inf, 1.0], [math.nan, math.nan]):
        with pytest.raises(xent.eval.EvalError, match="non-finite"):
            fixed_sum(torch.tensor(bad, dtype=torch.float64))
    with pytest.raises(xent.eval.EvalError, match="too large"):
        fixed(torch.tensor([2.0**31]))
    # large but representable values are summed exactly, split as needed (one int64 sum would wrap)
    x = torch.full((64,), 2.0**29, dtype=torch.float64)
    assert fixed_sum(x) == 64 * 2**29 * SCALE


@pytest.fixture(scope="module")
def nan_model_dir(model_dir, tmp_path_factory):
    """The saved tiny GPT-2 with position-embedding row 5 set to NaN (every later position's hidden
    state is NaN too, through attention)."""
    from safetensors.torch import load_file, save_file

    d = tmp_path_factory.mktemp("nan-gpt2")
    for f in model_dir.iterdir():
        shutil.copy(f, d / f.name)
    weights = load_file(d / "model.safetensors")
    weights["transformer.wpe.weight"][5] = math.nan
    save_file(weights, d / "model.safetensors", metadata={"format": "pt"})
    return d


def _nonfinite_in_first_window(model_dir, tok, text, max_length):
    """(how many, the first, of) the targets of the first window ([BOS] + the first max_length − 1
    tokens) with a non-finite log-probability, from the transformers model run directly."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = tok(text, add_special_tokens=False)["input_ids"][: max_length]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[tok.bos_token_id] + ids[:-1]])).logits[0].double()
    logp = logits - torch.logsumexp(logits, -1, keepdim=True)
    bad = ~torch.isfinite(logp[torch.arange(len(ids)), ids])
    return int(bad.sum()), int(bad.nonzero()[0, 0]), len(ids)


@pytest.mark.parametrize("max_length", [16, 17])  # an even and an odd count of NaN losses
def test_cli_eval_and_compare_stop_on_a_nan_model(capsys, model_dir, nan_model_dir, model_and_tokenizer,
                                                  tmp_path, max_length):
    _, tok = model_and_tokenizer
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS))
    bad, first, n = _nonfinite_in_first_window(nan_model_dir, tok, DOCS[0], max_length)
    assert bad % 2 == max_length % 2
    capsys.readouterr()  # the reference's own loading output
    out = tmp_path / "out"
    code = main(["eval", "--model", str(nan_model_dir), "--data", str(data), "--max-length", str(max_length),
                 "--batch-size", "1", "--out", str(out)])
    _, err = capsys.readouterr()
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    where = rf"at {bad} of the {n} tokens of a batch, the first at document 0 token {first} "
    assert re.search(where, err), err
    assert not (out / "summary.json").exists()
    code = main(["compare", "--base", str(model_dir), "--model", str(nan_model_dir), "--data", str(data),
                 "--max-length", str(max_length), "--batch-size", "1", "--out", str(tmp_path / "cmp")])
    _, err = capsys.readouterr()
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert re.search(rf"non-finite nll_model, kl\b.* at {bad} of the {n} tokens", err), err
    assert not (tmp_path / "cmp" / "summary.json").exists()
