"""xent.integrations.transformers: the patched forward against transformers' own loss, on tiny configs."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import xent  # noqa: E402
import xent.integrations.transformers as xt  # noqa: E402
from xent._reduce import apply_token_loss  # noqa: E402

V = 97


def tiny(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                      bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(cfg)
    if arch == "llama":  # untied head
        cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
                                       pad_token_id=0)
        return transformers.LlamaForCausalLM(cfg)
    if arch == "gemma2":  # final-logit soft-capping between the head and the loss
        cfg = transformers.Gemma2Config(vocab_size=V, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                        head_dim=16,
                                        final_logit_softcapping=3.0, bos_token_id=0, eos_token_id=0,
                                        pad_token_id=0)
        return transformers.Gemma2ForCausalLM(cfg)
    raise ValueError(arch)


def batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (3, 19), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 13:] = 0  # right padding
    labels = torch.where(mask.bool(), ids, -100)
    labels[2, :4] = -100  # a prompt that is not trained on
    return ids, mask, labels


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma2"])
def test_patched_cross_entropy_equals_transformers_loss_and_grads(arch):
    model = tiny(arch).eval()
    ids, mask, labels = batch()
    ref = model(input_ids=ids, attention_mask=mask, labels=labels)
    ref.loss.backward()
    ref_grads = grads(model)
    model.zero_grad()

    xt.patch_causal_lm(model)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is None  # the fused path never builds them
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=1e-6)
    out.loss.backward()
    got = grads(model)
    assert got.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(got[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_num_items_in_batch_matches_transformers(arch):
    model = tiny(arch).eval()
    ids, mask, labels = batch()
    n = torch.tensor(50)
    ref = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=n).loss
    xt.patch_causal_lm(model)
    got = model(ids, attention_mask=mask, labels=labels, num_items_in_batch=n).loss  # ids positional
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    # and it is Σℓ / n, not the mean over this batch's targets
    mean = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(got * n, mean * xent.count_items(labels), rtol=1e-5, atol=1e-5)


def test_any_objective_matches_the_plain_path_on_materialised_logits():
    model = tiny("llama").eval()
    ids, mask, labels = batch()
    logits = model(input_ids=ids, attention_mask=mask).logits
    loss = xent.losses.TaiLr(gamma=0.1, threshold=0.3)
    ref = apply_token_loss(loss, logits[:, :-1], labels[:, 1:])
    xt.patch_causal_lm(model, loss=loss)
    got = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_without_labels_the_original_forward_runs_and_unpatch_restores():
    model = tiny("gpt2").eval()
    ids, mask, labels = batch()
    ref = model(input_ids=ids, attention_mask=mask)
    xt.patch_causal_lm(model, loss=xent.losses.Focal(gamma=2.0))
    assert xt.is_patched(model)
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, ref.logits)
    patched = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    xt.unpatch(model)
    assert not xt.is_patched(model)
    plain = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert plain.logits is not None
    assert not torch.allclose(plain.loss, patched)  # focal is not CE: the patch really was off again
    xt.unpatch(model)  # a no-op
    assert "forward" not in vars(model)


def test_unpatch_restores_a_forward_wrapper_installed_before():
    model = tiny("gpt2").eval()
    calls = []
    method = model.forward

    def wrapper(*args, **kwargs):  # what accelerate's convert_outputs_to_fp32 and others look like
        calls.append(1)
        return method(*args, **kwargs)

    model.forward = wrapper
    ids, mask, labels = batch()
    xt.patch_causal_lm(model)
    model(input_ids=ids)  # no labels: the wrapped original runs
    assert calls == [1]
    xt.unpatch(model)
    assert model.forward is wrapper


def test_patch_rejects_what_it_cannot_run():
    with pytest.raises(TypeError, match="TokenLoss"):
        xt.patch_causal_lm(tiny("gpt2"), loss=torch.nn.CrossEntropyLoss())
    with pytest.raises(TypeError, match="output embeddings"):
        xt.patch_causal_lm(transformers.GPT2Model(transformers.GPT2Config(vocab_size=V, n_embd=16, n_layer=1,
                                                                           n_head=2)))


def _trainer_run(tmp_path, patched: bool):
    pytest.importorskip("accelerate")
    model = tiny("gpt2", seed=3)
    if patched:
        xt.patch_causal_lm(model)
    g = torch.Generator().manual_seed(5)
    rows = []
    for i in range(8):  # sequences of different target counts, so accumulation must use num_items
        n = 8 + 3 * i
        ids = torch.randint(1, V, (24,), generator=g)
        rows.append({"input_ids": ids, "attention_mask": (torch.arange(24) < n).long(),
                     "labels": torch.where(torch.arange(24) < n, ids, -100)})
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / ("patched" if patched else "plain")), per_device_train_batch_size=2,
        gradient_accumulation_steps=2, max_steps=2, learning_rate=0.5, lr_scheduler_type="constant",
        optim="sgd",  # updates linear in the gradient: Adam would hide a wrongly scaled one
        report_to=[], save_strategy="no", use_cpu=True, seed=0, logging_steps=1, disable_tqdm=True,
        dataloader_drop_last=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows)
    assert trainer.model_accepts_loss_kwargs  # so Trainer passes num_items_in_batch
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return model, losses


def test_trainer_with_gradient_accumulation_matches_unpatched(tmp_path):
    plain, plain_losses = _trainer_run(tmp_path, patched=False)
    fused, fused_losses = _trainer_run(tmp_path, patched=True)
    assert len(fused_losses) == 2
    assert fused_losses == pytest.approx(plain_losses, rel=1e-5)
    initial = dict(tiny("gpt2", seed=3).named_parameters())
    assert any(not torch.allclose(p, initial[n]) for n, p in fused.named_parameters())  # it trained
    for (name, a), b in zip(plain.named_parameters(), fused.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)


def test_shift_labels_as_transformers_takes_them():
    model = tiny("llama").eval()
    ids, mask, labels = batch()
    shift = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)  # what sequence parallelism passes
    ref = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    xt.patch_causal_lm(model)
    got = model(input_ids=ids, attention_mask=mask, shift_labels=shift).loss
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


def test_a_logit_scale_between_head_and_loss_is_honoured():
    torch.manual_seed(0)
    cfg = transformers.CohereConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=1, logit_scale=0.25,
                                    bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = transformers.CohereForCausalLM(cfg).eval()
    ids, mask, labels = batch()
    ref = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    xt.patch_causal_lm(model)
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask, labels=labels).loss, ref,
                               rtol=1e-6, atol=1e-6)


def test_reachable_from_import_xent():
    assert xent.integrations.transformers.patch_causal_lm is xt.patch_causal_lm


def test_trainer_evaluate_reports_the_same_loss(tmp_path):
    pytest.importorskip("accelerate")
    g = torch.Generator().manual_seed(2)
    rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(1, V, (6, 16), generator=g)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=2,
                                          report_to=[], use_cpu=True, disable_tqdm=True)
    model = tiny("gpt2")
    plain = transformers.Trainer(model=model, args=args, eval_dataset=rows).evaluate()["eval_loss"]
    xt.patch_causal_lm(model)
    fused = transformers.Trainer(model=model, args=args, eval_dataset=rows).evaluate()["eval_loss"]
    assert fused == pytest.approx(plain, rel=1e-6)


def test_the_decoder_cache_is_passed_on_without_a_deprecation_warning(caplog):
    # transformers 5 renamed the outputs' past_key_values to cache; reading or passing the old name logs
    # "`past_key_values`/`cache_params` are deprecated" (once per process: the cache of warning_once is
    # cleared first so that an earlier test cannot hide it).
    import logging

    getattr(logging.Logger, "warning_once", None) and logging.Logger.warning_once.cache_clear()
    model = tiny("gpt2").eval()
    ids, mask, labels = batch()
    ref = model(input_ids=ids, attention_mask=mask, use_cache=True)  # unpatched
    name = "cache" if "cache" in ref else "past_key_values"
    assert ref[name] is not None
    xt.patch_causal_lm(model)
    with caplog.at_level(logging.WARNING):
        out = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=True)
    assert [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()] == []
    assert out[name] is not None and out[name].get_seq_length() == ref[name].get_seq_length() == ids.shape[1]


def test_stats_on_the_output_equal_the_materialised_logits():
    model = tiny("gemma2").eval()  # soft-capped: the statistics are of the capped logits the loss sees
    ids, mask, labels = batch()
    logits = model(input_ids=ids, attention_mask=mask).logits
    loss, ref = xent.causal_lm_loss(logits, labels, return_stats=True)
    xt.patch_causal_lm(model, return_stats=True)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out.loss, loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.xent_stats.to_tensor(), ref.to_tensor(), rtol=1e-5, atol=1e-5)
    assert int(out.xent_stats.tokens) == int((labels[:, 1:] != -100).sum())
    assert "xent_stats" not in out.keys() and out[0] is out.loss


def test_trainer_logs_token_accuracy_and_entropy_from_the_stats(tmp_path):
    """A Trainer whose compute_loss reads out.xent_stats, sums them over the micro-batches of each step
    (gradient accumulation 2) and logs accuracy and entropy: equal to the same numbers computed from the
    materialised logits of the same model at the same step (an unpatched twin trained alike)."""
    pytest.importorskip("accelerate")

    class StatsTrainer(transformers.Trainer):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.step_stats, self.logged, self.micro = None, [], 0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, out = super().compute_loss(model, inputs, return_outputs=True,
                                             num_items_in_batch=num_items_in_batch)
            st = out.xent_stats if hasattr(out, "xent_stats") else xent.causal_lm_loss(
                out.logits.detach(), inputs["labels"], return_stats=True)[1]
            self.step_stats = st if self.step_stats is None else self.step_stats + st
            return (loss, out) if return_outputs else loss

        def training_step(self, *a, **kw):
            loss = super().training_step(*a, **kw)
            self.micro += 1
            if self.micro % self.args.gradient_accumulation_steps == 0:  # the step's last micro-batch
                means = self.step_stats.means()  # summed over the micro-batches, divided once
                self.logged.append({"token_accuracy": means["accuracy"], "entropy": means["entropy"]})
                self.log(self.logged[-1])
                self.step_stats = None
            return loss

    def run(patched):
        model = tiny("gpt2", seed=3)
        if patched:
            xt.patch_causal_lm(model, return_stats=True)
        g = torch.Generator().manual_seed(5)
        rows = []
        for i in range(8):
            n = 8 + 3 * i
            ids = torch.randint(1, V, (24,), generator=g)
            rows.append({"input_ids": ids, "attention_mask": (torch.arange(24) < n).long(),
                         "labels": torch.where(torch.arange(24) < n, ids, -100)})
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / str(patched)), per_device_train_batch_size=2,
            gradient_accumulation_steps=2, max_steps=2, learning_rate=0.5, lr_scheduler_type="constant",
            optim="sgd", report_to=[], save_strategy="no", use_cpu=True, seed=0, logging_steps=1,
            disable_tqdm=True, dataloader_drop_last=True)
        trainer = StatsTrainer(model=model, args=args, train_dataset=rows)
        trainer.train()
        logged = [h for h in trainer.state.log_history if "token_accuracy" in h]
        return trainer.logged, logged

    fused, fused_logged = run(True)
    plain, _ = run(False)
    assert len(fused) == 2 and len(fused_logged) == 2
    for a, b in zip(fused, plain):
        assert a["token_accuracy"] == pytest.approx(b["token_accuracy"], abs=1e-12)
        assert a["entropy"] == pytest.approx(b["entropy"], rel=1e-5)
