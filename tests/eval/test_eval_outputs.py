"""--out of xent eval / compare: one run per directory (an OS lock), checked before the model is loaded,
resumes that cannot lose rows, damaged checkpoints refused, OSErrors as one line, and the weights hash
reading only the files that are loaded."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

import xent.eval
from xent.cli import main
from xent.eval import _files


def run_cli(capsys, *argv):
    code = main([*map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, command="eval"):
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith(f"xent {command}: error: "), err
    assert "Traceback" not in err


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the model is loaded: the refusal must come first."""
    from xent.eval import _load

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the check")

    monkeypatch.setattr(_load, "load_model", refuse)


@pytest.fixture
def jsonl(tmp_path, documents):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"{i}: {documents[i % len(documents)]}"}) + "\n"
                            for i in range(11)))
    return data


def _hold_lock(directory):
    """Take the run lock of ``directory`` as another process would: flock on DIR/.xent.lock."""
    import fcntl

    os.makedirs(directory, exist_ok=True)
    fd = os.open(os.path.join(directory, ".xent.lock"), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, b"4242\n")
    return fd


# -- 1. one run per output directory ----------------------------------------------------------------------


def test_a_second_run_into_a_used_out_is_refused_and_touches_nothing(capsys, model_dir, jsonl, tmp_path,
                                                                      no_model_load):
    out = tmp_path / "out"
    (out / ".tokens").mkdir(parents=True)
    part = out / ".tokens" / "part-000000000002-r0000.parquet"
    part.write_bytes(b"the first run's rows")
    (out / "checkpoint.json").write_text("the first run's checkpoint")
    fd = _hold_lock(out)
    try:
        code, stdout, err = run_cli(capsys, "eval", "--model", model_dir, "--data", jsonl, "--out", out,
                                    "--per-token", "--checkpoint-every", 2)
    finally:
        os.close(fd)
    assert_one_line_error(code, err)
    assert f"{out} is in use by another xent run (pid 4242)" in err and stdout == ""
    assert part.read_bytes() == b"the first run's rows"
    assert (out / "checkpoint.json").read_text() == "the first run's checkpoint"


def test_compare_is_refused_too(capsys, model_dir, other_model_dir, jsonl, tmp_path, no_model_load):
    fd = _hold_lock(tmp_path / "out")
    try:
        code, _, err = run_cli(capsys, "compare", "--base", model_dir, "--model", other_model_dir,
                               "--data", jsonl, "--out", tmp_path / "out")
    finally:
        os.close(fd)
    assert_one_line_error(code, err, "compare")
    assert "is in use by another xent run" in err


@pytest.mark.slow
def test_two_processes(model_dir, jsonl, tmp_path):
    """The real thing: a second xent process while this one holds the lock."""
    out = tmp_path / "out"
    fd = _hold_lock(out)
    try:
        proc = subprocess.run([sys.executable, "-m", "xent", "eval", "--model", str(model_dir), "--data",
                               str(jsonl), "--out", str(out)], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    finally:
        os.close(fd)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "is in use by another xent run" in proc.stderr
    assert os.listdir(out) == [".xent.lock"]  # nothing of the refused run


def test_the_lock_of_a_killed_run_does_not_block_a_resume(capsys, model_dir, jsonl, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         f"fd = os.open({str(out / '.xent.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('locked', flush=True)\ntime.sleep(600)\n"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        code, _, err = run_cli(capsys, "eval", "--model", model_dir, "--data", jsonl, "--out", out)
        assert code == 2 and "in use by another xent run" in err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (out / ".xent.lock").exists()  # the killed run's file is left behind, its lock is not
    code, _, err = run_cli(capsys, "eval", "--model", model_dir, "--data", jsonl, "--out", out, "--json")
    assert code == 0, err
    assert sorted(os.listdir(out)) == ["summary.json"]  # the lock file is removed after the run


# -- 2. a resume keeps the outputs the checkpoint was written with -----------------------------------------


@pytest.mark.parametrize("first, then", [([], ["--per-token"]), (["--per-token"], []), ([], ["--html"])])
def test_resume_refuses_other_outputs(capsys, model_dir, jsonl, tmp_path, first, then):
    out = tmp_path / "out"
    common = ["eval", "--model", model_dir, "--data", jsonl, "--max-length", 32, "--checkpoint-every", 2,
              "--out", out, "--json"]
    assert main([*map(str, common), *first, "--stop-after", "5"]) == 3
    before = (out / "checkpoint.json").read_text()
    code, _, err = run_cli(capsys, *common, *then, "--resume")
    assert_one_line_error(code, err)
    changed = [f.lstrip("-").replace("-", "_") for f in first + then]
    assert "was written by a different run" in err and all(f"config.{c}" in err for c in changed), err
    assert (out / "checkpoint.json").read_text() == before and not (out / "summary.json").exists()
    code, _, err = run_cli(capsys, *common, *first, "--resume")  # the same outputs: fine
    assert code == 0, err


def test_resume_with_per_token_parts_missing_writes_no_tokens_file(capsys, model_dir, jsonl, tmp_path):
    out = tmp_path / "out"
    common = ["eval", "--model", model_dir, "--data", jsonl, "--max-length", 32, "--checkpoint-every", 2,
              "--out", out, "--per-token", "--json"]
    assert main([*map(str, common), "--stop-after", "5"]) == 3
    parts = sorted((out / ".tokens").iterdir())
    assert len(parts) == 3  # chunks ending at documents 2, 4, 6
    parts[0].unlink()  # as a second run used to do
    code, _, err = run_cli(capsys, *common, "--resume")
    assert_one_line_error(code, err)
    assert "per-token rows but" in err
    assert not (out / "tokens.parquet").exists() and not (out / "summary.json").exists()


# -- 3. damaged checkpoints ----------------------------------------------------------------------------------


def _edit(path, change):
    state = json.loads(path.read_text())
    change(state)
    path.write_text(json.dumps(state))


@pytest.mark.parametrize("damage", ["truncated", "empty", "binary", "a list", "next_document 10**9",
                                    "next_document -5", "a total", "checksum removed"])
def test_a_damaged_checkpoint_is_refused_in_one_line(capsys, model_dir, jsonl, tmp_path, damage):
    out = tmp_path / "out"
    common = ["eval", "--model", model_dir, "--data", jsonl, "--max-length", 32, "--checkpoint-every", 2,
              "--out", out, "--json"]
    assert main([*map(str, common), "--stop-after", "3"]) == 3
    ck = out / "checkpoint.json"
    raw = ck.read_bytes()
    if damage == "truncated":
        ck.write_bytes(raw[: len(raw) // 2])
    elif damage == "empty":
        ck.write_bytes(b"")
    elif damage == "binary":
        ck.write_bytes(bytes(range(256)) * 4)
    elif damage == "a list":
        ck.write_text("[1, 2]")
    elif damage == "next_document 10**9":
        _edit(ck, lambda s: s.update(next_document=10**9))
    elif damage == "next_document -5":
        _edit(ck, lambda s: s.update(next_document=-5))
    elif damage == "a total":
        _edit(ck, lambda s: s["totals"][0].update(tokens=s["totals"][0]["tokens"] + 1))
    else:
        _edit(ck, lambda s: s.pop("sha256"))
    damaged = ck.read_bytes()
    code, stdout, err = run_cli(capsys, *common, "--resume")
    assert_one_line_error(code, err)
    assert f"{ck} is damaged" in err and stdout == ""
    assert ck.read_bytes() == damaged and not (out / "summary.json").exists()


def _resave(ck, change):
    """Edit a checkpoint and give it a matching checksum (as a careful hand edit would)."""
    state = json.loads(ck.read_text())
    state.pop("sha256")
    change(state)
    digest = hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()
    ck.write_text(json.dumps({**state, "sha256": digest}))


def test_a_consistent_looking_checkpoint_must_still_fit_the_data(model_and_tokenizer, documents, tmp_path):
    model, tok = model_and_tokenizer
    docs = [f"{i}: {documents[i % len(documents)]}" for i in range(8)]
    kw = dict(max_length=32, checkpoint_every=2, checkpoint_dir=str(tmp_path))
    xent.eval.evaluate(model, tok, docs, stop_after=4, **kw)  # next_document 4
    ck = tmp_path / "checkpoint.json"
    saved = ck.read_text()
    # in-memory documents have no content hash: a shorter list is not caught by the fingerprint
    with pytest.raises(xent.eval.EvalError, match="says 4 documents are done but the data has 3"):
        xent.eval.evaluate(model, tok, docs[:3], resume=True, **kw)
    _resave(ck, lambda s: s.update(next_document=8))  # the totals hold 4 documents
    with pytest.raises(xent.eval.EvalError, match=r"totals count 4 documents, next_document 8 means 8"):
        xent.eval.evaluate(model, tok, docs, resume=True, **kw)
    ck.write_text(saved)
    _resave(ck, lambda s: s.update(next_document=True))
    with pytest.raises(xent.eval.EvalError, match="next_document True is not a positive integer"):
        xent.eval.evaluate(model, tok, docs, resume=True, **kw)
    ck.write_text(saved)
    _resave(ck, lambda s: s["totals"][0].pop("nll"))
    with pytest.raises(xent.eval.EvalError, match=r"its totals are not those of 1 data file"):
        xent.eval.evaluate(model, tok, docs, resume=True, **kw)
    ck.write_text(saved)
    full = xent.eval.evaluate(model, tok, docs, max_length=32, checkpoint_every=2).to_dict()
    assert xent.eval.evaluate(model, tok, docs, resume=True, **kw).to_dict() == full


def test_stale_temporary_files_are_removed_after_a_successful_run(capsys, model_dir, jsonl, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    stale = [".checkpoint.json.k2j4x.tmp", ".summary.json.a8c1.tmp", ".tokens.parquet.zz.tmp"]
    for name in stale + ["notes.tmp", ".mine.tmp"]:
        (out / name).write_text("left by a killed run")
    code, _, err = run_cli(capsys, "eval", "--model", model_dir, "--data", jsonl, "--out", out,
                           "--per-token", "--checkpoint-every", 2, "--json")
    assert code == 0, err
    assert sorted(os.listdir(out)) == [".mine.tmp", "notes.tmp", "summary.json", "tokens.parquet"]


# -- 4. --out problems are found before the model is loaded -----------------------------------------------


def test_out_that_is_a_file(capsys, model_dir, jsonl, tmp_path, no_model_load):
    (tmp_path / "f").write_text("mine")
    for command in (["eval", "--model", model_dir], ["compare", "--base", model_dir, "--model", model_dir]):
        code, _, err = run_cli(capsys, *command, "--data", jsonl, "--out", tmp_path / "f")
        assert_one_line_error(code, err, command[0])
        assert f"--out {tmp_path / 'f'} exists and is not a directory" in err
    assert (tmp_path / "f").read_text() == "mine"


def test_out_that_is_a_dangling_link(capsys, model_dir, jsonl, tmp_path, no_model_load):
    os.symlink(tmp_path / "gone", tmp_path / "link")
    code, _, err = run_cli(capsys, "eval", "--model", model_dir, "--data", jsonl, "--out", tmp_path / "link")
    assert_one_line_error(code, err)
    assert "is a broken symbolic link" in err and os.path.islink(tmp_path / "link")
    assert not (tmp_path / "gone").exists()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes anywhere")
def test_out_in_a_read_only_directory(capsys, model_dir, jsonl, tmp_path, no_model_load):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        for out in (ro, ro / "sub"):
            code, _, err = run_cli(capsys, "eval", "--model", model_dir, "--data", jsonl, "--out", out)
            assert_one_line_error(code, err)
            assert "cannot be written (" in err and "Permission denied" in err
    finally:
        ro.chmod(0o755)
    assert os.listdir(ro) == []


def test_out_that_cannot_be_created(capsys, model_dir, jsonl, no_model_load):
    code, _, err = run_cli(capsys, "eval", "--model", model_dir, "--data", jsonl, "--out",
                           "/proc/xent-no-such-dir/out")  # not creatable, even for root
    assert_one_line_error(code, err)
    assert "--out /proc/xent-no-such-dir/out cannot be written (" in err


def test_a_full_disk_mid_run_is_one_line_and_the_checkpoint_resumes(capsys, monkeypatch, model_dir, jsonl,
                                                                    tmp_path):
    full = tmp_path / "full"
    assert main(["eval", "--model", str(model_dir), "--data", str(jsonl), "--max-length", "32",
                 "--checkpoint-every", "2", "--out", str(full), "--per-token", "--json"]) == 0
    out = tmp_path / "out"
    writes = [0]
    original = _files.write_text

    def fill_up_at_the_third_write(path, text):
        writes[0] += 1
        if writes[0] == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        original(path, text)

    monkeypatch.setattr(_files, "write_text", fill_up_at_the_third_write)
    capsys.readouterr()
    common = ["eval", "--model", model_dir, "--data", jsonl, "--max-length", 32, "--checkpoint-every", 2,
              "--out", out, "--per-token", "--json"]
    code, stdout, err = run_cli(capsys, *common)
    assert_one_line_error(code, err)
    assert f"{out / 'checkpoint.json'}: No space left on device; {out / 'checkpoint.json'} is kept: " \
           "rerun with --resume" in err and stdout == ""
    assert json.loads((out / "checkpoint.json").read_text())["next_document"] == 4
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    monkeypatch.undo()
    code, _, err = run_cli(capsys, *common, "--resume")
    assert code == 0, err
    a, b = (json.loads((d / "summary.json").read_text()) for d in (full, out))
    assert a == b
    import pyarrow.parquet as pq

    assert pq.read_table(out / "tokens.parquet").equals(pq.read_table(full / "tokens.parquet"))


def test_summary_write_error_is_one_line(capsys, monkeypatch, model_dir, other_model_dir, jsonl, tmp_path):
    def no_space(path, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setattr(_files, "write_text", no_space)
    code, _, err = run_cli(capsys, "compare", "--base", model_dir, "--model", other_model_dir, "--data",
                           jsonl, "--max-length", 32, "--out", tmp_path / "out", "--json")
    assert_one_line_error(code, err, "compare")
    assert "summary.json: No space left on device" in err


# -- 5. the weights hash reads the loaded files only ---------------------------------------------------------


@pytest.fixture
def time_limit():
    """Fail (instead of hanging forever) if the block takes more than 60 s."""

    def alarm(*_):
        raise TimeoutError("took more than 60 s: reading a file that never ends?")

    before = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, before)


def _sha256_of(model_dir, names):
    h = hashlib.sha256()
    for name in names:
        h.update(name.encode() + b"\0" + (model_dir / name).read_bytes())
    return h.hexdigest()


def test_hash_skips_files_that_are_not_loaded(capsys, model_dir, jsonl, tmp_path, time_limit):
    d = tmp_path / "model"
    shutil.copytree(model_dir, d)
    os.symlink("/dev/zero", d / "extra.bin")
    os.mkfifo(d / "pipe.pt")
    (d / "optimizer.pt").write_bytes(os.urandom(4096))
    want = _sha256_of(model_dir, ["model.safetensors"])
    assert _files.weights_sha256(str(d)) == want
    code, out, err = run_cli(capsys, "eval", "--model", d, "--data", jsonl, "--max-length", 32, "--json")
    assert code == 0, err
    assert json.loads(out)["model_sha256"] == want


def test_hash_of_sharded_weights_covers_the_index_and_its_shards(tmp_path, time_limit):
    index = {"metadata": {}, "weight_map": {"a": "model-00002-of-00002.safetensors",
                                            "b": "model-00001-of-00002.safetensors",
                                            "c": "model-00001-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"shard one")
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"shard two")
    (tmp_path / "model-00003-of-00003.safetensors").write_bytes(b"not in the index")
    os.symlink("/dev/zero", tmp_path / "pytorch_model.bin")  # not read when safetensors are loaded
    want = _sha256_of(tmp_path, ["model.safetensors.index.json", "model-00001-of-00002.safetensors",
                                 "model-00002-of-00002.safetensors"])
    assert _files.weights_sha256(str(tmp_path)) == want
    os.remove(tmp_path / "model-00002-of-00002.safetensors")
    os.mkfifo(tmp_path / "model-00002-of-00002.safetensors")
    with pytest.raises(xent.eval.EvalError, match="model-00002-of-00002.safetensors is not a regular file"):
        _files.weights_sha256(str(tmp_path))


def test_pickle_weights_hash_reads_pytorch_model_bin_only(tmp_path, time_limit):
    (tmp_path / "pytorch_model.bin").write_bytes(b"weights")
    (tmp_path / "training_args.bin").write_bytes(b"not weights")
    os.symlink("/dev/zero", tmp_path / "rng_state.pth")
    assert _files.weights_sha256(str(tmp_path)) == _sha256_of(tmp_path, ["pytorch_model.bin"])


# -- 6 and 7. data and options -----------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["tpu", "cuda:x", ""])
def test_a_device_that_is_not_one(capsys, model_dir, jsonl, tmp_path, device, no_model_load):
    code, _, err = run_cli(capsys, "eval", "--model", model_dir, "--data", jsonl, "--device", device,
                           "--out", tmp_path / "out")
    assert_one_line_error(code, err)
    assert f"--device {device!r} is not a device" in err and not (tmp_path / "out").exists()


def test_a_document_over_the_limit_is_refused_before_the_model_loads(capsys, model_dir, tmp_path,
                                                                      no_model_load):
    (tmp_path / "book.txt").write_text("A line of a long book.\n" * 100)  # 2300 bytes
    code, _, err = run_cli(capsys, "eval", "--model", model_dir, "--data", tmp_path / "book.txt",
                           "--max-document-mb", 0.002, "--out", tmp_path / "out")  # 2097 bytes
    assert_one_line_error(code, err)
    assert "book.txt: a document of 2300 bytes is over the 2097 bytes limit (--max-document-mb): " \
           "cut it into smaller documents (.txt: --split lines or paragraphs)" in err
    assert not (tmp_path / "out").exists()
    for bad in ("0", "nan", "-1"):
        code, _, err = run_cli(capsys, "eval", "--model", model_dir, "--data", tmp_path / "book.txt",
                               "--max-document-mb", bad)
        assert_one_line_error(code, err)
        assert "--max-document-mb must be positive" in err


def test_deeply_nested_jsonl_mid_corpus(capsys, model_dir, tmp_path, documents):
    lines = [json.dumps({"text": d}) for d in documents] + ['{"text": "x", "m": ' + "[" * 100_000]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    code, _, err = run_cli(capsys, "eval", "--model", model_dir, "--data", tmp_path / "d.jsonl",
                           "--checkpoint-every", 2, "--out", tmp_path / "out")
    assert_one_line_error(code, err)
    assert f"d.jsonl:{len(documents) + 1}: JSON nested too deeply to read" in err
    assert not (tmp_path / "out").exists()


def test_progress_is_reported_per_batch_of_windows_within_a_document(model_and_tokenizer, documents):
    """One long document: the progress callback (the bar) moves with every batch of windows, not once
    per document."""
    model, tok = model_and_tokenizer
    long = " ".join(documents) * 3
    seen = []
    r = xent.eval.evaluate(model, tok, [long], max_length=32, batch_size=2, progress=seen.append)
    windows = -(-r.tokens // 32)  # disjoint windows of 32 predictions (BOS first)
    assert len(seen) == -(-windows // 2) > 5 and sum(seen) == r.tokens
