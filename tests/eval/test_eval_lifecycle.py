"""The run directory of xent.eval.evaluate (checkpoint_dir), from Python: the checkpoint kept by an
interruption and resumed bit for bit, the outputs of a completed run and no checkpoint left, and bad
options or input leaving nothing behind."""

from __future__ import annotations

import json
import os

import pytest

import xent.eval
from xent.eval._options import OptionError

KW = dict(max_length=32, checkpoint_every=2, batch_size=2, model_sha256="-")


@pytest.fixture(scope="module")
def docs(documents):
    return [f"{i}: {documents[i % len(documents)]}" for i in range(9)]


@pytest.fixture(scope="module")
def full(model_and_tokenizer, docs, tmp_path_factory):
    """An uninterrupted run into a directory: its summary (from the result) and its run directory."""
    model, tok = model_and_tokenizer
    d = tmp_path_factory.mktemp("full")
    result = xent.eval.evaluate(model, tok, docs, checkpoint_dir=str(d), per_token=True, **KW)
    return result.to_dict(), d


def _json(obj) -> str:
    return json.dumps(xent.eval._files.json_safe(obj), sort_keys=True)


def test_a_completed_run_leaves_its_outputs_and_no_checkpoint(full, docs):
    import pyarrow.parquet as pq

    summary, d = full
    assert sorted(os.listdir(d)) == ["summary.json", "tokens.parquet"]
    assert json.loads((d / "summary.json").read_text()) == json.loads(_json(summary))
    table = pq.read_table(d / "tokens.parquet")
    assert table.num_rows == summary["tokens"] > 0 and table.column("doc").to_pylist()[-1] == len(docs) - 1


class Boom(Exception):
    pass


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, Boom])
def test_an_interruption_keeps_the_checkpoint_and_resume_gives_the_same_result(
        model_and_tokenizer, docs, full, tmp_path, interruption):
    import pyarrow.parquet as pq

    model, tok = model_and_tokenizer
    chunks = []

    def progress(n):
        if len(chunks) == 2:  # the first batch of the third chunk (chunks of 2 documents)
            raise interruption

    with pytest.raises(interruption) as caught:
        xent.eval.evaluate(model, tok, docs, checkpoint_dir=str(tmp_path), per_token=True, progress=progress,
                           on_checkpoint=chunks.append, **KW)
    ck = tmp_path / "checkpoint.json"
    assert caught.value.__notes__ == [f"{ck} is kept: rerun with --resume once this is fixed"]
    assert json.loads(ck.read_text())["next_document"] == 4 and not (tmp_path / "summary.json").exists()
    assert not (tmp_path / "tokens.parquet").exists() and (tmp_path / ".tokens").is_dir()
    seen = []
    resumed = xent.eval.evaluate(model, tok, docs, checkpoint_dir=str(tmp_path), per_token=True, resume=True,
                                 progress=seen.append, **KW)
    summary, d = full
    assert _json(resumed.to_dict()) == _json(summary)  # exact: integer totals
    assert 0 < sum(seen) < summary["tokens"]  # only the documents after the checkpoint were scored
    assert sorted(os.listdir(tmp_path)) == ["summary.json", "tokens.parquet"]
    assert pq.read_table(tmp_path / "tokens.parquet").equals(pq.read_table(d / "tokens.parquet"))


def test_stop_after_stops_as_an_interruption_does(model_and_tokenizer, docs, tmp_path):
    model, tok = model_and_tokenizer
    part = xent.eval.evaluate(model, tok, docs, checkpoint_dir=str(tmp_path), per_token=True, stop_after=3,
                              **KW)
    assert part.documents == 4  # the chunk holding document 2 ends at 4
    assert json.loads((tmp_path / "checkpoint.json").read_text())["next_document"] == 4
    assert sorted(os.listdir(tmp_path)) == [".tokens", "checkpoint.json"]


@pytest.mark.parametrize("bad, names, shown", [
    (dict(stride=0), ("stride",), "stride must be positive, got 0"),
    (dict(stride=33), ("stride", "max_length"), "stride 33 is larger than max_length 32"),
    (dict(batch_size=0), ("batch_size",), "batch_size must be at least 1, got 0"),
    (dict(checkpoint_every=2.5), ("checkpoint_every",), "checkpoint_every must be an integer, got 2.5"),
    (dict(bos="sometimes"), ("bos",), "bos must be one of first, every, none, got 'sometimes'"),
    (dict(head="fast"), ("head",), "head must be one of auto, fused, forward, got 'fast'"),
    (dict(temperature=0.0), ("temperature",), "temperature must be a finite number > 0, got 0.0"),
    (dict(fit_temperature=True, resume=True), ("fit_temperature", "resume"), "do not pass resume"),
    (dict(save_base="{dir}"), ("save_base",), "exists and is not an empty directory"),
])
def test_a_bad_option_is_named_before_any_work_and_nothing_is_written(model_and_tokenizer, docs, tmp_path,
                                                                      bad, names, shown):
    model, tok = model_and_tokenizer
    run = tmp_path / "run"
    run.mkdir()
    ck = run / "checkpoint.json"
    ck.write_text("an earlier run's checkpoint")
    bad = {k: str(run) if v == "{dir}" else v for k, v in bad.items()}
    scored = []
    with pytest.raises(OptionError) as caught:
        xent.eval.evaluate(model, tok, docs, **{**KW, "checkpoint_dir": str(run), **bad},
                           progress=scored.append)
    assert caught.value.options == names and shown in str(caught.value) and "\n" not in str(caught.value)
    assert scored == [] and sorted(os.listdir(run)) == ["checkpoint.json"]
    assert ck.read_text() == "an earlier run's checkpoint"


@pytest.mark.parametrize("flag", ["resume", "per_token", "html"])
def test_outputs_need_a_directory(model_and_tokenizer, docs, flag):
    model, tok = model_and_tokenizer
    with pytest.raises(OptionError, match=f"^{flag} needs checkpoint_dir$"):
        xent.eval.evaluate(model, tok, docs, **{flag: True}, **KW)


def test_bad_input_mid_run_removes_what_the_run_wrote_unless_it_resumed(model_and_tokenizer, docs, tmp_path):
    model, tok = model_and_tokenizer
    broken = [*docs[:5], 42, *docs[5:]]  # document 5 is no string: found after two chunks were saved
    made = tmp_path / "made"
    with pytest.raises(xent.eval.EvalError, match="document 5 is int, not a string"):
        xent.eval.evaluate(model, tok, broken, checkpoint_dir=str(made), per_token=True, **KW)
    assert os.listdir(tmp_path) == []  # the directory it made, removed again
    run = dict(checkpoint_dir=str(tmp_path), per_token=True, **KW)
    xent.eval.evaluate(model, tok, broken, stop_after=1, **run)
    with pytest.raises(xent.eval.EvalError, match="document 5 is int"):
        xent.eval.evaluate(model, tok, broken, resume=True, **run)
    assert json.loads((tmp_path / "checkpoint.json").read_text())["next_document"] == 4
    assert (tmp_path / ".tokens").is_dir()


def test_no_token_to_score_is_an_error_and_leaves_nothing(model_and_tokenizer, tmp_path):
    model, tok = model_and_tokenizer
    with pytest.raises(xent.eval.EvalError, match="^no tokens to score in the documents: 2 empty and 0 "):
        xent.eval.evaluate(model, tok, ["", "  \n"], checkpoint_dir=str(tmp_path), per_token=True, **KW)
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(os.name != "posix", reason="the lock is fcntl.flock")
def test_a_directory_in_use_by_another_run_is_refused_and_left_alone(model_and_tokenizer, docs, tmp_path):
    import fcntl

    model, tok = model_and_tokenizer
    (tmp_path / "checkpoint.json").write_text("the other run's checkpoint")
    fd = os.open(tmp_path / ".xent.lock", os.O_RDWR | os.O_CREAT)  # another run's lock (its own file)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, b"4242\n")
    try:
        with pytest.raises(xent.eval.EvalError, match=r"is in use by another xent run \(pid 4242\): wait for "
                                                      "it to finish or choose another checkpoint_dir"):
            xent.eval.evaluate(model, tok, docs, checkpoint_dir=str(tmp_path), resume=True, **KW)
    finally:
        os.close(fd)
    assert (tmp_path / "checkpoint.json").read_text() == "the other run's checkpoint"
    xent.eval.evaluate(model, tok, docs[:2], checkpoint_dir=str(tmp_path / "new"), **KW)
    assert sorted(os.listdir(tmp_path / "new")) == ["summary.json"]  # made, and the lock file gone


@pytest.mark.skipif(os.name != "posix", reason="the lock is fcntl.flock")
def test_two_runs_of_one_process_into_one_directory_exclude_each_other(model_and_tokenizer, docs, tmp_path):
    model, tok = model_and_tokenizer
    second = []

    def start_another(n):
        if not second:
            with pytest.raises(xent.eval.EvalError, match="is in use by another xent run") as caught:
                xent.eval.evaluate(model, tok, docs, checkpoint_dir=str(tmp_path), **KW)
            second.append(caught.value)

    first = xent.eval.evaluate(model, tok, docs[:2], checkpoint_dir=str(tmp_path), progress=start_another,
                               **KW)
    assert len(second) == 1 and first.documents == 2
    assert sorted(os.listdir(tmp_path)) == ["summary.json"]
