"""The fused evaluation head (decoder, then the output embeddings on the scored positions only) against a
float64 computation from the model's own logits, for the architectures whose final logits are
transformed: Gemma 2 soft-capping, Cohere logit scale, Granite logits scaling; and the fallback to the
model's forward for a forward the head does not know."""

from __future__ import annotations

import math

import pytest
import torch
from eval_reference import metrics, records_one_window

import xent.eval
from xent.eval._compare import pair_stats

transformers = pytest.importorskip("transformers")

KEYS = ["nll_mean", "nll_se_token", "nll_se_document", "perplexity", "bits_per_byte", "top1_accuracy",
        "top5_accuracy", "entropy_mean", "ece", "brier"]
DOCS = ["The quick brown fox jumps over the lazy dog.", "Hi.", "Cross-entropy measures how well a model",
        "Perplexity is the exponential of the mean negative log-likelihood", "A sliding window"]


def tiny(arch: str, vocab: int, seed: int = 0, **extra):
    """A tiny model whose logits spread over several nats (a random head gives nearly uniform ones)."""
    model = _tiny(arch, vocab, seed, **extra)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(40.0)
    return model


def _tiny(arch: str, vocab: int, seed: int, **extra):
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, bos_token_id=0, eos_token_id=0,
                  pad_token_id=1, max_position_embeddings=64)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                      bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(cfg).eval()
    if arch == "llama":  # an untied head
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, tie_word_embeddings=False,
                                                                      **extra)).eval()
    if arch == "gemma2":  # final-logit soft-capping, small enough to bend these logits
        cfg = transformers.Gemma2Config(**common, head_dim=16, **{"final_logit_softcapping": 2.0, **extra})
        return transformers.Gemma2ForCausalLM(cfg).eval()
    if arch == "cohere":
        cfg = transformers.CohereConfig(**common, **{"logit_scale": 4.0, "tie_word_embeddings": False,
                                                     **extra})
        return transformers.CohereForCausalLM(cfg).eval()
    if arch == "granite":
        cfg = transformers.GraniteConfig(**common, **{"logits_scaling": 0.25, **extra})
        return transformers.GraniteForCausalLM(cfg).eval()
    raise ValueError(arch)


# the transform each architecture applies, and its value that does nothing (to show it matters here)
NEUTRAL = {"gemma2": {"final_logit_softcapping": None}, "cohere": {"logit_scale": 1.0},
           "granite": {"logits_scaling": 1.0}}


@pytest.fixture(scope="module")
def tok(model_and_tokenizer):
    return model_and_tokenizer[1]


def _per_token(model, tok, **kw):
    rows = []

    def keep(st):
        names = ("doc", "position", "loss", "entropy", "top1_prob", "rank")
        rows.extend(zip(*(st[k].tolist() for k in names)))

    r = xent.eval.evaluate(model, tok, DOCS, max_length=64, model_sha256="-", on_tokens=keep, **kw)
    return r, sorted(rows)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma2", "cohere", "granite"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_fused_head_equals_the_float64_logits_path(arch, side, tok):
    model = tiny(arch, len(tok))
    ids = [tok(d, add_special_tokens=False)["input_ids"] for d in DOCS]
    per_doc = records_one_window(model, ids, tok.bos_token_id)  # model(...).logits, float64 after
    want = metrics(per_doc, DOCS)
    got, rows = _per_token(model, tok, batch_size=3, padding_side=side)
    assert got.config["head"] == "fused"
    g = got.to_dict()
    for k in ("tokens", "documents", "bytes"):
        assert g[k] == want[k]
    for k in KEYS:
        assert g[k] == pytest.approx(want[k], rel=1e-5, abs=1e-7), k
    # every token's values, against the float64 log-softmax of the model's own logits
    flat = [rec for recs in per_doc for rec in recs]
    assert len(rows) == len(flat)
    for (_, _, loss, ent, top1, rank), (logp, y, _) in zip(rows, flat):
        p = logp.exp()
        assert loss == pytest.approx(-logp[y].item(), rel=1e-5, abs=1e-6)
        assert ent == pytest.approx(-(p * logp).sum().item(), rel=1e-5, abs=1e-6)
        assert top1 == pytest.approx(p.max().item(), rel=1e-5)
        assert rank == 1 + int((logp > logp[y]).sum())
    if arch in NEUTRAL:  # the transform changes these numbers: leaving it out would fail above
        plain = xent.eval.evaluate(tiny(arch, len(tok), **NEUTRAL[arch]), tok, DOCS, max_length=64,
                                   model_sha256="-")
        assert abs(plain.nll_mean - got.nll_mean) > 1e-3


class ScaledGPT2(transformers.GPT2LMHeadModel if transformers else object):
    """A forward that does something the fused head cannot know: halves its logits."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 0.5
        return out


def test_an_unknown_forward_is_scored_with_the_forward_and_says_so(tok, capsys):
    torch.manual_seed(0)
    model = ScaledGPT2(transformers.GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2,
                                               n_positions=64, bos_token_id=0, eos_token_id=0)).eval()
    ids = [tok(d, add_special_tokens=False)["input_ids"] for d in DOCS]
    want = metrics(records_one_window(model, ids, tok.bos_token_id), DOCS)
    capsys.readouterr()
    got = xent.eval.evaluate(model, tok, DOCS, max_length=64, batch_size=2, model_sha256="-")
    err = capsys.readouterr().err
    assert "ScaledGPT2" in err and "own forward" in err
    assert got.config["head"] == "forward"
    for k in KEYS:
        assert got.to_dict()[k] == pytest.approx(want[k], rel=1e-5, abs=1e-7), k


def test_forward_head_on_request_gives_the_fused_numbers(tok, capsys):
    model = tiny("gemma2", len(tok))
    fused = xent.eval.evaluate(model, tok, DOCS, max_length=64, batch_size=2, model_sha256="-")
    forward = xent.eval.evaluate(model, tok, DOCS, max_length=64, batch_size=2, model_sha256="-",
                                 head="forward")
    assert (fused.config["head"], forward.config["head"]) == ("fused", "forward")
    for k in KEYS:
        assert fused.to_dict()[k] == pytest.approx(forward.to_dict()[k], rel=1e-5, abs=1e-7), k
    with pytest.raises(xent.eval.EvalError, match="head must be one of"):
        xent.eval.evaluate(model, tok, DOCS, head="logits")
    # compare checks its options at its door, before it looks at a model
    for bad, says in ((dict(head="logits"), "head must be one of"),
                      (dict(padding_side="up"), "padding_side must be 'left' or 'right'")):
        with pytest.raises(xent.eval.EvalError, match=says):
            xent.eval.compare(None, None, tok, DOCS, **bad)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "cohere"])
def test_fused_compare_equals_float64_pair_statistics(arch, tok):
    base, model = tiny(arch, len(tok), seed=0), tiny(arch, len(tok), seed=1)
    got = xent.eval.compare(base, model, tok, DOCS, max_length=64, batch_size=3, padding_side="left",
                            model_sha256={}, data_sha256="-")
    assert got.config["head"] == {"base": "fused", "model": "fused"}
    kl, nb, nm = [], [], []
    with torch.no_grad():
        for doc in DOCS:
            src = torch.tensor([[tok.bos_token_id] + tok(doc, add_special_tokens=False)["input_ids"]])
            lp = torch.log_softmax(base(input_ids=src).logits[0].double(), -1)[:-1]
            lq = torch.log_softmax(model(input_ids=src).logits[0].double(), -1)[:-1]
            y = src[0, 1:]
            kl += (lp.exp() * (lp - lq)).sum(-1).tolist()
            nb += (-lp.gather(-1, y[:, None])).squeeze(-1).tolist()
            nm += (-lq.gather(-1, y[:, None])).squeeze(-1).tolist()
    assert got.tokens == len(kl) and math.fsum(kl) / len(kl) > 1e-2  # models that differ
    assert got.kl_mean == pytest.approx(math.fsum(kl) / len(kl), rel=1e-4)
    assert got.nll_base == pytest.approx(math.fsum(nb) / len(nb), rel=1e-6)
    assert got.nll_model == pytest.approx(math.fsum(nm) / len(nm), rel=1e-6)
    assert got.kl_max == pytest.approx(max(kl), rel=1e-4)


def test_pair_stats_with_minus_inf_logits():
    # a vocabulary entry masked to −inf in both models (p = q = 0): it adds nothing to the KL
    zb = torch.tensor([[2.0, 1.0, -math.inf], [0.5, -math.inf, 0.1]])
    zm = torch.tensor([[1.0, 1.5, -math.inf], [0.2, -math.inf, 0.3]])
    got = pair_stats(zb, zm, torch.tensor([0, 2]))
    lp = torch.log_softmax(zb.double(), -1).tolist()
    lq = torch.log_softmax(zm.double(), -1).tolist()

    def kl(a, b):
        return [sum(math.exp(x) * (x - y) for x, y in zip(r, s) if x > -math.inf) for r, s in zip(a, b)]

    mix = [[math.log((math.exp(x) + math.exp(y)) / 2) if x > -math.inf else -math.inf for x, y in zip(r, s)]
           for r, s in zip(lp, lq)]
    close = lambda v: pytest.approx(v, rel=1e-5, abs=1e-7)  # noqa: E731
    assert got["kl"].tolist() == close(kl(lp, lq))
    assert got["rkl"].tolist() == close(kl(lq, lp))
    assert got["jsd"].tolist() == close([(a + b) / 2 for a, b in zip(kl(lp, mix), kl(lq, mix))])
    assert torch.isfinite(got["nll_base"]).all() and torch.isfinite(got["dp"]).all()


# -- the check: a token's numbers are those of its window's own forward, whatever the head and batching --

def _gpt2(tok, cls=None, dtype=torch.float32, **cfg):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                     bos_token_id=0, eos_token_id=0, **cfg)
    model = (cls or transformers.GPT2LMHeadModel)(config).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(40.0)
    return model.to(dtype)


def _alone_losses(model, tok, docs=DOCS):
    """Per-token losses (document order), float64 log-softmax of each document's own forward alone."""
    out = []
    with torch.no_grad():
        for d in docs:
            ids = [tok.bos_token_id] + tok(d, add_special_tokens=False)["input_ids"]
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
            out += [-logp[t, y].item() for t, y in enumerate(ids[1:])]
    return out


def _run(model, tok, docs=DOCS, **kw):
    got = {}

    def keep(st):
        for d, p, v in zip(st["doc"].tolist(), st["position"].tolist(), st["loss"].tolist()):
            got[(d, p)] = v

    r = xent.eval.evaluate(model, tok, docs, max_length=64, model_sha256="-", on_tokens=keep, **kw)
    return r, [got[k] for k in sorted(got)]


class LateHalved(transformers.GPT2LMHeadModel if transformers else object):
    """Halves its logits from input position 16 on: the first 16 tokens look like a plain GPT-2."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = torch.cat([out.logits[:, :16], out.logits[:, 16:] * 0.5], 1)
        return out


class BatchHalved(transformers.GPT2LMHeadModel if transformers else object):
    """Halves its logits only in a batch of more than one window."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        if out.logits.shape[0] > 1:
            out.logits = out.logits * 0.5
        return out


class Scaled102(transformers.GPT2LMHeadModel if transformers else object):
    """An unknown ×1.02 logit scale: within 3 % of the head, beyond the rounding of bfloat16."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 1.02
        return out


class HeadMultiplier(transformers.GPT2LMHeadModel if transformers else object):
    """FalconH1's rule: logits · config.lm_head_multiplier."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * self.config.lm_head_multiplier
        return out


class LogitsSizes(transformers.GPT2LMHeadModel if transformers else object):
    """Records the shape of every [B, T, V] logits tensor its own forward returns."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        self.seen.append(tuple(out.logits.shape))
        return out


@pytest.mark.parametrize("side", ["right", "left"])
def test_the_fused_check_never_holds_a_batch_of_logits(tok, side):
    """Under the fused head the first batch's check asks the model's own forward for one window's logits
    at a time (its references); the batched and padded probes go through the decoder and the fused head,
    a chunk at a time. The numbers are each window's own."""
    model = _gpt2(tok, LogitsSizes)
    model.seen = []
    want = _alone_losses(model, tok)
    model.seen.clear()
    r, got = _run(model, tok, batch_size=3, padding_side=side)
    assert r.config["head"] == "fused" and got == pytest.approx(want, abs=1e-5)
    assert model.seen and all(b == 1 for b, _, _ in model.seen), model.seen


@pytest.mark.parametrize("side", ["right", "left"])
def test_a_transform_beyond_the_first_16_tokens_is_seen(tok, side, capsys):
    model = _gpt2(tok, LateHalved)
    want = _alone_losses(model, tok)
    r, got = _run(model, tok, batch_size=3, padding_side=side)
    assert r.config["head"] == "forward" and "own forward" in capsys.readouterr().err
    assert got == pytest.approx(want, abs=1e-5)


def test_a_transform_of_batched_logits_only_is_no_concern_of_the_fused_head(tok):
    """A forward that halves its final logits in a batch: the fused head (decoder, then the output
    embeddings) gives each window its numbers alone, batched and padded; the model's own forward must run
    each window alone, and says so."""
    model = _gpt2(tok, BatchHalved)
    want = _alone_losses(model, tok)
    r, got = _run(model, tok, batch_size=3)
    assert r.config["head"] == "fused" and "head_notes" not in r.config
    assert got == pytest.approx(want, abs=1e-5)
    r, got = _run(model, tok, batch_size=3, head="forward")
    assert got == pytest.approx(want, abs=1e-5)
    assert any("run alone" in n for n in r.config["head_notes"])


def test_a_decoder_that_depends_on_the_batch_runs_each_window_alone_with_a_note(tok):
    """Hidden states halved in a batch of more than one window: the fused head's batched numbers differ
    from each window's alone, so each window runs alone (fused), with the same numbers as alone."""
    model = _gpt2(tok)

    def halve_in_a_batch(module, args, out):
        if out.last_hidden_state.shape[0] > 1:
            out.last_hidden_state = out.last_hidden_state * 0.5
        return out

    model.transformer.register_forward_hook(halve_in_a_batch)
    want = _alone_losses(model, tok)
    r, got = _run(model, tok, batch_size=3)
    assert r.config["head"] == "fused"
    assert got == pytest.approx(want, abs=1e-5)
    assert any("run alone" in n for n in r.config["head_notes"])


def test_an_unknown_scale_in_bfloat16_falls_back_and_fused_refuses(tok):
    model = _gpt2(tok, Scaled102, dtype=torch.bfloat16)
    want = _alone_losses(model, tok)
    r, got = _run(model, tok, batch_size=1)
    assert r.config["head"] == "forward"
    assert got == pytest.approx(want, abs=1e-5)
    with pytest.raises(xent.eval.EvalError, match=r"head='fused' .*Scaled102.*beyond the rounding"):
        _run(model, tok, batch_size=1, head="fused")


def test_bfloat16_fused_equals_its_own_forward_exactly(tok):
    model = _gpt2(tok, dtype=torch.bfloat16)
    fused, got = _run(model, tok, batch_size=1)
    forward, want = _run(model, tok, batch_size=1, head="forward")
    assert fused.config["head"] == "fused" and "head_notes" not in fused.config
    assert got == pytest.approx(want, abs=1e-5)


def test_float16_on_the_cpu_stays_fused_with_its_forward_numbers(tok):
    model = _gpt2(tok, dtype=torch.float16)
    r, got = _run(model, tok, batch_size=3)
    assert r.config["head"] == "fused" and "head_notes" not in r.config
    # the fused head projects in float32; the forward rounds its logits to float16 (≤ 2^-11 relative)
    want = _alone_losses(model, tok)
    assert got == pytest.approx(want, abs=0.05)
    assert abs(sum(got) - sum(want)) / len(got) < 5e-3


def test_config_fields_about_the_logits():
    from xent.eval._head import unapplied_logit_fields

    assert unapplied_logit_fields(transformers.FalconH1Config(lm_head_multiplier=0.98)) == [
        "lm_head_multiplier=0.98"]
    assert unapplied_logit_fields(transformers.FalconH1Config()) == []  # a multiplier of 1
    assert unapplied_logit_fields(transformers.xLSTMConfig()) == ["output_logit_soft_cap=30.0"]
    assert unapplied_logit_fields(transformers.RecurrentGemmaConfig()) == ["logits_soft_cap=30.0"]
    # applied by the head (Gemma 2 soft-cap, Cohere, Granite), or about attention and embeddings
    for cfg in (transformers.Gemma2Config(), transformers.CohereConfig(),
                transformers.GraniteConfig(logits_scaling=4.0, attention_multiplier=0.5,
                                           embedding_multiplier=2.0)):
        assert unapplied_logit_fields(cfg) == [], cfg


def test_a_logits_multiplier_in_the_config_means_the_forward(tok, capsys):
    # in bfloat16 a 0.98 multiplier is within the rounding allowed two computations, so only the config
    # field can tell: auto uses the forward; fused is used when the check shows no difference
    model = _gpt2(tok, HeadMultiplier, dtype=torch.bfloat16, lm_head_multiplier=0.98)
    want = _alone_losses(model, tok)
    r, got = _run(model, tok, batch_size=1)
    assert r.config["head"] == "forward" and "lm_head_multiplier=0.98" in capsys.readouterr().err
    assert got == pytest.approx(want, abs=1e-5)
    plain = _gpt2(tok, dtype=torch.bfloat16, lm_head_multiplier=0.98)  # the field, not applied
    r, got = _run(plain, tok, batch_size=1, head="fused")
    assert r.config["head"] == "fused"
    assert got == pytest.approx(_alone_losses(plain, tok), abs=1e-5)


def test_mpt_inv_sqrt_d_model_logit_scale(tok, capsys):
    torch.manual_seed(0)
    cfg = transformers.MptConfig(vocab_size=len(tok), d_model=32, n_heads=2, n_layers=2, max_seq_len=64,
                                 logit_scale="inv_sqrt_d_model")
    model = transformers.MptForCausalLM(cfg).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(40.0)
    want = _alone_losses(model, tok)
    r, got = _run(model, tok, batch_size=2)
    assert got == pytest.approx(want, abs=1e-5)
    assert r.config["head"] == "forward" and "logit_scale" in capsys.readouterr().err


ROBERTA = ["roberta", "xlm-roberta", "camembert", "data2vec-text", "roberta-prelayernorm"]


@pytest.mark.parametrize("model_type", ROBERTA)
@pytest.mark.parametrize(("batch_size", "side"), [(1, "right"), (3, "right"), (3, "left")])
def test_roberta_family_positions(model_type, batch_size, side, tok):
    from eval_arch import causal_lm_types, tiny_model

    name = dict(causal_lm_types())[model_type]
    model = tiny_model(model_type, name, len(tok))
    want = _alone_losses(model, tok)
    r, got = _run(model, tok, batch_size=batch_size, padding_side=side)
    assert got == pytest.approx(want, abs=1e-5)
    assert any("position" in n for n in r.config["head_notes"])


def test_roberta_compare_positions(tok):
    from eval_arch import tiny_model

    base, model = (tiny_model("roberta", "RobertaForCausalLM", len(tok), seed=s) for s in (0, 1))
    got = xent.eval.compare(base, model, tok, DOCS, max_length=64, batch_size=3, model_sha256={},
                            data_sha256="-")
    nb, nm = _alone_losses(base, tok), _alone_losses(model, tok)
    assert got.tokens == len(nb)
    assert got.nll_base == pytest.approx(math.fsum(nb) / len(nb), rel=1e-6)
    assert got.nll_model == pytest.approx(math.fsum(nm) / len(nm), rel=1e-6)


@pytest.mark.parametrize("side", ["left", "right"])
def test_rwkv_padding_changes_nothing(tok, side):
    from eval_arch import tiny_model

    model = tiny_model("rwkv", "RwkvForCausalLM", len(tok))
    want = _alone_losses(model, tok)
    r, got = _run(model, tok, batch_size=3, padding_side=side)
    assert got == pytest.approx(want, abs=1e-5)
    if side == "left":  # the recurrent state would run through the pad tokens
        assert any("padding" in n for n in r.config["head_notes"])


def test_cli_head_option(model_dir, other_model_dir, tmp_path, capsys):
    import json

    from xent.cli import main

    data = tmp_path / "d.txt"
    data.write_text("\n".join(DOCS) + "\n")
    heads = {}
    for head in ("auto", "fused", "forward"):
        assert main(["eval", "--model", str(model_dir), "--data", str(data), "--split", "lines", "--json",
                     "--head", head, "--batch-size", "2"]) == 0
        heads[head] = json.loads(capsys.readouterr().out)
    assert [heads[h]["config"]["head"] for h in heads] == ["fused", "fused", "forward"]
    assert heads["forward"]["nll_mean"] == pytest.approx(heads["auto"]["nll_mean"], rel=1e-6)
    assert main(["compare", "--base", str(model_dir), "--model", str(other_model_dir), "--data", str(data),
                 "--split", "lines", "--json", "--head", "forward"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["head"] == {"base": "forward", "model": "forward"}
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--model", str(model_dir), "--data", str(data), "--head", "logits"])
    assert exit_.value.code == 2


@pytest.mark.parametrize("seed", range(4))
def test_check_compares_block_by_block_as_whole(seed, monkeypatch):
    """The head check compares [B, T, V] logits a block of rows at a time (its temporaries were ~10 GB at
    V 128256, batch 4 × 512): the verdicts and the largest difference are those of one whole comparison,
    NaN/inf placement included, whatever the block."""
    from xent.eval import _head

    g = torch.Generator().manual_seed(seed)
    want = torch.randn(3, 5, 37, generator=g) * 8
    got = want + torch.randn(want.shape, generator=g) * 10.0 ** -(seed + 4)
    if seed % 2:
        want[1, 2, 3] = got[1, 2, 3] = float("inf")
        want[0, 4, 0] = got[0, 4, 0] = float("nan")
    if seed == 3:
        got[2, 0, 5] = float("nan")  # a NaN where the forward has a number: never close
    # the whole comparison, written out directly
    finite = torch.isfinite(got) & torch.isfinite(want)
    same = bool(((got == want) | (got.isnan() & want.isnan()) | finite).all())
    diff = (got - want)[finite].abs()
    whole_err = float(diff.max())
    results = []
    for block in (1 << 22, 37, 74, 111):
        monkeypatch.setattr(_head, "_COMPARE_BLOCK", block)
        results.append((_head._rounding_close(got, want, torch.float32, 2.0),
                        _head._agrees(got, want, torch.float32)))
    assert all(r == results[0] for r in results)
    (ok, err), _ = results[0]
    if not same:
        assert not ok and err == float("inf")
    else:
        assert err == whole_err
