"""The fused no-grad forward: projection and online log-sum-exp in one kernel, so no [N, V] (nor [C, V])
logits are ever written to memory (issue 22 item 1b: validation losses, the eval head, log-probs without
gradient).

One program per BLOCK_N rows of h [N, D]: for each tile of BLOCK_V classes it forms the logits tile
h_rows @ W_tile.T (+ bias) in registers, a ``tl.dot`` per BLOCK_D columns of D with float32
accumulation, then updates each row's running max, Σ exp, entropy and label-smoothing sums exactly as the
row kernel does (:mod:`xent._triton._rows`), and picks out z_y. W is read once per BLOCK_N rows.

Operand precision of the dot: float16 inputs multiply as float16 (exact products, float32 sums); bf16
inputs are widened exactly from their bits and multiplied either as bf16 (``HALF_DOT``, on a GPU: the
bf16 tensor cores) or as float32 in TF32 (under the interpreter, whose bf16 dot is wrong: a bf16 value is
exact in TF32, so both compute exact products summed in float32); float32 inputs in TF32 (a GPU's
default, ~1e-3 relative) or exactly (``input_precision="ieee"``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import load_f32, online_lse_step, smoothing_weights, tanh_f32
from ._config import fused_config

_INF = tl.constexpr(float("inf"))


@triton.jit
def logits_tile(h_ptr, stride_h, w_ptr, stride_w, rows, rmask, cols, cmask, D,
                BF16: tl.constexpr, FP16: tl.constexpr, HALF_DOT: tl.constexpr, TF32: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """The float32 tile h[rows] @ W[cols].T [BLOCK_N, BLOCK_V] (0 outside the masks), a ``tl.dot`` per
    BLOCK_D columns of D in the operand precision of the module docstring."""
    dcols = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + dcols
        dmask = dd < D
        a_ptrs = h_ptr + rows[:, None] * stride_h + dd[None, :]
        b_ptrs = w_ptr + cols[None, :].to(tl.int64) * stride_w + dd[:, None]  # W tile, transposed
        a_mask = rmask[:, None] & dmask[None, :]
        b_mask = dmask[:, None] & cmask[None, :]
        if BF16:
            a = load_f32(a_ptrs, a_mask, 0.0, True)
            b = load_f32(b_ptrs, b_mask, 0.0, True)
            if HALF_DOT:  # exact: the values are bf16's own
                acc = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
            else:  # a bf16 value is exact in TF32: the same products, in float32
                acc = tl.dot(a, b, acc, input_precision="tf32")
        elif FP16:  # float16 products are exact in float32; numpy's too (the interpreter)
            a = tl.load(a_ptrs, mask=a_mask, other=0.0)
            b = tl.load(b_ptrs, mask=b_mask, other=0.0)
            acc = tl.dot(a, b, acc)
        elif TF32:
            a = tl.load(a_ptrs, mask=a_mask, other=0.0)
            b = tl.load(b_ptrs, mask=b_mask, other=0.0)
            acc = tl.dot(a, b, acc, input_precision="tf32")
        else:
            a = tl.load(a_ptrs, mask=a_mask, other=0.0)
            b = tl.load(b_ptrs, mask=b_mask, other=0.0)
            acc = tl.dot(a, b, acc, input_precision="ieee")
    return acc


@triton.jit
def _fused_ce_forward_kernel(
    h_ptr, stride_h, w_ptr, stride_w, b_ptr, target_ptr, wy_ptr, cw_ptr, loss_ptr, stats_ptr,
    N, V, D, z_coef, softcap, eps,
    BF16: tl.constexpr, FP16: tl.constexpr, HALF_DOT: tl.constexpr, TF32: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_WY: tl.constexpr, SMOOTH: tl.constexpr, HAS_CW: tl.constexpr,
    SOFTCAP: tl.constexpr, STATS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    y = tl.load(target_ptr + rows, mask=rmask, other=0)
    tl.device_assert((y >= 0) & (y < V), "target out of range")
    vcols = tl.arange(0, BLOCK_V)

    zero = tl.zeros([BLOCK_N], dtype=tl.float32)
    mx = zero - float("inf")
    k = zero
    s = zero
    t = zero
    c = zero
    z_y = zero
    nans = tl.zeros([BLOCK_N], dtype=tl.int32)
    wsum = 0.0
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + vcols
        cmask = cols < V
        acc = logits_tile(h_ptr, stride_h, w_ptr, stride_w, rows, rmask, cols, cmask, D, BF16, FP16, HALF_DOT,
                          TF32, BLOCK_N, BLOCK_V, BLOCK_D)
        if HAS_BIAS:
            acc += load_f32(b_ptr + cols, cmask, 0.0, BF16)[None, :]
        nans += tl.sum((acc != acc).to(tl.int32), 1)
        if SOFTCAP:
            x = softcap * tanh_f32(acc / softcap)
        else:
            x = acc
        x = tl.where(cmask[None, :], x, -float("inf"))
        z_y += tl.sum(tl.where(cols[None, :] == y[:, None], x, 0.0), 1)
        if SMOOTH:
            w = smoothing_weights(cw_ptr, cols, cmask, HAS_CW)
        else:
            w = tl.zeros([BLOCK_V], dtype=tl.float32)
        mx, k, s, t, c = online_lse_step(x, mx, k, s, t, c, wsum, w[None, :], cmask[None, :], STATS, SMOOTH,
                                         1)
        if SMOOTH:
            wsum += tl.sum(w, 0)

    bad = (nans > 0) | (mx == _INF) | (mx == -_INF)
    rel = tl.log(s)
    lse = k + rel
    if HAS_WY:
        a_r = tl.load(wy_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    else:
        a_r = 1.0
    loss = a_r * ((k - z_y) + rel)
    if SMOOTH:
        loss = (1.0 - eps) * loss + (eps / V) * (rel * wsum - c)
    loss += z_coef * lse * lse
    nan = float("nan")
    tl.store(loss_ptr + rows, tl.where(bad, nan, loss), mask=rmask)
    if STATS:
        tl.store(stats_ptr + 3 * rows, tl.where(bad, nan, tl.where(z_y >= mx, 1.0, 0.0)), mask=rmask)
        tl.store(stats_ptr + 3 * rows + 1, tl.where(bad, nan, rel - t / s), mask=rmask)
        tl.store(stats_ptr + 3 * rows + 2, tl.where(bad, nan, lse), mask=rmask)


#: The kernel itself, for the compile checks.
KERNEL = _fused_ce_forward_kernel


def launch(h, w, bias, target, w_y, z_coef, stats, softcap, label_smoothing, class_weight, tf32, half_dot):
    """Runs the fused forward on checked arguments (see :func:`xent._triton.fused_ce_forward`)."""
    rows, hidden = h.shape
    num_classes = w.shape[0]
    loss = torch.empty(rows, dtype=torch.float32, device=h.device)
    if rows == 0:
        return loss
    cfg = fused_config(rows, num_classes, hidden, h.element_size())
    bf16 = h.dtype == torch.bfloat16
    smooth = label_smoothing > 0.0

    def bits(t):
        return t.view(torch.int16) if t is not None and t.dtype == torch.bfloat16 else t

    _fused_ce_forward_kernel[(triton.cdiv(rows, cfg.block_n),)](
        bits(h), h.stride(0), bits(w), w.stride(0), loss if bias is None else bits(bias), target,
        loss if w_y is None else w_y, loss if class_weight is None else class_weight, loss,
        loss if stats is None else stats, rows, num_classes, hidden, float(z_coef),
        1.0 if softcap is None else float(softcap), float(label_smoothing),
        BF16=bf16, FP16=h.dtype == torch.float16, HALF_DOT=bf16 and half_dot, TF32=tf32,
        HAS_BIAS=bias is not None, HAS_WY=w_y is not None,
        SMOOTH=smooth, HAS_CW=smooth and class_weight is not None, SOFTCAP=softcap is not None,
        STATS=stats is not None, BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return loss
