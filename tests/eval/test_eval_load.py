"""Loading a model directory: a checkpoint that does not fit the model and a tokenizer that does not fit
either are refused before any work, with one line naming the directory and what is wrong."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import xent.eval
from xent.cli import main


def _copy(src, dst, skip=()):
    dst.mkdir()
    for f in src.iterdir():
        if f.name not in skip:
            shutil.copy(f, dst / f.name)
    return dst


def _edit_weights(d, edit):
    from safetensors.torch import load_file, save_file

    weights = load_file(d / "model.safetensors")
    edit(weights)
    save_file(weights, d / "model.safetensors", metadata={"format": "pt"})


@pytest.fixture()
def data(tmp_path, documents):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in documents))
    return path


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    _, err = capsys.readouterr()
    return code, err


def test_missing_or_unexpected_weights_are_refused(capsys, model_dir, tmp_path, data):
    # transformers initialises a weight missing from the checkpoint at random (its load report says
    # so), so two runs of the same command would differ
    missing = _copy(model_dir, tmp_path / "missing")
    _edit_weights(missing, lambda w: w.pop("transformer.h.0.mlp.c_fc.weight"))
    argv = ["eval", "--model", missing, "--data", data, "--max-length", 32, "--json"]
    code, err = _run(capsys, *argv)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"{missing} lacks weights" in err and "transformer.h.0.mlp.c_fc.weight" in err
    code, err = _run(capsys, *argv, "--allow-missing-weights")
    assert code == 0, err
    extra = _copy(model_dir, tmp_path / "extra")
    _edit_weights(extra, lambda w: w.update({"extra.head.weight": torch.zeros(3)}))
    code, err = _run(capsys, "compare", "--base", model_dir, "--model", extra, "--data", data,
                     "--max-length", 32)
    assert code == 2 and "holds weights the model does not use: extra.head.weight" in err


def test_a_directory_without_tokenizer_files_is_refused(capsys, model_dir, tmp_path, data):
    # transformers then gives a tokenizer with no vocabulary: every document had "no tokens"
    bare = _copy(model_dir, tmp_path / "bare", skip=("tokenizer.json", "tokenizer_config.json"))
    for argv in (["eval", "--model", bare, "--data", data],
                 ["compare", "--base", model_dir, "--model", bare, "--data", data],
                 ["train", "--model", bare, "--data", data, "--out", tmp_path / "trained", "--steps", 1]):
        code, err = _run(capsys, *argv)
        assert code == 2 and len(err.strip().splitlines()) == 1, (argv[0], err)
        assert f"{bare}: the tokenizer has no vocabulary" in err, err
    assert not (tmp_path / "trained").exists()


def test_a_tokenizer_larger_than_the_embedding_is_refused(capsys, model_and_tokenizer, tmp_path, data,
                                                          documents):
    from transformers import GPT2Config, GPT2LMHeadModel

    _, tok = model_and_tokenizer
    small = GPT2LMHeadModel(GPT2Config(vocab_size=200, n_positions=64, n_embd=16, n_layer=1, n_head=2))
    d = tmp_path / "small"
    small.save_pretrained(d)
    tok.save_pretrained(d)
    assert len(tok) == 300 and max(i for doc in documents for i in tok(doc)["input_ids"]) >= 200
    code, err = _run(capsys, "eval", "--model", d, "--data", data, "--max-length", 32)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert f"{d}: the tokenizer has 300 tokens but the model's embedding has 200 rows" in err
    with pytest.raises(xent.eval.EvalError, match="300 tokens but the model's embedding has 200 rows"):
        xent.eval.evaluate(small, tok, documents, max_length=32)
