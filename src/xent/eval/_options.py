"""Evaluation options: defaults from the model and tokenizer, validation, and the presets.

Presets reproduce other tools' numbers on the same tokens:

- ``"lm-eval"``: lm-evaluation-harness 0.4.13 ``loglikelihood_rolling`` (wikitext-style perplexity
  tasks): the document is prefixed with BOS (EOS when the tokenizer has no BOS), cut into disjoint
  windows of max_length predictions (each later window's first input is the previous window's last
  target: one token of carried context), the last window moved back to hold max_length inputs; words
  counted as ``len(re.split(r"\\s+", text))`` and bytes as UTF-8 bytes of the document, as the harness
  does. Whitespace-only documents are scored; an empty one has no window but counts its one word and 0
  bytes. (lm-eval ≥ 0.4.9.2 lets the tokenizer add BOS: with one that does, lm-eval matches only with
  its model argument ``add_bos_token=False``.)
- ``"llama.cpp"``: ``llama-perplexity`` (default mode): chunks of max_length tokens (``-c``) of the
  BOS-prefixed text, the remainder dropped, each chunk's first token replaced by BOS, only the
  predictions of the second half scored (L/2 ... L − 2 → tokens L/2 + 1 ... L − 1); a text of fewer
  than 2·max_length tokens is refused (not scored). llama.cpp tokenizes a file as one text: use it with
  whole-file documents (the default for .txt), which lose one trailing newline as ``-f`` reads them. Its
  BOS follows the model's add_bos metadata: ``bos="none"`` reproduces models without it (GPT-2 style).
- ``"transformers"``: the loop of transformers' page "Perplexity of fixed-length models" exactly
  (see _windows.transformers_windows): BOS none unless ``bos="first"``, the stride as given; the
  tokens are counted from the labels (the page's own count is off by one per later window).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ._errors import EvalError

PRESETS = ("lm-eval", "llama.cpp", "transformers")
BOS_MODES = ("first", "every", "none")


@dataclass(frozen=True)
class Options:
    max_length: int
    stride: int
    bos: str  # first | every | none
    bos_id: int | None
    preset: str | None
    extend_last: bool
    words: str  # "whitespace" | "lm-eval"
    batch_size: int
    padding_side: str
    checkpoint_every: int

    def config(self) -> dict:
        return asdict(self)


def model_context(model) -> int | None:
    cfg = model.config
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def resolve_options(
    model,
    tokenizer,
    *,
    max_length: int | None = None,
    stride: int | None = None,
    bos: str | None = None,
    preset: str | None = None,
    batch_size: int = 8,
    padding_side: str = "right",
    checkpoint_every: int = 100,
) -> Options:
    """Fill in defaults and check every option; EvalError names the first bad one."""
    from ._load import check_tokenizer

    check_tokenizer(model, tokenizer)
    context = model_context(model)
    if max_length is None:
        if context is None:
            raise EvalError("the model config gives no context length: pass max_length")
        max_length = context
    if max_length < 3:
        raise EvalError(f"max-length must be at least 3, got {max_length}")
    if context is not None and max_length > context:
        raise EvalError(f"max-length {max_length} is beyond the model's {context} positions")
    if batch_size < 1:
        raise EvalError(f"batch-size must be at least 1, got {batch_size}")
    if padding_side not in ("left", "right"):
        raise EvalError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if checkpoint_every < 1:
        raise EvalError(f"checkpoint-every must be at least 1, got {checkpoint_every}")
    bos_id = tokenizer.bos_token_id
    extend_last, words = False, "whitespace"
    if preset is not None:
        if preset not in PRESETS:
            raise EvalError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
        if (stride is not None and preset != "transformers") or (bos is not None and preset == "lm-eval"):
            raise EvalError(f"--preset {preset} fixes the stride{' and BOS' * (preset == 'lm-eval')}: "
                            f"do not pass --stride{' or --bos' * (preset == 'lm-eval')}")
        if preset != "lm-eval" and bos == "every":
            raise EvalError(f"--preset {preset} takes --bos first or none, not every")
        if preset == "lm-eval":
            bos_id = bos_id if bos_id is not None else tokenizer.eos_token_id
            if bos_id is None:
                raise EvalError("--preset lm-eval needs a BOS or EOS token and the tokenizer has neither")
            bos, stride, extend_last, words = "first", max_length, True, "lm-eval"
        elif preset == "llama.cpp":
            bos = bos or ("first" if bos_id is not None else "none")
            stride = max_length
        else:
            bos = bos or "none"
    if bos is None:
        bos = "first" if bos_id is not None else "none"
    if bos not in BOS_MODES:
        raise EvalError(f"bos must be one of {', '.join(BOS_MODES)}, got {bos!r}")
    if bos != "none" and bos_id is None:
        raise EvalError(f"--bos {bos}: the tokenizer has no BOS token (use --bos none)")
    if bos == "none":
        bos_id = None
    if stride is None:
        stride = max_length
    if stride <= 0 or stride > max_length:
        raise EvalError(f"stride must be in 1..max-length ({max_length}), got {stride}")
    return Options(max_length, stride, bos, bos_id, preset, extend_last, words, batch_size, padding_side,
                   checkpoint_every)
