"""Rho-1 selective language modelling (Lin et al. 2024, arXiv 2404.07965): train only on the tokens whose
excess loss CE_θ − CE_ref is in the top fraction of the call's valid tokens.

The selection needs every token's loss before any gradient, so the fused path runs twice: a forward
pass without gradient (one matmul per chunk, plus one for a reference head) gives every token's CE,
the selection (:func:`xent._reduce.select_top_fraction`) becomes 0/1 token weights, and the gradient pass
runs the ordinary fused cross-entropy with them, which drops the unselected tokens before the
projection. Cost: 1 + 3·ratio matmuls per token against fused cross-entropy's 3 (0.93× at ratio 0.6 with
the reference losses given; one matmul more per token with a reference head).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from . import _validate as V
from ._compile import compiler_disable
from ._engine import check_head
from ._linear import RENAMED, fused_call, fused_loss
from ._reduce import select_top_fraction
from .losses._rho1 import DEFAULT_RATIO, Excess, Rho1, check_ref_losses


@compiler_disable
def linear_rho1_loss(
    hidden: torch.Tensor,
    linear_weight: torch.Tensor | None = None,
    target: torch.Tensor | None = None,
    *,
    ref_losses: torch.Tensor | None = None,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    ratio: float = DEFAULT_RATIO,
    softcap: float | None = None,
    linear_bias: torch.Tensor | None = None,
    shift: bool = False,
    chunk_size: int | str = "auto",
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items=None,
    token_weights: torch.Tensor | None = None,
    projection_dtype: torch.dtype | None = None,
    backend: str = "auto",
    **deprecated,
) -> torch.Tensor:
    """:func:`xent.rho1_loss` of ``hidden @ linear_weight.T + linear_bias`` without the logits, in two
    passes (module docstring): a forward pass without gradient for every token's CE, the selection, then
    the fused cross-entropy on the selected tokens only.

    The reference comes as ``ref_losses`` (per-token CE shaped like ``target``, shifted like it), or as a
    reference head ``ref_hidden`` ``[..., D_r]`` (positions as ``hidden``), ``ref_weight`` ``[V, D_r]``,
    ``ref_bias``: then the first pass projects both heads per chunk (the reference without gradient, as
    :func:`xent.linear_distill_loss` projects a teacher), soft-capped alike. Other arguments as
    :func:`xent.linear_cross_entropy` (``bias=`` is the old spelling of ``linear_bias``).
    """
    V.head_weight("linear_rho1_loss", linear_weight, deprecated.pop("weight", None), class_weights=False)
    given = V.take_deprecated("linear_rho1_loss", deprecated, RENAMED, {"linear_bias": linear_bias})
    loss = Rho1(ratio=ratio, softcap=softcap)
    call = fused_call(hidden, linear_weight, target, linear_bias=given["linear_bias"], shift=shift,
                      chunk_size=chunk_size, ignore_index=ignore_index, reduction=reduction,
                      num_items=num_items, token_weights=token_weights, projection_dtype=projection_dtype,
                      backend=backend)
    if (ref_losses is None) == (ref_weight is None) or (ref_weight is None) != (ref_hidden is None):
        raise ValueError("give the reference as ref_losses, or as ref_hidden and ref_weight (not both)")
    heads = ()
    if ref_weight is not None:
        check_head(ref_hidden, ref_weight, ref_bias, shift, "ref_hidden", "ref_weight", "ref_bias")
        if ref_hidden.shape[:-1] != hidden.shape[:-1] or ref_weight.shape[0] != linear_weight.shape[0]:
            raise ValueError(f"ref_hidden shape {tuple(ref_hidden.shape)} / ref_weight shape "
                             f"{tuple(ref_weight.shape)} must match hidden {tuple(hidden.shape)} on every "
                             f"dimension but the last and linear_weight's vocabulary size "
                             f"{linear_weight.shape[0]}")
        heads = ((ref_hidden, ref_weight, ref_bias),)
    else:
        check_ref_losses(ref_losses, target, ignore_index, shift)
    tgt = target[..., 1:] if shift else target
    tw = None if token_weights is None else (token_weights[..., 1:] if shift else token_weights)
    # pass 1 scores every valid token, unweighted (weight-0 tokens are skipped as in every pass)
    keep = None if token_weights is None else (token_weights != 0).to(token_weights.dtype)
    scoring = replace(call, reduction="none", num_items=None, token_weights=keep)
    with torch.no_grad():  # one matmul per head and chunk
        if heads:
            excess = fused_loss(scoring, Excess(softcap=softcap), extra_heads=heads)
        else:
            own = fused_loss(scoring, loss.as_cross_entropy())
            ref = ref_losses[..., 1:] if shift else ref_losses
            excess = own - ref.detach().to(own.dtype)
    valid = tgt != ignore_index
    if tw is not None:
        valid = valid & (tw != 0)
    selected = select_top_fraction(excess, valid, loss.ratio)
    weights = selected.to(excess.dtype) if tw is None else torch.where(selected, tw, 0.0).to(excess.dtype)
    if shift:  # token_weights are shaped like target (the first position's weight is unused)
        weights = torch.cat([torch.zeros_like(weights[..., :1]), weights], dim=-1)
    return fused_loss(replace(call, token_weights=weights), loss.as_cross_entropy())
