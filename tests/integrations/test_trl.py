"""xent.integrations.trl with the real TRL: SFT and GRPO runs of a few steps on a tiny local model give the
losses and metrics of TRL's own trainers, the log-probs equal a float64 computation from the full logits,
and the fused head holds less memory than the logits."""

from __future__ import annotations

import pytest
import torch

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

import xent.integrations.trl as xtrl  # noqa: E402
from xent.demo import train_tokenizer  # noqa: E402

TEXTS = [f"the {w} sat on the {v} mat." for w in ("cat", "dog", "fox", "owl")
         for v in ("red", "big", "old", "new")]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=300)  # trained here: nothing is downloaded


def tiny(tok, vocab_size=None, n_positions=64):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=vocab_size or len(tok), n_embd=32, n_layer=1, n_head=2,
                                  n_positions=n_positions, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.pad_token_id)
    return transformers.GPT2LMHeadModel(cfg)


def logged(trainer) -> list[dict]:
    return [e for e in trainer.state.log_history if "loss" in e]


def count_calls(monkeypatch) -> list[int]:
    calls = [0]
    original = xtrl.linear_log_probs

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(xtrl, "linear_log_probs", counted)
    return calls


def test_sft_trainer_matches_trl(tmp_path, tokenizer, one_thread):
    ds = datasets.Dataset.from_dict({"text": TEXTS})

    def run(cls, **kw):
        args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                             gradient_accumulation_steps=2, learning_rate=1e-3, max_length=32, bf16=False,
                             report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
                             logging_steps=1, seed=0)
        trainer = cls(model=tiny(tokenizer), args=args, train_dataset=ds, processing_class=tokenizer, **kw)
        trainer.train()
        return trainer

    stock = logged(run(trl.SFTTrainer))
    trainer = run(xtrl.XentSFTTrainer)
    ours = logged(trainer)
    assert xent_is_used(trainer.model)
    assert len(ours) == len(stock) == 3
    for a, b in zip(ours, stock):  # the same loss, gradients (their norm) and metrics, step by step
        for key in ("loss", "grad_norm", "entropy", "mean_token_accuracy", "num_tokens"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key

    # another objective goes through the same trainer: TaiLr's first loss is its own, not cross-entropy's
    tailr = logged(run(xtrl.XentSFTTrainer, loss=xent_losses().TaiLr(gamma=0.1, threshold=0.3)))
    assert tailr[0]["loss"] < 0.9 * stock[0]["loss"]  # weights in [0.3, 1] on a near-uniform model


def xent_losses():
    import xent.losses

    return xent.losses


def xent_is_used(model) -> bool:
    from xent.integrations.transformers import is_patched

    return is_patched(model)


def test_grpo_trainer_matches_trl(tmp_path, tokenizer, one_thread, monkeypatch):
    model_dir = tmp_path / "tiny"
    tiny(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    prompts = datasets.Dataset.from_dict({"prompt": ["the cat", "the dog", "a fox", "an owl"] * 2})

    def reward(completions, **kwargs):
        return [float(c.count("a")) for c in completions]

    def run(cls):
        args = trl.GRPOConfig(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4,
                              num_generations=4, max_completion_length=8, learning_rate=1e-2, beta=0.04,
                              temperature=0.7, bf16=False, report_to=[], save_strategy="no", use_cpu=True,
                              disable_tqdm=True, logging_steps=1, seed=0)
        trainer = cls(model=str(model_dir), reward_funcs=reward, args=args, train_dataset=prompts,
                      processing_class=tokenizer)
        trainer.train()
        return trainer

    stock = logged(run(trl.GRPOTrainer))
    calls = count_calls(monkeypatch)
    ours = logged(run(xtrl.XentGRPOTrainer))
    assert calls[0] > 0  # the policy's and the reference model's log-probs came from xent
    assert len(ours) == len(stock) == 2
    for a, b in zip(ours, stock):  # same completions (same seed), same objective, KL and entropy
        for key in ("loss", "grad_norm", "kl", "entropy", "reward"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key


def reference_log_probs(model, input_ids, labels, temperature):
    """float64 log q_y and H(q) from the model's full logits, q = softmax(z / T), shifted."""
    with torch.no_grad():
        z = model(input_ids=input_ids).logits[:, :-1].double() / temperature
    y = labels[:, 1:]
    lq = torch.log_softmax(z, -1)
    mask = y != -100
    logp = torch.where(mask, lq.gather(-1, y.clamp(min=0)[..., None]).squeeze(-1), 0.0)
    ent = torch.where(mask, -(lq.exp() * lq).sum(-1), 0.0)
    return logp, ent, mask


def peak_bytes(fn) -> int:
    """Largest CPU memory held by torch tensors while ``fn`` runs, above what was held when it started
    (torch.profiler's allocation events, in time order)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    held = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        held += event.self_cpu_memory_usage
        peak = max(peak, held)
    return peak


def test_patch_log_probs_values_and_memory(tokenizer, one_thread):
    V, B, T, temperature = 8192, 4, 128, 0.7
    model = tiny(tokenizer, vocab_size=V, n_positions=T)
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, V, (B, T), generator=g)
    labels = input_ids.clone()
    labels[:, :40] = -100  # the prompt
    labels[1, 100:] = -100  # padding
    want_logp, want_ent, mask = reference_log_probs(model, input_ids, labels, temperature)

    xtrl.patch_log_probs(model, temperature=temperature)
    out = model(input_ids=input_ids, labels=labels, fused_lm_head=True)
    torch.testing.assert_close(out.log_probs.double(), want_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.entropy.double(), want_ent, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.label_mask, mask)
    assert out.loss.item() == pytest.approx(-want_logp.sum().item() / mask.sum().item(), rel=1e-5)
    assert model(input_ids=input_ids).logits.shape == (B, T, V)  # without fused_lm_head: the model's forward

    def fused():
        o = model(input_ids=input_ids, labels=labels, fused_lm_head=True)
        (o.log_probs.sum() + o.entropy.sum()).backward()

    def from_logits():  # what a trainer without a fused head does: full logits, then log-softmax
        z = model.transformer(input_ids).last_hidden_state[:, :-1] @ model.lm_head.weight.T
        lq = torch.log_softmax(z.float() / temperature, -1)
        logp = lq.gather(-1, labels[:, 1:].clamp(min=0)[..., None]).squeeze(-1)
        ent = -(lq.exp() * lq).sum(-1)
        (logp[mask].sum() + ent[mask].sum()).backward()

    stock = tiny(tokenizer, vocab_size=V, n_positions=T)  # TRL's own chunked head, for the record
    trl.trainer.utils.add_fused_lm_head(stock, temperature=temperature, outputs=("log_probs", "entropy"))

    def trl_fused():
        o = stock(input_ids=input_ids, labels=labels, fused_lm_head=True)
        (o.log_probs.sum() + o.entropy.sum()).backward()

    fused(), trl_fused()  # warm-up: the CPU kernel's build, the first allocations
    xent_peak, logits_peak, trl_peak = peak_bytes(fused), peak_bytes(from_logits), peak_bytes(trl_fused)
    logits_bytes = B * (T - 1) * V * 4
    print(f"peak above the start, forward + backward of log-probs and entropy, B={B} T={T} V={V}: "
          f"xent {xent_peak / 2**20:.1f} MiB, full logits {logits_peak / 2**20:.1f} MiB, "
          f"TRL's fused head {trl_peak / 2**20:.1f} MiB "
          f"(one [B, T-1, V] float32 tensor: {logits_bytes / 2**20:.1f} MiB)")
    assert logits_peak > 2 * logits_bytes  # logits, log-softmax and their gradients coexist
    assert xent_peak < logits_bytes  # the fused head never holds one full [B, T-1, V] tensor


def test_patch_log_probs_applies_the_models_soft_capping(one_thread):
    """Gemma 2 soft-caps its logits: the log-probs are those of its own capped logits, at any temperature."""
    torch.manual_seed(0)
    cfg = transformers.Gemma2Config(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                    max_position_embeddings=32, final_logit_softcapping=3.0)
    model = transformers.Gemma2ForCausalLM(cfg)
    with torch.no_grad():  # logits large enough for the cap to matter
        model.get_output_embeddings().weight.mul_(30.0)
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 101, (2, 16), generator=g)
    labels = input_ids.clone()
    labels[0, :4] = -100
    want_logp, want_ent, _ = reference_log_probs(model, input_ids, labels, 1.3)
    xtrl.patch_log_probs(model, temperature=1.3)
    out = model(input_ids=input_ids, labels=labels, fused_lm_head=True)
    torch.testing.assert_close(out.log_probs.double(), want_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.entropy.double(), want_ent, rtol=1e-5, atol=1e-5)
