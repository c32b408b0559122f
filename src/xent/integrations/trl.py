"""TRL: ``SFTTrainer`` with any xent loss, and ``GRPOTrainer`` whose log-probs come from xent.

Usage::

    from xent.integrations.trl import XentGRPOTrainer, XentSFTTrainer

    trainer = XentSFTTrainer(model=model, args=SFTConfig(...), train_dataset=ds,
                             loss=xent.losses.TaiLr(gamma=0.1, threshold=0.3))   # loss=None: cross-entropy
    trainer = XentGRPOTrainer(model=model, reward_funcs=reward, args=GRPOConfig(...), train_dataset=ds)

Both are the TRL trainers of the same names with the LM head computed by xent; every other argument and
behaviour is TRL's. Written for TRL 1.16 (``pip install 'xent[trl]'``), whose trainers call the model with
``fused_lm_head=True`` and read per-token fields of its ``FusedCausalLMOutput``:

- :class:`XentSFTTrainer` computes the training loss with
  :func:`xent.integrations.transformers.patch_causal_lm` (any :class:`xent.losses.TokenLoss`,
  ``num_items_in_batch`` honoured) and TRL's ``entropy`` and ``mean_token_accuracy`` metrics
  from the same fused pass (``return_stats``). A ``compute_loss_func`` or label smoothing set through
  TRL's arguments is left to TRL.
- :class:`XentGRPOTrainer` takes the per-token log-probs and entropies of the policy and the reference
  model from :func:`xent.linear_log_probs`, at the trainer's temperature, in float32 when
  ``cast_lm_head_to_fp32=True``, with the model's logit scale and soft-capping applied. Calls that ask for
  router logits (MoE auxiliary loss) go to TRL's own head.
"""

from __future__ import annotations

import functools

import torch
import transformers
import trl

from .. import linear_log_probs
from ..losses import TokenLoss
from .transformers import is_patched, output_head, patch_causal_lm

__all__ = ["XentGRPOTrainer", "XentSFTTrainer", "patch_log_probs"]


def _unwrapped(model):
    """The transformers model under a PEFT wrapper (TRL patches that one too)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def patch_log_probs(model, *, temperature: float = 1.0, projection_dtype: torch.dtype | None = None,
                    chunk_size: int | str = "auto"):
    """Make ``model(..., labels=labels, fused_lm_head=True)`` return TRL's ``FusedCausalLMOutput`` with
    ``log_probs`` and ``entropy`` from :func:`xent.linear_log_probs`.

    ``log_probs[b, t]`` is log q(labels[b, t + 1]) with q = softmax(cap(s·z) / temperature), z the head's
    logits, s and cap the model's logit scale and soft-capping (``shift_labels``: already shifted, scored
    as given); 0 where the label is −100. ``loss`` is −Σ log_probs divided by ``num_items_in_batch`` (the
    valid labels when it is not passed) and ``label_mask`` marks the valid labels; TRL's other per-token
    fields (``is_top1``, ``mean_logits``, ``log_sum_sq_probs``) are ``None``. Without ``fused_lm_head``,
    or with ``output_router_logits``, the forward installed before runs unchanged (generation included).
    Returns the model.
    """
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    output_head(model)  # fail now: a model without a separate decoder and LM head
    previous = model.forward

    @functools.wraps(previous)
    def forward(*args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                **kwargs):
        if not fused_lm_head or kwargs.get("output_router_logits"):
            if fused_lm_head:
                kwargs["fused_lm_head"] = True
            for name, value in (("labels", labels), ("shift_labels", shift_labels),
                                ("num_items_in_batch", num_items_in_batch)):
                if value is not None:
                    kwargs[name] = value
            return previous(*args, **kwargs)
        from trl.trainer.utils import FusedCausalLMOutput

        head = output_head(model)  # looked up on each call: FSDP and PEFT may replace the head
        kwargs["use_cache"] = False
        hidden = head.decoder(*args, **kwargs)[0]  # [B, T, D]
        if head.hidden_scale != 1.0:
            hidden = hidden * head.hidden_scale  # (s·h) @ Wᵀ = s·(h @ Wᵀ)
        shift = shift_labels is None
        target = (labels if shift else shift_labels).to(hidden.device)
        log_probs, entropy = linear_log_probs(
            hidden, head.weight, target, linear_bias=head.bias, temperature=float(temperature),
            softcap=head.softcap, shift=shift, chunk_size=chunk_size, with_entropy=True,
            projection_dtype=projection_dtype)
        mask = (target[:, 1:] if shift else target) != -100
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-log_probs.sum() / count, log_probs=log_probs, entropy=entropy,
                                   label_mask=mask)

    model.forward = forward  # an instance attribute, as TRL's own head
    return model


class XentSFTTrainer(trl.SFTTrainer):
    """``trl.SFTTrainer`` whose loss is ``loss`` (a :class:`xent.losses.TokenLoss`; ``None``: cross-entropy)
    through xent's fused head. The model is patched with
    :func:`~xent.integrations.transformers.patch_causal_lm` and stays patched after training (``unpatch``)."""

    def __init__(self, *args, loss: TokenLoss | None = None, **kwargs):
        if loss is not None and not isinstance(loss, TokenLoss):
            raise TypeError(f"loss must be a xent.losses.TokenLoss, got {type(loss).__name__}")
        super().__init__(*args, **kwargs)
        # After TRL's own head is installed, so that the labelled call reaches xent first.
        patch_causal_lm(_unwrapped(self.model), loss, return_stats=True)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if (self.compute_loss_func is not None or self.label_smoother is not None or self.aux_loss_enabled
                or not is_patched(_unwrapped(self.model))):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        inputs = {**inputs, "use_cache": False}
        # transformers' Trainer.compute_loss: the model's own loss, num_items_in_batch and the rescaling
        # for averaged tokens across ranks; SFTTrainer's override would call TRL's head instead.
        loss, outputs = transformers.Trainer.compute_loss(
            self, model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        stats = _unwrapped(self.model).xent_stats  # this call's: see patch_causal_lm
        gather = self.accelerator.gather_for_metrics
        tokens = gather(stats.tokens.to(loss.device)).sum()
        entropy = gather(stats.entropy_sum.to(loss.device)).sum()
        correct = gather(stats.correct.to(loss.device)).sum()
        valid = tokens.item() > 0
        self._metrics[mode]["entropy"].append((entropy / tokens).item() if valid else 0.0)
        self._metrics[mode]["mean_token_accuracy"].append((correct / tokens).item() if valid else 0.0)
        if mode == "train" and "attention_mask" in inputs:
            self._total_train_tokens += gather(inputs["attention_mask"].sum()).sum().item()
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        return (loss, outputs) if return_outputs else loss


class XentGRPOTrainer(trl.GRPOTrainer):
    """``trl.GRPOTrainer`` whose per-token log-probs and entropies (policy and reference model) come from
    :func:`xent.linear_log_probs` (see :func:`patch_log_probs`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        dtype = torch.float32 if self.args.cast_lm_head_to_fp32 else None
        patch_log_probs(_unwrapped(self.model), temperature=self.temperature, projection_dtype=dtype)
        if self.ref_model is not None:
            patch_log_probs(self.ref_model, temperature=self.temperature, projection_dtype=dtype)
