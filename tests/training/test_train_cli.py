"""``xent train`` on a tiny saved model: trains, saves a checkpoint ``xent eval`` reads, fails in one line."""

from __future__ import annotations

import json

import pytest

transformers = pytest.importorskip("transformers")

from xent.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from xent.demo import MarkovSource, build_model, train_tokenizer

    root = tmp_path_factory.mktemp("train-cli")
    texts = MarkovSource(num_words=16, seed=1).sample(60, 40, seed=2)
    tok = train_tokenizer(texts, vocab_size=300)
    model = build_model(len(tok), seq_len=32, d_model=32, n_layer=1, n_head=2)
    model.save_pretrained(root / "init")
    tok.save_pretrained(root / "init")
    with open(root / "train.jsonl", "w") as f:
        for t in texts[:50]:
            f.write(json.dumps({"text": t}) + "\n")
    (root / "heldout.txt").write_text("\n".join(texts[50:]))
    return root


def test_train_saves_a_checkpoint_that_xent_eval_reads(model_dir, capsys):
    out = model_dir / "tailr"
    rc = main(["train", "--model", str(model_dir / "init"), "--data", str(model_dir / "train.jsonl"),
               "--eval-data", str(model_dir / "heldout.txt"), "--split", "lines", "--out", str(out),
               "--objective", "tailr", "--gamma", "0.5", "--steps", "4", "--batch-size", "4",
               "--micro-batch-size", "2", "--eval-every", "2", "--no-progress", "--lr", "1e-2"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "tailr: 4 steps" in printed and "held-out cross-entropy" in printed
    log = json.loads((out / "xent_train.json").read_text())
    assert log["config"]["objective_options"] == {"gamma": 0.5}
    assert log["config"]["seq_len"] == 32  # the model's context
    assert "gamma=0.5" in log["objective"]
    assert [e["step"] for e in log["eval_history"]] == [0, 2, 4]
    assert main(["eval", "--model", str(out), "--data", str(model_dir / "heldout.txt"), "--split", "lines",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] > 0


@pytest.mark.parametrize("extra, message", [
    (["--objective", "xe"], "unknown objective 'xe'"),
    (["--objective", "ce", "--gamma", "2"], "gamma"),
    (["--seq-len", "999"], "beyond the model's 32 positions"),
])
def test_bad_options_fail_in_one_line(model_dir, capsys, extra, message):
    rc = main(["train", "--model", str(model_dir / "init"), "--data", str(model_dir / "train.jsonl"),
               "--out", str(model_dir / "bad"), "--steps", "1", "--no-progress", *extra])
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_missing_model_directory(tmp_path, capsys):
    assert main(["train", "--model", str(tmp_path / "nope"), "--data", str(tmp_path / "x.txt"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err


# -- options are checked before anything is loaded; errors are one line without Python internals ----------


@pytest.fixture
def no_model_load(monkeypatch):
    from xent.eval import _load

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the check")

    monkeypatch.setattr(_load, "load_model", refuse)


def _train(model_dir, out, *extra):
    return main(["train", "--model", str(model_dir / "init"), "--data", str(model_dir / "train.jsonl"),
                 "--out", str(out), "--steps", "3", "--batch-size", "4", "--no-progress", *map(str, extra)])


def _one_line(capsys):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("xent train: error: "), err
    assert "Traceback" not in err and "__init__" not in err and "keyword argument" not in err
    return err


@pytest.mark.parametrize("extra, message", [
    (["--micro-batch-size", "0"], "--micro-batch-size must be at least 1, got 0"),
    (["--micro-batch-size", "3"], "--micro-batch-size 3 does not divide --batch-size 4"),
    (["--seq-len", "0"], "--seq-len must be at least 2, got 0"),
    (["--seq-len", "-4"], "--seq-len must be at least 2, got -4"),
    (["--seq-len", "1"], "--seq-len must be at least 2, got 1"),
    (["--warmup-steps", "-5"], "--warmup-steps must be at least 0, got -5"),
    (["--steps", "0"], "--steps must be at least 1, got 0"),
    (["--lr", "0"], "--lr must be a positive finite number, got 0.0"),
    (["--lr", "nan"], "--lr must be a positive finite number, got nan"),
    (["--min-lr=-1e-4"], "--min-lr must be a non-negative finite number, got -0.0001"),
    (["--grad-clip", "-1"], "--grad-clip must be a non-negative finite number, got -1.0"),
    (["--gamma", "inf", "--objective", "focal"], "--gamma must be a finite number, got inf"),
    (["--objective", "ce", "--gamma", "2"],
     "--gamma does not apply to objective 'ce' (its options: --label-smoothing, --z-loss)"),
    (["--objective", "gold", "--epsilon", "1"],
     "--epsilon does not apply to objective 'gold' (its options: --threshold)"),
    (["--device", "tpu"], "--device 'tpu' is not a device (cpu, cuda, cuda:N, mps)"),
    (["--objective", "rho1"], "objective 'rho1' needs --ref-model DIR"),
    (["--objective", "ce", "--ref-model", "x"], "--ref-model is for objective 'rho1' only, not 'ce'"),
    (["--objective", "eaft", "--ratio", "0.5"], "--ratio does not apply to objective 'eaft' (its options: "
     "--top-k, --alpha"),
    (["--patience", "2"], "--patience 2 needs --eval-data and --eval-every N > 0"),
    (["--patience", "-1"], "--patience must be at least 0, got -1"),
    (["--max-document-mb", "0"], "--max-document-mb must be positive, got 0"),
])
def test_bad_options_are_refused_before_loading(model_dir, tmp_path, capsys, no_model_load, extra, message):
    assert _train(model_dir, tmp_path / "out", *extra) == 2
    assert message in _one_line(capsys)
    assert not (tmp_path / "out").exists()


def test_a_diverging_run_stops_at_the_first_non_finite_loss_and_saves_nothing(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert _train(model_dir, out, "--lr", "1e10", "--warmup-steps", "0", "--steps", "20") == 2
    err = _one_line(capsys)
    import re

    assert re.search(r"step \d+ of 20: the (loss|gradient norm) is (nan|inf|-inf): training stopped before "
                     r"this step's update and the model was not saved", err), err
    assert not out.exists()  # nothing saved as if it had finished


def test_out_problems_are_found_before_loading(model_dir, tmp_path, capsys, no_model_load):
    (tmp_path / "file").write_text("mine")
    assert _train(model_dir, tmp_path / "file") == 2
    assert "--out " + str(tmp_path / "file") + " exists and is not a directory" in _one_line(capsys)
    import fcntl
    import os

    (tmp_path / "busy").mkdir()
    fd = os.open(tmp_path / "busy" / ".xent.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        assert _train(model_dir, tmp_path / "busy") == 2
    finally:
        os.close(fd)
    assert "is in use by another xent run" in _one_line(capsys)


def test_a_failed_save_does_not_lose_the_trained_model(model_dir, tmp_path, capsys, monkeypatch):
    import errno
    import os
    import tempfile

    import torch

    from xent.training import _loop

    out = tmp_path / "out"
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    real_dump, calls = _loop.json.dump, [0]

    def disk_full_once(*a, **k):  # the first xent_train.json write fails: the model was written before
        calls[0] += 1
        if calls[0] == 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_dump(*a, **k)

    monkeypatch.setattr(_loop.json, "dump", disk_full_once)
    trained = []
    real_train = _loop.train
    monkeypatch.setattr("xent.training.train", lambda model, *a, **k: (trained.append(model),
                                                                         real_train(model, *a, **k))[1])
    assert _train(model_dir, out) == 2
    err = _one_line(capsys)
    assert f"cannot save the model after step 3 to {out}: No space left on device" in err
    fallback = err.split("it was saved to ")[1].split(" instead")[0]
    assert fallback.startswith(str(tmp_path / "tmp" / "xent-train-"))
    assert not out.exists()  # no half-written weights where a loader would find them (it was created empty)
    log = json.loads(open(os.path.join(fallback, "xent_train.json")).read())
    assert [h["step"] for h in log["history"]] == [1, 2, 3]
    saved = transformers.AutoModelForCausalLM.from_pretrained(fallback)
    for name, p in trained[0].state_dict().items():
        torch.testing.assert_close(saved.state_dict()[name], p, rtol=0, atol=0)


def test_a_finished_run_leaves_only_its_files(model_dir, tmp_path, capsys):
    import os

    out = tmp_path / "out"
    (out / ".xent-save-k3j").mkdir(parents=True)  # a save killed half-way by an earlier run
    (out / ".xent-save-k3j" / "model.safetensors").write_bytes(b"half")
    assert _train(model_dir, out, "--steps", "1") == 0
    names = os.listdir(out)
    assert "model.safetensors" in names and "xent_train.json" in names
    assert not [n for n in names if n.startswith(".xent")]  # no stale save, no lock file


def test_defaults_are_train_configs_and_help_shows_them(capsys):
    from dataclasses import fields

    from xent.cli import build_parser
    from xent.training import TrainConfig

    args = build_parser().parse_args(["train", "--model", "m", "--data", "d", "--out", "o"])
    cfg = TrainConfig()
    for f in fields(TrainConfig):
        if hasattr(args, f.name) and f.name not in ("grad_clip",):
            assert getattr(args, f.name) == getattr(cfg, f.name), f.name
    assert args.grad_clip == cfg.grad_clip and args.min_lr is None and args.seq_len is None
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for flag, value in [("--lr", f"{cfg.lr:g}"), ("--steps", cfg.steps), ("--batch-size", cfg.batch_size),
                        ("--warmup-steps", cfg.warmup_steps), ("--weight-decay", f"{cfg.weight_decay:g}")]:
        assert f"(default: {value})" in text.split(flag, 2)[2].split(" --", 1)[0], flag
    assert "(default: lr/10)" in text and "``" not in text


@pytest.mark.parametrize("command", ["eval", "compare", "train", "demo"])
def test_help_is_plain_text(capsys, command):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    assert "``" not in out  # reStructuredText markup of the docstrings
    if command != "demo":
        assert "--threads N" in out


def test_eval_data_alone_is_scored_at_the_end(model_dir, capsys):
    out = model_dir / "ce-end"
    rc = main(["train", "--model", str(model_dir / "init"), "--data", str(model_dir / "train.jsonl"),
               "--eval-data", str(model_dir / "heldout.txt"), "--out", str(out), "--steps", "2",
               "--batch-size", "2", "--no-progress"])
    assert rc == 0
    assert "held-out cross-entropy" in capsys.readouterr().out
    assert [e["step"] for e in json.loads((out / "xent_train.json").read_text())["eval_history"]] == [0, 2]


def test_threads_and_ctrl_c(model_dir, capsys, monkeypatch):
    import torch

    import xent.training

    seen = []

    def interrupted(*args, **kwargs):
        seen.append(torch.get_num_threads())
        raise KeyboardInterrupt

    monkeypatch.setattr(xent.training, "train", interrupted)
    before = torch.get_num_threads()
    argv = ["train", "--model", str(model_dir / "init"), "--data", str(model_dir / "train.jsonl"),
            "--out", str(model_dir / "interrupted"), "--no-progress", "--threads", "2"]
    assert main(argv) == 130
    assert seen == [2] and torch.get_num_threads() == before
    err = capsys.readouterr().err
    assert "nothing was saved" in err and "--save-every" in err and err.count("\n") == 1
    assert main([*argv, "--save-every", "5"]) == 130
    assert "interrupted/step-N" in capsys.readouterr().err
    assert main([*argv[:-1], "0"]) == 2
    assert capsys.readouterr().err == "xent train: error: --threads must be at least 1, got 0\n"


def test_every_objective_trains_from_the_command_line(model_dir, tmp_path, capsys):
    """Each name of xent.training.OBJECTIVES, two steps through ``xent train`` (rho1 with the initial
    model as its reference): the log names the loss object and its options, the loss is finite."""
    import math

    from xent.training import OBJECTIVES, make_objective

    options = {"eaft": ["--top-k", "5"], "entropy_reg": ["--beta", "0.05"], "rho1": ["--ratio", "0.5"],
               "dft": []}
    for name in OBJECTIVES:
        out = tmp_path / name
        extra = options.get(name, [])
        if name == "rho1":
            extra = [*extra, "--ref-model", str(model_dir / "init")]
        assert _train(model_dir, out, "--objective", name, "--steps", "2", *extra) == 0, name
        assert f"{name}: 2 steps" in capsys.readouterr().out
        log = json.loads((out / "xent_train.json").read_text())
        expected = {"eaft": {"k": 5}, "entropy_reg": {"beta": 0.05}, "rho1": {"ratio": 0.5}}.get(name, {})
        assert log["config"]["objective_options"] == expected, name
        if name != "emo":  # EMO's repr holds its cost embedding's shape, built from the model
            assert log["objective"] == repr(make_objective(name, **expected)), name
        assert all(math.isfinite(h["loss"]) for h in log["history"]) and len(log["history"]) == 2


def test_rho1_trains_on_the_selected_share_of_the_tokens(model_dir, tmp_path, capsys):
    args = ["--steps", "1", "--batch-size", "4", "--micro-batch-size", "2"]
    assert _train(model_dir, tmp_path / "ce", *args) == 0
    assert _train(model_dir, tmp_path / "rho1", *args, "--objective", "rho1", "--ratio", "0.5",
                  "--ref-model", model_dir / "init") == 0
    ce, rho1 = (json.loads((tmp_path / n / "xent_train.json").read_text())["tokens"] for n in ("ce", "rho1"))
    assert rho1 == 2 * ((ce // 2) // 2)  # each micro-batch keeps ⌊0.5·n⌋ of its n targets


def test_patience_stops_and_the_best_weights_are_saved(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert _train(model_dir, out, "--eval-data", model_dir / "heldout.txt", "--split", "lines", "--steps",
                  "60", "--eval-every", "2", "--patience", "1", "--lr", "0.5", "--warmup-steps", "0") == 0
    printed = capsys.readouterr().out
    log = json.loads((out / "xent_train.json").read_text())
    assert log["stopped_at"] is not None and len(log["history"]) == log["stopped_at"] < 60
    assert f"{log['stopped_at']} of 60 steps (patience)" in printed
    ce = [e["eval_ce"] for e in log["eval_history"]]
    assert log["eval_at_end"]["eval_ce"] == min(ce) and log["best_step"] == log["eval_history"][
        ce.index(min(ce))]["step"]
