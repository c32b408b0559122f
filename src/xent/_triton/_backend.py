"""The engine's ``"triton"`` row backend (:class:`xent._engine.RowBackend`): cross-entropy chunks through
the Triton row kernel (:func:`xent._triton.ce_rows_`).

It serves exactly cross-entropy (the loss's :class:`~xent.losses._base.CrossEntropyRows` spec: class
weights, label smoothing, z-loss, soft-cap) with float32 losses on float32, bf16 or float16 chunks, the
training statistics, and the bias gradient (one torch reduction over the chunk's gradient after the
kernel). A pass without gradient (evaluation, ``torch.no_grad()``, the forward of ``reduction="none"``)
runs whole through the fused forward (:func:`xent._triton.fused_ce_forward`), and a pass with gradients
through it and the fused backward (:func:`xent._triton.fused_ce_backward`) unless
:attr:`TritonRows.fused_backward` is False: the projection inside the kernels, no ``[C, V]`` logits
written. CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1`` (the tests force it with
``backend="triton"``; "auto" never picks it for a CPU call). Importing this module imports nothing of
triton: the kernel module is loaded at the first chunk.
"""

from __future__ import annotations

import torch

from .._engine import RowBackend, RowRequest
from ..losses._base import CrossEntropyRows
from . import available, ce_rows_, fused_ce_backward, fused_ce_forward

_LOGITS = (torch.float32, torch.bfloat16, torch.float16)


class TritonRows(RowBackend):
    """Cross-entropy rows by the Triton row kernel; see the module docstring for what it serves."""

    name = "triton"

    def can_serve(self, request: RowRequest) -> str | None:
        spec = request.spec
        if not isinstance(spec, CrossEntropyRows):
            return f"the Triton kernel computes cross-entropy only, not {type(request.loss).__name__}"
        ok, why = available(request.device)
        if not ok:
            return why
        if request.compute_dtype != torch.float32 or request.logits_dtype not in _LOGITS:
            return (f"the Triton kernel takes float32, bfloat16 or float16 logits with float32 losses, not "
                    f"{request.logits_dtype} logits with {request.compute_dtype} losses")
        if request.extra_heads or request.token_extras or request.num_outputs != 1:
            return "the Triton kernel computes one cross-entropy per token, without extra heads"
        return None

    def scratch(self, request, max_rows, num_classes):
        # the z-loss coefficient as a number, read once per call: under a class-weighted mean it is a 0-d
        # tensor on the device, and reading it per chunk would synchronise per chunk
        return float(request.spec.z_coef)

    def rows_(self, request, z, target, scale, *, w_y=None, stats=None, extra=(), grad_bias=None,
              bias_alpha=1.0, scratch=None):
        spec = request.spec
        z_coef = float(spec.z_coef) if scratch is None else scratch
        loss = ce_rows_(z, target, scale, w_y, z_coef, stats, softcap=spec.softcap,
                        label_smoothing=spec.label_smoothing, class_weight=spec.class_weight)
        if grad_bias is not None and scale is not None:  # z now holds the chunk's gradient
            grad_bias.add_(z.sum(dim=0, dtype=grad_bias.dtype), alpha=bias_alpha)
        return loss

    #: Passes with gradients through the fused backward (True: no [C, V] chunk is formed, the logits are
    #: recomputed tile by tile, five matmuls in all) or chunk by chunk through cuBLAS and the row kernel
    #: (False: a [C, V] chunk, three matmuls). Both agree with float64 to float32 rounding on float32
    #: inputs; on half inputs the chunk loop rounds the chunk's logits and gradient to the half dtype, as the
    #: torch backend does, the fused kernels neither. Which is faster on a GPU is not known until
    #: benchmarks/gpu_check.sh has timed both. Passes without gradient always run the fused forward.
    fused_backward = True

    def fuses(self, request):
        return not request.grad or self.fused_backward

    def fused_pass(self, request, hidden, weight, bias, target, scale, need, *, w_y=None, stats=None,
                   scratch=None):
        # the fused forward (projection and online log-sum-exp in one kernel), then with gradients the
        # fused backward on its log-sum-exp: no logits written
        spec = request.spec
        z_coef = float(spec.z_coef) if scratch is None else scratch
        hidden, weight = (t if t.stride(1) == 1 else t.contiguous() for t in (hidden, weight))
        kw = dict(bias=None if bias is None else bias.contiguous(), softcap=spec.softcap,
                  label_smoothing=spec.label_smoothing, class_weight=spec.class_weight)
        if scale is not None and stats is None:
            stats = torch.empty((hidden.shape[0], 3), dtype=torch.float32, device=hidden.device)
        losses = fused_ce_forward(hidden, weight, target, w_y, z_coef, stats, **kw)
        if scale is None:
            return losses, None, None, None
        return (losses, *fused_ce_backward(hidden, weight, target, stats[:, 2], scale, w_y, z_coef,
                                           need=need, **kw))


#: What the engine's backend table takes (``xent._engine._backends.OPTIONAL`` names this module).
BACKEND = TritonRows()
