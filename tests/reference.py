"""Independent float64 references, written differently from xent: explicit loops over tokens, explicit
softmax, one-hot sums. Slow on purpose; use small shapes."""

from __future__ import annotations

import torch

# docs/REFERENCE.md §2
X = [[2.0, 1.0, 0.1], [0.5, 2.5, 0.3], [1.5, 0.5, 2.0]]
Y = [0, -100, 2]


def ref_cross_entropy(
    logits,
    target,
    *,
    ignore_index=-100,
    reduction="mean",
    weight=None,
    label_smoothing=0.0,
    z_loss=0.0,
    softcap=None,
    num_items=None,
):
    """REFERENCE.md §1 token by token in float64; returns float64. Under "mean" the class-weighted part is
    divided by Σ_valid w_y whatever its sign (as torch) and the z-loss part by the count of valid tokens;
    num_items divides both; nothing valid (or num_items = 0) gives 0."""
    V = logits.shape[-1]
    x = logits.detach().to(torch.float64).reshape(-1, V)
    t = target.reshape(-1).tolist()
    w = torch.ones(V, dtype=torch.float64) if weight is None else weight.detach().to(torch.float64)
    per_token, z_terms, denom = [], [], 0.0
    for i, y in enumerate(t):
        if y == ignore_index:
            per_token.append(0.0)
            continue
        row = x[i]
        if softcap is not None:
            row = softcap * torch.tanh(row / softcap)
        m = row.max()
        e = torch.exp(row - m)
        q = e / e.sum()
        logq = torch.log(q)
        onehot = torch.zeros(V, dtype=torch.float64)
        onehot[y] = 1.0
        nll = -(w * onehot * logq).sum()
        smooth = -(w * logq).sum()
        lse = m + torch.log(e.sum())
        z_term = z_loss * lse**2
        loss = (1 - label_smoothing) * nll + label_smoothing / V * smooth + z_term
        per_token.append(loss.item())
        z_terms.append(z_term.item())
        denom += w[y].item()
    out = torch.tensor(per_token, dtype=torch.float64)
    if reduction == "none":
        return out.reshape(target.shape)
    if reduction == "sum":
        return out.sum()
    zero = torch.tensor(0.0, dtype=torch.float64)
    if num_items is not None:
        return out.sum() / float(num_items) if float(num_items) else zero
    if not z_terms:
        return zero
    z_sum = sum(z_terms)
    return (out.sum() - z_sum) / denom + z_sum / len(z_terms)


def ref_causal(logits, labels, *, ignore_index=-100, position_ids=None, **kw):
    """Shift by hand: position t predicts labels[t+1]; a label starting a packed document is ignored."""
    B, T, _ = logits.shape
    tgt = torch.full((B, T - 1), ignore_index, dtype=torch.long)
    for b in range(B):
        for t in range(T - 1):
            starts_doc = position_ids is not None and int(position_ids[b, t + 1]) == 0
            if not starts_doc:
                tgt[b, t] = labels[b, t + 1]
    return ref_cross_entropy(logits[:, :-1], tgt, ignore_index=ignore_index, **kw)


def close(a, b, rtol=1e-6, atol=1e-7) -> bool:
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    return bool(torch.allclose(a, b, rtol=rtol, atol=atol))



def assert_closed_form_grad(loss, z, y, scale, *, value_rtol):
    """A loss's closed-form ``value_and_grad`` (given a copy: it may overwrite its logits) equals autograd
    through the loss's own per-token definition, with ``scale`` as the upstream gradient."""
    zz = z.clone().requires_grad_()
    expected = loss(zz, y)
    (grad_ref,) = torch.autograd.grad(expected, zz, scale)
    value, grad = loss.value_and_grad(z.clone(), y, scale)
    torch.testing.assert_close(value, expected.detach(), atol=1e-13, rtol=value_rtol)
    torch.testing.assert_close(grad, grad_ref, atol=1e-13, rtol=1e-10)
