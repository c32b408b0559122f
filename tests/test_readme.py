"""README.md's recipes run as written and do what the text around them says.

Each python snippet uses the names the README says the reader has (`args` and `ds` of a Trainer run, a
model directory `my-model`, `steps` of micro-batches...); each test provides them with tiny models, runs
the snippet's text unchanged, then checks its result against an independent computation (transformers'
own loss on the full batch, TRL's own DFT loss, the plain loss on materialised logits). The shell recipe
runs through the CLI's entry point. A new snippet without a runner fails test_every_snippet_has_a_runner.
The docs/ pages' snippets are tests/test_docs.py's.
"""

from __future__ import annotations

import json
import re
import shlex
import sys

import pytest
import torch

from doc_snippets import ROOT, batch, check_runners, run_snippet, snippet, tiny

README = "README.md"

RUNNERS = {
    "patch_causal_lm(model, loss=xent.losses.TaiLr": "test_recipe_a_trainer",
    "trainer = XentSFTTrainer(model=model, args=sft_args": "test_recipe_a_trl",
    "for micro_batches in steps:": "test_recipe_b_training_loop",
}


def test_every_snippet_has_a_runner():
    check_runners(README, RUNNERS, sys.modules[__name__])


def test_readme_stays_short():
    lines = (ROOT / README).read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 210, len(lines)
    text = "\n".join(lines)
    for recipe in ("Recipe (a)", "Recipe (b)", "Recipe (c)"):
        assert recipe in text
    for block in re.findall(r"```(?:python|bash)\n(.*?)```", text, flags=re.S):  # recipes of <= 15 lines
        assert len(block.strip().splitlines()) <= 15, block


@pytest.mark.parametrize("page", [README, *sorted(p.relative_to(ROOT).as_posix()
                                                   for p in (ROOT / "docs").glob("*.md"))])
def test_links_point_inside_the_repository(page):
    path = ROOT / page
    for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text(encoding="utf-8")):
        if "://" in target or target.startswith("#"):
            continue
        resolved = (path.parent / target.split("#")[0]).resolve()
        assert resolved.is_relative_to(ROOT), target  # a clone has nothing above the repository
        assert resolved.exists(), f"{page}: {target}"


transformers = pytest.importorskip("transformers")

import xent  # noqa: E402


@pytest.fixture
def one_thread_here(one_thread):
    yield


def _logged(monkeypatch) -> list[dict]:
    logs = []
    original = transformers.Trainer.log

    def log(self, values, *args, **kwargs):
        logs.append(dict(values))
        return original(self, values, *args, **kwargs)

    monkeypatch.setattr(transformers.Trainer, "log", log)
    return logs


def test_recipe_a_trainer(tmp_path, monkeypatch, one_thread_here):
    pytest.importorskip("accelerate")
    from xent.integrations.transformers import is_patched

    tiny("gpt2").save_pretrained(tmp_path / "my-model")
    monkeypatch.chdir(tmp_path)
    ids, labels = batch(rows=4)
    ds = [{"input_ids": i, "labels": y} for i, y in zip(ids, labels)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4,
                                          max_steps=2, report_to=[], save_strategy="no", use_cpu=True,
                                          disable_tqdm=True, logging_steps=1, learning_rate=1e-2)
    with torch.no_grad():  # the first step's loss, from the logits of the model as loaded (plain path)
        logits = tiny("gpt2")(input_ids=ids).logits
    # Trainer's num_items_in_batch counts labels != -100 before the shift, for transformers' own loss too
    total = xent.tailr_loss(logits[:, :-1], labels[:, 1:], gamma=0.1, threshold=0.3, reduction="sum")
    want = (total / (labels != -100).sum()).item()
    logs = _logged(monkeypatch)
    ns = run_snippet(README, "patch_causal_lm(model, loss=xent.losses.TaiLr", {"args": args, "ds": ds})
    steps = [e for e in logs if "loss" in e]
    assert len(steps) == 2 and steps[0]["loss"] == pytest.approx(want, rel=1e-5)
    assert steps[1]["loss"] < steps[0]["loss"]  # it trained
    assert not is_patched(ns["model"])


def test_recipe_a_trl(tmp_path, monkeypatch, one_thread_here):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from xent.demo import train_tokenizer
    from xent.integrations.transformers import is_patched

    texts = datasets.Dataset.from_dict({"text": [f"the {w} sat on the {v} mat." for w in ("cat", "dog", "owl")
                                                 for v in ("red", "big", "old", "new")]})
    tokenizer = train_tokenizer(texts["text"], vocab_size=300)

    def config(**kw):
        return trl.SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4,
                             max_length=32, bf16=False, report_to=[], save_strategy="no", use_cpu=True,
                             disable_tqdm=True, logging_steps=1, seed=0, **kw)

    # TRL's own DFT (loss_type="dft") from the full logits is the reference for xent's DFT
    stock = trl.SFTTrainer(model=tiny("gpt2", vocab_size=len(tokenizer), positions=64),
                           args=config(loss_type="dft"), train_dataset=texts, processing_class=tokenizer)
    stock.train()
    want = [e["loss"] for e in stock.state.log_history if "loss" in e]
    model = tiny("gpt2", vocab_size=len(tokenizer), positions=64)
    ns = run_snippet(README, "trainer = XentSFTTrainer(model=model, args=sft_args", {
        "xent": xent, "model": model, "sft_args": config(), "texts": texts, "tokenizer": tokenizer})
    got = [e["loss"] for e in ns["trainer"].state.log_history if "loss" in e]
    assert is_patched(model)
    assert got == pytest.approx(want, rel=1e-5)


def test_recipe_b_training_loop(one_thread_here):
    model = tiny("gpt2").train()
    ids, labels = batch(rows=6)
    micro_batches = [{"input_ids": ids[i : i + 2], "labels": labels[i : i + 2]} for i in range(0, 6, 2)]
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # the update is the gradient
    run_snippet(README, "for micro_batches in steps:",
                {"model": model, "optimizer": optimizer, "steps": [micro_batches]})
    reference = tiny("gpt2").train()
    reference(input_ids=ids, labels=labels).loss.backward()  # transformers' mean over the whole batch
    for b, p, r in zip(before, model.parameters(), reference.parameters()):
        torch.testing.assert_close(b - p.detach(), r.grad, rtol=1e-4, atol=1e-6)


def test_recipe_c_eval_and_compare(tmp_path, monkeypatch, capsys, one_thread_here):
    from xent.cli import main
    from xent.demo import train_tokenizer

    docs = [f"Document {i}: the quick brown fox jumps over the lazy dog number {i}." for i in range(12)]
    tokenizer = train_tokenizer(docs, vocab_size=300)
    for name, seed in (("my-model", 0), ("base-model", 1)):
        tiny("gpt2", seed=seed, vocab_size=len(tokenizer), positions=64).save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    (tmp_path / "test.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    monkeypatch.chdir(tmp_path)
    commands = [line for line in snippet(README, "xent eval --model my-model", "bash").splitlines() if line]
    assert [c.split()[:2] for c in commands] == [["xent", "eval"], ["xent", "compare"]]
    for command in commands:
        assert main(shlex.split(command)[1:]) == 0, command
    summary = json.loads((tmp_path / "runs/eval/summary.json").read_text())
    assert summary["tokens"] > 0 and summary["perplexity"] > 1
    assert (tmp_path / "runs/eval/report.html").exists()
    assert "KL" in capsys.readouterr().out  # compare's table
