"""float64 references of the Triton kernels' rows, written differently from them: the loop-by-token
reference of tests/reference.py for the losses, autograd through torch's own cross-entropy for the
gradients."""

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
