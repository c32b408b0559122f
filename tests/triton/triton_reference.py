"""float64 references of the Triton kernels' rows, written differently from them: the loop-by-token
reference of tests/reference.py for the losses, autograd through torch's own cross-entropy for the
gradients; and :func:`ref_loss`, a fused call's reduced loss from float64 logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from reference import ref_cross_entropy


def ref_rows(z, y, scale, *, weight=None, z_coef=0.0, softcap=None, eps=0.0, loop=True):
    """float64 losses [C] (the loop-by-token reference; torch's with ``loop`` False: the loop's one-hot sum
    makes a −inf logit NaN) and gradients scale·dℓ/dz [C, V] (autograd through torch's cross-entropy) of
    the logits as given (half inputs upcast exactly)."""
    x = z.detach().to(torch.float64).requires_grad_(scale is not None)
    w = None if weight is None else weight.to(torch.float64)
    loss = ref_cross_entropy(x, y, reduction="none", weight=w, label_smoothing=eps, z_loss=z_coef,
                             softcap=softcap)
    capped = x if softcap is None else softcap * torch.tanh(x / softcap)
    lse = capped.logsumexp(-1)
    per = F.cross_entropy(capped, y, weight=w, label_smoothing=eps, reduction="none") + z_coef * lse**2
    if loop:
        torch.testing.assert_close(per.detach(), loss, rtol=1e-12, atol=1e-12)  # the two references agree
    if scale is None:
        return per.detach(), None
    (grad,) = torch.autograd.grad(per, x, scale.to(torch.float64))
    return per.detach(), grad


def ref_loss(logits, y, *, reduction, cw=None, eps=0.0, z=0.0, cap=None, tw=None):
    """float64, differentiable: REFERENCE.md §1 with torch's cross-entropy per token, written out."""
    valid = y != -100
    yy = y.clamp(min=0)
    x = logits if cap is None else cap * torch.tanh(logits / cap)
    per = F.cross_entropy(x.flatten(0, -2), yy.flatten(), weight=cw, label_smoothing=eps, reduction="none")
    per = per.view(y.shape)
    lse = x.logsumexp(-1)
    zt = z * lse**2
    t = torch.ones_like(per) if tw is None else tw.to(per.dtype)
    per, zt, t = per * valid, zt * valid, t * valid
    wy = torch.ones_like(per) if cw is None else cw[yy] * valid
    if reduction == "none":
        return (per + zt) * t
    if reduction == "sum":
        return ((per + zt) * t).sum()
    if not valid.any():
        return logits.sum() * 0.0
    return (per * t).sum() / (wy * t).sum() + (zt * t).sum() / t.sum()
