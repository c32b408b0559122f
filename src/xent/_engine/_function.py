"""The autograd Function of the fused head: the forward runs the chunk loop (with the gradients already,
for a scalar reduction), the backward rescales them or recomputes each chunk with the upstream
gradients."""

from __future__ import annotations

from dataclasses import replace

import torch

from ..losses._base import check_first_order
from ._loop import run
from ._plan import Plan


class LinearLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden2d, weight, bias, plan: Plan, out_shape, positions, denom, precompute):
        # denom: None for reduction="none", else the scalar Σℓ is divided by (1 for "sum").
        # precompute: gradients are wanted and the reduction is a scalar, so the forward computes them
        # with scale 1/denom and backward only rescales.
        ctx.plan, ctx.positions, ctx.denom, ctx.out_shape = plan, positions, denom, tuple(out_shape)
        ctx.need = (hidden2d.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
        ctx.dtypes = (hidden2d.dtype, weight.dtype, None if bias is None else bias.dtype)
        if precompute:
            scale = (1.0 / denom).to(plan.compute_dtype).expand(plan.rows.numel())
            per_token, *ctx.grads = run(plan, hidden2d, weight, bias, scale, ctx.need)
        else:
            per_token = run(plan, hidden2d, weight, bias, None, ctx.need)[0]
            ctx.grads = None
        ctx.save_for_backward(hidden2d, weight, bias)  # references only: to recompute if needed
        if denom is not None:
            return per_token.sum() / denom
        value_shape = tuple(per_token.shape[1:])  # (K,) for a loss with K values per token, else ()
        out = torch.zeros((*out_shape, *value_shape), dtype=per_token.dtype, device=per_token.device)
        out.view(-1, *value_shape)[positions] = per_token
        return out

    @staticmethod
    def backward(ctx, grad_out):
        check_first_order("the fused path (xent.linear_loss)")
        if ctx.grads is not None:
            # Rescale in place (no second float32 [V, D] copy) and drop the reference so the stored
            # gradients are freed as soon as autograd has accumulated them. A second backward
            # (retain_graph) takes the recompute path below.
            grads, ctx.grads = ctx.grads, None
            grads = [None if g is None else g.mul_(grad_out.to(g.dtype)) for g in grads]
        else:  # recompute each chunk with the upstream gradients
            hidden2d, weight, bias = ctx.saved_tensors
            if ctx.denom is not None:  # a scalar reduction (not "none" of a 0-d target): grad_out / denom
                scale = grad_out.expand(ctx.plan.rows.numel()) / ctx.denom
            else:
                scale = grad_out.reshape(-1, *grad_out.shape[len(ctx.out_shape):])[ctx.positions]
            plan = replace(ctx.plan, stats=None)  # the forward has filled them
            grads = run(plan, hidden2d, weight, bias, scale.to(plan.compute_dtype), ctx.need)[1:]
        grads = [None if g is None else g.to(dt) for g, dt in zip(grads, ctx.dtypes)]
        return (*grads, None, None, None, None, None)
