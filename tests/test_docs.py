"""Every code snippet of docs/*.md runs, as written, and does what the page says.

A snippet uses names its page's prose says the reader has (`model`, `hidden`, `head_weight`, a Trainer's
arguments...): each test provides them with tiny models, executes the snippet's text unchanged, then
checks its result against an independent computation (transformers' own loss, float64 references from
the materialised logits, TRL's own trainers, the full-batch gradient). A new snippet without a runner
fails test_every_snippet_has_a_runner. README.md's recipes are tests/test_readme.py's.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from doc_snippets import ROOT, batch, check_runners, run_snippet, snippet, tiny

# page -> {a line of the snippet: the test that runs it}
RUNNERS = {
    "docs/losses.md": {
        "logits = torch.randn(4, 128, 32000": "test_exact_token_losses_example",
        'n = sum(xent.count_items(mb["labels"]) for mb in micro_batches)': "test_num_items_example",
        "emo = xent.losses.EMO(": "test_beyond_cross_entropy_example",
        "loss, stats = xent.linear_cross_entropy(": "test_stats_example",
        "class StatsTrainer(transformers.Trainer)": "test_stats_trainer_example",
    },
    "docs/fused-head.md": {
        "loss = xent.linear_cross_entropy(hidden, head_weight, labels, shift=True)": "test_fused_example",
    },
    "docs/rl.md": {
        "logp, entropy = xent.linear_log_probs(": "test_log_probs_example",
        "def token_logp(model, input_ids, labels": "test_grpo_example",
    },
    "docs/trl.md": {
        "trainer = XentSFTTrainer(model=model, args=args": "test_trl_sft_example",
        'trainer = XentGRPOTrainer(model="my-model"': "test_trl_grpo_example",
    },
    "docs/training.md": {'path = "xent-demo/models/ce"': "test_train_example_on_a_demo_checkpoint"},
    "docs/keras.md": {"import xent.keras as xk": "test_keras_example"},
    "docs/distributed.md": {
        "local_head = torch.nn.Parameter(": "test_distributed_examples",
        "group=dist.group.WORLD) for mb in micro_batches)": "test_distributed_examples",
    },
}


def test_every_page_is_covered():
    pages = {p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md")}
    with_code = {p for p in pages if "```python" in (ROOT / p).read_text(encoding="utf-8")}
    assert with_code <= set(RUNNERS), with_code - set(RUNNERS)


@pytest.mark.parametrize("page", sorted(RUNNERS))
def test_every_snippet_has_a_runner(page):
    check_runners(page, RUNNERS[page], sys.modules[__name__])


def test_pages_carry_no_project_history():
    for page in (ROOT / "docs").glob("*.md"):
        text = page.read_text(encoding="utf-8")
        for phrase in ("Issue 1", "Before, ", "as before"):
            assert phrase not in text, (page.name, phrase)


transformers = pytest.importorskip("transformers")

import xent  # noqa: E402


@pytest.fixture
def one_thread_here(one_thread):
    yield



def test_exact_token_losses_example():
    ns = run_snippet("docs/losses.md", "logits = torch.randn(4, 128, 32000", {})
    assert ns["loss"].dtype == torch.float32 and torch.isfinite(ns["loss"])


def test_num_items_example(one_thread_here):
    model = tiny("gpt2").train()
    ids, labels = batch(rows=6)
    micro_batches = [{"input_ids": ids[i : i + 2], "labels": labels[i : i + 2]} for i in range(0, 6, 2)]
    run_snippet("docs/losses.md", 'n = sum(xent.count_items(mb["labels"]) for mb in micro_batches)',
                {"xent": xent, "model": model, "micro_batches": micro_batches})
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(input_ids=ids, labels=labels).loss.backward()  # transformers' mean over the whole batch
    for g, p in zip(got, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])  # model.model is Llama's decoder, not GPT-2's
def test_fused_example(arch, one_thread_here):
    model = tiny(arch)
    input_ids, labels = batch()
    key = "loss = xent.linear_cross_entropy(hidden, head_weight, labels, shift=True)"
    ns = run_snippet("docs/fused-head.md", key, {"model": model, "input_ids": input_ids, "labels": labels})
    ref = model(input_ids=input_ids, labels=labels).loss
    torch.testing.assert_close(ns["loss"], ref, rtol=1e-5, atol=1e-6)


def test_beyond_cross_entropy_example(one_thread_here):
    model = tiny("llama")
    input_ids, labels = batch()
    hidden = model.base_model(input_ids).last_hidden_state
    teacher = tiny("gpt2", seed=1)
    ns = run_snippet("docs/losses.md", "emo = xent.losses.EMO(", {
        "xent": xent, "model": model, "hidden": hidden, "labels": labels,
        "h_student": hidden, "W_student": model.get_output_embeddings().weight,
        "h_teacher": teacher.base_model(input_ids).last_hidden_state.detach(),
        "W_teacher": teacher.get_output_embeddings().weight.detach(),
    })
    # EMO-1's value is the cross-entropy's (docs/REFERENCE.md §3)
    torch.testing.assert_close(ns["loss"], model(input_ids=input_ids, labels=labels).loss, rtol=1e-5,
                               atol=1e-6)
    assert torch.isfinite(ns["kd"]) and ns["kd"] > 0


def test_log_probs_example():
    g = torch.Generator().manual_seed(3)
    head = torch.nn.Linear(8, 31, bias=False).double()
    hidden = torch.randn(2, 6, 8, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 31, (2, 6), generator=g)
    labels[0, 3] = -100
    logits = hidden @ head.weight.T
    ns = run_snippet("docs/rl.md", "logp, entropy = xent.linear_log_probs(", {
        "hidden": hidden, "head_weight": head.weight, "labels": labels, "logits": logits})
    # float64 log-softmax at T = 0.7 by hand, shifted: position t scores labels[t + 1]
    logq = torch.log_softmax(logits[:, :-1].detach() / 0.7, dim=-1)
    y = labels[:, 1:]
    want = torch.where(y != -100, logq.gather(-1, y.clamp(min=0)[..., None]).squeeze(-1), 0.0)
    ent = torch.where(y != -100, -(logq.exp() * logq).sum(-1), 0.0)
    torch.testing.assert_close(ns["logp"].detach(), want)
    torch.testing.assert_close(ns["entropy"].detach(), ent)


def test_grpo_example(one_thread_here):
    policy, old_policy, ref_model = tiny("gpt2"), tiny("gpt2"), tiny("gpt2", seed=2)
    input_ids, labels = batch()
    advantages = torch.tensor([1.0, -0.5, 2.0])
    num_items = xent.count_items(labels)
    ns = run_snippet("docs/rl.md", "def token_logp(model, input_ids, labels", {
        "policy": policy, "old_policy": old_policy, "ref_model": ref_model,
        "input_ids": input_ids, "labels": labels, "advantages": advantages, "num_items": num_items})
    # the same objective from the materialised logits in float32 (old policy == policy: ratio 1)
    def logp_of(model):
        z = model(input_ids=input_ids).logits[:, :-1].float() / 0.7
        y = labels[:, 1:]
        lq = torch.log_softmax(z, -1)
        return lq.gather(-1, y.clamp(min=0)[..., None]).squeeze(-1), -(lq.exp() * lq).sum(-1)
    with torch.no_grad():
        lp, ent = logp_of(policy)
        ref_lp, _ = logp_of(ref_model)
    mask = labels[:, 1:] != -100
    torch.testing.assert_close(ns["logp"][mask], lp[mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ns["entropy"][mask], ent[mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ns["ratio"][mask], torch.ones_like(lp[mask]), rtol=1e-5, atol=1e-5)
    kl = torch.exp(ref_lp - lp) - (ref_lp - lp) - 1
    pg = -advantages[:, None].expand_as(lp)
    want = torch.where(mask, pg + 0.04 * kl - 0.001 * ent, 0.0).sum() / num_items
    torch.testing.assert_close(ns["loss"].detach(), want, rtol=1e-5, atol=1e-5)
    assert all(p.grad is not None for p in policy.parameters() if p.requires_grad)


def test_stats_example(one_thread_here):
    model = tiny("gpt2")
    input_ids, labels = batch()
    hidden = model.base_model(input_ids).last_hidden_state
    head = model.get_output_embeddings()
    ns = run_snippet("docs/losses.md", "loss, stats = xent.linear_cross_entropy(", {
        "hidden": hidden, "head_weight": head.weight, "labels": labels})
    with torch.no_grad():  # float64 from the materialised logits
        z = (hidden @ head.weight.T)[:, :-1].double()
        y = labels[:, 1:]
        mask = y != -100
        lq = torch.log_softmax(z, -1)
        correct = (z.gather(-1, y.clamp(min=0)[..., None]).squeeze(-1) == z.amax(-1)) & mask
        ent = -(lq.exp() * lq).sum(-1)
    st = ns["stats"]
    assert int(st.tokens) == int(mask.sum()) and int(st.correct) == int(correct.sum())
    assert float(st.entropy_sum) == pytest.approx(float(ent[mask].sum()), rel=1e-5)


@pytest.mark.parametrize("bf16", [False, True])  # bf16: accelerate's wrapper rebuilds the outputs
def test_stats_trainer_example(tmp_path, one_thread_here, bf16):
    pytest.importorskip("accelerate")
    from xent.integrations.transformers import patch_causal_lm, unpatch

    ns = run_snippet("docs/losses.md", "class StatsTrainer(transformers.Trainer)", {})
    model = tiny("gpt2")
    ids, labels = batch(rows=4)
    ds = [{"input_ids": i, "labels": y} for i, y in zip(ids, labels)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=1,
                                          gradient_accumulation_steps=4, max_steps=1, report_to=[],
                                          save_strategy="no", use_cpu=True, disable_tqdm=True,
                                          logging_strategy="no", learning_rate=0.0, bf16=bf16)
    # the step's metrics from the logits of the unpatched model (lr 0: the weights do not move)
    with torch.no_grad():
        z = model(input_ids=ids).logits[:, :-1]
        y = labels[:, 1:]
        mask = y != -100
        correct = (z.gather(-1, y.clamp(min=0)[..., None]).squeeze(-1) == z.amax(-1)) & mask
        lq = torch.log_softmax(z.double(), -1)
        entropy = -(lq.exp() * lq).sum(-1)[mask].mean().item()
    patch_causal_lm(model, return_stats=True)
    logged = []
    try:
        trainer = ns["StatsTrainer"](model=model, args=args, train_dataset=ds)
        trainer.log = lambda logs, *a, **k: logged.append(logs)
        trainer.train()
    finally:
        unpatch(model)
    step = [entry for entry in logged if "token_accuracy" in entry]
    assert len(step) == 1
    if bf16:  # bfloat16 logits under autocast: near the float32 values
        assert step[0]["entropy"] == pytest.approx(entropy, rel=2e-2)
    else:
        assert step[0]["token_accuracy"] == pytest.approx(float(correct.sum() / mask.sum()), rel=1e-6)
        assert step[0]["entropy"] == pytest.approx(entropy, rel=1e-5)


@pytest.mark.slow
def test_keras_example(tmp_path):
    """The Keras snippet, as written, in a fresh process (it chooses the JAX backend before importing
    Keras): one fit over 32 padded sequences."""
    pytest.importorskip("jax")
    pytest.importorskip("keras")
    import subprocess

    code = (
        snippet("docs/keras.md", "import xent.keras as xk")
        # one epoch from a random tied embedding: the loss is about ln V = 10.37 (z-loss 1e-4 adds ~0)
        + "\nloss = model.history.history['loss'][0]\nassert 9.0 < loss < 12.0, loss\nprint('OK', loss)\n"
    )
    script = tmp_path / "keras_readme.py"
    script.write_text(code)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]


# ---------- the two torchrun snippets, on 2 CPU processes (gloo over the loopback interface) ----------

def _distributed_worker(rank: int, world: int, port: int, directory: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    errors = []
    # vocabulary-parallel head: the same head, hidden and labels on every rank
    g = torch.Generator().manual_seed(0)
    D, Vh = 16, 29
    head = torch.randn(Vh, D, generator=g, dtype=torch.float64)
    hidden = torch.randn(2, 7, D, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, Vh, (2, 7), generator=g)
    labels[0, 2] = -100
    ns = run_snippet("docs/distributed.md", "local_head = torch.nn.Parameter(",
                     {"head_weight": head, "hidden": hidden, "labels": labels})
    # reference: one process, the whole head, explicit z-loss
    h = hidden.detach().clone().requires_grad_()
    W = head.clone().requires_grad_()
    logits = (h @ W.T)[:, :-1].reshape(-1, Vh)
    y = labels[:, 1:].reshape(-1)
    valid = y != -100
    lse = torch.logsumexp(logits[valid], dim=-1)
    ref = (lse - logits[valid].gather(1, y[valid, None]).squeeze(1)).mean() + 1e-4 * lse.square().mean()
    ref.backward()
    rows = head.tensor_split(world)
    start = sum(len(r) for r in rows[:rank])
    if ns["local_head"].grad is None:
        errors.append("local_head.grad is None")
    elif not torch.allclose(ns["local_head"].grad, W.grad[start : start + len(rows[rank])], atol=1e-10):
        errors.append("local_head.grad differs from its rows of the full gradient")
    if not torch.allclose(ns["loss"].detach(), ref.detach(), atol=1e-12):
        errors.append(f"loss {ns['loss'].item()} != {ref.item()}")
    if not torch.allclose(hidden.grad, h.grad, atol=1e-10):
        errors.append("hidden.grad differs from the full gradient")

    # data parallelism: DDP, 2 micro-batches per rank, SGD(lr=1) so that the update is the gradient
    model = tiny("gpt2").train()
    ids, lab = batch(rows=8, seed=3)  # the whole step: rank r takes rows 4r ... 4r + 3
    mine = slice(4 * rank, 4 * rank + 4)
    micro_batches = [{"input_ids": ids[mine][i : i + 2], "labels": lab[mine][i : i + 2]} for i in (0, 2)]
    before = [p.detach().clone() for p in model.parameters()]
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=1.0)
    run_snippet("docs/distributed.md", 'group=dist.group.WORLD) for mb in micro_batches)',
                {"model": ddp, "micro_batches": micro_batches, "optimizer": optimizer})
    reference = tiny("gpt2").train()
    reference(input_ids=ids, labels=lab).loss.backward()  # one process, the whole batch: transformers' mean
    for b, p, r in zip(before, model.parameters(), reference.parameters()):
        if not torch.allclose(b - p.detach(), r.grad, rtol=1e-4, atol=1e-6):
            errors.append("the DDP step differs from one process on the whole batch")
            break
    dist.barrier()
    dist.destroy_process_group()
    with open(os.path.join(directory, f"rank{rank}.json"), "w") as f:
        json.dump(errors, f)
    os._exit(0)  # the result is on disk; skip the interpreter's teardown of torch threads


@pytest.mark.slow  # two processes import torch and transformers
def test_distributed_examples():
    import torch.multiprocessing as mp

    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    with socket.socket() as s:  # a free port on the loopback interface, for the env:// rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as directory:
        ctx = mp.start_processes(_distributed_worker, args=(2, port, directory), nprocs=2, join=False,
                                 start_method="spawn")
        deadline = time.monotonic() + 180
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                pytest.fail("the distributed README snippets ran over 180 s")
        errors = [json.loads(Path(directory, f"rank{r}.json").read_text()) for r in range(2)]
    assert errors == [[], []]


# ---------- TRL (docs/trl.md) and xent.train (docs/training.md) ----------

TEXTS = [f"the {w} sat on the {v} mat." for w in ("cat", "dog", "fox", "owl")
         for v in ("red", "big", "old", "new")]


def test_trl_sft_example(tmp_path, monkeypatch, one_thread_here):
    pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from xent.demo import train_tokenizer
    from xent.integrations.transformers import is_patched

    tokenizer = train_tokenizer(TEXTS, vocab_size=300)
    model = tiny("gpt2", vocab_size=len(tokenizer), positions=128)
    monkeypatch.chdir(tmp_path)
    ns = run_snippet("docs/trl.md", "trainer = XentSFTTrainer(model=model, args=args", {
        "model": model, "tokenizer": tokenizer, "texts": datasets.Dataset.from_dict({"text": TEXTS})})
    losses = [e["loss"] for e in ns["trainer"].state.log_history if "loss" in e]
    assert is_patched(model) and len(losses) == 4  # 20 steps, logged every 5
    assert losses[-1] < losses[0]  # TaiLr through xent's head trains the model


def test_trl_grpo_example(tmp_path, monkeypatch, one_thread_here):
    pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    import xent.integrations.trl as xtrl
    from xent.demo import train_tokenizer

    tokenizer = train_tokenizer(TEXTS, vocab_size=300)
    tiny("gpt2", vocab_size=len(tokenizer), positions=64).save_pretrained(tmp_path / "my-model")
    tokenizer.save_pretrained(tmp_path / "my-model")
    monkeypatch.chdir(tmp_path)
    calls = [0]
    original = xtrl.linear_log_probs

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(xtrl, "linear_log_probs", counted)
    prompts = datasets.Dataset.from_dict({"prompt": ["the cat", "the dog", "a fox", "an owl"]})
    ns = run_snippet("docs/trl.md", 'trainer = XentGRPOTrainer(model="my-model"',
                     {"tokenizer": tokenizer, "prompts": prompts})
    steps = [e for e in ns["trainer"].state.log_history if "loss" in e]
    assert len(steps) == 10 and calls[0] >= 20  # the policy and the reference model, every step
    assert all(torch.isfinite(torch.tensor([e["loss"], e["kl"], e["entropy"]])).all() for e in steps)


def test_train_example_on_a_demo_checkpoint(tmp_path, monkeypatch, capsys, one_thread_here):
    # What `make demo` leaves in xent-demo/ (models/ce with its tokenizer, data/heldout.jsonl), built with
    # the demo's own parts and positions (64), at a smaller width.
    from xent.cli import main
    from xent.demo import MarkovSource, build_model, train_tokenizer

    texts = MarkovSource(num_words=64, seed=0).sample(100, 64, seed=2)
    demo = tmp_path / "xent-demo"
    tok = train_tokenizer(texts, vocab_size=300)
    model = build_model(len(tok), seq_len=64, d_model=32, n_layer=1, n_head=2, eot_id=tok.eos_token_id)
    model.save_pretrained(demo / "models" / "ce")
    tok.save_pretrained(demo / "models" / "ce")
    (demo / "data").mkdir()
    (demo / "data" / "heldout.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))

    monkeypatch.chdir(tmp_path)
    ns = run_snippet("docs/training.md", 'path = "xent-demo/models/ce"', {})
    result = ns["result"]
    assert [e["step"] for e in result.eval_history] == [0, 20, 40, 60]  # step 0: the model as given
    assert result.eval_at_end["eval_ce"] < result.eval_at_start["eval_ce"]
    assert ns["after"] == pytest.approx(result.eval_at_end["eval_ce"], rel=1e-5)  # the weights returned
    assert ns["after"] < ns["before"] - 0.5  # the held-out loss improved on the starting model
    assert "held-out cross-entropy" in capsys.readouterr().out
    # the saved directory is one `xent eval` reads: the tokenizer went with the model
    assert main(["eval", "--model", "out", "--data", "xent-demo/data/heldout.jsonl", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] > 0
