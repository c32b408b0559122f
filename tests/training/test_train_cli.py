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
    assert [e["step"] for e in log["eval_history"]] == [2, 4]
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
    assert [e["step"] for e in json.loads((out / "xent_train.json").read_text())["eval_history"]] == [2]


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
