"""Multi-token prediction (Gloeckle et al. 2024, arXiv 2404.19737; DeepSeek-V3, arXiv 2412.19437): K hidden
streams share one output head; stream k (k = 1..K) at position t predicts token t + k.

    L = Σ_k λ_k · mean_t ℓ_k(t),   each stream averaged over its own valid targets (or its num_items)

The fused version stacks the K streams as rows of one call of the fused engine, with per-token weights
λ_k / (stream k's denominator) and a sum: the head is read once per chunk of rows whatever stream they
come from, and each stream costs what one fused loss on its tokens costs (no extra pass, no [K·N, V]).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from . import _validate as V
from ._compile import compiler_disable
from ._linear import RENAMED, fused_call, fused_loss
from ._reduce import apply_token_loss, denominator_weight, mean_denominator
from .losses._base import TokenLoss
from .losses._cross_entropy import CrossEntropy

#: DeepSeek-V3's MTP weight λ (0.3 for the first 10T tokens, then 0.1), shared by the K − 1 extra streams.
DEEPSEEK_V3_LAMBDA = 0.3


def stream_lambdas(num_streams: int, weights) -> list[float]:
    """λ_1..λ_K: given, or DeepSeek-V3's 1 for the next-token stream and λ/(K−1) for each of the K − 1
    extra streams (its D = K − 1 MTP modules), λ = 0.3."""
    if weights is None:
        extra = num_streams - 1
        return [1.0] + [DEEPSEEK_V3_LAMBDA / extra] * extra if extra else [1.0]
    if isinstance(weights, torch.Tensor):
        weights = weights.tolist()
    if not isinstance(weights, (list, tuple)) or len(weights) != num_streams:
        raise ValueError(f"stream_weights must be a sequence of K = {num_streams} numbers, got {weights!r}")
    return [V.check_number("stream_weights", w) for w in weights]


def stream_num_items(num_items, num_streams: int):
    """num_items per stream: None, or K counts (a sequence or a 1-D tensor)."""
    if num_items is None:
        return [None] * num_streams
    if isinstance(num_items, torch.Tensor):
        num_items = list(num_items.reshape(-1)) if num_items.dim() == 1 else [num_items]
    if not isinstance(num_items, (list, tuple)) or len(num_items) != num_streams:
        raise ValueError(f"num_items must hold one count per stream (K = {num_streams}), got {num_items!r}")
    return list(num_items)


def stream_targets(labels: torch.Tensor, num_streams: int, ignore_index: int) -> torch.Tensor:
    """[K, ..., T]: entry (k−1, ..., t) is labels[..., t + k], ignore_index where t + k ≥ T."""
    out = torch.full((num_streams, *labels.shape), ignore_index, dtype=labels.dtype, device=labels.device)
    T = labels.shape[-1]
    for k in range(1, num_streams + 1):
        if k < T:
            out[k - 1, ..., : T - k] = labels[..., k:]
    return out


def stack_streams(streams, name: str):
    """K streams given as a list or tuple, stacked into [K, ...] after checking them one by one (an empty
    list, a non-tensor or streams of different shapes, dtypes or devices name the argument, instead of
    failing inside torch.stack); a tensor is returned as it is."""
    if not isinstance(streams, (list, tuple)):
        return streams
    if not streams:
        raise ValueError(f"{name} is an empty {type(streams).__name__}: multi-token prediction needs K >= 1 "
                         "streams")
    first = streams[0]
    for i, s in enumerate(streams):
        if not isinstance(s, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(s).__name__}")
        for what, a, b in (("shape", tuple(s.shape), tuple(first.shape)), ("dtype", s.dtype, first.dtype),
                           ("device", s.device, first.device)):
            if a != b:
                raise ValueError(f"{name}[{i}] has {what} {a} but {name}[0] has {what} {b}: every stream "
                                 f"must have the same {what}")
    return torch.stack(list(streams))


def _check(loss, num_streams, labels, token_weights):
    if not isinstance(loss, TokenLoss):
        raise TypeError(f"loss must be a xent.losses.TokenLoss, got {type(loss).__name__}")
    if loss.num_extra or loss.num_outputs != 1 or getattr(loss, "selects_tokens", False):
        raise TypeError(f"loss {type(loss).__name__} cannot be a multi-token loss (extra inputs, several "
                        "values per token or a selection over the call)")
    if num_streams < 1:
        raise ValueError(f"multi-token prediction needs K >= 1 streams, got {num_streams}")
    if not isinstance(labels, torch.Tensor) or labels.dim() < 1:
        raise TypeError("labels must be an integer tensor [..., T]")
    V.check_token_weights(token_weights, labels.shape, like="labels shape")


def multi_token_loss(
    logits,
    labels: torch.Tensor,
    *,
    stream_weights=None,
    loss: TokenLoss | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items=None,
    token_weights: torch.Tensor | None = None,
    **deprecated,
) -> torch.Tensor:
    r"""Multi-token prediction loss of K streams' logits against one label sequence.

    ``logits``: ``[K, ..., T, V]`` or a list of K ``[..., T, V]``; stream k (1-based) at position t
    predicts ``labels[..., t + k]``. ``stream_weights`` λ_1..λ_K (default: 1 and DeepSeek-V3's
    0.3/(K−1) for each further stream; Gloeckle et al. weigh every stream 1; the old spelling
    ``weights=`` works with a DeprecationWarning). ``loss`` the per-token loss of every
    stream (default cross-entropy). ``"mean"``: Σ_k λ_k · (Σ_t ℓ_k / stream k's own denominator: its count
    of valid targets, Σ w_t with ``token_weights``, or ``num_items[k]``: K counts, e.g.
    ``(labels[..., k:] != -100).sum()`` over the step). ``"sum"``: Σ_k λ_k Σ_t ℓ_k. ``"none"``: the
    unweighted per-token losses ``[K, ..., T]``, 0 where a stream has no target. ``token_weights``
    ``[..., T]`` weigh the labels: stream k's prediction of label t + k gets w_{t+k}. Losses with class
    weights are refused under "mean" (their denominator is per stream).
    """
    stream_weights = V.take_deprecated("multi_token_loss", deprecated, RENAMED,
                                       {"stream_weights": stream_weights})["stream_weights"]
    loss = CrossEntropy() if loss is None else loss
    logits = stack_streams(logits, "logits")
    V.check_logits(logits)
    num_streams = logits.shape[0]
    _check(loss, num_streams, labels, token_weights)
    V.check_reduction(reduction)
    if tuple(logits.shape[1:-1]) != tuple(labels.shape):
        raise ValueError(f"logits shape {tuple(logits.shape)} must be [K, *labels.shape, V] with labels "
                         f"shape {tuple(labels.shape)}")
    lam, counts = _stream_options(loss, num_streams, stream_weights, num_items, reduction, labels)
    loss.check(logits.shape[-1])
    T = labels.shape[-1]
    parts = []
    for k in range(1, num_streams + 1):
        z, y = logits[k - 1, ..., : max(T - k, 0), :], labels[..., k:]
        V.check_target(y, z.shape[:-1], z.shape[-1], ignore_index)
        tw = None if token_weights is None else token_weights[..., k:]
        out = apply_token_loss(loss, z, y, ignore_index=ignore_index, reduction=reduction,
                               num_items=counts[k - 1], token_weights=tw)
        if reduction == "none":
            out = torch.cat([out, out.new_zeros((*out.shape[:-1], T - out.shape[-1]))], dim=-1)
            parts.append(out)
        else:
            parts.append(lam[k - 1] * out)
    return torch.stack(parts) if reduction == "none" else sum(parts)


def _stream_options(loss, num_streams, weights, num_items, reduction, labels):
    """(λ_k, num_items_k) of the K streams, checked; class-weighted losses refused under "mean"."""
    lam = stream_lambdas(num_streams, weights)
    counts = stream_num_items(num_items, num_streams)
    for c in counts:
        V.check_num_items(c, reduction)
    _refuse_class_weights(loss, reduction, labels)
    return lam, counts


def _refuse_class_weights(loss, reduction, labels):
    if reduction == "mean" and loss.token_weight(torch.zeros(1, dtype=torch.long, device=labels.device)) \
            is not None:
        raise ValueError(f"{type(loss).__name__} has class weights: multi-token prediction takes losses "
                         "without them under reduction='mean'")


@compiler_disable
def linear_multi_token_loss(
    hiddens,
    linear_weight: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    *,
    stream_weights=None,
    loss: TokenLoss | None = None,
    linear_bias: torch.Tensor | None = None,
    chunk_size: int | str = "auto",
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items=None,
    token_weights: torch.Tensor | None = None,
    projection_dtype: torch.dtype | None = None,
    backend: str = "auto",
    **deprecated,
) -> torch.Tensor:
    """:func:`xent.multi_token_loss` of ``hiddens[k] @ linear_weight.T + linear_bias`` (one shared head)
    without the logits: ``hiddens`` ``[K, ..., T, D]`` (no copy) or a list of K ``[..., T, D]``
    (stacked: one copy of the hidden states). One call of the fused engine on all K streams' rows (module
    docstring): the head is read once per chunk, each stream's tokens cost what fused cross-entropy on
    them costs. Arguments as
    :func:`xent.multi_token_loss` and :func:`xent.linear_loss` (old spellings ``weights=`` and ``bias=``
    deprecated).
    """
    V.head_weight("linear_multi_token_loss", linear_weight, deprecated.pop("weight", None),
                  class_weights=False)
    given = V.take_deprecated("linear_multi_token_loss", deprecated, RENAMED,
                              {"stream_weights": stream_weights, "linear_bias": linear_bias})
    stream_weights, linear_bias = given["stream_weights"], given["linear_bias"]
    loss = CrossEntropy() if loss is None else loss
    hiddens = stack_streams(hiddens, "hiddens")
    V.check_floating("hiddens", hiddens)
    if hiddens.dim() < 3:
        raise ValueError(f"hiddens must have shape [K, ..., T, D], got shape {tuple(hiddens.shape)}")
    num_streams = hiddens.shape[0]
    _check(loss, num_streams, labels, token_weights)
    V.check_reduction(reduction)
    if tuple(hiddens.shape[1:-1]) != tuple(labels.shape):
        raise ValueError(f"hiddens shape {tuple(hiddens.shape)} must be [K, *labels.shape, D] with labels "
                         f"shape {tuple(labels.shape)}")
    lam, counts = _stream_options(loss, num_streams, stream_weights, num_items, reduction, labels)
    target = stream_targets(labels, num_streams, ignore_index)  # [K, ..., T]
    dtype = torch.float64 if hiddens.dtype == torch.float64 else torch.float32
    base = torch.ones(labels.shape, dtype=dtype, device=labels.device) if token_weights is None else \
        token_weights.to(dtype)
    tw = stream_targets(base, num_streams, 0.0)  # w_{t+k} at (k−1, t); 0 where there is no target
    call = fused_call(hiddens, linear_weight, target, linear_bias=linear_bias, chunk_size=chunk_size,
                      ignore_index=ignore_index, reduction="none", token_weights=tw,
                      projection_dtype=projection_dtype, backend=backend)
    loss.check(linear_weight.shape[0])
    if reduction == "none":
        return fused_loss(call, loss)
    scale = []
    for k in range(num_streams):
        factor = torch.tensor(lam[k], dtype=dtype, device=labels.device)
        if reduction == "mean":
            valid = (target[k] != ignore_index) & (tw[k] != 0)
            V.check_num_items_covers(counts[k], valid.sum())
            factor = factor / mean_denominator(valid, counts[k], denominator_weight(None, tw[k]), dtype)
        scale.append(factor)
    combined = tw * torch.stack(scale).view(-1, *(1,) * labels.dim())
    return fused_loss(replace(call, reduction="sum", token_weights=combined), loss)
