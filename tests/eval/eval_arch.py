"""Tiny versions of every causal LM of the installed transformers, built generically from the config
classes' defaults (hidden, intermediate, layer, head, expert and vocabulary sizes shrunk), and the check
of one against float64 references: each window's per-token losses from ``model(input_ids=window).logits``
alone, against xent.eval.evaluate's at batch size > 1 with padding. Shared by test_eval_arch_sweep.py and
benchmarks/eval_arch_sweep.py (nothing is downloaded)."""

from __future__ import annotations

import math
import re

import torch

SIZES = {  # field of a config's defaults -> its tiny value
    "hidden_size": 32, "n_embd": 32, "d_model": 32, "n_embed": 32, "embed_dim": 32, "dim": 32,
    "intermediate_size": 64, "n_inner": 64, "ffn_dim": 64, "d_ff": 64, "ffn_hidden_size": 64,
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "expert_intermediate_size": 32,
    "num_hidden_layers": 2, "n_layer": 2, "num_layers": 2, "n_layers": 2, "decoder_layers": 2,
    "num_attention_heads": 2, "n_head": 2, "num_heads": 2, "n_heads": 2, "decoder_attention_heads": 2,
    "num_key_value_heads": 2, "n_kv_heads": 2, "num_kv_heads": 2, "multi_query_group_num": 2,
    "head_dim": 16, "kv_channels": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    "kv_lora_rank": 16, "q_lora_rank": 16, "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4,
    "moe_num_experts": 4, "num_experts_per_tok": 2, "moe_topk": 2, "n_group": 1, "topk_group": 1,
    "max_position_embeddings": 128, "n_positions": 128, "n_ctx": 128, "max_sequence_length": 128,
    "seq_length": 128, "first_k_dense_replace": 1, "decoder_ffn_dim": 64, "qk_head_dim": 16,
    "index_topk": 4, "index_head_dim": 16, "index_n_heads": 2, "embedding_dim": 32, "num_blocks": 2,
    "lru_width": 32, "mamba_d_ssm": 32, "mamba_n_heads": 2, "mamba_d_head": 16, "mamba_d_state": 16,
    "mamba_chunk_size": 16, "ssm_state_size": 16, "mamba_num_heads": 2, "mamba_head_dim": 16,
    "chunk_size": 16, "moe_shared_expert_intermediate_size": 32, "linear_key_head_dim": 16,
    "linear_value_head_dim": 16, "linear_num_key_heads": 2, "linear_num_value_heads": 2, "n_groups": 1,
    "mamba_n_groups": 1,
}
# fields about the final logits (see xent.eval._head): switched on, so that the head is tested with them
LOGIT_FIELDS = {"final_logit_softcapping": 2.0, "logit_scale": 4.0, "logits_scaling": 0.25,
                "output_logit_soft_cap": 2.0, "logits_soft_cap": 2.0, "lm_head_multiplier": 0.5,
                "logits_mup_width_multiplier": 2.0}
MAX_LENGTH = 16
DOCS = ["The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away.",
        "Hi there.", "Cross-entropy measures how well a model predicts"]


class Unbuildable(Exception):
    """This architecture does not build tiny from its defaults (the reason)."""


def causal_lm_types() -> list[tuple[str, str]]:
    """(model_type, class name) of every entry of transformers' causal-LM auto mapping."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return [(k, v if isinstance(v, str) else v[0])
            for k, v in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items())]


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:160] if text else ''}"


def tiny_model(model_type: str, class_name: str, vocab: int, *, seed: int = 0):
    """A tiny float32 model of that type in eval mode, its output embeddings scaled so that the logits
    spread over several nats; Unbuildable(reason) when it cannot be built generically."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cls = getattr(transformers, class_name, None)
    if cls is None:
        raise Unbuildable(f"transformers has no {class_name}")
    try:
        defaults = CONFIG_MAPPING[model_type]().to_dict()
    except Exception as err:
        raise Unbuildable(f"default config: {_first_line(err)}") from None
    kw = {k: v for k, v in SIZES.items() if k in defaults and defaults[k] is not None}
    if "n_inner" in kw and defaults.get("n_inner") is None:
        kw.pop("n_inner")
    layers = next((defaults[k] for k in ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
                   if isinstance(defaults.get(k), int)), None)
    # lists of layer kinds (per layer, or a pattern): one layer of each kind (2 to 4 layers)
    kinds = {k: list(dict.fromkeys(v)) for k, v in defaults.items()
             if re.search(r"type|block|layer", k) and isinstance(v, list) and v
             and all(isinstance(x, str) for x in v)}
    n = min(4, max([2] + [len(v) for v in kinds.values()]))
    for k in ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "num_blocks"):
        if k in kw:
            kw[k] = n
    for k, v in defaults.items():
        if k in kinds:
            kw[k] = [kinds[k][i % len(kinds[k])] for i in range(n)] if len(v) == layers else kinds[k]
        elif isinstance(v, list) and layers and len(v) == layers and k not in kw:
            kw[k] = [v[i % len(v)] for i in range(n)]
    kw["vocab_size"] = vocab
    for k in ("bos_token_id", "eos_token_id", "decoder_start_token_id"):
        if k in defaults:
            kw[k] = 0
    if "pad_token_id" in defaults:
        kw["pad_token_id"] = 1
    for k, v in LOGIT_FIELDS.items():
        if k in defaults and (defaults[k] is None or isinstance(defaults[k], (int, float))):
            kw[k] = v
    if model_type in ("roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text", "xmod",
                      "roberta-prelayernorm") or defaults.get("is_decoder") is False:
        kw["is_decoder"] = True
    try:
        config = CONFIG_MAPPING[model_type](**kw)
    except Exception as err:
        raise Unbuildable(f"tiny config: {_first_line(err)}") from None
    try:
        with torch.device("meta"):  # its size first, without allocating it
            n = sum(p.numel() for p in cls(config).parameters())
        if n > 5_000_000:
            raise Unbuildable(f"not tiny from its defaults ({n / 1e6:.1f}M parameters)")
        torch.manual_seed(seed)
        model = cls(config).eval()
        if hasattr(model, "set_default_language"):  # X-MOD: one adapter per language
            model.set_default_language(next(iter(config.languages)))
    except Unbuildable:
        raise
    except Exception as err:
        raise Unbuildable(f"model: {_first_line(err)}") from None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    with torch.no_grad():
        if head is not None and isinstance(getattr(head, "weight", None), torch.Tensor):
            head.weight.mul_(20.0)
    return model


def reference_losses(model, tok, windows) -> list[float]:
    """Per-token losses, float64 log-softmax of each window's own ``model(input_ids).logits``."""
    out = []
    with torch.no_grad():
        for ids, labels in windows:
            logits = model(input_ids=torch.tensor([ids])).logits[0].double()
            logp = logits - torch.logsumexp(logits, -1, keepdim=True)
            out += [-logp[t, y].item() for t, y in enumerate(labels) if y != -100]
    return out


def check(model, tok, *, batch_size: int = 2, padding_side: str = "left", dtype=None) -> dict:
    """Evaluate the tiny model (windows of MAX_LENGTH, so documents span windows of several lengths) and
    compare each token's loss with the float64 reference. Returns head, notes, tokens, max |Δloss|."""
    import xent.eval
    from xent.eval._options import resolve_options
    from xent.eval._runner import document_windows

    if dtype is not None:
        model = model.to(dtype)  # the reference is this model's own forward, in this dtype
    opts = resolve_options(model, tok, max_length=MAX_LENGTH)
    windows = [(w.input_ids, w.labels) for d in DOCS
               for w in document_windows(tok(d, add_special_tokens=False)["input_ids"], opts)]
    try:
        want = reference_losses(model, tok, windows)
    except Exception as err:
        raise Unbuildable(f"its own forward fails at this size: {_first_line(err)}") from None
    got = {}

    def keep(st):
        for d, p, v in zip(st["doc"].tolist(), st["position"].tolist(), st["loss"].tolist()):
            got[(d, p)] = v

    r = xent.eval.evaluate(model, tok, DOCS, max_length=MAX_LENGTH, batch_size=batch_size,
                           padding_side=padding_side, model_sha256="-", on_tokens=keep)
    losses = [got[k] for k in sorted(got)]
    err = (max((abs(a - b) for a, b in zip(losses, want)), default=0.0) if len(losses) == len(want)
           else math.inf)
    return {"head": r.config["head"], "notes": r.config.get("head_notes", []), "tokens": len(losses),
            "reference_tokens": len(want), "max_abs_diff": err}


def skip_reason_class(reason: str) -> str:
    return re.sub(r"\d+", "N", reason)[:80]
