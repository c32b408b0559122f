"""Row selection: the rows of a call that have a valid target (ignored and weight-0 tokens are dropped
before the projection), and the checks of a head's shapes and dtypes."""

from __future__ import annotations

from .. import _validate as V


def check_head(hidden, weight, bias, shift, name="hidden", weight_name="weight", bias_name="bias"):
    """hidden [..., D], weight [V, D] and bias [V] agree in shape and dtype (the target is checked apart:
    with a sharded head its ids range over the global vocabulary, not weight.shape[0])."""
    V.check_floating(name, hidden)
    V.check_floating(weight_name, weight)
    if hidden.dim() < 1:
        raise ValueError(f"{name} must have shape [..., D], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{weight_name} must have shape [V, D] with D = {name}.shape[-1] = {hidden.shape[-1]}, "
            f"got shape {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{weight_name} dtype {weight.dtype} must equal {name} dtype {hidden.dtype}")
    if bias is not None:
        V.check_floating(bias_name, bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(
                f"{bias_name} must have shape [V] = [{weight.shape[0]}], got shape {tuple(bias.shape)}"
            )
    if shift and hidden.dim() < 2:
        raise ValueError(f"shift=True needs {name} of shape [..., T, D], got shape {tuple(hidden.shape)}")


def valid_rows(hidden, target, ignore_index, shift, token_weights=None):
    """Rows of hidden.reshape(-1, D) with a valid target, their targets, their flat positions in the
    (shifted) target and their token weights ([n], or None without token_weights, which are shaped like
    target and shifted like it). A token whose weight is 0 is not valid, like an ignored one. With shift,
    hidden[..., t, :] predicts target[..., t+1]: no copy of hidden."""
    T = hidden.shape[-2] if shift else 1
    tgt = target[..., 1:] if shift else target
    flat = V.as_ids(tgt.reshape(-1))
    keep = flat != ignore_index
    weights = None
    if token_weights is not None:
        weights = (token_weights[..., 1:] if shift else token_weights).reshape(-1)
        keep = keep & (weights != 0)
    positions = keep.nonzero().squeeze(-1)
    rows = positions + positions // (T - 1) if shift and T > 1 else positions
    if weights is not None:
        weights = weights[positions]
    return rows, flat[positions], positions, tuple(tgt.shape), weights
