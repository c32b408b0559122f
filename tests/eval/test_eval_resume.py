"""Resume: an interrupted run continued with --resume gives exactly the uninterrupted result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

import xent.eval
from xent.cli import main


def _same(a: dict, b: dict) -> bool:
    """Equal, NaN included."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _docs(documents, n=23):
    return [f"{i}: {documents[i % len(documents)]}" for i in range(n)]


def test_api_resume_equals_uninterrupted(model_and_tokenizer, documents, tmp_path):
    model, tok = model_and_tokenizer
    docs = _docs(documents)
    kw = dict(max_length=32, stride=16, checkpoint_every=4, batch_size=3)
    full = xent.eval.evaluate(model, tok, docs, **kw).to_dict()
    ck = tmp_path / "ck"
    part = xent.eval.evaluate(model, tok, docs, checkpoint_dir=str(ck), stop_after=9, **kw)
    assert part.documents == 12 < full["documents"]  # stopped after the chunk holding document 9
    assert json.loads((ck / "checkpoint.json").read_text())["next_document"] == 12
    seen = []
    resumed = xent.eval.evaluate(model, tok, docs, checkpoint_dir=str(ck), resume=True,
                                 progress=seen.append, **kw).to_dict()
    assert _same(resumed, full)  # exact: integer totals
    assert sum(seen) < full["tokens"]  # only the remaining documents were scored


def test_resume_refuses_a_checkpoint_of_another_run(model_and_tokenizer, documents, tmp_path):
    model, tok = model_and_tokenizer
    docs = _docs(documents, 8)
    xent.eval.evaluate(model, tok, docs, max_length=32, checkpoint_every=4, checkpoint_dir=str(tmp_path),
                       stop_after=4)
    with pytest.raises(xent.eval.EvalError, match="written by a different run"):
        xent.eval.evaluate(model, tok, docs, max_length=24, checkpoint_every=4, checkpoint_dir=str(tmp_path),
                           resume=True)


def test_cli_resume_with_per_token_output(capsys, model_dir, documents, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in _docs(documents, 15)))
    common = ["eval", "--model", str(model_dir), "--data", str(data), "--max-length", "32",
              "--checkpoint-every", "2", "--per-token", "--json"]
    assert main(common + ["--out", str(tmp_path / "full")]) == 0
    assert main(common + ["--out", str(tmp_path / "cut"), "--stop-after", "5"]) == 3
    assert not (tmp_path / "cut" / "summary.json").exists()
    assert main(common + ["--out", str(tmp_path / "cut"), "--resume"]) == 0
    capsys.readouterr()
    full = json.loads((tmp_path / "full" / "summary.json").read_text())
    cut = json.loads((tmp_path / "cut" / "summary.json").read_text())
    full["config"].pop("model"), cut["config"].pop("model")
    assert cut == full
    import pyarrow.parquet as pq

    assert pq.read_table(tmp_path / "cut" / "tokens.parquet").equals(pq.read_table(tmp_path / "full" /
                                                                                   "tokens.parquet"))
    assert not (tmp_path / "cut" / "checkpoint.json").exists()


def test_ctrl_c_then_resume(capsys, monkeypatch, model_dir, documents, tmp_path):
    from xent.eval import _report

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in _docs(documents, 12)))
    argv = ["eval", "--model", str(model_dir), "--data", str(data), "--max-length", "32",
            "--checkpoint-every", "3", "--batch-size", "2", "--json", "--out"]
    assert main(argv + [str(tmp_path / "full")]) == 0
    calls = [0]
    original = _report.Progress.__call__

    def interrupt_at_the_25th_batch(self, n):
        calls[0] += 1
        if calls[0] == 25:
            raise KeyboardInterrupt
        original(self, n)

    monkeypatch.setattr(_report.Progress, "__call__", interrupt_at_the_25th_batch)
    capsys.readouterr()
    assert main(argv + [str(tmp_path / "cut")]) == 130
    out, err = capsys.readouterr()
    assert out == "" and err == (f"xent eval: interrupted; the same command with --resume continues from "
                                 f"the last checkpoint in {tmp_path / 'cut'} (every 3 documents)\n")
    assert not (tmp_path / "cut" / "summary.json").exists()
    assert 0 < json.loads((tmp_path / "cut" / "checkpoint.json").read_text())["next_document"] < 12
    monkeypatch.undo()
    assert main(argv + [str(tmp_path / "cut"), "--resume"]) == 0
    full = json.loads((tmp_path / "full" / "summary.json").read_text())
    cut = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert cut == full


# Run in a child process: the xent CLI, with the progress callback patched to SIGKILL the process itself
# at a fixed batch, so the hard kill lands at the same point on every machine (no timing race).
_KILL_AT_BATCH = """
import os, signal, sys
from xent.eval import _report
from xent.cli import main
calls = [0]
original = _report.Progress.__call__
def kill_at(self, n):
    calls[0] += 1
    if calls[0] == int(os.environ["XENT_TEST_KILL_AT"]):
        os.kill(os.getpid(), signal.SIGKILL)
    original(self, n)
_report.Progress.__call__ = kill_at
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_killed_process_resumes_to_the_same_summary(capsys, model_dir, documents, tmp_path):
    n = 80
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in _docs(documents, n)))
    argv = ["eval", "--model", str(model_dir), "--data", str(data), "--max-length", "32",
            "--checkpoint-every", "5", "--batch-size", "4", "--json"]
    assert main(argv + ["--out", str(tmp_path / "full")]) == 0
    out = tmp_path / "cut"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "XENT_TEST_KILL_AT": "30"}
    proc = subprocess.run([sys.executable, "-c", _KILL_AT_BATCH, *argv, "--out", str(out)],
                          capture_output=True, env=env, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert not (out / "summary.json").exists()
    state = json.loads((out / "checkpoint.json").read_text())
    assert 0 < state["next_document"] < n
    env.pop("XENT_TEST_KILL_AT")
    subprocess.run([sys.executable, "-m", "xent", *argv, "--out", str(out), "--resume"], check=True,
                   capture_output=True, env=env, timeout=300)
    full = json.loads((tmp_path / "full" / "summary.json").read_text())
    cut = json.loads((out / "summary.json").read_text())
    assert cut == full
