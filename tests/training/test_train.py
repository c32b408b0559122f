"""xent.train: every objective learns, accumulation is exact, runs are reproducible, checkpoints load."""

from __future__ import annotations

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

import xent  # noqa: E402
from xent.training import OBJECTIVES, TrainConfig, lr_at, make_objective  # noqa: E402
from xent.training._loop import accumulate_gradients, micro_batch_loss  # noqa: E402

V, T = 64, 24


def tiny(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=1, n_head=2, n_positions=T,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


def bigram_data(num_seqs: int = 64, seed: int = 0) -> torch.Tensor:
    """Sequences from a sparse random bigram chain: easy to learn within a few steps."""
    g = torch.Generator().manual_seed(seed)
    succ = torch.randint(0, V, (V, 2), generator=g)  # two successors per token
    x = torch.empty(num_seqs, T, dtype=torch.long)
    x[:, 0] = torch.randint(0, V, (num_seqs,), generator=g)
    for t in range(1, T):
        x[:, t] = succ[x[:, t - 1], torch.randint(0, 2, (num_seqs,), generator=g)]
    return x


def objective_value(model, loss, seqs) -> float:
    with torch.no_grad():
        return micro_batch_loss(model, loss, seqs, xent.count_items(seqs)).item()


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_a_few_steps_reduce_the_loss_for_every_objective(objective):
    data = bigram_data()
    model = tiny()
    loss = make_objective(objective, model)
    # DFT's value −q·log q rises with q while q < 1/e, and Rho-1's depends on the selection: for both
    # the cross-entropy is what falls
    measure = make_objective("ce") if objective in ("dft", "rho1") else loss
    ref = {"ref_model": tiny(seed=1)} if objective == "rho1" else {}
    before = objective_value(model, measure, data)
    result = xent.train(model, data, objective=loss, steps=12, batch_size=16, lr=1e-2, warmup_steps=2,
                        progress=False, **ref)
    after = objective_value(model, measure, data)
    assert len(result.history) == 12
    assert after < before - 0.1, (objective, before, after)


def test_the_head_is_never_applied_to_the_whole_sequence():
    model = tiny()
    calls = []
    model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    xent.train(model, bigram_data(), steps=2, batch_size=8, progress=False)
    assert calls == []  # the fused path multiplies by the head's weight chunk by chunk, never lm_head(h)


def padded_data():
    data = bigram_data(8, seed=2)
    for i in range(8):  # sequences with very different target counts
        data[i, 4 + 2 * i :] = -100
    return data


@pytest.mark.parametrize("objective", ["ce", "tailr"])
@pytest.mark.parametrize("micro", [1, 4])
def test_accumulated_gradients_equal_the_full_batch_gradients(micro, objective):
    data = padded_data()
    model = tiny(seed=1)
    loss = make_objective(objective)
    full_loss, n = accumulate_gradients(model, loss, data, micro_batch_size=8)
    full = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    acc_loss, n_acc = accumulate_gradients(model, loss, data, micro_batch_size=micro)
    assert n == n_acc == int((data[:, 1:] != -100).sum())
    assert acc_loss == pytest.approx(full_loss, rel=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, full[name], rtol=1e-4, atol=1e-7, msg=name)
    # what the loop would do wrong without the global count: the mean of the micro-batch means
    model.zero_grad()
    for mb in data.split(micro):
        (micro_batch_loss(model, loss, mb, None) / (8 // micro)).backward()
    wrong = model.transformer.wte.weight.grad
    assert not torch.allclose(wrong, full["transformer.wte.weight"], rtol=1e-3)


def test_accumulating_run_trains_like_the_full_batch_run():
    data = padded_data()
    runs = [xent.train(tiny(seed=1), data, steps=3, batch_size=8, micro_batch_size=m, grad_clip=1e9,
                       progress=False).history for m in (8, 2)]
    for a, b in zip(*runs):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)


def test_same_seed_same_run_different_seed_different_order():
    data = bigram_data()
    a, b, c = tiny(), tiny(), tiny()
    ra = xent.train(a, data, steps=4, batch_size=8, seed=3, progress=False)
    rb = xent.train(b, data, steps=4, batch_size=8, seed=3, progress=False)
    rc = xent.train(c, data, steps=4, batch_size=8, seed=4, progress=False)
    assert [h["loss"] for h in ra.history] == [h["loss"] for h in rb.history]
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert [h["loss"] for h in ra.history] != [h["loss"] for h in rc.history]


def test_checkpoint_is_a_transformers_model(tmp_path):
    data = bigram_data()
    model = tiny()
    old_umask = os.umask(0o022)
    try:
        result = xent.train(model, data, steps=3, batch_size=8, save_dir=str(tmp_path / "ckpt"),
                            progress=False, eval_every=2, objective="tailr", grad_clip=None)
    finally:
        os.umask(old_umask)
    assert (tmp_path / "ckpt" / "model.safetensors").exists()
    # the files follow the umask (safetensors alone writes 0600, which a teammate cannot read)
    for name in ("model.safetensors", "config.json", "xent_train.json"):
        assert (tmp_path / "ckpt" / name).stat().st_mode & 0o777 == 0o644, name
    log = json.loads((tmp_path / "ckpt" / "xent_train.json").read_text(),
                     parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    assert log["config"]["objective"] == "tailr" and len(log["history"]) == 3
    assert log["history"][0]["grad_norm"] is None  # not measured without clipping: null, not NaN
    assert [e["step"] for e in result.eval_history] == []  # no eval_data given
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "ckpt"))
    x = data[:2]
    torch.testing.assert_close(loaded(input_ids=x).logits, model.eval()(input_ids=x).logits)


def test_eval_history_is_the_held_out_cross_entropy():
    data = bigram_data()
    model = tiny()
    result = xent.train(model, data[:48], eval_data=data[48:], steps=4, batch_size=8, eval_every=2,
                        progress=False)
    assert [e["step"] for e in result.eval_history] == [0, 2, 4]  # step 0: the model as given
    model.eval()
    with torch.no_grad():
        ref = xent.causal_lm_loss(model(input_ids=data[48:]).logits, data[48:]).item()
    assert result.eval_history[-1]["eval_ce"] == pytest.approx(ref, rel=1e-5)


def test_warmup_then_cosine():
    cfg = TrainConfig(steps=110, warmup_steps=10, lr=1e-3, min_lr=1e-4)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(5.5e-4)  # half-way down the cosine
    assert lr_at(110, cfg) == pytest.approx(1e-4)


def test_bad_options_fail_loudly():
    with pytest.raises(ValueError, match="unknown objective 'xe'"):
        xent.train(tiny(), bigram_data(), objective="xe", progress=False)
    with pytest.raises(TypeError, match="unknown training option"):
        xent.train(tiny(), bigram_data(), step=3)
    with pytest.raises(ValueError, match="objective_options apply to an objective given by name"):
        xent.train(tiny(), bigram_data(), objective=make_objective("focal"),
                   objective_options={"gamma": 1.0}, progress=False)
    with pytest.raises(ValueError, match="must divide"):
        xent.train(tiny(), bigram_data(), batch_size=8, micro_batch_size=3, progress=False)


def test_trains_a_llama_with_an_untied_head_too():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False,
                                   max_position_embeddings=T)
    model = transformers.LlamaForCausalLM(cfg)
    data = bigram_data()
    loss = make_objective("emo", model)
    before = objective_value(model, loss, data)
    head_before = model.lm_head.weight.detach().clone()
    xent.train(model, data, objective=loss, steps=10, batch_size=16, lr=1e-2, warmup_steps=2, progress=False)
    assert objective_value(model, loss, data) < before - 0.1
    assert not torch.equal(model.lm_head.weight, head_before)  # the head trains through the fused path


@pytest.mark.parametrize("option, value, message", [
    ("micro_batch_size", 0, "micro_batch_size must be at least 1, got 0"),  # was: silently the batch size
    ("seq_len", 1, "seq_len must be at least 2, got 1"),
    ("seq_len", 0, "seq_len must be at least 2, got 0"),
    ("warmup_steps", -5, "warmup_steps must be at least 0, got -5"),
    ("lr", float("inf"), "lr must be finite, got inf"),
    ("lr", -1e-3, "lr must be positive, got -0.001"),
    ("grad_clip", 0.0, "grad_clip must be positive, got 0.0"),
    ("eval_every", -1, "eval_every must be at least 0, got -1"),
])
def test_config_out_of_range_is_refused(option, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        xent.train(tiny(), bigram_data(), steps=1, batch_size=8, progress=False, **{option: value})


def test_config_of_the_wrong_type_is_refused():
    with pytest.raises(TypeError, match=r"steps must be an integer, got 2.0"):
        xent.train(tiny(), bigram_data(), steps=2.0, progress=False)


def test_training_stops_at_the_first_non_finite_loss(tmp_path):
    model = tiny()
    steps = []
    with pytest.raises(FloatingPointError, match=r"step (\d+) of 30: the (loss|gradient norm) is (nan|inf)") \
            as err:
        xent.train(model, bigram_data(), steps=30, batch_size=8, lr=1e10, warmup_steps=0, grad_clip=None,
                   save_dir=str(tmp_path / "out"), progress=False)
    steps.append(int(err.value.args[0].split()[1]))
    assert "the model was not saved" in str(err.value)
    assert not (tmp_path / "out").exists()
    # the step that went non-finite was not applied: the weights are what the earlier steps made them
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert steps[0] >= 2  # step 1 starts from a sane model


def test_objective_options_are_checked_by_name():
    with pytest.raises(ValueError, match=r"objective 'ce' takes no option 'gamma'; its options: weight, "
                                         r"label_smoothing, z_loss, softcap"):
        make_objective("ce", gamma=2.0)
    with pytest.raises(ValueError, match=r"objective 'focal' takes no option 'epsilon', 'z'; its options: "
                                         r"gamma, alpha, detach_factor, softcap"):
        make_objective("focal", z=1, epsilon=0.1)
    assert make_objective("focal", gamma=0.5).gamma == 0.5


def test_an_interrupted_save_leaves_no_weights_file(tmp_path, monkeypatch):
    from xent.training import _loop

    class Tok:
        def save_pretrained(self, directory):
            raise OSError(28, "No space left on device")

    with pytest.raises(_loop.SaveError, match="cannot save the model after step 1 to .*: No space left") as e:
        xent.train(tiny(), bigram_data(), steps=1, batch_size=8, progress=False, tokenizer=Tok(),
                   save_dir=str(tmp_path / "out"))
    assert isinstance(e.value, OSError) and [h["step"] for h in e.value.log["history"]] == [1]
    assert list((tmp_path / "out").iterdir()) == []  # model.safetensors was written, but not moved in


def test_a_failed_periodic_save_stops_with_the_run_so_far(tmp_path, monkeypatch):
    from xent.training import _loop

    real = _loop.save_model

    def no_space_at_step_2(model, tokenizer, directory, log):
        if directory.endswith("step-2"):
            raise OSError(28, "No space left on device")
        real(model, tokenizer, directory, log)

    monkeypatch.setattr(_loop, "save_model", no_space_at_step_2)
    with pytest.raises(_loop.SaveError, match=r"after step 2 to .*step-2: No space left on device") as e:
        xent.train(tiny(), bigram_data(), steps=4, batch_size=8, save_every=1, progress=False,
                   save_dir=str(tmp_path / "out"))
    assert e.value.step == 2 and [h["step"] for h in e.value.log["history"]] == [1, 2]
    assert (tmp_path / "out" / "step-1" / "model.safetensors").exists()


def test_seq_len_is_checked_against_the_model_positions():
    stream = bigram_data().reshape(-1)  # a 1-D token stream
    # GPT-2 would index past its position embedding: IndexError (a device-side assert on CUDA)
    with pytest.raises(ValueError, match=r"seq_len=48 is beyond the model's 24 positions"):
        xent.train(tiny(), stream, seq_len=48, steps=1, batch_size=2, progress=False)
    with pytest.raises(ValueError, match=r"data has sequences of 30 tokens, beyond the model's 24 positions"):
        xent.train(tiny(), torch.randint(0, V, (8, 30)), steps=1, batch_size=2, progress=False)
    with pytest.raises(ValueError, match=r"eval_data\['eval_ce'\] has sequences of 30"):
        xent.train(tiny(), bigram_data(), eval_data=torch.randint(0, V, (4, 30)), steps=1, batch_size=2,
                   progress=False)


def test_default_seq_len_is_the_model_context(tmp_path):
    stream = bigram_data().reshape(-1)
    result = xent.train(tiny(), stream, steps=1, batch_size=2, progress=False, save_dir=str(tmp_path))
    assert result.tokens == 2 * (T - 1)  # two sequences of the model's T positions, T - 1 targets each
    config = json.loads((tmp_path / "xent_train.json").read_text())["config"]
    assert config["seq_len"] == T and config["min_lr"] == pytest.approx(config["lr"] / 10)


def test_eval_data_without_eval_every_is_scored_once_at_the_end():
    data = bigram_data()
    result = xent.train(tiny(), data[:48], eval_data=data[48:], steps=3, batch_size=8, progress=False)
    assert [e["step"] for e in result.eval_history] == [0, 3]  # step 0: the model as given


def test_min_lr_defaults_to_a_tenth_of_lr():
    cfg = TrainConfig(steps=110, warmup_steps=10, lr=1e-2)
    assert lr_at(110, cfg) == pytest.approx(1e-3)


def _markov_fine_tune_setup(pretrain_steps: int = 12):
    """The README's `xent.train` example in miniature: a briefly pre-trained model of the demo's kind
    (its Markov source, its tokenizer and positions) fine-tuned at lr 1e-2 on a few documents, far
    too few for the steps: it gets better on held-out documents at first, then overfits."""
    from xent.demo import MarkovSource, build_model, train_tokenizer

    source = MarkovSource(num_words=64, seed=0)
    texts = source.sample(30, 64, seed=2)
    tok = train_tokenizer(texts, vocab_size=300)
    ids = [[tok.eos_token_id, *tok(t)["input_ids"]] for t in texts]
    model = build_model(len(tok), seq_len=64, d_model=64, n_layer=1, n_head=2, eot_id=tok.eos_token_id)
    other = [[tok.eos_token_id, *tok(t)["input_ids"]] for t in source.sample(200, 64, seed=7)]
    xent.train(model, other, steps=pretrain_steps, batch_size=16, lr=1e-2, progress=False)
    return model, tok, ids[:8], ids[8:]


def test_an_overfitting_fine_tune_ends_better_than_it_started(tmp_path):
    model, tok, train_ids, heldout_ids = _markov_fine_tune_setup()
    result = xent.train(model, train_ids, objective="tailr", steps=200, batch_size=16, micro_batch_size=8,
                        lr=1e-2, eval_data=heldout_ids, eval_every=10, patience=3, save_dir=str(tmp_path),
                        tokenizer=tok, progress=False)
    ce = [e["eval_ce"] for e in result.eval_history]
    start, end = result.eval_at_start["eval_ce"], result.eval_at_end["eval_ce"]
    assert result.eval_history[0]["step"] == 0 and ce[0] == start
    assert ce[-1] > start  # the last step's weights are worse than the model it started from ...
    assert end < start  # ... and the run returns better ones: those of the lowest held-out loss
    assert result.restored and result.best_step == result.eval_history[ce.index(min(ce))]["step"] > 0
    assert end == min(ce)
    assert result.stopped_at == result.best_step + 3 * 10 < 200  # patience: 3 evaluations, no better
    assert len(result.history) == result.stopped_at
    # the returned model and the saved one are the best step's: their held-out loss, by torch
    seqs = xent.training.as_sequences(heldout_ids, 64)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path))
    for m in (model, loaded):
        with torch.no_grad():
            logits = m.eval()(input_ids=seqs).logits[:, :-1].double()
        ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), seqs[:, 1:].reshape(-1))
        assert ref.item() == pytest.approx(end, rel=1e-5)
    log = json.loads((tmp_path / "xent_train.json").read_text())
    assert log["best_step"] == result.best_step and log["eval_at_end"]["eval_ce"] == pytest.approx(end)


def test_without_restore_best_the_last_weights_stay():
    model, _, train_ids, heldout_ids = _markov_fine_tune_setup()
    result = xent.train(model, train_ids, steps=40, batch_size=16, lr=1e-2, eval_data=heldout_ids,
                        eval_every=10, restore_best=False, progress=False)
    assert not result.restored and result.stopped_at is None
    assert result.eval_at_end["eval_ce"] == result.eval_history[-1]["eval_ce"]
    assert result.eval_at_end["eval_ce"] == pytest.approx(
        xent.training.evaluate_ce(model, xent.training.as_sequences(heldout_ids, 64)))


@pytest.mark.parametrize("options, message", [
    ({"patience": 2}, "patience=2 needs eval_data and eval_every > 0"),
    ({"patience": 2, "eval_data": "held"}, "patience=2 needs eval_data and eval_every > 0"),
    ({"patience": -1}, "patience must be at least 0, got -1"),
    ({"threads": 0}, "threads must be at least 1, got 0"),
])
def test_patience_and_threads_are_checked(options, message):
    data = bigram_data()
    if options.get("eval_data") == "held":
        options = {**options, "eval_data": data[48:]}
    with pytest.raises(ValueError, match=message):
        xent.train(tiny(), data[:48], steps=2, batch_size=8, progress=False, **options)
    with pytest.raises(TypeError, match="restore_best must be True or False, got 1"):
        xent.train(tiny(), data, steps=2, batch_size=8, restore_best=1)


def test_threads_are_set_for_the_run_and_restored(monkeypatch):
    from xent.cli import _threads

    model = tiny()
    seen = []
    model.transformer.register_forward_hook(lambda *a: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(_threads, "default_threads", lambda torch_default: 1)  # a busy machine
        xent.train(model, bigram_data(), steps=2, batch_size=8, progress=False)
        assert set(seen) == {1} and torch.get_num_threads() == 2
        seen.clear()
        result = xent.train(model, bigram_data(), steps=1, batch_size=8, progress=False, threads=2,
                            save_dir=None)
        assert set(seen) == {2} and len(result.history) == 1
    finally:
        torch.set_num_threads(before)


def test_progress_lines_when_not_on_a_terminal(capsys, monkeypatch):
    from xent.training import _loop

    data = bigram_data()
    monkeypatch.setattr(_loop._Progress, "EVERY", 0.0)  # a line every step instead of every 10 s
    xent.train(tiny(), data[:48], eval_data=data[48:], eval_every=2, steps=4, batch_size=8)
    err = capsys.readouterr().err.splitlines()
    steps = [line for line in err if "tokens/s" in line]
    assert [line.split("step ")[1].split(",")[0] for line in steps] == ["1/4", "2/4", "3/4", "4/4"]
    assert all(" left" in line and "loss " in line for line in steps)
    assert "held-out cross-entropy at step 0" in err[0]
    assert "held-out cross-entropy" in err[-1] and "->" in err[-1]
    xent.train(tiny(), data[:48], eval_data=data[48:], steps=4, batch_size=8, progress=False)
    assert capsys.readouterr().err == ""
