"""xent eval and compare: --threads, what Ctrl-C says, and the hint when the SE by document is undefined."""

from __future__ import annotations

import pytest
import torch

import xent.eval
import xent.eval._compare
from xent.cli import main


@pytest.fixture
def text_file(tmp_path, documents):
    path = tmp_path / "docs.txt"
    path.write_text("\n".join(documents) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("command", ["eval", "compare"])
def test_threads_option_sets_torch_threads_for_the_run_only(monkeypatch, capsys, model_dir, text_file,
                                                            command):
    seen = []
    module, name = (xent.eval, "evaluate") if command == "eval" else (xent.eval._compare, "compare")
    real = getattr(module, name)

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    models = ["--model", str(model_dir)] if command == "eval" else ["--base", str(model_dir), "--model",
                                                                    str(model_dir)]
    before = torch.get_num_threads()
    assert main([command, *models, "--data", str(text_file), "--split", "lines", "--max-length", "32",
                 "--threads", "2", "--json"]) == 0
    assert seen == [2] and torch.get_num_threads() == before
    capsys.readouterr()


@pytest.mark.parametrize("command", ["eval", "compare"])
def test_threads_below_one_is_a_one_line_error(capsys, model_dir, text_file, command):
    models = ["--model", str(model_dir)] if command == "eval" else ["--base", str(model_dir), "--model",
                                                                    str(model_dir)]
    assert main([command, *models, "--data", str(text_file), "--threads", "0"]) == 2
    err = capsys.readouterr().err
    assert err == f"xent {command}: error: --threads must be at least 1, got 0\n"


def test_ctrl_c_says_that_resume_continues(monkeypatch, capsys, model_dir, text_file, tmp_path):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(xent.eval, "evaluate", interrupted)
    out = tmp_path / "run"
    assert main(["eval", "--model", str(model_dir), "--data", str(text_file), "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert "--resume" in err and str(out) in err and err.count("\n") == 1
    assert main(["eval", "--model", str(model_dir), "--data", str(text_file)]) == 130
    assert "--out DIR" in capsys.readouterr().err  # nothing to resume from without --out


def test_one_document_gets_a_hint_about_split(capsys, model_dir, text_file):
    assert main(["eval", "--model", str(model_dir), "--data", str(text_file), "--max-length", "32"]) == 0
    printed = capsys.readouterr().out
    assert "--split lines" in printed  # the SE by document of a single document is undefined
    assert main(["eval", "--model", str(model_dir), "--data", str(text_file), "--max-length", "32",
                 "--split", "lines"]) == 0
    assert "--split" not in capsys.readouterr().out
