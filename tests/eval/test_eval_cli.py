"""xent eval on the command line: corpus formats, outputs, and every bad input of issue 5."""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest

import xent.eval
from xent.cli import main


def run_cli(capsys, *argv):
    code = main(["eval", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def corpus_files(tmp_path_factory, documents):
    """The same documents as .txt (lines), .jsonl, .parquet and a datasets directory."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path_factory.mktemp("corpus")
    (d / "docs.txt").write_text("\n".join(documents) + "\n", encoding="utf-8")
    with open(d / "docs.jsonl", "w", encoding="utf-8") as f:
        for i, doc in enumerate(documents):
            f.write(json.dumps({"id": i, "body": doc}) + "\n")
    pq.write_table(pa.table({"body": documents}), d / "docs.parquet")
    datasets.Dataset.from_dict({"body": documents}).save_to_disk(str(d / "hf"))
    return d


def test_json_summary_matches_the_api(capsys, model_dir, model_and_tokenizer, corpus_files, documents):
    model, tok = model_and_tokenizer
    code, out, err = run_cli(capsys, "--model", model_dir, "--data", corpus_files / "docs.txt",
                             "--split", "lines", "--max-length", 32, "--stride", 16, "--json")
    assert code == 0, err
    got = json.loads(out)
    want = xent.eval.evaluate(model, tok, documents, max_length=32, stride=16).to_dict()
    for key in ("tokens", "documents", "bytes", "words", "nll_mean", "nll_se_document", "ece", "brier"):
        assert got[key] == pytest.approx(want[key], rel=1e-9), key
    assert got["config"]["max_length"] == 32 and got["config"]["stride"] == 16
    assert len(got["model_sha256"]) == 64 and len(got["data_sha256"]) == 64


@pytest.mark.parametrize("fmt", ["docs.jsonl", "docs.parquet", "hf"])
def test_every_format_gives_the_same_numbers(capsys, model_dir, corpus_files, fmt):
    base = run_cli(capsys, "--model", model_dir, "--data", corpus_files / "docs.txt", "--split", "lines",
                   "--max-length", 32, "--json")
    other = run_cli(capsys, "--model", model_dir, "--data", corpus_files / fmt, "--text-field", "body",
                    "--max-length", 32, "--json")
    assert base[0] == other[0] == 0
    a, b = json.loads(base[1]), json.loads(other[1])
    assert (a["tokens"], a["documents"], a["nll_mean"]) == (b["tokens"], b["documents"], b["nll_mean"])


def test_several_files_give_per_file_and_pooled(capsys, model_dir, corpus_files, tmp_path, documents):
    (tmp_path / "one.txt").write_text(documents[1], encoding="utf-8")
    code, out, _ = run_cli(capsys, "--model", model_dir, "--data", tmp_path / "one.txt",
                           corpus_files / "docs.jsonl", "--text-field", "body", "--max-length", 32, "--json")
    assert code == 0
    s = json.loads(out)
    parts = list(s["per_file"].values())
    assert len(parts) == 2 and parts[0]["documents"] == 1 and parts[1]["documents"] == len(documents)
    assert s["tokens"] == parts[0]["tokens"] + parts[1]["tokens"]
    pooled = sum(p["nll_mean"] * p["tokens"] for p in parts) / s["tokens"]
    assert s["nll_mean"] == pytest.approx(pooled, rel=1e-12)


def test_dtype_bfloat16(capsys, model_dir, model_and_tokenizer, corpus_files, documents):
    import copy

    import torch

    model, tok = model_and_tokenizer
    code, out, _ = run_cli(capsys, "--model", model_dir, "--data", corpus_files / "docs.txt", "--split",
                           "lines", "--max-length", 32, "--dtype", "bfloat16", "--json")
    assert code == 0
    got = json.loads(out)
    want = xent.eval.evaluate(copy.deepcopy(model).to(torch.bfloat16), tok, documents, max_length=32)
    assert got["config"]["dtype"] == "bfloat16" and got["nll_mean"] == want.nll_mean


def test_table_on_the_terminal(capsys, model_dir, corpus_files):
    code, out, _ = run_cli(capsys, "--model", model_dir, "--data", corpus_files / "docs.txt",
                           "--max-length", 32)
    assert code == 0
    assert "perplexity" in out and "SE, by document" in out and "ECE" in out


def test_per_token_parquet_and_html(capsys, model_dir, model_and_tokenizer, corpus_files, tmp_path,
                                    documents):
    import pyarrow.parquet as pq
    from eval_reference import records_one_window

    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "--model", model_dir, "--data", corpus_files / "docs.txt", "--split",
                           "lines", "--out", out, "--per-token", "--html", "--checkpoint-every", 2)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    table = pq.read_table(out / "tokens.parquet").to_pylist()
    assert len(table) == summary["tokens"]
    assert list(table[0]) == ["doc", "position", "token_id", "token", "loss", "entropy", "rank", "top1_prob"]
    assert math.fsum(r["loss"] for r in table) / len(table) == pytest.approx(summary["nll_mean"], rel=1e-6)
    # document 0 fits one window: its rows are the reference's tokens, in order
    model, tok = model_and_tokenizer
    ids = tok(documents[0], add_special_tokens=False)["input_ids"]
    ref = records_one_window(model, [ids], tok.bos_token_id)[0]
    rows = [r for r in table if r["doc"] == 0]
    assert [r["position"] for r in rows] == list(range(len(ids)))
    assert [r["token_id"] for r in rows] == ids
    assert "".join(r["token"] for r in rows) == documents[0]
    # a document with multi-byte characters split across byte-level tokens: the pieces still join up
    for doc in (1, 2):  # 東京, Ελληνικά, naïve: several windows, characters over 2–3 tokens
        assert "".join(r["token"] for r in table if r["doc"] == doc) == documents[doc]
    for r, (logp, y, _) in zip(rows, ref):
        assert r["loss"] == pytest.approx(-logp[y].item(), rel=1e-5, abs=1e-6)
        assert r["rank"] == 1 + int((logp > logp[y]).sum())
        assert r["top1_prob"] == pytest.approx(logp.exp().max().item(), rel=1e-5)
    page = (out / "report.html").read_text()
    for png in ("reliability.png", "loss_by_position.png"):
        assert f'src="{png}"' in page and (out / png).stat().st_size > 1000
    assert f'title="loss {rows[0]["loss"]:.3f} nats' in page
    # the summary is rounded for reading (summary.json keeps every digit) and each metric is defined
    nll = summary["nll_mean"]
    assert f"<td>nll_mean</td><td class=num>{nll:.{3 - math.floor(math.log10(nll))}f}</td>" in page
    for key in ("nll_mean", "nll_se_document", "perplexity", "ece", "brier"):
        assert repr(summary[key]) not in page, key
    for words in ("expected calibration error", "Σℓ / (B·ln 2)", "clustered by document"):
        assert words in page
    assert not (out / ".tokens").exists() and not (out / "checkpoint.json").exists()


def test_empty_documents_are_skipped_and_counted(capsys, model_dir, tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "Hello world."}\n{"text": ""}\n{"text": "  \\n"}\n')
    code, out, _ = run_cli(capsys, "--model", model_dir, "--data", tmp_path / "d.jsonl", "--json")
    assert code == 0
    s = json.loads(out)
    assert s["documents"] == 1 and s["skipped_empty"] == 2


def test_invalid_utf8_is_replaced_and_counted(capsys, model_dir, tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"Caf\xe9 and \xff\xfe bytes, and a real \xef\xbf\xbd.")
    code, out, _ = run_cli(capsys, "--model", model_dir, "--data", tmp_path / "bad.txt", "--json")
    assert code == 0
    s = json.loads(out)
    assert s["invalid_utf8"] == 3 and s["tokens"] > 0
    assert s["bytes"] == len("Caf\ufffd and \ufffd\ufffd bytes, and a real \ufffd.".encode())


# -- bad input: one line, exit 2, no traceback, nothing written -------------------------------------------


@pytest.fixture(scope="module")
def bad_dirs(tmp_path_factory, model_dir):
    import torch
    from eval_builders import _tokenizer
    from transformers import AutoModelForCausalLM, BertConfig, BertModel

    root = tmp_path_factory.mktemp("bad")
    dirs = {}
    dirs["corrupt_config"] = root / "corrupt_config"
    shutil.copytree(model_dir, dirs["corrupt_config"])
    (dirs["corrupt_config"] / "config.json").write_text("{ not json")
    dirs["corrupt_weights"] = root / "corrupt_weights"
    shutil.copytree(model_dir, dirs["corrupt_weights"])
    (dirs["corrupt_weights"] / "model.safetensors").write_bytes(b"\x10\x00\x00\x00garbage")
    dirs["bert"] = root / "bert"
    BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=16)).save_pretrained(dirs["bert"])
    dirs["pickle"] = root / "pickle"
    shutil.copytree(model_dir, dirs["pickle"])
    os.remove(dirs["pickle"] / "model.safetensors")
    state = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    torch.save(state, dirs["pickle"] / "pytorch_model.bin")
    dirs["no_bos"] = root / "no_bos"
    shutil.copytree(model_dir, dirs["no_bos"])
    _tokenizer(dirs["no_bos"], with_bos=False)
    return dirs


@pytest.mark.parametrize("case,args,message", [
    ("missing model", ["--model", "{tmp}/nope"], "model directory not found: "),
    ("corrupt config", ["--model", "{corrupt_config}"], "cannot read the model config in "),
    ("corrupt weights", ["--model", "{corrupt_weights}"], "cannot load the weights in "),
    ("not a causal LM", ["--model", "{bert}"],
     "not a causal language model (model_type 'bert', architectures BertModel)"),
    ("pickle weights", ["--model", "{pickle}"], "has no .safetensors weights (found pytorch_model.bin)"),
    ("no BOS", ["--model", "{no_bos}", "--bos", "first"], "the tokenizer has no BOS token (use --bos none)"),
    ("max-length", ["--max-length", "65"], "max-length 65 is beyond the model's 64 positions"),
    ("stride > L", ["--max-length", "32", "--stride", "33"], "--stride 33 is larger than --max-length 32"),
    ("stride 0", ["--stride", "0"], "--stride must be positive, got 0"),
    ("stride > default L", ["--stride", "65"],
     "--stride 65 is larger than --max-length 64 (the model's context): tokens between windows"),
    ("empty corpus", ["--data", "{empty}"], "no tokens to score in "),
    ("missing data", ["--data", "{tmp}/none.txt"], "data file not found: "),
    ("format", ["--data", "{tmp}/x.csv"], "unsupported data format '.csv'"),
    ("bad jsonl", ["--data", "{tmp}/bad.jsonl"], "bad.jsonl:2: not valid JSON"),
    ("jsonl field", ["--data", "{tmp}/good.jsonl", "--text-field", "body"], "good.jsonl:1: no field 'body'"),
    ("resume without out", ["--resume"], "--resume needs --out DIR"),
    ("per-token without out", ["--per-token"], "--per-token needs --out DIR"),
    ("html without out", ["--html"], "--html needs --out DIR"),
    ("fit and resume", ["--fit-temperature", "--resume"], "--fit-temperature needs every token of one run: "
                                                          "do not pass --resume"),
])
def test_bad_input_is_one_line_and_writes_nothing(capsys, model_dir, bad_dirs, tmp_path, case, args, message):
    (tmp_path / "empty.jsonl").write_text('{"text": ""}\n{"text": "   "}\n')
    (tmp_path / "x.csv").write_text("text\nhello\n")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    (tmp_path / "good.jsonl").write_text('{"text": "fine"}\n')
    (tmp_path / "ok.txt").write_text("Some text to score.")
    names = {k: str(v) for k, v in bad_dirs.items()}
    names.update(tmp=str(tmp_path), empty=str(tmp_path / "empty.jsonl"))
    argv = [a.format(**names) for a in args]
    if "--model" not in argv:
        argv += ["--model", str(model_dir)]
    if "--data" not in argv:
        argv += ["--data", str(tmp_path / "ok.txt")]
    out_dir = tmp_path / "out"
    if not {"--resume", "--per-token", "--html"} & set(argv) or "--fit-temperature" in argv:
        argv += ["--out", str(out_dir)]
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("xent eval: error: ") and "Traceback" not in err
    assert message in err
    assert out == "" and not out_dir.exists()


def test_pickle_weights_load_with_allow_pickle(capsys, bad_dirs, model_dir, tmp_path):
    (tmp_path / "ok.txt").write_text("Some text to score, twice. Some text to score, twice.")
    a = run_cli(capsys, "--model", bad_dirs["pickle"], "--allow-pickle", "--data", tmp_path / "ok.txt",
                "--json")
    b = run_cli(capsys, "--model", model_dir, "--data", tmp_path / "ok.txt", "--json")
    assert a[0] == b[0] == 0
    assert json.loads(a[1])["nll_mean"] == json.loads(b[1])["nll_mean"]


def test_an_error_mid_corpus_leaves_nothing_behind(capsys, model_dir, tmp_path, documents):
    # checkpoints and per-token parts of the first chunks were written before the bad line is read
    lines = [json.dumps({"text": d}) for d in documents] + ["{broken"]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "--model", model_dir, "--data", tmp_path / "d.jsonl", "--max-length", 32,
                           "--checkpoint-every", 2, "--per-token", "--out", out)
    assert code == 2 and f"d.jsonl:{len(documents) + 1}: not valid JSON" in err
    assert not out.exists()
