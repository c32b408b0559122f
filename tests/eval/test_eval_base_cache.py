"""xent compare --base-cache: the base model kept as hidden states gives the two-model compare's numbers
exactly, with only the compared model loaded; a cache that does not fit the run is refused."""

from __future__ import annotations

import json

import pytest

import xent.eval
from xent.cli import main


@pytest.fixture(scope="module")
def two_models(model_and_tokenizer, other_model_dir):
    from transformers import AutoModelForCausalLM

    base, tok = model_and_tokenizer
    return base, AutoModelForCausalLM.from_pretrained(other_model_dir).eval(), tok


def _numbers(result) -> dict:
    """Every number of a compare result (not its config or the models' hashes)."""
    return {k: v for k, v in result.to_dict().items() if k not in ("config", "model_sha256")}


def test_cached_base_equals_two_model_compare(two_models, documents, tmp_path):
    base, model, tok = two_models
    kw = dict(max_length=32, stride=16, batch_size=3)
    want = xent.eval.compare(base, model, tok, documents, **kw)
    xent.eval.evaluate(base, tok, documents, save_base=str(tmp_path / "c"), **kw)
    got = xent.eval.compare(None, model, tok, iter(documents), base_cache=str(tmp_path / "c"), **kw)
    assert _numbers(got) == _numbers(want)  # the same floats, bit for bit
    assert got.kl_mean > 0.01 and got.tokens > 200
    assert got.config["head"] == {"base": "cached", "model": "fused"}
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["dtype"] == "float32" and sum(manifest["rows"]) == got.tokens


def test_cache_mismatches_are_refused(two_models, documents, tmp_path, other_tokenizer_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, model, tok = two_models
    cache = str(tmp_path / "c")
    xent.eval.evaluate(base, tok, documents, save_base=cache, max_length=32, batch_size=3)

    def refused(match, docs=documents, m=model, t=tok, **kw):
        opts = dict(max_length=32, batch_size=3) | kw
        with pytest.raises(xent.eval.EvalError, match=match):
            xent.eval.compare(None, m, t, docs, base_cache=cache, **opts)

    refused("max_length is 16 here but 32 in the cache", max_length=16)
    refused("stride is 16 here but 32", stride=16)
    refused("bos is 'every' here", bos="every")
    refused("preset is 'lm-eval' here", preset="lm-eval")
    refused("batch_size is 4 here but 3", batch_size=4)
    refused("the texts", docs=documents[:-1] + [documents[-1] + " and more"])
    refused("the texts", docs=documents[::-1])
    other = AutoModelForCausalLM.from_pretrained(other_tokenizer_model_dir).eval()
    refused("the tokenizer differs", m=other, t=AutoTokenizer.from_pretrained(other_tokenizer_model_dir))
    with pytest.raises(xent.eval.EvalError, match="not an empty directory"):
        xent.eval.evaluate(base, tok, documents, save_base=cache, max_length=32)


def test_cli_save_base_then_compare(capsys, model_dir, other_model_dir, tmp_path, documents):
    data = tmp_path / "d.txt"
    data.write_text("\n".join(documents), encoding="utf-8")
    # the same threads in every run: a CPU matmul's rounding may depend on the thread count
    common = ["--data", str(data), "--split", "lines", "--max-length", "32", "--batch-size", "2",
              "--threads", "1"]
    assert main(["eval", "--model", str(model_dir), *common, "--save-base", str(tmp_path / "c")]) == 0
    assert main(["compare", "--base", str(model_dir), "--model", str(other_model_dir), *common,
                 "--out", str(tmp_path / "two")]) == 0
    assert main(["compare", "--base-cache", str(tmp_path / "c"), "--model", str(other_model_dir), *common,
                 "--out", str(tmp_path / "one")]) == 0
    two, one = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("two", "one"))
    assert {k: v for k, v in one.items() if k != "config"} == {k: v for k, v in two.items() if k != "config"}
    capsys.readouterr()
    # another data file: refused before any output
    (tmp_path / "e.txt").write_text("\n".join(documents[:3]), encoding="utf-8")
    code = main(["compare", "--base-cache", str(tmp_path / "c"), "--model", str(other_model_dir), "--data",
                 str(tmp_path / "e.txt"), *common[2:], "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert code == 2 and "base-cache: the data files differ" in err and err.count("\n") == 1
    assert not (tmp_path / "bad" / "summary.json").exists()
    code = main(["eval", "--model", str(model_dir), *common, "--save-base", str(tmp_path / "c")])
    assert code == 2 and "not an empty directory" in capsys.readouterr().err
