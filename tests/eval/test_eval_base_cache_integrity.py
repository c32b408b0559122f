"""The base cache's integrity: a cache that is not what --save-base wrote (tampered, damaged, a FIFO or a
device in place of a file) is one line and exit 2, never other numbers under the base model's hash; two
runs into one directory, a failed write and the files' permissions."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import xent.eval
from xent.cli import main

DOCS_ARGS = ["--split", "lines", "--max-length", "32", "--batch-size", "3", "--threads", "1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory, documents):
    path = tmp_path_factory.mktemp("cache-data") / "d.txt"
    path.write_text("\n".join(documents), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def caches(tmp_path_factory, model_dir, other_model_dir, data):
    """The base model's cache, and the other model's (same texts and options) to swap files from."""
    root = tmp_path_factory.mktemp("caches")
    for name, model in (("base", model_dir), ("other", other_model_dir)):
        assert main(["eval", "--model", str(model), "--data", str(data), *DOCS_ARGS,
                     "--save-base", str(root / name), "--json"]) == 0
    return root


@pytest.fixture
def cache(caches, tmp_path):
    """A fresh copy of the base model's cache, to damage."""
    return shutil.copytree(caches / "base", tmp_path / "cache")


def _compare(cache, model, data, out) -> int:
    return main(["compare", "--base-cache", str(cache), "--model", str(model), "--data", str(data),
                 *DOCS_ARGS, "--out", str(out), "--json"])


def _refused(capsys, cache, other_model_dir, data, tmp_path) -> str:
    """compare on the cache exits 2 with one line and writes no summary; that line."""
    code = _compare(cache, other_model_dir, data, tmp_path / "out")
    captured = capsys.readouterr()
    assert code == 2, captured.out[-300:]
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err, captured.err
    assert captured.out == "" and not (tmp_path / "out" / "summary.json").exists()
    return captured.err


def _reseal(cache) -> None:
    """Rewrite the manifest's file sizes and hashes and its own checksum (sha256 of its sorted-key JSON
    without that field) for the files as they now are: a cache damaged consistently, as a writer with a
    bug or another version would leave it, so that only the checks of the contents can refuse it."""
    m = json.loads((cache / "manifest.json").read_text())
    for name in ("states.safetensors", "head.safetensors"):
        path = cache / name
        if path.exists():
            raw = path.read_bytes()
            m.setdefault("files", {})[name] = {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    m.pop("sha256", None)
    m["sha256"] = hashlib.sha256(json.dumps(m, sort_keys=True).encode()).hexdigest()
    (cache / "manifest.json").write_text(json.dumps(m))


def _edit_tensors(cache, name, edit) -> None:
    tensors = dict(load_file(cache / name))
    edit(tensors)
    save_file(tensors, cache / name)


def _edit_manifest(cache, edit) -> None:
    m = json.loads((cache / "manifest.json").read_text())
    edit(m)
    (cache / "manifest.json").write_text(json.dumps(m))


def test_an_untouched_cache_gives_the_two_model_numbers(capsys, cache, model_dir, other_model_dir, data,
                                                        tmp_path):
    assert _compare(cache, other_model_dir, data, tmp_path / "one") == 0
    assert main(["compare", "--base", str(model_dir), "--model", str(other_model_dir), "--data", str(data),
                 *DOCS_ARGS, "--out", str(tmp_path / "two"), "--json"]) == 0
    capsys.readouterr()
    one, two = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two"))
    assert one["kl_mean"] == two["kl_mean"] > 0.01 and one["model_sha256"] == two["model_sha256"]


def _scale_states(cache, caches):
    _edit_tensors(cache, "states.safetensors", lambda t: t.update(hidden=t["hidden"] * 1.01))


def _swap_states(cache, caches):
    shutil.copy(caches / "other" / "states.safetensors", cache / "states.safetensors")


def _other_head(cache, caches):
    shutil.copy(caches / "other" / "head.safetensors", cache / "head.safetensors")


def _swap_both(cache, caches):
    for name in ("states.safetensors", "head.safetensors"):
        shutil.copy(caches / "other" / name, cache / name)


def _edit_scale(cache, caches):
    _edit_manifest(cache, lambda m: m["transform"].update(scale=1.02))


def _edit_softcap(cache, caches):
    _edit_manifest(cache, lambda m: m["transform"].update(softcap=30.0))


def _edit_base_hash(cache, caches):
    _edit_manifest(cache, lambda m: m.update(base_model_sha256="0" * 64))


TAMPERED = [_scale_states, _swap_states, _other_head, _swap_both, _edit_scale, _edit_softcap, _edit_base_hash]


@pytest.mark.parametrize("tamper", TAMPERED, ids=lambda f: f.__name__.strip("_"))
def test_a_changed_cache_is_refused(capsys, cache, caches, other_model_dir, data, tmp_path, tamper):
    tamper(cache, caches)
    err = _refused(capsys, cache, other_model_dir, data, tmp_path)
    assert "base-cache:" in err and "damaged" in err and "--save-base" in err


def _cut(name, keep):
    def damage(cache):
        path = cache / name
        path.write_bytes(path.read_bytes()[: int(keep * path.stat().st_size)])
    return damage


def _garbage(name):
    def damage(cache):
        (cache / name).write_bytes(os.urandom(4096))
    return damage


def _rename_key(name, old, new):
    return lambda cache: _edit_tensors(cache, name, lambda t: t.update({new: t.pop(old)}))


def _retype(name, key, dtype):
    return lambda cache: _edit_tensors(cache, name, lambda t: t.update({key: t[key].to(dtype)}))


def _states_wider(cache):  # hidden size + 1
    _edit_tensors(cache, "states.safetensors",
                  lambda t: t.update(hidden=torch.cat([t["hidden"], t["hidden"][:, :1]], 1)))


def _head_wider(cache):
    _edit_tensors(cache, "head.safetensors",
                  lambda t: t.update(weight=torch.cat([t["weight"], t["weight"][:, :1]], 1)))


def _vocab_short(cache):  # vocabulary − 1
    _edit_tensors(cache, "head.safetensors", lambda t: t.update(weight=t["weight"][:-1].contiguous()))


def _bias_wrong_length(cache):
    _edit_tensors(cache, "head.safetensors", lambda t: t.update(bias=torch.zeros(t["weight"].shape[0] + 1)))


def _manifest_vocab(cache):
    _edit_manifest(cache, lambda m: m.update(vocab=m["vocab"] + 1))


def _manifest_rows(cache):
    _edit_manifest(cache, lambda m: m["rows"].__setitem__(0, m["rows"][0] + 1))


def _manifest_no_transform(cache):
    _edit_manifest(cache, lambda m: m.pop("transform"))


def _manifest_scale_string(cache):
    _edit_manifest(cache, lambda m: m["transform"].update(scale="inv_sqrt_d_model"))


def _manifest_rows_strings(cache):
    _edit_manifest(cache, lambda m: m.update(rows=[str(r) for r in m["rows"]]))


def _states_missing(cache):
    (cache / "states.safetensors").unlink()


# each is then re-sealed (see _reseal): the hashes agree, the contents do not
DAMAGED = {
    "states truncated": _cut("states.safetensors", 0.5),
    "head truncated": _cut("head.safetensors", 0.9),
    "states header only": _cut("states.safetensors", 0.01),
    "states empty": _cut("states.safetensors", 0),
    "states garbage": _garbage("states.safetensors"),
    "head garbage": _garbage("head.safetensors"),
    "states key missing": _rename_key("states.safetensors", "hidden", "h"),
    "head key missing": _rename_key("head.safetensors", "weight", "w"),
    "states int32": _retype("states.safetensors", "hidden", torch.int32),
    "states float64": _retype("states.safetensors", "hidden", torch.float64),
    "head int64": _retype("head.safetensors", "weight", torch.int64),
    "hidden size +1 (states)": _states_wider,
    "hidden size +1 (head)": _head_wider,
    "vocabulary -1 (head)": _vocab_short,
    "bias of the wrong length": _bias_wrong_length,
    "vocabulary +1 (manifest)": _manifest_vocab,
    "rows off by one (manifest)": _manifest_rows,
    "no transform (manifest)": _manifest_no_transform,
    "scale a string (manifest)": _manifest_scale_string,
    "rows strings (manifest)": _manifest_rows_strings,
    "states missing": _states_missing,
}


@pytest.mark.parametrize("damage", list(DAMAGED.values()), ids=list(DAMAGED))
def test_a_damaged_cache_is_one_line(capsys, cache, other_model_dir, data, tmp_path, damage):
    damage(cache)
    _reseal(cache)
    err = _refused(capsys, cache, other_model_dir, data, tmp_path)
    assert err.startswith("xent compare: error: ") and "base-cache" in err


@pytest.mark.parametrize("damage", ["not JSON", "cut short", "a list", "empty", "format 1"])
def test_a_damaged_manifest_is_one_line(capsys, cache, other_model_dir, data, tmp_path, damage):
    path = cache / "manifest.json"
    text = path.read_text()
    path.write_text({"not JSON": "{oops", "cut short": text[: len(text) // 2], "a list": "[1, 2]",
                     "empty": "", "format 1": text.replace('"format": 2', '"format": 1')}[damage])
    assert "base-cache" in _refused(capsys, cache, other_model_dir, data, tmp_path)


def _refused_in_a_process(cache, model, data, tmp_path, fifo) -> str:
    """As _refused, in a child process killed after a timeout: a reader blocked on a FIFO inside a
    native library can hold the GIL, which no thread or signal of this process could then interrupt.
    On a timeout the FIFO is opened for writing and closed (which ends the blocked open) and the test
    fails."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "xent", "compare", "--base-cache", str(cache), "--model", str(model),
           "--data", str(data), *DOCS_ARGS, "--out", str(tmp_path / "out"), "--json"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as p:
        try:
            out, err = p.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            pytest.fail(f"blocked on the FIFO {fifo} for 60 s")
    assert p.returncode == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert out == "" and not (tmp_path / "out" / "summary.json").exists()
    return err


# /dev/zero as the manifest is left out: code that reads it whole would fill the test machine's memory
@pytest.mark.skipif(not hasattr(os, "mkfifo") or not os.path.exists("/dev/zero"), reason="POSIX only")
@pytest.mark.parametrize("name", ["manifest.json", "states.safetensors", "head.safetensors"])
def test_a_fifo_in_the_cache_does_not_hang(cache, other_model_dir, data, tmp_path, name):
    (cache / name).unlink()
    os.mkfifo(cache / name)
    assert "not a regular file" in _refused_in_a_process(cache, other_model_dir, data, tmp_path, name)


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="POSIX only")
@pytest.mark.parametrize("name", ["states.safetensors", "head.safetensors"])
def test_dev_zero_in_the_cache_is_refused(capsys, cache, other_model_dir, data, tmp_path, name):
    (cache / name).unlink()
    os.symlink("/dev/zero", cache / name)
    assert "not a regular file" in _refused(capsys, cache, other_model_dir, data, tmp_path)


def test_two_save_base_runs_into_one_directory(capsys, monkeypatch, model_dir, other_model_dir, data,
                                               tmp_path):
    target = tmp_path / "c"
    second: list = []
    real = xent.eval.evaluate

    def while_the_first_runs(*args, **kwargs):
        # a second run into the same directory, started while the first computes
        second.append(main(["eval", "--model", str(other_model_dir), "--data", str(data), *DOCS_ARGS,
                            "--save-base", str(target), "--json"]))
        second.append(capsys.readouterr().err)
        return real(*args, **kwargs)

    monkeypatch.setattr(xent.eval, "evaluate", while_the_first_runs)
    assert main(["eval", "--model", str(model_dir), "--data", str(data), *DOCS_ARGS, "--save-base",
                 str(target), "--json"]) == 0
    monkeypatch.undo()
    assert second[0] == 2 and "in use by another xent run" in second[1] and second[1].count("\n") == 1
    # the first run's cache is whole: it gives the two-model compare's KL
    assert _compare(target, other_model_dir, data, tmp_path / "one") == 0
    assert main(["compare", "--base", str(model_dir), "--model", str(other_model_dir), "--data", str(data),
                 *DOCS_ARGS, "--out", str(tmp_path / "two"), "--json"]) == 0
    capsys.readouterr()
    one, two = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two"))
    assert one["kl_mean"] == two["kl_mean"]
    assert sorted(os.listdir(tmp_path)) == ["c", "one", "two"]  # no lock or temporary folder left


def test_a_directory_filled_during_the_run_keeps_its_files(model_and_tokenizer, documents, tmp_path):
    model, tok = model_and_tokenizer
    target = tmp_path / "c"

    def another_writer(tokens):
        if not target.exists():
            target.mkdir()
            (target / "theirs.txt").write_text("kept")

    with pytest.raises(xent.eval.EvalError, match="filled by another run"):
        xent.eval.evaluate(model, tok, documents, save_base=str(target), max_length=32,
                           progress=another_writer)
    assert os.listdir(target) == ["theirs.txt"] and os.listdir(tmp_path) == ["c"]


def test_a_failed_write_leaves_no_cache(monkeypatch, model_and_tokenizer, documents, tmp_path):
    import safetensors.torch

    model, tok = model_and_tokenizer
    real, calls = safetensors.torch.save_file, []

    def disk_full_on_the_second_file(tensors, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full_on_the_second_file)
    with pytest.raises(OSError, match="No space left"):
        xent.eval.evaluate(model, tok, documents, save_base=str(tmp_path / "c"), max_length=32)
    assert len(calls) == 2 and os.listdir(tmp_path) in ([], ["c"]) and not list(tmp_path.glob("c/*"))


def test_cache_and_checkpoint_files_follow_the_umask(capsys, model_dir, data, tmp_path):
    before = os.umask(0o022)
    try:
        assert main(["eval", "--model", str(model_dir), "--data", str(data), *DOCS_ARGS, "--save-base",
                     str(tmp_path / "c"), "--out", str(tmp_path / "o"), "--checkpoint-every", "1",
                     "--json"]) == 0
        assert main(["eval", "--model", str(model_dir), "--data", str(data), *DOCS_ARGS, "--out",
                     str(tmp_path / "p"), "--checkpoint-every", "1", "--stop-after", "1"]) == 3
    finally:
        os.umask(before)
    capsys.readouterr()
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in [tmp_path / "c", *(tmp_path / "c").iterdir()]}
    assert modes == {"c": "0o755", "manifest.json": "0o644", "states.safetensors": "0o644",
                     "head.safetensors": "0o644"}
    assert oct((tmp_path / "p" / "checkpoint.json").stat().st_mode & 0o777) == "0o644"
    assert oct((tmp_path / "o" / "summary.json").stat().st_mode & 0o777) == "0o644"


def test_a_failed_run_leaves_the_directory_free(capsys, model_dir, data, tmp_path):
    target = tmp_path / "c"
    assert main(["eval", "--model", str(model_dir), "--data", str(tmp_path / "missing.txt"), *DOCS_ARGS,
                 "--save-base", str(target)]) == 2
    capsys.readouterr()
    assert os.listdir(tmp_path) == []
    assert main(["eval", "--model", str(model_dir), "--data", str(data), *DOCS_ARGS, "--save-base",
                 str(target), "--json"]) == 0
    capsys.readouterr()
    assert sorted(os.listdir(target)) == ["head.safetensors", "manifest.json", "states.safetensors"]
