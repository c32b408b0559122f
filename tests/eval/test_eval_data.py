"""Corpus reading: splits, formats, invalid UTF-8 counting (no model needed)."""

from __future__ import annotations

import json

import pytest

from xent.eval import Corpus, EvalError


def test_txt_splits(tmp_path):
    p = tmp_path / "a.txt"
    p.write_bytes(b"line one\r\nline two\n\n\npara two, line 1\npara two, line 2\n")
    assert [t for _, t in Corpus([str(p)])] == [p.read_bytes().decode()]  # as is, CRLF kept
    assert [t for _, t in Corpus([str(p)], split="lines")] == [
        "line one", "line two", "", "", "para two, line 1", "para two, line 2"]
    assert [t for _, t in Corpus([str(p)], split="paragraphs")] == [
        "line one\r\nline two", "para two, line 1\npara two, line 2"]


def test_several_files_are_numbered_in_order(tmp_path):
    (tmp_path / "a.txt").write_text("A")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "B1"}) + "\n\n" + json.dumps({"text": "B2"}) + "\n")
    c = Corpus([str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")])
    assert list(c) == [(0, "A"), (1, "B1"), (1, "B2")]
    assert len(c.sha256()) == 64


def test_invalid_utf8_counted_but_not_a_genuine_replacement_character(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_bytes(b'{"text": "ok \xff\xfe"}\n{"text": "real \xef\xbf\xbd"}\n')
    c = Corpus([str(p)])
    assert [t for _, t in c] == ["ok \ufffd\ufffd", "real \ufffd"]
    assert c.invalid_utf8 == 2


def test_jsonl_non_string_text(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"text": 3}\n')
    with pytest.raises(EvalError, match=r"a.jsonl:1: field 'text' is int, not a string"):
        list(Corpus([str(p)]))


def test_parquet_missing_column_and_corrupt_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "a.parquet")
    with pytest.raises(EvalError, match=r"no column 'text' \(columns: body\)"):
        list(Corpus([str(tmp_path / "a.parquet")]))
    (tmp_path / "b.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(EvalError, match="not a readable Parquet file"):
        list(Corpus([str(tmp_path / "b.parquet")]))


def test_dataset_dict_directory_names_its_splits(tmp_path):
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a"]}),
                               "test": datasets.Dataset.from_dict({"text": ["b"]})})
    dd.save_to_disk(str(tmp_path / "d"))
    with pytest.raises(EvalError, match=r"holds the splits \['test', 'train'\]: pass .*/<split>"):
        list(Corpus([str(tmp_path / "d")]))
    assert list(Corpus([str(tmp_path / "d" / "test")])) == [(0, "b")]


def test_a_directory_that_is_not_a_dataset(tmp_path):
    with pytest.raises(EvalError, match="is a directory but not a saved Hugging Face dataset"):
        Corpus([str(tmp_path)])
