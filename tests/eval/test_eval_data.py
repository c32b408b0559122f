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


# -- malformed JSON lines: file:line, never a traceback ----------------------------------------------------


def test_jsonl_huge_integers_are_read(tmp_path):
    """JSON allows integers of any length; Python's int() refuses more than 4300 digits."""
    p = tmp_path / "a.jsonl"
    big = "9" * 5000
    p.write_text(f'{{"id": {big}, "text": "kept"}}\n{{"id": -{big}, "text": "too"}}\n{{"text": {big}}}\n')
    docs = iter(Corpus([str(p)]))
    assert [next(docs), next(docs)] == [(0, "kept"), (0, "too")]
    with pytest.raises(EvalError, match=r"a.jsonl:3: field 'text' is int, not a string"):
        next(docs)


def test_jsonl_nested_too_deeply(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"text": "fine"}\n{"text": "x", "meta": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    with pytest.raises(EvalError, match=r"a.jsonl:2: JSON nested too deeply to read"):
        list(Corpus([str(p)]))


# -- documents over the size limit are refused while reading, before the tokenizer ---------------------------


def test_a_whole_txt_file_over_the_limit_is_refused_when_the_corpus_is_made(tmp_path):
    (tmp_path / "ok.txt").write_bytes(b"x" * 1000)
    (tmp_path / "big.txt").write_bytes(b"x" * 600 + b"\n" + b"x" * 400)
    assert [t for _, t in Corpus([str(tmp_path / "ok.txt")], max_document_bytes=1000)] == ["x" * 1000]
    with pytest.raises(EvalError, match=r"big.txt: a document of 1001 bytes is over the 1000 bytes limit "
                                        r"\(--max-document-mb\): .*--split lines or paragraphs"):
        Corpus([str(tmp_path / "big.txt")], max_document_bytes=1000)  # before any document is read
    assert len(list(Corpus([str(tmp_path / "big.txt")], split="lines", max_document_bytes=1000))) == 2


def test_lines_paragraphs_and_fields_over_the_limit(tmp_path):
    limit = 1000
    ok, big = "é" * 500, "é" * 501  # 1000 and 1002 bytes (501 characters: bytes are what count)
    (tmp_path / "a.txt").write_text(f"short\n{ok}\r\n{big}\n")
    with pytest.raises(EvalError, match=r"a.txt:3: a document is over"):
        list(Corpus([str(tmp_path / "a.txt")], split="lines", max_document_bytes=limit))
    assert [len(t) for _, t in Corpus([str(tmp_path / "a.txt")], split="lines",
                                      max_document_bytes=1002)] == [5, 500, 501]
    (tmp_path / "p.txt").write_text("one\n\n" + "x" * 600 + "\n" + "y" * 399 + "\n\n" + "z" * 600 + "\n"
                                    + "w" * 400 + "\n")  # paragraphs of 1000 and 1001 bytes
    docs = iter(Corpus([str(tmp_path / "p.txt")], split="paragraphs", max_document_bytes=limit))
    assert [len(next(docs)[1]), len(next(docs)[1])] == [3, 1000]
    with pytest.raises(EvalError, match=r"p.txt:6: a document is over"):
        next(docs)
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": ok}) + "\n" + json.dumps({"text": big}) + "\n")
    with pytest.raises(EvalError, match=r"a.jsonl:2: a document of 1002 bytes is over"):
        list(Corpus([str(tmp_path / "a.jsonl")], max_document_bytes=limit))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [ok, big]}), tmp_path / "a.parquet")
    with pytest.raises(EvalError, match=r"a.parquet: a document of 1002 bytes is over"):
        list(Corpus([str(tmp_path / "a.parquet")], max_document_bytes=limit))


def test_a_gigabyte_line_is_refused_without_reading_it(tmp_path):
    import tracemalloc

    p = tmp_path / "huge.txt"
    with open(p, "wb") as f:  # 1 GiB + 1 byte, sparse: one line of NUL characters
        f.seek(1 << 30)
        f.write(b"x")
    with pytest.raises(EvalError, match=r"huge.txt: a document of 1024.0 MiB is over the 16 MiB limit"):
        Corpus([str(p)])
    tracemalloc.start()
    try:
        with pytest.raises(EvalError, match=r"huge.txt:1: a document is over the 16 MiB limit"):
            list(Corpus([str(p)], split="lines"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 40 << 20  # one read of 16 MiB + a few bytes, not the gigabyte


def test_max_document_bytes_is_checked():
    with pytest.raises(EvalError, match=r"max_document_bytes must be a positive integer, got 0"):
        Corpus([], max_document_bytes=0)
