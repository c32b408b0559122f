"""Fused linear + loss: ``loss(hidden @ weight.T + bias, target)`` a chunk of tokens at a time.

Only one chunk of logits ``[C, V]`` (and its gradient, usually in the same buffer) exists at any
moment. The engine is generic over the per-token loss (:class:`xent.losses.TokenLoss`): a loss with a
closed-form gradient (cross-entropy: softmax minus one-hot) uses it; any other is differentiated per
chunk by autograd. So every loss is fused with no autograd code of its own.

Work per call, for the n valid tokens (ignored ones are dropped before the projection):

- mean/sum with gradients: the three matmuls that cannot be avoided (logits, grad hidden, grad weight)
  all run in the forward; backward only rescales the stored gradients by the upstream scalar.
- reduction="none" with gradients: the forward computes the losses; backward recomputes each chunk of
  logits with the per-token upstream gradients (one extra matmul).
- no gradient needed (evaluation): one matmul.

Half-precision inputs are projected in their own dtype (as ``hidden @ weight.T`` would be; the GEMM
accumulates in float32), the loss and its gradient are computed in float32 a block of rows at a time,
and the weight and bias gradients are accumulated over chunks in float32; gradients are returned in
the inputs' dtypes. float16 on CPU is the exception: its matmuls are slow there, so it is projected in
float32 from a float32 copy of the weight (:func:`matmul_dtype`). On the CPU, plain cross-entropy takes a
whole chunk through one compiled C kernel (:mod:`xent._cpu_kernel`) instead of the block loop.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass, replace

import torch

from . import _cpu_kernel
from . import _validate as V
from ._compile import compiler_disable
from ._reduce import (
    as_token_weights,
    check_stats_loss,
    denominator_weight,
    mean_denominator,
    mean_loss,
    sum_token_stats,
)
from .losses._base import TokenLoss, check_first_order
from .losses._cross_entropy import CrossEntropy

#: Memory for one chunk's [C, V] logits buffers when chunk_size="auto"; XENT_CHUNK_MB overrides it.
#: On the CPU a cache-friendly 64 MiB; on CUDA 1 GiB, because small chunks leave the GEMMs short of
#: rows (Liger and PyTorch's chunked loss size chunks by the inputs' footprint for the same reason).
#: The CUDA numbers are provisional: benchmarks/gpu_check.sh sweeps XENT_CHUNK_MB to fix them.
DEFAULT_CHUNK_MB = {"cpu": 64, "cuda": 1024}
#: Fewer tokens than this per chunk make the call markedly slower per token: every chunk reads and
#: writes the [V, D] float32 weight-gradient accumulator once, 8·V·D bytes against 6·C·V·D flops (at
#: 2048×512×128256 float32 on the CPU: 1.21× the three-matmul floor with C = 256, 1.13× with C = 512).
#: So "auto" never goes below it unless there are fewer tokens.
MIN_AUTO_CHUNK = {"cpu": 512, "cuda": 1024}
#: "auto" chunks are a multiple of this many tokens: the GEMMs' row blocking leaves a ragged tail otherwise
#: (4096×512×32000 bf16 on 2 AMD EPYC cores, forward + backward, × the three-matmul floor, one process,
#: median of 6 paired rounds: 1.08× with 1024-token chunks, 1.09× with 1152 or 960, 1.11× with 1040,
#: 1.13× with 1056, 1.18× with 1048, the 64 MiB budget's own size).
CHUNK_ALIGN = 64
#: The loss sees a chunk a block of rows at a time, about this many bytes of float32 logits: the block
#: stays in cache across the loss's passes over it, and an autograd loss's temporaries are per block.
BLOCK_BYTES = 8 * 2**20


def auto_chunk_size(num_tokens: int, num_classes: int, bytes_per_logit: int = 4, device="cpu") -> int:
    """Tokens per chunk such that the chunk's [C, V] buffers (``bytes_per_logit`` bytes per token and
    class in all) fit the budget (XENT_CHUNK_MB, else 64 MiB on the CPU and 1 GiB on CUDA), but at least
    MIN_AUTO_CHUNK tokens (512; 1024 on CUDA), a multiple of CHUNK_ALIGN tokens, and at most every token."""
    kind = "cuda" if torch.device(device).type == "cuda" else "cpu"
    budget = chunk_budget_mb(kind) * 2**20
    chunk = max(int(budget // (bytes_per_logit * num_classes)), MIN_AUTO_CHUNK[kind])
    chunk -= chunk % CHUNK_ALIGN
    return max(1, min(chunk, num_tokens))


def chunk_tokens(chunk_size, num_tokens: int, num_classes: int, bytes_per_logit: int, device) -> int:
    """The chunk of a fused call: ``chunk_size`` itself, or for "auto" :func:`auto_chunk_size` of the call's
    tokens on its device (one place, so no fused function forgets the device's budget)."""
    if chunk_size != "auto":
        return chunk_size
    return auto_chunk_size(max(num_tokens, 1), num_classes, bytes_per_logit, device)


def chunk_budget_mb(kind: str = "cpu") -> float:
    """XENT_CHUNK_MB (MiB of logits per chunk) if set, else DEFAULT_CHUNK_MB for the device kind."""
    raw = os.environ.get("XENT_CHUNK_MB")
    if raw is None:
        return float(DEFAULT_CHUNK_MB[kind])
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"XENT_CHUNK_MB must be a number of MiB > 0, got {raw!r}")
    return value


_FLOAT_OUT_MM: dict[str, bool] = {}


def float_out_mm(device: torch.device) -> bool:
    """Whether half GEMMs can write float32 results directly here (``torch.addmm(..., out_dtype=
    torch.float32)``, CUDA in recent PyTorch): then the half weight gradient is accumulated in float32 by
    the GEMM itself, with no [V, D] temporary per chunk. Probed once per device type."""
    kind = device.type
    if kind not in _FLOAT_OUT_MM:
        try:
            a = torch.ones((2, 2), dtype=torch.bfloat16, device=device)
            acc = torch.ones((2, 2), dtype=torch.float32, device=device)
            torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
            _FLOAT_OUT_MM[kind] = bool((acc == 3.0).all())
        except (RuntimeError, TypeError, NotImplementedError):
            _FLOAT_OUT_MM[kind] = False
    return _FLOAT_OUT_MM[kind]


def matmul_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype the projections run in: the inputs' own, except float16 on CPU, whose matmuls are ~4×
    slower than float32 there (1024×512 @ 512×32000 on 2 AMD EPYC cores: 920 ms vs 225 ms), so it is
    projected in float32. Half matmuls
    accumulate in float32 inside the GEMM; only their [C, V] / [C, D] / [V, D] outputs are rounded."""
    if dtype == torch.float16 and device.type == "cpu":
        return torch.float32
    return dtype


def projection_dtype_for(hidden: torch.Tensor, projection_dtype) -> torch.dtype:
    """The dtype the head is projected in: :func:`matmul_dtype` by default (None); else
    ``projection_dtype``, which must be the inputs' dtype or, for half inputs, torch.float32 (then the
    weight is copied to float32 once per call and each chunk of hidden states is upcast: log-probs as
    exact as a float32 model's head, at the price of float32 matmuls)."""
    if projection_dtype is None:
        return matmul_dtype(hidden.dtype, hidden.device)
    allowed = [hidden.dtype] + ([torch.float32] if hidden.dtype in (torch.float16, torch.bfloat16) else [])
    if not isinstance(projection_dtype, torch.dtype) or projection_dtype not in allowed:
        raise ValueError(
            f"projection_dtype must be None or one of {allowed} for inputs of dtype {hidden.dtype}, "
            f"got {projection_dtype!r}"
        )
    return projection_dtype


@dataclass
class _Plan:
    """What the autograd Function needs besides the differentiable tensors."""

    loss: TokenLoss
    rows: torch.Tensor  # [n] rows of hidden2d that have a valid target
    target: torch.Tensor  # [n] their target ids
    chunk: int
    compute_dtype: torch.dtype  # the loss's: float32, or float64 for float64 inputs
    extras: tuple  # ((hidden2d, weight, bias), ...) heads projected without gradient, e.g. a teacher
    mm_dtype: torch.dtype | None = None  # the projections'; None: compute_dtype
    weights: torch.Tensor | None = None  # [n] per-token weights w_t (compute dtype), None: all 1
    stats: torch.Tensor | None = None  # [n, 3] filled by the forward pass with the training statistics
    per_token: torch.Tensor | None = None  # [n] w_t·ℓ_t, kept by the forward pass when stats are wanted
    token_extras: tuple = ()  # ([n, ...], ...) per-token data the loss takes after the heads' logits


def _chunks(plan: _Plan):
    n = plan.rows.numel()
    for start in range(0, n, plan.chunk):
        yield slice(start, min(start + plan.chunk, n))


def _block_rows(num_classes: int, min_rows: int = 1) -> int:
    return max(1, min_rows, BLOCK_BYTES // (4 * num_classes))


def _blocks(rows: int, num_classes: int, min_rows: int = 1):
    # as few blocks as _block_rows allows, of equal size (no small tail block)
    count = -(-rows // _block_rows(num_classes, min_rows))
    step = -(-rows // count) if rows else 1
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


_kept = threading.local()  # .buffers: {dtype: 1-D CPU tensor}, this thread's kept chunk buffers


def _chunk_buffer(shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The [C, V] logits buffer of a call. With XENT_KEEP_CHUNK_BUFFER=1, on the CPU, it is kept for the
    thread's next call (grown when a call needs more): a buffer over glibc's 32 MiB mmap ceiling is
    otherwise a fresh mapping at every call, ~16 ms of page faults per 64 MiB (1.5 % of a 4096×512×32000
    bf16 step). Not the default: the kept buffer also lives through the caller's backward, which raised
    that step's extra peak memory from 137 to 166 MB. :func:`release_buffers` frees it. CUDA's caching
    allocator already reuses memory, so CUDA buffers are never kept."""
    numel = shape[0] * shape[1]
    if device.type != "cpu" or os.environ.get("XENT_KEEP_CHUNK_BUFFER", "0") != "1":
        return torch.empty(shape, dtype=dtype, device=device)
    kept = _kept.__dict__.setdefault("buffers", {})
    flat = kept.get(dtype)
    if flat is None or flat.numel() < numel:
        kept.pop(dtype, None)  # free the smaller one before allocating
        flat = kept[dtype] = torch.empty(numel, dtype=dtype)
    return flat[:numel].view(shape)


def release_buffers() -> None:
    """Frees this thread's kept CPU chunk buffers (XENT_KEEP_CHUNK_BUFFER=1, :func:`_chunk_buffer`)."""
    _kept.__dict__.pop("buffers", None)


def _project(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, out=None) -> torch.Tensor:
    # [C, D] @ [D, V] (+ [V]) -> [C, V], a buffer the loss may overwrite.
    if b is not None:
        return torch.addmm(b, h, w.t(), out=out)
    return torch.mm(h, w.t(), out=out)


def _as(x: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if x is None else x.to(dtype)


def _run(plan: _Plan, hidden2d, weight, bias, scale, need):
    """One pass over the chunks. ``scale`` [n] is each token's upstream gradient, None for no gradient.

    need = (grad hidden?, grad weight?, grad bias?). Returns (per-token losses [n], grads...). A loss
    with K = ``loss.num_outputs`` > 1 values per token (log-probs with their entropy) gives [n, K]
    values and takes a [n, K] ``scale``; nothing else changes.

    Per-token weights (``plan.weights``) are applied here and nowhere else: the losses come back as
    w_t·ℓ_t and each token's upstream gradient is w_t·scale_t, so no loss, closed-form or autograd, knows
    of them.

    Per chunk: project to a [C, V] buffer in the matmul dtype; hand it to the loss a block of rows at a
    time in the compute dtype (half blocks are copied to a float32 block, the gradient copied back); then
    the two gradient matmuls read the chunk's gradient from the same buffer. The weight and bias
    gradients are accumulated over chunks in the compute dtype.
    """
    dt = plan.compute_dtype
    mt = plan.mm_dtype or dt
    value_shape = () if plan.loss.num_outputs == 1 else (plan.loss.num_outputs,)
    weights = None if plan.weights is None else plan.weights.view(-1, *(1,) * len(value_shape))
    if scale is not None and weights is not None:
        scale = scale * weights  # d(Σ w_t·ℓ_t)/dℓ_t: the weight joins the upstream gradient
    w = _as(weight, mt)  # a float32 copy once for float16 on CPU; the same tensor otherwise
    b = _as(bias, mt)
    extras = [(h2, _as(w2, mt), _as(b2, mt)) for h2, w2, b2 in plan.extras]
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
    loss = plan.loss
    stats = plan.stats  # [n, 3] or None: the training statistics, filled block by block
    # One [C, V] buffer per head reused by every chunk: a fresh 64 MiB allocation per chunk is an mmap
    # and ~16k page faults each time (measured: ~5% of the call; benchmarks/README.md).
    c_max = min(plan.chunk, n)
    buf = _chunk_buffer((c_max, num_classes), mt, dev)
    ebufs = [torch.empty((c_max, num_classes), dtype=mt, device=dev) for _ in extras]
    # Plain cross-entropy on the CPU: a compiled kernel takes the whole chunk in one pass (_cpu_kernel),
    # its losses and, when wanted, its gradient.
    kernel_args = None
    if (grad_b is None and not extras and not plan.token_extras
            and hasattr(loss, "row_kernel_args") and _cpu_kernel.usable(dev, mt, dt)):
        kernel_args = loss.row_kernel_args(plan.target)
    block = None
    if mt != dt and kernel_args is None:  # the loss's float32 view of a block of half logits
        rows_max = min(c_max, _block_rows(num_classes, loss.min_block_rows))
        block = torch.empty((rows_max, num_classes), dtype=dt, device=dev)
    # float16's range is narrow: p·scale (e.g. 1/32000 · 1/4096) would flush to zero in a float16 buffer,
    # so its chunk gradient is formed at unit scale and the factor applied after the matmuls.
    unit = mt == torch.float16
    # Every token has the same upstream gradient ("mean"/"sum": an expanded scalar): the factor is read to
    # the host once per call, not once per chunk (a device sync each on CUDA).
    uniform = unit and want and n > 0 and scale.dim() == 1 and scale.stride(0) == 0
    f_all = (float(scale[0].abs()) or 1.0) if uniform else 1.0
    # half weight gradients are formed a [V_s, D] slice at a time, about half a float32 block each
    slice_rows = max(1, BLOCK_BYTES // (2 * 4 * weight.shape[1]))
    for sl in _chunks(plan):
        c = sl.stop - sl.start
        s, f = (scale[sl] if want else None), 1.0
        if unit and want:
            f = f_all if uniform else (float(s.abs().max()) or 1.0)
            s = s / f
        rows, t = plan.rows[sl], plan.target[sl]
        pick = (lambda x, sl=sl: x[sl]) if dense else (lambda x, rows=rows: x.index_select(0, rows))
        h = pick(hidden2d).to(mt)  # [C, D]
        z = _project(h, w, b, out=buf[:c])  # [C, V], contiguous rows of buf
        extra = [_project(pick(h2).to(mt), w2, b2, out=eb[:c]) for (h2, w2, b2), eb in zip(extras, ebufs)]
        if kernel_args is not None:  # the chunk's losses, and with s its gradient written over z
            w_y, z_coef = kernel_args
            per_token[sl] = _cpu_kernel.ce_rows_(z, t, s, None if w_y is None else w_y[sl], z_coef,
                                                 None if stats is None else stats[sl])
        for blk in _blocks(c, num_classes, loss.min_block_rows) if kernel_args is None else ():
            zb = z[blk]
            x = zb if block is None else block[: blk.stop - blk.start].copy_(zb)
            tok = slice(sl.start + blk.start, sl.start + blk.stop)
            xe = [e[blk].to(dt) for e in extra] + [te[tok] for te in plan.token_extras]
            if not want:
                if stats is not None:
                    stats[tok] = loss.stats(x, t[blk])
                per_token[tok] = loss(x, t[blk], *xe)
                continue
            if loss.has_closed_form_grad and stats is not None:  # the statistics from the same pass
                value, g, stats[tok] = loss.value_grad_stats(x, t[blk], s[blk], *xe)  # g may overwrite x
            elif loss.has_closed_form_grad:
                value, g = loss.value_and_grad(x, t[blk], s[blk], *xe)  # g may overwrite x
            else:
                if stats is not None:
                    stats[tok] = loss.stats(x, t[blk])
                with torch.enable_grad():
                    x = x.detach().requires_grad_(True)
                    value = loss(x, t[blk], *xe)
                    (g,) = torch.autograd.grad(value, x, grad_outputs=s[blk].to(value.dtype))
                value = value.detach()
            per_token[tok] = value
            if grad_b is not None:
                grad_b.add_(g.sum(dim=0), alpha=f)
            if g.data_ptr() != zb.data_ptr():
                zb.copy_(g)  # the chunk's gradient, in the projection dtype, where its logits were
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
            if mt != dt and float_out_mm(dev):  # the GEMM accumulates into the float32 gradient itself
                fresh = grad_w is None
                if fresh:
                    grad_w = torch.empty(weight.shape, dtype=dt, device=dev)
                torch.addmm(grad_w, z.t(), h, beta=0.0 if fresh else 1.0, alpha=f, out_dtype=dt, out=grad_w)
            elif mt != dt:  # half [V_s, D] products accumulated in float32, a cache-sized slice at a time
                fresh = grad_w is None  # the first chunk writes, the others accumulate
                if fresh:
                    grad_w = torch.empty(weight.shape, dtype=dt, device=dev)
                for v in range(0, num_classes, slice_rows):
                    part, dst = z[:, v : v + slice_rows].t() @ h, grad_w[v : v + slice_rows]
                    if kernel_args is not None:  # bf16 here (the kernel takes float32 or bf16): one pass
                        _cpu_kernel.accumulate_(dst, part, f, fresh)
                    elif not fresh:
                        dst.add_(part, alpha=f)
                    elif f != 1.0:
                        dst.copy_(part).mul_(f)
                    else:
                        dst.copy_(part)
            elif grad_w is None:  # the first chunk writes, the others accumulate: no zero-fill pass
                grad_w = z.t() @ h
            else:
                grad_w.addmm_(z.t(), h)
        del z
    if weights is not None:
        per_token.mul_(weights)
    if stats is not None:
        plan.per_token = per_token
    return per_token, grad_h, grad_w, grad_b


class _LinearLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden2d, weight, bias, plan: _Plan, out_shape, positions, denom, precompute):
        # denom: None for reduction="none", else the scalar Σℓ is divided by (1 for "sum").
        # precompute: gradients are wanted and the reduction is a scalar, so the forward computes them
        # with scale 1/denom and backward only rescales.
        ctx.plan, ctx.positions, ctx.denom, ctx.out_shape = plan, positions, denom, tuple(out_shape)
        ctx.need = (hidden2d.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
        ctx.dtypes = (hidden2d.dtype, weight.dtype, None if bias is None else bias.dtype)
        if precompute:
            scale = (1.0 / denom).to(plan.compute_dtype).expand(plan.rows.numel())
            per_token, *ctx.grads = _run(plan, hidden2d, weight, bias, scale, ctx.need)
        else:
            per_token = _run(plan, hidden2d, weight, bias, None, ctx.need)[0]
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
            grads = _run(plan, hidden2d, weight, bias, scale.to(plan.compute_dtype), ctx.need)[1:]
        grads = [None if g is None else g.to(dt) for g, dt in zip(grads, ctx.dtypes)]
        return (*grads, None, None, None, None, None)


def _check_linear(hidden, weight, bias, target, ignore_index, shift, name="hidden", weight_name="weight"):
    _check_head(hidden, weight, bias, shift, name, weight_name)
    V.check_target(target, hidden.shape[:-1], weight.shape[0], ignore_index, lead_name=name)


def _check_head(hidden, weight, bias, shift, name="hidden", weight_name="weight", bias_name="bias"):
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


def _valid_rows(hidden, target, ignore_index, shift, token_weights=None):
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


@compiler_disable
def linear_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    loss: TokenLoss | None = None,
    bias: torch.Tensor | None = None,
    shift: bool = False,
    chunk_size: int | str = "auto",
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items=None,
    token_weights: torch.Tensor | None = None,
    return_stats: bool = False,
    projection_dtype: torch.dtype | None = None,
    _extra_heads: tuple = (),
    _token_extras: tuple = (),
):
    """Any per-token loss of ``hidden @ weight.T + bias`` without materialising the logits.

    Same value and gradients (for hidden, weight and bias) as the plain path on materialised logits,
    e.g. ``xent.cross_entropy(hidden @ weight.T + bias, target, ...)`` for ``loss=CrossEntropy(...)``.

    Args:
        hidden: ``[..., D]`` (``[..., T, D]`` with ``shift``), any float dtype.
        weight: ``[V, D]``, the LM head or tied embedding, same dtype as hidden.
        target: ``[...]`` class ids shaped like ``hidden.shape[:-1]``; ``ignore_index`` is skipped.
        loss: a :class:`xent.losses.TokenLoss` (default :class:`xent.losses.CrossEntropy`).
        bias: optional ``[V]``.
        shift: causal shift, hidden[..., t, :] predicts target[..., t+1] (no copy of hidden).
        chunk_size: tokens per chunk, or "auto": as many as fit 64 MiB of logits in the projection
            dtype (XENT_CHUNK_MB overrides the budget), at least 512 tokens.
        reduction, num_items: as :func:`xent.cross_entropy`.
        token_weights: ``[...]`` per-token weights w_t shaped like ``target`` (shifted like it), as
            :func:`xent.cross_entropy`: ℓ_t ← w_t·ℓ_t, "mean" divides by Σ_valid w_t·w_y. The fused engine
            multiplies each token's upstream gradient by w_t, so every loss takes them; tokens with
            w_t = 0 are dropped before the projection like ignored ones.
        return_stats: also return a :class:`xent.TokenStats` of detached sums over the valid tokens
            (loss, count, top-1 correct, entropy, z-loss terms, logsumexp), as ``(loss, stats)``. They are
            computed in the same pass over each chunk of logits (cross-entropy forms them inside its
            closed form; other losses read the block once more before their own pass).
        projection_dtype: None (default): half inputs are projected in their own dtype (float16 on the
            CPU in float32). ``torch.float32``: half inputs are projected in float32 (the weight copied to
            float32 once per call, each chunk of hidden states upcast), so the logits, log-probs and
            gradients equal those of the float32 computation on the upcast inputs (gradients returned in
            the inputs' dtype); costs float32 matmuls and a float32 [V, D] copy of the weight.
    """
    V.check_flags(shift=shift, return_stats=return_stats)
    loss = CrossEntropy() if loss is None else loss
    if not isinstance(loss, TokenLoss):
        raise TypeError(f"loss must be a xent.losses.TokenLoss, got {type(loss).__name__}")
    if loss.num_extra != len(_extra_heads) + len(_token_extras):
        raise TypeError(
            f"loss {type(loss).__name__} takes {loss.num_extra} extra tensor(s) per token (a teacher), which "
            "linear_loss cannot supply: use xent.linear_distill_loss or xent.linear_sparse_distill_loss"
        )
    if getattr(loss, "selects_tokens", False):
        raise TypeError(f"loss {type(loss).__name__} selects tokens over the whole call, which a per-token "
                        "pass cannot do: use xent.linear_rho1_loss")
    if return_stats:
        check_stats_loss(loss)
    V.check_reduction(reduction)
    V.check_num_items(num_items, reduction)
    _check_linear(hidden, weight, bias, target, ignore_index, shift)
    V.check_token_weights(token_weights, target.shape)
    num_classes = weight.shape[0]
    loss.check(num_classes)
    V.check_chunk_size(chunk_size)

    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    token_weights = as_token_weights(token_weights, dtype, hidden.device)
    rows, tgt, positions, out_shape, tw = _valid_rows(hidden, target, ignore_index, shift, token_weights)
    n = rows.numel()
    V.check_num_items_covers(num_items, n)
    mm = projection_dtype_for(hidden, projection_dtype)
    heads = 1 + len(_extra_heads)  # one [C, V] buffer each, in the projection dtype
    chunk = chunk_tokens(chunk_size, n, num_classes, heads * mm.itemsize, hidden.device)
    extras = tuple((h.reshape(-1, h.shape[-1]), w, b) for h, w, b in _extra_heads)
    denom = None
    if reduction == "sum":
        denom = torch.ones((), dtype=dtype, device=hidden.device)
    elif reduction == "mean":
        valid = torch.ones(n, dtype=torch.bool, device=hidden.device)
        class_weight = loss.token_weight(tgt)
        denom = mean_denominator(valid, num_items, denominator_weight(class_weight, tw), dtype)
        loss = mean_loss(loss, valid, num_items, class_weight, dtype, tw)
    stats = torch.empty((n, 3), dtype=dtype, device=hidden.device) if return_stats else None
    # per-token data [..., *] aligned with hidden's rows (like a second head's hidden states)
    lead = hidden.shape[:-1].numel()
    token_extras = tuple(x.reshape(lead, *x.shape[len(hidden.shape) - 1:])[rows] for x in _token_extras)
    plan = _Plan(loss, rows, tgt, chunk, dtype, extras, mm, weights=tw, stats=stats,
                 token_extras=token_extras)
    grad_wanted = torch.is_grad_enabled() and (
        hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    out = _LinearLoss.apply(hidden2d, weight, bias, plan, out_shape, positions, denom,
                            grad_wanted and denom is not None)
    if not return_stats:
        return out
    return out, sum_token_stats(plan.per_token, stats, None, loss.z_loss)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    shift: bool = False,
    chunk_size: int | str = "auto",
    ignore_index: int = -100,
    reduction: str = "mean",
    weight_classes: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    num_items=None,
    token_weights: torch.Tensor | None = None,
    return_stats: bool = False,
    projection_dtype: torch.dtype | None = None,
):
    """Cross-entropy of ``hidden @ weight.T + bias`` without ever holding the [N, V] logits.

    Same value and the same gradients for hidden, weight and bias as
    ``xent.cross_entropy(hidden @ weight.T + bias, target, weight=weight_classes, ...)`` for every
    option and reduction (class weights are ``weight_classes`` here: ``weight`` is the projection).
    Uses the closed-form gradient softmax − one-hot, computed in place in the chunk's logits buffer.
    See :func:`xent.linear_loss` for shapes, ``shift``, ``chunk_size``, ``projection_dtype`` and
    ``return_stats`` (whose statistics come out of the closed form's own pass over each chunk).

    Example:
        >>> import torch, xent
        >>> h, W = torch.randn(2, 9, 16), torch.randn(100, 16)
        >>> y = torch.randint(0, 100, (2, 9))
        >>> fused = xent.linear_cross_entropy(h, W, y, shift=True)
        >>> plain = xent.causal_lm_loss(h @ W.T, y)
        >>> bool(torch.allclose(fused, plain, atol=1e-5))
        True
    """
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        V.check_options(num_classes=weight.shape[0], weight=weight_classes, weight_name="weight_classes")
    loss = CrossEntropy(weight=weight_classes, label_smoothing=label_smoothing, z_loss=z_loss,
                        softcap=softcap)
    return linear_loss(hidden, weight, target, loss=loss, bias=bias, shift=shift, chunk_size=chunk_size,
                       ignore_index=ignore_index, reduction=reduction, num_items=num_items,
                       token_weights=token_weights, return_stats=return_stats,
                       projection_dtype=projection_dtype)


def linear_distill_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    target: torch.Tensor | None = None,
    *,
    kind: str = "forward_kl",
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    t_squared: bool = False,
    softcap: float | None = None,
    hard_weight: float = 0.0,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    shift: bool = False,
    chunk_size: int | str = "auto",
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items=None,
    token_weights: torch.Tensor | None = None,
    projection_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """:func:`xent.distill_loss` of ``student_hidden @ student_weight.T`` against
    ``teacher_hidden @ teacher_weight.T`` without holding either model's full logits.

    Each chunk of tokens projects both heads (the teacher's without gradient), then the same
    :class:`xent.losses.Distill` per-token loss the plain path uses. student_hidden ``[..., D_s]`` and
    teacher_hidden ``[..., D_t]`` cover the same tokens; both heads have the same V. ``target`` (optional)
    masks ignored tokens and labels the hard CE term when ``hard_weight`` > 0; ``shift`` as in
    :func:`xent.linear_loss`. ``token_weights`` ``[...]`` (shaped like ``student_hidden.shape[:-1]``) as
    :func:`xent.distill_loss`. ``projection_dtype`` as :func:`xent.linear_loss` (both heads: with
    torch.float32, half teacher and student heads are projected in float32). Gradients reach the student's
    hidden, weight and bias only.
    """
    from .losses._distill import Distill, distill_target

    loss = Distill(kind=kind, beta=beta, alpha=alpha, temperature=temperature, t_squared=t_squared,
                   softcap=softcap, hard_weight=hard_weight)
    _check_head(student_hidden, student_weight, student_bias, shift, "student_hidden", "student_weight",
                "student_bias")
    _check_head(teacher_hidden, teacher_weight, teacher_bias, shift, "teacher_hidden", "teacher_weight",
                "teacher_bias")
    if teacher_weight.shape[0] != student_weight.shape[0]:
        raise ValueError(
            f"teacher_weight vocabulary size {teacher_weight.shape[0]} does not match student_weight "
            f"vocabulary size {student_weight.shape[0]}"
        )
    if teacher_hidden.shape[:-1] != student_hidden.shape[:-1]:
        raise ValueError(
            f"teacher_hidden shape {tuple(teacher_hidden.shape)} and student_hidden shape "
            f"{tuple(student_hidden.shape)} must agree on every dimension but the last"
        )
    target, ignore_index = distill_target(target, student_hidden.shape[:-1], student_hidden.device,
                                          hard_weight, ignore_index)
    return linear_loss(
        student_hidden, student_weight, target, loss=loss, bias=student_bias, shift=shift,
        chunk_size=chunk_size, ignore_index=ignore_index, reduction=reduction, num_items=num_items,
        token_weights=token_weights, projection_dtype=projection_dtype,
        _extra_heads=((teacher_hidden, teacher_weight, teacher_bias),),
    )


def linear_sparse_distill_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    target: torch.Tensor | None = None,
    *,
    kind: str = "forward_kl",
    beta: float = 0.5,
    alpha: float = 0.1,
    softcap: float | None = None,
    student_bias: torch.Tensor | None = None,
    shift: bool = False,
    chunk_size: int | str = "auto",
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items=None,
    token_weights: torch.Tensor | None = None,
    projection_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """:func:`xent.sparse_distill_loss` of ``student_hidden @ student_weight.T + student_bias`` without
    holding the student's logits: each chunk is projected, pooled onto the teacher's k + 1 buckets and
    differentiated in closed form in its own buffer (:class:`xent.losses.SparseDistill`).

    ``teacher_ids`` and ``teacher_log_probs`` are ``[..., k]`` aligned with ``student_hidden``'s positions
    (the teacher's top-k at position t, as ``teacher_hidden`` is in :func:`xent.linear_distill_loss`);
    with ``shift`` position t is scored against ``target[..., t+1]`` and the last position is dropped.
    Other arguments as :func:`xent.linear_distill_loss`.
    """
    from .losses._distill import distill_target
    from .losses._sparse_distill import SparseDistill, check_sparse_teacher, teacher_read_mask

    loss = SparseDistill(kind=kind, beta=beta, alpha=alpha, softcap=softcap)
    _check_head(student_hidden, student_weight, student_bias, shift, "student_hidden", "student_weight",
                "student_bias")
    check_sparse_teacher(teacher_ids, teacher_log_probs, student_hidden.shape[:-1], student_weight.shape[0],
                         lead_name="student_hidden", read=teacher_read_mask(
                             target, ignore_index, student_hidden.shape[:-1], shift=shift))
    target, ignore_index = distill_target(target, student_hidden.shape[:-1], student_hidden.device, 0.0,
                                          ignore_index)
    dtype = torch.float64 if student_hidden.dtype == torch.float64 else torch.float32
    return linear_loss(
        student_hidden, student_weight, target, loss=loss, bias=student_bias, shift=shift,
        chunk_size=chunk_size, ignore_index=ignore_index, reduction=reduction, num_items=num_items,
        token_weights=token_weights, projection_dtype=projection_dtype,
        _token_extras=(V.as_ids(teacher_ids), teacher_log_probs.detach().to(dtype)),
    )
