"""Loading a local Hugging Face causal LM without running code from its directory.

trust_remote_code stays False unless asked; weights are read from .safetensors only, unless
``allow_pickle`` (then pickle files are read with torch.load(weights_only=True)). Every failure becomes
an EvalError with one line naming the directory and the problem.
"""

from __future__ import annotations

import os

from ._errors import EvalError
from ._files import first_line, weights_sha256

DTYPES = ("float32", "bfloat16", "float16")


def load_model(model_dir: str, *, dtype: str = "float32", device: str = "cpu",
               trust_remote_code: bool = False, allow_pickle: bool = False,
               allow_missing_weights: bool = False, tokenizer_dir: str | None = None):
    """(model in eval mode on device, tokenizer, sha256 of the weight files). ``tokenizer_dir``: read the
    tokenizer from there instead of ``model_dir`` (the same checks apply).

    Refused before any work: weights the model has but the checkpoint lacks (transformers would
    initialise them at random, so two runs would differ) or that the checkpoint has and the model does
    not (unless ``allow_missing_weights``); a tokenizer with no vocabulary (a directory without tokenizer
    files gives one); a tokenizer whose ids reach past the model's embedding rows."""
    import torch
    import transformers
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING,
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    )

    transformers.utils.logging.disable_progress_bar()  # our own bar is the one on stderr
    if not os.path.isdir(model_dir):
        raise EvalError(f"model directory not found: {model_dir}")
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        raise EvalError(f"{model_dir} has no config.json: not a Hugging Face model directory")
    if dtype not in DTYPES:
        raise EvalError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EvalError(f"device {device!r} asked for but CUDA is not available")
    try:
        config = transformers.AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code,
                                                         local_files_only=True)
    except Exception as err:
        raise EvalError(f"cannot read the model config in {model_dir}: {first_line(err)}") from None
    # A causal-LM config type is not enough (BertConfig has BertLMHeadModel): the saved architecture
    # must be a causal LM too, when the config names it.
    archs = getattr(config, "architectures", None) or []
    causal_names = {n for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
                    for n in ((v,) if isinstance(v, str) else v)}
    causal = type(config) in MODEL_FOR_CAUSAL_LM_MAPPING and (
        not archs or any(a in causal_names for a in archs))
    if not causal and not (trust_remote_code and _has_auto_map(config)):
        raise EvalError(f"{model_dir} is not a causal language model (model_type {config.model_type!r}, "
                        f"architectures {', '.join(archs) or 'none'})")
    files = os.listdir(model_dir)
    has_safetensors = any(f.endswith(".safetensors") for f in files)
    pickles = sorted(f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt")))
    if not has_safetensors and not allow_pickle:
        found = f"found {', '.join(pickles)}" if pickles else "no weight files"
        raise EvalError(f"{model_dir} has no .safetensors weights ({found}); --allow-pickle loads pickle "
                        "weights with weights_only=True")
    if not has_safetensors and not pickles:
        raise EvalError(f"{model_dir} has no weight files")
    kwargs = dict(trust_remote_code=trust_remote_code, local_files_only=True, dtype=getattr(torch, dtype))
    if has_safetensors:
        kwargs["use_safetensors"] = True
    else:
        kwargs.update(use_safetensors=False, weights_only=True)
    try:
        model, info = transformers.AutoModelForCausalLM.from_pretrained(model_dir, output_loading_info=True,
                                                                        **kwargs)
    except Exception as err:
        raise EvalError(f"cannot load the weights in {model_dir}: {first_line(err)}") from None
    if not allow_missing_weights:
        for kind, what in (("missing_keys", "lacks weights the model needs (they would be initialised at "
                                            "random)"),
                           ("unexpected_keys", "holds weights the model does not use")):
            names = sorted(info.get(kind) or ())
            if names:
                shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
                raise EvalError(f"the checkpoint in {model_dir} {what}: {shown} (--allow-missing-weights "
                                "to evaluate it anyway)")
    tokenizer_dir = model_dir if tokenizer_dir is None else tokenizer_dir
    if not os.path.isdir(tokenizer_dir):
        raise EvalError(f"tokenizer directory not found: {tokenizer_dir}")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            tokenizer_dir, trust_remote_code=trust_remote_code, local_files_only=True)
    except Exception as err:
        raise EvalError(f"cannot load the tokenizer in {tokenizer_dir}: {first_line(err)}") from None
    if isinstance(tokenizer, bool) or not callable(tokenizer):
        raise EvalError(f"cannot load the tokenizer in {tokenizer_dir}")
    check_tokenizer(model, tokenizer, where=tokenizer_dir)
    model = model.to(device).eval()
    return model, tokenizer, weights_sha256(model_dir)


def check_tokenizer(model, tokenizer, *, where: str | None = None) -> None:
    """EvalError unless the tokenizer has a vocabulary and its ids are all rows of the model's input
    embedding (an id past them is an IndexError on the CPU and a device-side assert on CUDA)."""
    prefix = f"{where}: " if where else ""
    size = len(tokenizer)
    empty = getattr(tokenizer, "vocab_size", None) == 0
    if empty or not tokenizer("a", add_special_tokens=False)["input_ids"]:
        raise EvalError(f"{prefix}the tokenizer has no vocabulary ({size} special tokens, no token for "
                        "text): are the tokenizer files missing?")
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(emb, "num_embeddings", None) or getattr(model.config, "vocab_size", None)
    if rows is not None and size > rows:
        raise EvalError(f"{prefix}the tokenizer has {size} tokens but the model's embedding has {rows} rows: "
                        f"ids {rows}..{size - 1} would index past it")


def _has_auto_map(config) -> bool:
    return "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
