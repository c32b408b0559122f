"""The fused backward: the gradients of the fused head's cross-entropy with respect to h, W and the bias,
recomputing the logits tile by tile from h and W (cut-cross-entropy's way), so no [N, V] (nor [C, V])
logits or gradient are ever written (issue 22 item 1c).

For a tile of rows r and classes j the logits z = h_r·W_j (+ b_j) are recomputed exactly as the fused
forward forms them (:func:`xent._triton._fused.logits_tile`), soft-capped when asked (x = c·tanh(z/c)),
and the gradient tile of Σ_r scale_r·ℓ_r is

    g_rj = (exp(x_rj − lse_r)·pc_r − [j = y_r]·gy_r − gw_r·w_j) · (1 − tanh²  under soft-capping)

with the per-row factors pc = scale·((1−ε)a + (ε/V)Σw + 2·z_coef·lse), gy = scale·(1−ε)a, gw = scale·ε/V
formed once per call (a: the target's class weight; w: label smoothing's class weights, 1 without), and
lse the forward's (of the capped logits). Two kernels, neither with atomics:

- :func:`_grad_hidden_kernel`, one program per BLOCK_N rows: for every tile of BLOCK_V classes, g, then
  dH[rows] += g @ W_tile, a BLOCK_D slice of D at a time, in a float32 [N, D] that only this program
  touches;
- :func:`_grad_weight_kernel`, one program per BLOCK_V classes: for every tile of BLOCK_N rows, g, then
  dW[cols] += gᵀ @ h_tile in a float32 [V, D] that only this program touches, and the bias gradient
  Σ_r g in registers.

Each kernel recomputes the logits once (five matmuls in all with the forward, against four for a kernel
that accumulates dW with atomics): the price of owning every output element, so no ordering of
floating-point additions depends on scheduling and the interpreter, which runs programs one after another,
proves what a GPU computes.

The gradient dots take float32 operands: g as formed, W and h widened exactly from their dtype. In TF32
for half inputs (a bf16 or float16 value is exact in TF32; g keeps 10 bits of mantissa, finer than the
chunk loop's half gradient buffer, and float32's range, where float16 would flush p·scale) and for float32
inputs when TF32 is allowed; exactly (``input_precision="ieee"``) otherwise.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import load_f32, smoothing_weights, tanh_f32
from ._config import backward_config, backward_variant
from ._fused import logits_tile


@triton.jit
def _grad_tile(acc, b_ptr, cw_ptr, rows_ok, cols, cmask, y, lse, pc, gy, gw, softcap,
               BF16: tl.constexpr, HAS_BIAS: tl.constexpr, SMOOTH: tl.constexpr, HAS_CW: tl.constexpr,
               SOFTCAP: tl.constexpr):
    """The gradient tile g [BLOCK_N, BLOCK_V] of the logits tile ``acc`` (module docstring); 0 outside
    the rows and columns of the problem."""
    if HAS_BIAS:
        acc += load_f32(b_ptr + cols, cmask, 0.0, BF16)[None, :]
    if SOFTCAP:
        th = tanh_f32(acc / softcap)
        x = softcap * th
    else:
        x = acc
    g = tl.exp(x - lse[:, None]) * pc[:, None] - tl.where(cols[None, :] == y[:, None], gy[:, None], 0.0)
    if SMOOTH:
        g -= gw[:, None] * smoothing_weights(cw_ptr, cols, cmask, HAS_CW)[None, :]
    if SOFTCAP:
        g = g * ((1.0 - th) * (1.0 + th))  # d(c·tanh(z/c))/dz = 1 − tanh²
    return tl.where(rows_ok[:, None] & cmask[None, :], g, 0.0)


@triton.jit
def _row_factors(target_ptr, lse_ptr, pc_ptr, gy_ptr, gw_ptr, rows, rmask, V):
    y = tl.load(target_ptr + rows, mask=rmask, other=0)
    tl.device_assert((y >= 0) & (y < V), "target out of range")
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    pc = tl.load(pc_ptr + rows, mask=rmask, other=0.0)
    gy = tl.load(gy_ptr + rows, mask=rmask, other=0.0)
    gw = tl.load(gw_ptr + rows, mask=rmask, other=0.0)
    return y, lse, pc, gy, gw


@triton.jit
def _grad_hidden_kernel(
    h_ptr, stride_h, w_ptr, stride_w, b_ptr, target_ptr, lse_ptr, pc_ptr, gy_ptr, gw_ptr, cw_ptr, dh_ptr,
    N, V, D, softcap,
    BF16: tl.constexpr, FP16: tl.constexpr, HALF_DOT: tl.constexpr, TF32: tl.constexpr,
    GRAD_TF32: tl.constexpr, HAS_BIAS: tl.constexpr, SMOOTH: tl.constexpr, HAS_CW: tl.constexpr,
    SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    y, lse, pc, gy, gw = _row_factors(target_ptr, lse_ptr, pc_ptr, gy_ptr, gw_ptr, rows, rmask, V)
    dcols = tl.arange(0, BLOCK_D)
    vcols = tl.arange(0, BLOCK_V)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + vcols
        cmask = cols < V
        acc = logits_tile(h_ptr, stride_h, w_ptr, stride_w, rows, rmask, cols, cmask, D, BF16, FP16, HALF_DOT,
                          TF32, BLOCK_N, BLOCK_V, BLOCK_D)
        g = _grad_tile(acc, b_ptr, cw_ptr, rmask, cols, cmask, y, lse, pc, gy, gw, softcap, BF16, HAS_BIAS,
                       SMOOTH, HAS_CW, SOFTCAP)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + dcols
            dmask = dd < D
            wt = load_f32(w_ptr + cols[:, None].to(tl.int64) * stride_w + dd[None, :],
                          cmask[:, None] & dmask[None, :], 0.0, BF16)  # [BLOCK_V, BLOCK_D]
            if GRAD_TF32:
                part = tl.dot(g, wt, input_precision="tf32")
            else:
                part = tl.dot(g, wt, input_precision="ieee")
            out = dh_ptr + rows[:, None] * D + dd[None, :]
            omask = rmask[:, None] & dmask[None, :]
            tl.store(out, tl.load(out, mask=omask, other=0.0) + part, mask=omask)  # rows of this program only


@triton.jit
def _grad_weight_kernel(
    h_ptr, stride_h, w_ptr, stride_w, b_ptr, target_ptr, lse_ptr, pc_ptr, gy_ptr, gw_ptr, cw_ptr, dw_ptr,
    db_ptr, N, V, D, softcap,
    BF16: tl.constexpr, FP16: tl.constexpr, HALF_DOT: tl.constexpr, TF32: tl.constexpr,
    GRAD_TF32: tl.constexpr, HAS_BIAS: tl.constexpr, SMOOTH: tl.constexpr, HAS_CW: tl.constexpr,
    SOFTCAP: tl.constexpr, WEIGHT_GRAD: tl.constexpr, BIAS_GRAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    cols = tl.program_id(0).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    cmask = cols < V
    dcols = tl.arange(0, BLOCK_D)
    ncols = tl.arange(0, BLOCK_N)
    db = tl.zeros([BLOCK_V], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + ncols.to(tl.int64)
        rmask = rows < N
        y, lse, pc, gy, gw = _row_factors(target_ptr, lse_ptr, pc_ptr, gy_ptr, gw_ptr, rows, rmask, V)
        acc = logits_tile(h_ptr, stride_h, w_ptr, stride_w, rows, rmask, cols, cmask, D, BF16, FP16, HALF_DOT,
                          TF32, BLOCK_N, BLOCK_V, BLOCK_D)
        g = _grad_tile(acc, b_ptr, cw_ptr, rmask, cols, cmask, y, lse, pc, gy, gw, softcap, BF16, HAS_BIAS,
                       SMOOTH, HAS_CW, SOFTCAP)
        if BIAS_GRAD:
            db += tl.sum(g, 0)
        if WEIGHT_GRAD:
            gt = tl.trans(g)  # [BLOCK_V, BLOCK_N]
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + dcols
                dmask = dd < D
                ht = load_f32(h_ptr + rows[:, None] * stride_h + dd[None, :], rmask[:, None] & dmask[None, :],
                              0.0, BF16)  # [BLOCK_N, BLOCK_D]
                if GRAD_TF32:
                    part = tl.dot(gt, ht, input_precision="tf32")
                else:
                    part = tl.dot(gt, ht, input_precision="ieee")
                out = dw_ptr + cols[:, None] * D + dd[None, :]
                omask = cmask[:, None] & dmask[None, :]
                tl.store(out, tl.load(out, mask=omask, other=0.0) + part, mask=omask)  # its own classes
    if BIAS_GRAD:
        tl.store(db_ptr + cols, db, mask=cmask)


#: The kernels, for the compile checks.
KERNELS = {"grad_hidden": _grad_hidden_kernel, "grad_weight": _grad_weight_kernel}


def launch(h, w, bias, target, lse, pc, gy, gw, class_weight, softcap, smooth, tf32, half_dot, need):
    """Runs the two kernels on checked arguments (see :func:`xent._triton.fused_ce_backward`); returns the
    float32 (grad_h [N, D], grad_w [V, D], grad_bias [V]), None where ``need`` says not wanted."""
    rows, hidden = h.shape
    num_classes = w.shape[0]
    f32 = torch.float32
    grad_h = torch.zeros((rows, hidden), dtype=f32, device=h.device) if need[0] else None
    grad_w = torch.zeros((num_classes, hidden), dtype=f32, device=h.device) if need[1] else None
    grad_b = torch.zeros(num_classes, dtype=f32, device=h.device) if need[2] and bias is not None else None
    if rows == 0:
        return grad_h, grad_w, grad_b
    cfg = backward_config(rows, num_classes, hidden, backward_variant(h.element_size(), tf32))
    bf16 = h.dtype == torch.bfloat16

    def bits(t):
        return t.view(torch.int16) if t is not None and t.dtype == torch.bfloat16 else t

    head = (bits(h), h.stride(0), bits(w), w.stride(0), lse if bias is None else bits(bias), target, lse, pc,
            gy, gw, lse if class_weight is None else class_weight)
    flags = dict(BF16=bf16, FP16=h.dtype == torch.float16, HALF_DOT=bf16 and half_dot, TF32=tf32,
                 GRAD_TF32=tf32 or h.dtype != f32, HAS_BIAS=bias is not None, SMOOTH=smooth,
                 HAS_CW=smooth and class_weight is not None, SOFTCAP=softcap is not None,
                 BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d, num_warps=cfg.num_warps,
                 num_stages=cfg.num_stages)
    cap = 1.0 if softcap is None else float(softcap)
    if grad_h is not None:
        _grad_hidden_kernel[(triton.cdiv(rows, cfg.block_n),)](*head, grad_h, rows, num_classes, hidden, cap,
                                                              **flags)
    if grad_w is not None or grad_b is not None:
        _grad_weight_kernel[(triton.cdiv(num_classes, cfg.block_v),)](
            *head, lse if grad_w is None else grad_w, lse if grad_b is None else grad_b, rows, num_classes,
            hidden, cap, WEIGHT_GRAD=grad_w is not None, BIAS_GRAD=grad_b is not None, **flags)
    return grad_h, grad_w, grad_b
