"""Hugging Face transformers: any causal LM computes its loss through :func:`xent.linear_loss`.

Usage::

    import xent
    from xent.integrations.transformers import patch_causal_lm, unpatch

    patch_causal_lm(model, loss=xent.losses.TaiLr(gamma=0.1, threshold=0.3))
    out = model(input_ids, labels=input_ids)   # out.loss is fused; out.logits is None
    trainer = transformers.Trainer(model=model, ...)   # patch first: Trainer reads the signature
    unpatch(model)

The patch is generic: it needs only ``model.base_model`` (the decoder that returns the last hidden
state) and ``model.get_output_embeddings()`` (the LM head, a ``Linear`` or a tied embedding), which
every transformers ``*ForCausalLM`` has. Logit transforms that some models apply between the two are
honoured: Gemma 2/3's ``final_logit_softcapping``, Cohere's ``logit_scale`` and Granite's
``logits_scaling``; a model whose forward does anything else to its logits is not a fit for this patch.
"""

from __future__ import annotations

import copy
import functools
import inspect
from dataclasses import dataclass

import torch

from .. import _linear
from ..losses import CrossEntropy, TokenLoss

# Keyword arguments of a causal LM's forward that belong to its loss, not to the decoder
# (transformers' ForCausalLMLoss takes num_items_in_batch, ignore_index and shift_labels).
_LOSS_KWARGS = ("num_items_in_batch", "ignore_index", "shift_labels")
_ATTR = "_xent_original_forward"


@dataclass
class OutputHead:
    """How a causal LM turns its last hidden state h into logits: ``softcap(scale·h @ weight.T + bias)``."""

    decoder: torch.nn.Module
    weight: torch.Tensor
    bias: torch.Tensor | None
    hidden_scale: float
    softcap: float | None


def output_head(model) -> OutputHead:
    """The decoder and LM head of a transformers causal LM (raises ``TypeError`` when there is none)."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    decoder = getattr(model, "base_model", None)
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise TypeError(f"{type(model).__name__} has no output embeddings (get_output_embeddings() is None)")
    if decoder is None or decoder is model:
        raise TypeError(f"{type(model).__name__} has no base_model separate from its LM head")
    config = getattr(model, "config", None)
    scale = 1.0
    if getattr(config, "logit_scale", None) is not None:  # Cohere: logits · logit_scale
        scale *= float(config.logit_scale)
    if getattr(config, "logits_scaling", None) is not None:  # Granite: logits / logits_scaling
        scale /= float(config.logits_scaling)
    softcap = getattr(config, "final_logit_softcapping", None)  # Gemma 2/3
    return OutputHead(decoder, head.weight, getattr(head, "bias", None), scale,
                      None if softcap is None else float(softcap))


def fit_loss(loss: TokenLoss, head: OutputHead) -> TokenLoss:
    """``loss`` with the model's soft-capping, when the model has one and the loss does not."""
    if head.softcap is None or loss.softcap is not None:
        return loss
    loss = copy.copy(loss)
    loss.softcap = head.softcap
    return loss


def patch_causal_lm(model, loss: TokenLoss | None = None, *, chunk_size: int | str = "auto",
                    return_stats: bool = False):
    """Make ``model(..., labels=...)`` compute its loss with ``loss`` through :func:`xent.linear_loss`.

    With ``labels`` the patched forward runs ``model.base_model``, then the fused head + loss, and returns a
    ``CausalLMOutputWithPast`` whose ``logits`` is ``None`` (they were never materialised). It honours
    ``num_items_in_batch`` (what transformers' ``Trainer`` passes under gradient accumulation: the
    loss is Σℓ / num_items), ``ignore_index`` and ``shift_labels``. Without ``labels`` the original
    forward runs unchanged, so ``generate`` and logit inspection keep working.

    Patch before creating a ``Trainer``: it reads the forward's signature to decide whether to pass
    ``num_items_in_batch``. ``Trainer.evaluate`` reports the same loss; a ``compute_metrics`` that needs
    the logits gets none (unpatch for that evaluation). The loss object is used as given (an EMO cost
    embedding must already be on the model's device). Returns the model; :func:`unpatch` restores it.

    ``return_stats=True`` puts the call's training statistics on the output as ``out.xent_stats`` (a
    :class:`xent.TokenStats`: detached sums of the loss, token count, top-1 correct, entropy, z-loss terms
    and logsumexp over the call's target tokens, computed in the fused pass), for a ``Trainer`` to log:
    sum them over the micro-batches of a step (and all-reduce over ranks), then divide
    (:meth:`xent.TokenStats.means`). ``xent_stats`` is a plain attribute, not a key of the output, so
    indexing the output (``out[0]``, ``out["loss"]``) is unchanged. The latest call's statistics are also
    ``model.xent_stats``, which a wrapper that rebuilds the output (accelerate's mixed precision: a
    ``Trainer`` with ``bf16=True``) cannot drop.
    """
    loss = CrossEntropy() if loss is None else loss
    if not isinstance(loss, TokenLoss):
        raise TypeError(f"loss must be a xent.losses.TokenLoss, got {type(loss).__name__}")
    if loss.num_extra:
        raise TypeError(f"{type(loss).__name__} needs extra per-token inputs; it cannot be a model's loss")
    output_head(model)  # fail now, not at the first forward
    if _ATTR in vars(model):
        unpatch(model)
    original = model.forward  # the class's bound method, or a wrapper installed before
    # Arguments are named with the class's forward (a wrapper installed earlier may take *args).
    signature = inspect.signature(type(model).forward.__get__(model))
    var_kw = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)

    @functools.wraps(original)
    def forward(*args, **kwargs):
        bound = signature.bind_partial(*args, **kwargs)
        named = dict(bound.arguments)
        named.update(named.pop(var_kw, None) or {})  # flatten **kwargs into the named arguments
        labels = named.pop("labels", None)
        shift_labels = named.get("shift_labels")
        if labels is None and shift_labels is None:
            return original(*args, **kwargs)
        return _fused_forward(model, loss, named, labels, chunk_size, return_stats)

    forward.__signature__ = signature
    # Remember an instance-level forward that was already there (accelerate, for one, installs
    # wrappers that way) so unpatch restores it rather than the class's method.
    vars(model)[_ATTR] = vars(model).get("forward")
    model.forward = forward  # an instance attribute: nn.Module.__call__ finds it first
    return model


def unpatch(model):
    """Undo :func:`patch_causal_lm` (a no-op on a model that is not patched). Returns the model."""
    if _ATTR in vars(model):
        previous = vars(model).pop(_ATTR)
        if previous is None:
            vars(model).pop("forward", None)
        else:
            vars(model)["forward"] = previous
    return model


def is_patched(model) -> bool:
    return _ATTR in vars(model)


def _has_var_kw(signature: inspect.Signature) -> bool:
    return any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())


def _fused_forward(model, loss: TokenLoss, named: dict, labels, chunk_size, return_stats=False):
    from transformers.modeling_outputs import CausalLMOutputWithPast

    num_items = named.pop("num_items_in_batch", None)
    ignore_index = named.pop("ignore_index", -100)
    shift_labels = named.pop("shift_labels", None)
    named.pop("logits_to_keep", None)
    named.pop("num_logits_to_keep", None)
    head = output_head(model)
    accepted = inspect.signature(head.decoder.forward)
    if not _has_var_kw(accepted):
        named = {k: v for k, v in named.items() if k in accepted.parameters}
    outputs = head.decoder(**named)
    hidden = outputs[0]  # last hidden state [B, T, D]
    if head.hidden_scale != 1.0:
        hidden = hidden * head.hidden_scale  # (s·h) @ Wᵀ = s·(h @ Wᵀ)
    if shift_labels is not None:  # already shifted (sequence parallelism): position t predicts it as is
        target, shift = shift_labels.to(hidden.device), False
    else:
        target, shift = labels.to(hidden.device), True
    value = _linear.linear_loss(
        hidden, head.weight, target, loss=fit_loss(loss, head), linear_bias=head.bias, shift=shift,
        chunk_size=chunk_size, ignore_index=ignore_index, num_items=num_items, return_stats=return_stats,
    )
    value, stats = value if return_stats else (value, None)
    out = CausalLMOutputWithPast(loss=value, logits=None, **_passed_on(outputs, CausalLMOutputWithPast))
    if stats is not None:
        out.xent_stats = stats  # an attribute, not a ModelOutput key: out[i] and out.to_tuple() unchanged
        # accelerate's mixed-precision wrapper rebuilds the output from its keys, dropping that attribute:
        # the latest call's statistics stay reachable on the model itself.
        model.xent_stats = stats
    return out


def _passed_on(outputs, output_class) -> dict:
    """The decoder's cache, hidden states and attentions, under the names of this transformers version:
    the cache is ``cache`` from transformers 5 on (reading or passing ``past_key_values`` logs a
    deprecation warning there), ``past_key_values`` before. ``.get`` reads a field without that alias."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(output_class)}
    cache = "cache" if "cache" in names else "past_key_values"
    wanted = [n for n in (cache, "hidden_states", "attentions") if n in names]
    if not isinstance(outputs, dict):  # a tuple (return_dict=False): nothing is named
        return {}
    return {n: outputs.get(n) for n in wanted}
