"""Every Python snippet of README.md runs, as written, and does what the text around it says.

A snippet uses names the README's text says the user has (`model`, `micro_batches`, a Trainer's `args` and
`ds`...): each runner below provides them with tiny models, executes the snippet's text unchanged, then
checks its result against an independent computation (transformers' own loss, the full-batch gradient).
A new snippet without a runner fails test_every_snippet_has_a_runner.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"

# a snippet is recognised by a line of it; its runner is the test that executes it
RUNNERS = {
    'path = "xent-demo/models/ce"': "test_train_example_on_a_demo_checkpoint",
    "patch_causal_lm(model, loss=": "test_transformers_patch_with_trainer",
    "logits = torch.randn(4, 128, 32000": "test_exact_token_losses_example",
    'n = sum(xent.count_items(mb["labels"]) for mb in micro_batches)': "test_num_items_example",
    "hidden = model.base_model(input_ids).last_hidden_state       # [B, T, D]": "test_fused_example",
    "emo = xent.losses.EMO(": "test_beyond_cross_entropy_example",
    "logp, entropy = xent.linear_log_probs(": "test_log_probs_example",
    "def token_logp(model, input_ids, labels": "test_grpo_example",
    "loss, stats = xent.linear_cross_entropy(": "test_stats_example",
    "class StatsTrainer(transformers.Trainer)": "test_stats_trainer_example",
    "import keras, xent.keras as xk": "test_keras_example",
    "local_head = torch.nn.Parameter(": "test_distributed_examples",
    'group=dist.group.WORLD) for mb in micro_batches)': "test_distributed_examples",
}


def snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def snippet(key: str) -> str:
    (found,) = [s for s in snippets() if key in s]
    return found


def run_snippet(key: str, namespace: dict) -> dict:
    code = snippet(key)
    exec(compile(code, f"README.md snippet <{key}>", "exec"), namespace)
    return namespace


def test_every_snippet_has_a_runner():
    for s in snippets():
        keys = [k for k in RUNNERS if k in s]
        assert len(keys) == 1, f"README snippet without exactly one runner:\n{s}"
    names = {name for name in dir(sys.modules[__name__]) if name.startswith("test_")}
    assert set(RUNNERS.values()) <= names


def test_links_point_inside_the_repository():
    root = README.parent
    for target in re.findall(r"\]\(([^)]+)\)", README.read_text(encoding="utf-8")):
        if "://" in target or target.startswith("#"):
            continue
        assert not target.startswith(".."), target  # a clone has nothing above the repository
        assert (root / target.split("#")[0]).exists(), target


transformers = pytest.importorskip("transformers")

import xent  # noqa: E402

V, T = 97, 24


def tiny(arch: str = "gpt2", seed: int = 0):
    torch.manual_seed(seed)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=1, n_head=2, n_positions=T,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                      bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(cfg)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False,
                                   max_position_embeddings=T, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg)


def batch(rows: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (rows, T), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt
    labels[-1, 17:] = -100  # padding
    return ids, labels


@pytest.fixture
def one_thread_here(one_thread):
    yield


@pytest.mark.slow  # 400 steps of 32 sequences, as written
def test_train_example_on_a_demo_checkpoint(tmp_path, monkeypatch, capsys, one_thread_here):
    # What `xent demo` leaves in xent-demo/ (models/NAME with the tokenizer, data/synthetic.jsonl), built
    # with the demo's own parts and its positions (64), at a smaller width.
    from xent.cli import main
    from xent.demo import DemoConfig, MarkovSource, build_model, train_tokenizer

    cfg = DemoConfig.quick()
    texts = MarkovSource(num_words=cfg.markov_words, seed=0).sample(cfg.synthetic_eval_docs,
                                                                     cfg.words_per_doc, seed=2)
    demo = tmp_path / "xent-demo"
    tok = train_tokenizer(texts, vocab_size=300)
    model = build_model(len(tok), seq_len=cfg.seq_len, d_model=32, n_layer=1, n_head=2,
                        eot_id=tok.eos_token_id)
    model.save_pretrained(demo / "models" / "ce")
    tok.save_pretrained(demo / "models" / "ce")
    (demo / "data").mkdir()
    with open(demo / "data" / "synthetic.jsonl", "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    (demo / "data" / "heldout.jsonl").write_text((demo / "data" / "synthetic.jsonl").read_text())
    assert model.config.n_positions == 64  # the example used to cut sequences of 128: an IndexError

    monkeypatch.chdir(tmp_path)
    ns = run_snippet('path = "xent-demo/models/ce"', {})
    result = ns["result"]
    assert [e["step"] for e in result.eval_history] == list(range(0, 401, 50))  # step 0: the model as given
    assert "held-out cross-entropy" in capsys.readouterr().out
    # the saved directory is one `xent eval` reads: the tokenizer went with the model
    assert main(["eval", "--model", "out", "--data", "xent-demo/data/heldout.jsonl", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] > 0


def test_transformers_patch_with_trainer(tmp_path, one_thread_here):
    pytest.importorskip("accelerate")
    from xent.integrations.transformers import is_patched

    model = tiny("gpt2")
    ids, labels = batch(rows=4)
    ds = [{"input_ids": i, "labels": y} for i, y in zip(ids, labels)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2,
                                          max_steps=2, report_to=[], save_strategy="no", use_cpu=True,
                                          disable_tqdm=True, logging_strategy="no")
    before = [p.detach().clone() for p in model.parameters()]
    run_snippet("patch_causal_lm(model, loss=", {"model": model, "args": args, "ds": ds})
    assert not is_patched(model)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))  # it trained


def test_exact_token_losses_example():
    ns = run_snippet("logits = torch.randn(4, 128, 32000", {})
    assert ns["loss"].dtype == torch.float32 and torch.isfinite(ns["loss"])


def test_num_items_example(one_thread_here):
    model = tiny("gpt2").train()
    ids, labels = batch(rows=6)
    micro_batches = [{"input_ids": ids[i : i + 2], "labels": labels[i : i + 2]} for i in range(0, 6, 2)]
    run_snippet('n = sum(xent.count_items(mb["labels"]) for mb in micro_batches)',
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
    ns = run_snippet("hidden = model.base_model(input_ids).last_hidden_state       # [B, T, D]",
                     {"xent": xent, "model": model, "input_ids": input_ids, "labels": labels})
    ref = model(input_ids=input_ids, labels=labels).loss
    torch.testing.assert_close(ns["loss"], ref, rtol=1e-5, atol=1e-6)


def test_beyond_cross_entropy_example(one_thread_here):
    model = tiny("llama")
    input_ids, labels = batch()
    hidden = model.base_model(input_ids).last_hidden_state
    teacher = tiny("gpt2", seed=1)
    ns = run_snippet("emo = xent.losses.EMO(", {
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
    ns = run_snippet("logp, entropy = xent.linear_log_probs(", {
        "xent": xent, "hidden": hidden, "head": head, "labels": labels, "logits": logits})
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
    ns = run_snippet("def token_logp(model, input_ids, labels", {
        "xent": xent, "torch": torch, "policy": policy, "old_policy": old_policy, "ref_model": ref_model,
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
    ns = run_snippet("loss, stats = xent.linear_cross_entropy(", {
        "xent": xent, "hidden": hidden, "head": head, "labels": labels})
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


def test_stats_trainer_example(tmp_path, one_thread_here):
    pytest.importorskip("accelerate")
    from xent.integrations.transformers import patch_causal_lm, unpatch

    ns = run_snippet("class StatsTrainer(transformers.Trainer)", {"transformers": transformers})
    model = tiny("gpt2")
    ids, labels = batch(rows=4)
    ds = [{"input_ids": i, "labels": y} for i, y in zip(ids, labels)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=1,
                                          gradient_accumulation_steps=4, max_steps=1, report_to=[],
                                          save_strategy="no", use_cpu=True, disable_tqdm=True,
                                          logging_strategy="no", learning_rate=0.0)
    # the step's metrics from the logits of the unpatched model (lr 0: the weights do not move)
    with torch.no_grad():
        z = model(input_ids=ids).logits[:, :-1]
        y = labels[:, 1:]
        mask = y != -100
        correct = (z.gather(-1, y.clamp(min=0)[..., None]).squeeze(-1) == z.amax(-1)) & mask
    patch_causal_lm(model, return_stats=True)
    logged = []
    try:
        trainer = ns["StatsTrainer"](model=model, args=args, train_dataset=ds)
        trainer.step_stats = None
        trainer.log = lambda logs, *a, **k: logged.append(logs)
        trainer.train()
    finally:
        unpatch(model)
    step = [entry for entry in logged if "token_accuracy" in entry]
    assert len(step) == 1
    assert step[0]["token_accuracy"] == pytest.approx(float(correct.sum() / mask.sum()), rel=1e-6)


@pytest.mark.slow
def test_keras_example(tmp_path):
    """The Keras snippet, as written, in a fresh process (it chooses the JAX backend before importing
    Keras): one fit over 32 padded sequences, then the compile with a loss on logits."""
    pytest.importorskip("jax")
    pytest.importorskip("keras")
    import subprocess

    code = (
        "import numpy as np\n"
        "rng = np.random.default_rng(0)\n"
        "ids = rng.integers(0, 32000, (32, 128)).astype('int32')\n"
        "labels_with_padding_as_minus_100 = ids.copy(); labels_with_padding_as_minus_100[:, 100:] = -100\n"
        + snippet("import keras, xent.keras as xk")
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
    ns = run_snippet("local_head = torch.nn.Parameter(", {"head": head, "hidden": hidden, "labels": labels})
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
    run_snippet('group=dist.group.WORLD) for mb in micro_batches)',
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
