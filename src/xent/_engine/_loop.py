"""The chunk loop: one pass over a call's chunks of valid rows, forming each chunk's logits, handing them
to a row backend (:mod:`xent._engine._backends`) and running the gradient matmuls on what it leaves."""

from __future__ import annotations

import torch

from . import _backends
from ._backends import RowRequest, select
from ._plan import Plan, float_out_mm
from ._project import as_dtype, chunk_buffer, project


def row_request(plan: Plan, device: torch.device, grad: bool, bias_grad: bool) -> RowRequest:
    """What a pass of ``plan`` asks of a row backend (gradients wanted or not, a bias gradient or not)."""
    loss = plan.loss
    return RowRequest(loss, loss.row_spec(), plan.mm_dtype or plan.compute_dtype, plan.compute_dtype, device,
                      grad=grad, stats=plan.stats is not None, bias_grad=bias_grad,
                      extra_heads=len(plan.extras), token_extras=len(plan.token_extras),
                      num_outputs=loss.num_outputs)


def run(plan: Plan, hidden2d, weight, bias, scale, need):
    """One pass over the chunks. ``scale`` [n] is each token's upstream gradient, None for no gradient.

    need = (grad hidden?, grad weight?, grad bias?). Returns (per-token losses [n], grads...). A loss
    with K = ``loss.num_outputs`` > 1 values per token (log-probs with their entropy) gives [n, K]
    values and takes a [n, K] ``scale``; nothing else changes.

    Per-token weights (``plan.weights``) are applied here and nowhere else: the losses come back as
    w_t·ℓ_t and each token's upstream gradient is w_t·scale_t, so no loss or backend knows of them.

    Per chunk: project to a [C, V] buffer in the matmul dtype; the row backend turns it into the losses
    and (with ``scale``) the gradient in the same buffer; then the two gradient matmuls read it. The
    weight and bias gradients are accumulated over chunks in the compute dtype.
    """
    dt = plan.compute_dtype
    mt = plan.mm_dtype or dt
    value_shape = () if plan.loss.num_outputs == 1 else (plan.loss.num_outputs,)
    weights = None if plan.weights is None else plan.weights.view(-1, *(1,) * len(value_shape))
    if scale is not None and weights is not None:
        scale = scale * weights  # d(Σ w_t·ℓ_t)/dℓ_t: the weight joins the upstream gradient
    w = as_dtype(weight, mt)  # a float32 copy once for float16 on CPU; the same tensor otherwise
    b = as_dtype(bias, mt)
    extras = [(h2, as_dtype(w2, mt), as_dtype(b2, mt)) for h2, w2, b2 in plan.extras]
    n, num_classes = plan.rows.numel(), weight.shape[0]
    # Every row valid (no ignored token, no shift): chunks are slices, no gather/scatter of rows.
    dense = n == hidden2d.shape[0]
    dev = hidden2d.device
    per_token = torch.empty((n, *value_shape), dtype=dt, device=dev)
    want = scale is not None
    grad_h = grad_w = grad_b = None
    if want and need[0]:
        grad_h = (torch.empty_like if dense else torch.zeros_like)(hidden2d)
    if want and need[1] and n == 0:
        grad_w = torch.zeros(weight.shape, dtype=dt, device=weight.device)
    if want and need[2]:
        grad_b = torch.zeros(num_classes, dtype=dt, device=weight.device)
    stats = plan.stats  # [n, 3] or None: the training statistics, filled chunk by chunk
    request = row_request(plan, dev, want, grad_b is not None)
    backend = select(request, plan.backend)
    class_weight = getattr(request.spec, "class_weight", None)  # a spec with class weights (cross-entropy's)
    w_y = None
    if class_weight is not None:  # w_y per row, for a backend's closed form
        w_y = class_weight.to(plan.target.device)[plan.target]
    c_max = min(plan.chunk, n)
    scratch = backend.scratch(request, c_max, num_classes)
    if backend.fuses(request):  # the projection inside the backend: no [C, V] logits
        h_all = (hidden2d if dense else hidden2d.index_select(0, plan.rows)).to(mt)
        per_token, gh, gw, gb = backend.fused_pass(request, h_all, w, b, plan.target, scale,
                                                   tuple(want and bool(x) for x in need), w_y=w_y,
                                                   stats=stats, scratch=scratch)
        if gh is not None and dense:
            grad_h.copy_(gh)
        elif gh is not None:  # the rows of ignored tokens stay 0
            grad_h.index_copy_(0, plan.rows, gh.to(grad_h.dtype))
        return finish(plan, per_token, weights), grad_h, gw, gb
    # One [C, V] buffer per head reused by every chunk: a fresh 64 MiB allocation per chunk is an mmap
    # and ~16k page faults each time (measured: ~5% of the call; benchmarks/README.md).
    buf = chunk_buffer((c_max, num_classes), mt, dev)
    ebufs = [torch.empty((c_max, num_classes), dtype=mt, device=dev) for _ in extras]
    # float16's range is narrow: p·scale (e.g. 1/32000 · 1/4096) would flush to zero in a float16 buffer,
    # so its chunk gradient is formed at unit scale and the factor applied after the matmuls.
    unit = mt == torch.float16
    # Every token has the same upstream gradient ("mean"/"sum": an expanded scalar): the factor is read to
    # the host once per call, not once per chunk (a device sync each on CUDA).
    uniform = unit and want and n > 0 and scale.dim() == 1 and scale.stride(0) == 0
    f_all = (float(scale[0].abs()) or 1.0) if uniform else 1.0
    for sl in plan.chunks():
        c = sl.stop - sl.start
        s, f = (scale[sl] if want else None), 1.0
        if unit and want:
            f = f_all if uniform else (float(s.abs().max()) or 1.0)
            s = s / f
        rows = plan.rows[sl]
        pick = (lambda x, sl=sl: x[sl]) if dense else (lambda x, rows=rows: x.index_select(0, rows))
        h = pick(hidden2d).to(mt)  # [C, D]
        z = project(h, w, b, out=buf[:c])  # [C, V], contiguous rows of buf
        extra = [project(pick(h2).to(mt), w2, b2, out=eb[:c]) for (h2, w2, b2), eb in zip(extras, ebufs)]
        extra += [te[sl] for te in plan.token_extras]
        # the chunk's losses, and with s its gradient written over z
        per_token[sl] = backend.rows_(request, z, plan.target[sl], s, w_y=None if w_y is None else w_y[sl],
                                      stats=None if stats is None else stats[sl], extra=tuple(extra),
                                      grad_bias=grad_b, bias_alpha=f, scratch=scratch)
        if not want:
            continue
        if grad_h is not None:
            gh = z @ w
            gh = (gh.to(dt).mul_(f) if f != 1.0 else gh).to(grad_h.dtype)
            if dense:
                grad_h[sl] = gh
            else:
                grad_h.index_copy_(0, rows, gh)
        if need[1]:
            grad_w = add_weight_grad(grad_w, z, h, f, weight.shape, dt, backend)
        del z
    return finish(plan, per_token, weights), grad_h, grad_w, grad_b


def finish(plan: Plan, per_token, weights):
    """The pass's per-token losses w_t·ℓ_t, kept on the plan when the statistics are wanted."""
    if weights is not None:
        per_token.mul_(weights)
    if plan.stats is not None:
        plan.per_token = per_token
    return per_token


def add_weight_grad(grad_w, z, h, f: float, shape, dt, backend):
    """grad_w + f·zᵀh for a chunk's gradient z [C, V] and hidden states h [C, D] (grad_w None: the first
    chunk, which writes instead of adding: no zero-fill pass); returns the accumulator, in ``dt``."""
    fresh = grad_w is None
    if z.dtype == dt:  # f is 1 here: only float16 chunks are formed at unit scale
        return z.t() @ h if fresh else grad_w.addmm_(z.t(), h)
    if fresh:
        grad_w = torch.empty(shape, dtype=dt, device=z.device)
    if float_out_mm(z.device):  # the GEMM accumulates into the float32 gradient itself
        return torch.addmm(grad_w, z.t(), h, beta=0.0 if fresh else 1.0, alpha=f, out_dtype=dt, out=grad_w)
    # half [V_s, D] products accumulated in float32, a slice of about half a float32 block at a time
    slice_rows = max(1, _backends.BLOCK_BYTES // (2 * 4 * shape[1]))
    for v in range(0, shape[0], slice_rows):
        backend.accumulate_(grad_w[v : v + slice_rows], z[:, v : v + slice_rows].t() @ h, f, fresh)
    return grad_w
