"""The row kernel: cross-entropy rows of a chunk of logits in place, the Triton twin of the C kernel
(``xent/_kernels/ce_rows.c``) with soft-capping and label smoothing besides.

One program per row of z [C, V]; the row is walked in tiles of BLOCK_V columns:

1. an online log-sum-exp (running max k and Σ exp(z − k), rescaled when k grows), with in the same pass
   the entropy's Σ e·(z − k) and label smoothing's Σ_c w_c (z_c − k), each rescaled alike: every term
   keeps one sign (z − k ≤ 0), so nothing cancels whatever V;
2. with an upstream scale, the gradient written over the row:
   scale·(p·((1−ε)a + (ε/V)Σw + 2s·lse) − (1−ε)a·[j = y] − (ε/V)·w_j), times 1 − tanh² under soft-capping.

Everything is float32 whatever the input dtype; a row with a NaN, or whose (capped) maximum is +inf or
−inf, gets a NaN loss, NaN statistics and a NaN gradient (the C kernel's rule, torch's softmax result).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import load_f32, online_lse_step, smoothing_weights, store_f32, tanh_f32
from ._config import row_config

_INF = tl.constexpr(float("inf"))


@triton.jit
def _cap(raw, softcap, SOFTCAP: tl.constexpr):
    if SOFTCAP:
        return softcap * tanh_f32(raw / softcap)
    else:
        return raw


@triton.jit
def _ce_rows_kernel(
    z_ptr, stride_z, target_ptr, scale_ptr, stride_scale, wy_ptr, cw_ptr, loss_ptr, stats_ptr,
    V, z_coef, softcap, eps,
    BF16: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_WY: tl.constexpr, SMOOTH: tl.constexpr,
    HAS_CW: tl.constexpr, SOFTCAP: tl.constexpr, STATS: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # row·stride exceeds 2^31 at 16384 × 256000
    zrow = z_ptr + row * stride_z
    y = tl.load(target_ptr + row)
    tl.device_assert((y >= 0) & (y < V), "target out of range")
    cols = tl.arange(0, BLOCK_V)

    mx = -float("inf")  # the row's (capped) maximum so far
    k = 0.0  # the shift: mx where finite (0 while every logit seen is -inf)
    s = 0.0  # Σ exp(z - k)
    t = 0.0  # Σ e·(z - k), the entropy's sum
    c = 0.0  # Σ w·(z - k), label smoothing's sum
    wsum = 0.0  # Σ w over the columns seen
    nans = 0
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        mask = offs < V
        raw = load_f32(zrow + offs, mask, 0.0, BF16)
        nans += tl.sum((raw != raw).to(tl.int32), 0)
        x = tl.where(mask, _cap(raw, softcap, SOFTCAP), -float("inf"))
        if SMOOTH:
            w = smoothing_weights(cw_ptr, offs, mask, HAS_CW)
        else:
            w = 0.0
        mx, k, s, t, c = online_lse_step(x, mx, k, s, t, c, wsum, w, mask, STATS, SMOOTH, 0)
        if SMOOTH:
            wsum += tl.sum(w, 0)

    bad = (nans > 0) | (mx == _INF) | (mx == -_INF)
    rel = tl.log(s)
    lse = k + rel
    z_y = _cap(load_f32(zrow + y, True, 0.0, BF16), softcap, SOFTCAP)
    if HAS_WY:
        a = tl.load(wy_ptr + row).to(tl.float32)
    else:
        a = 1.0
    loss = a * ((k - z_y) + rel)  # lse - z_y without cancellation at large logits
    coef = a
    if SMOOTH:
        loss = (1.0 - eps) * loss + (eps / V) * (rel * wsum - c)
        coef = (1.0 - eps) * a + (eps / V) * wsum
    loss += z_coef * lse * lse
    coef += 2.0 * z_coef * lse
    nan = float("nan")
    tl.store(loss_ptr + row, tl.where(bad, nan, loss))
    if STATS:
        correct = tl.where(z_y >= mx, 1.0, 0.0)
        tl.store(stats_ptr + 3 * row, tl.where(bad, nan, correct))
        tl.store(stats_ptr + 3 * row + 1, tl.where(bad, nan, rel - t / s))
        tl.store(stats_ptr + 3 * row + 2, tl.where(bad, nan, lse))

    if HAS_SCALE:
        sc = tl.load(scale_ptr + row * stride_scale).to(tl.float32)
        f = sc * coef / s  # gradient = f·e_j − ...
        g_y = sc * a
        if SMOOTH:
            g_y = g_y * (1.0 - eps)
            g_w = sc * (eps / V)
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            mask = offs < V
            raw = load_f32(zrow + offs, mask, 0.0, BF16)
            if SOFTCAP:
                th = tanh_f32(raw / softcap)
                x = softcap * th
            else:
                x = raw
            g = tl.exp(x - k) * f - tl.where(offs == y, g_y, 0.0)
            if SMOOTH:
                if HAS_CW:
                    g -= g_w * load_f32(cw_ptr + offs, mask, 0.0, False)
                else:
                    g -= g_w
            if SOFTCAP:
                g = g * ((1.0 - th) * (1.0 + th))  # d(c·tanh(z/c))/dz = 1 − tanh²
            store_f32(zrow + offs, tl.where(bad, nan, g), mask, BF16)


#: The kernel itself, for the compile checks (xent._triton._compile).
KERNEL = _ce_rows_kernel


def launch(z, target, scale, w_y, z_coef, stats, softcap, label_smoothing, class_weight):
    """Runs the row kernel on checked arguments (see :func:`xent._triton.ce_rows_`); returns the losses."""
    rows, num_classes = z.shape
    loss = torch.empty(rows, dtype=torch.float32, device=z.device)
    if rows == 0:
        return loss
    cfg = row_config(num_classes, z.element_size())
    bf16 = z.dtype == torch.bfloat16
    smooth = label_smoothing > 0.0
    _ce_rows_kernel[(rows,)](
        z.view(torch.int16) if bf16 else z, z.stride(0), target,
        loss if scale is None else scale, 0 if scale is None else scale.stride(0),
        loss if w_y is None else w_y,
        loss if class_weight is None else class_weight,
        loss, loss if stats is None else stats,
        num_classes, float(z_coef), 1.0 if softcap is None else float(softcap), float(label_smoothing),
        BF16=bf16, HAS_SCALE=scale is not None, HAS_WY=w_y is not None, SMOOTH=smooth,
        HAS_CW=smooth and class_weight is not None, SOFTCAP=softcap is not None, STATS=stats is not None,
        BLOCK_V=cfg.block_v, num_warps=cfg.num_warps,
    )
    return loss
