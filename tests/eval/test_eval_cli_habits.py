"""xent eval with lm-eval's and llama.cpp's habits: --limit, --tokenizer, a hint for a hub id, the fields
that exist when --text-field is wrong, and examples in --help that parse."""

from __future__ import annotations

import json
import shlex
import shutil

import pytest

from xent.cli import build_parser, main

WINDOWS = ["--max-length", "32", "--threads", "1", "--json"]


def _eval(capsys, *argv):
    code = main(["eval", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else None), err


def _numbers(summary: dict) -> tuple:
    return summary["tokens"], summary["documents"], summary["bytes"], summary["nll_mean"], summary["ece"]


def test_limit_scores_the_first_documents_across_files(capsys, model_dir, documents, tmp_path):
    (tmp_path / "a.txt").write_text("\n".join(documents[:2]), encoding="utf-8")
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in documents[2:]),
                                      encoding="utf-8")
    # the reference: the first 4 documents alone, in one file
    (tmp_path / "first4.txt").write_text("\n".join(documents[:4]), encoding="utf-8")
    code, want, err = _eval(capsys, "--model", model_dir, "--data", tmp_path / "first4.txt", "--split",
                            "lines", *WINDOWS)
    assert code == 0, err
    code, got, err = _eval(capsys, "--model", model_dir, "--data", tmp_path / "a.txt", tmp_path / "b.jsonl",
                           "--split", "lines", "--limit", "4", *WINDOWS)
    assert code == 0, err
    assert _numbers(got) == _numbers(want) and got["documents"] == 4
    assert got["config"]["limit"] == 4
    code, whole, _ = _eval(capsys, "--model", model_dir, "--data", tmp_path / "a.txt", tmp_path / "b.jsonl",
                           "--split", "lines", *WINDOWS)
    assert whole["documents"] == len(documents) and whole["config"]["limit"] is None


@pytest.mark.parametrize("limit", ["0", "-3"])
def test_limit_below_one_is_one_line(capsys, model_dir, tmp_path, limit):
    (tmp_path / "a.txt").write_text("Some text.", encoding="utf-8")
    code, _, err = _eval(capsys, "--model", model_dir, "--data", tmp_path / "a.txt", "--limit", limit)
    assert code == 2 and err == f"xent eval: error: --limit must be at least 1, got {limit}\n"


def test_tokenizer_from_another_folder(capsys, model_dir, documents, tmp_path):
    weights, tokenizer = tmp_path / "weights", tmp_path / "tokenizer"
    weights.mkdir()
    tokenizer.mkdir()
    for f in model_dir.iterdir():
        shutil.copy(f, (weights if f.name in ("config.json", "model.safetensors", "generation_config.json")
                        else tokenizer) / f.name)
    (tmp_path / "d.txt").write_text("\n".join(documents), encoding="utf-8")
    data = ["--data", tmp_path / "d.txt", "--split", "lines", *WINDOWS]
    code, want, err = _eval(capsys, "--model", model_dir, *data)
    assert code == 0, err
    code, _, err = _eval(capsys, "--model", weights, *data)  # the weights' folder has no tokenizer
    assert code == 2 and "tokenizer" in err and err.count("\n") == 1
    code, got, err = _eval(capsys, "--model", weights, "--tokenizer", tokenizer, *data)
    assert code == 0, err
    assert _numbers(got) == _numbers(want) and got["config"]["tokenizer"] == str(tokenizer)
    code, _, err = _eval(capsys, "--model", weights, "--tokenizer", tmp_path / "nope", *data)
    assert code == 2 and err == f"xent eval: error: tokenizer directory not found: {tmp_path / 'nope'}\n"


@pytest.mark.parametrize("name", ["gpt2", "meta-llama/Llama-3.2-1B", "Qwen/Qwen2.5-0.5B-Instruct"])
def test_a_hub_id_gets_a_hint(capsys, monkeypatch, tmp_path, name):
    monkeypatch.chdir(tmp_path)  # no such directory here
    (tmp_path / "a.txt").write_text("Some text.", encoding="utf-8")
    for command in (["eval", "--model", name], ["compare", "--base", name, "--model", name]):
        assert main([*command, "--data", "a.txt"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"model directory not found: {name} (" in err
        assert "read from a local directory" in err and f"hf download {name} --local-dir DIR" in err
        assert "huggingface-cli download" in err and "save_pretrained(DIR)" in err


@pytest.mark.parametrize("path", ["./missing-model", "/nonexistent/model", "a/b/c", "../up"])
def test_a_path_gets_no_hub_hint(capsys, monkeypatch, tmp_path, path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.txt").write_text("Some text.", encoding="utf-8")
    assert main(["eval", "--model", path, "--data", "a.txt"]) == 2
    assert capsys.readouterr().err == f"xent eval: error: model directory not found: {path}\n"


def test_a_wrong_text_field_lists_the_fields(capsys, model_dir, tmp_path):
    (tmp_path / "d.jsonl").write_text('{"id": 1, "title": "A", "content": "Some text."}\n', encoding="utf-8")
    code, _, err = _eval(capsys, "--model", model_dir, "--data", tmp_path / "d.jsonl")
    assert code == 2 and err.count("\n") == 1
    assert "d.jsonl:1: no field 'text' (fields: 'id', 'title', 'content'; use --text-field)" in err
    (tmp_path / "e.jsonl").write_text('["not", "an", "object"]\n', encoding="utf-8")
    code, _, err = _eval(capsys, "--model", model_dir, "--data", tmp_path / "e.jsonl")
    assert code == 2 and "e.jsonl:1: a JSON list, not an object with a field 'text'" in err
    code, got, err = _eval(capsys, "--model", model_dir, "--data", tmp_path / "d.jsonl", "--text-field",
                           "content", *WINDOWS)
    assert code == 0 and got["documents"] == 1, err


def test_help_has_examples_that_parse(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and "hf download" in text and "save_pretrained" in text
    # each example (continued lines joined) is a command the parser accepts
    joined = text[text.index("examples:"):].replace("\\\n", " ")
    commands = [line.strip() for line in joined.splitlines() if line.strip().startswith("xent eval ")]
    assert len(commands) >= 4 and any("--limit" in c for c in commands)
    assert any("--tokenizer" in c for c in commands) and any("--text-field" in c for c in commands)
    parser = build_parser()
    for command in commands:
        args = parser.parse_args(shlex.split(command)[1:])
        assert args.command == "eval" and args.model
