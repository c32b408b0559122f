"""Triton helpers shared by xent's kernels, written so that Triton's CPU interpreter computes exactly what
a GPU does (docs/cuda.md):

- bf16 is read and written through its bits (an int16 view): the load is a 16-bit shift, exact; the store
  rounds float32 to nearest even by integer arithmetic, as torch's ``.to(torch.bfloat16)`` and a GPU's
  ``cvt.rn.bf16.f32`` do. The interpreter's own bf16 conversions are wrong (its load flushes subnormals,
  its store truncates), and it never does bf16 arithmetic at all (bf16 is uint16 to numpy), so the
  kernels never use the bf16 type: the same code runs on both.
- tanh is written with ``exp`` (libdevice's tanh returns None in the interpreter).
"""

from __future__ import annotations

import triton
import triton.language as tl

# tanh(x) = x + x³·P(x²) on |x| < 0.625, P a least-squares fit (≤ 1.3 ulp in float32 there); above,
# 1 − 2/(e^{2|x|} + 1) (≤ 3 ulp with a correctly rounded exp; no cancellation: tanh ≥ 0.55 there).
_T0 = tl.constexpr(-0.33333333206054655)
_T1 = tl.constexpr(0.1333332510596335)
_T2 = tl.constexpr(-0.05396643271747563)
_T3 = tl.constexpr(0.021850154658520346)
_T4 = tl.constexpr(-0.008751771509139118)
_T5 = tl.constexpr(0.0032292201384225183)
_T6 = tl.constexpr(-0.0008034715803403956)


@triton.jit
def tanh_f32(x):
    """tanh of a float32 tensor (finite or ±inf; a NaN gives ±1: callers detect NaN inputs themselves)."""
    ax = tl.abs(x)
    x2 = x * x
    p = _T6 * x2 + _T5
    p = p * x2 + _T4
    p = p * x2 + _T3
    p = p * x2 + _T2
    p = p * x2 + _T1
    p = p * x2 + _T0
    small = x + x * x2 * p
    e = tl.exp(2.0 * tl.minimum(ax, 15.0))  # tanh(15) rounds to 1 in float32
    large = 1.0 - 2.0 / (e + 1.0)
    large = tl.where(x < 0.0, -large, large)
    return tl.where(ax < 0.625, small, large)


@triton.jit
def load_f32(ptrs, mask, other, BF16: tl.constexpr):
    """float32 values of the elements at ``ptrs`` (``other`` where ``mask`` is off). With ``BF16`` the
    pointers are to the int16 bits of bfloat16 values, widened exactly by a shift."""
    if BF16:
        bits = tl.load(ptrs, mask=mask, other=0).to(tl.uint16, bitcast=True).to(tl.uint32)
        x = (bits << 16).to(tl.float32, bitcast=True)
    else:
        x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    return tl.where(mask, x, other)


@triton.jit
def bf16_bits(x):
    """The int16 bits of float32 ``x`` rounded to bfloat16 to nearest even (a NaN stays a quiet NaN).

    On the magnitude's bits, so no integer overflows (Triton's overflow checks run under debug): adding
    0x7FFF plus the lowest kept bit carries into the kept bits exactly when the dropped half is above
    one half, or equal to it with the kept bits odd."""
    u = x.to(tl.int32, bitcast=True)
    sign = (u >> 16) & 0x8000
    mag = u & 0x7FFFFFFF
    mag = tl.where(mag > 0x7F800000, 0x7FC00000, mag)  # NaN: quiet, and no carry past the top
    rounded = (mag + 0x7FFF + ((mag >> 16) & 1)) >> 16
    return (rounded | sign).to(tl.uint16).to(tl.int16, bitcast=True)


@triton.jit
def store_f32(ptrs, x, mask, BF16: tl.constexpr):
    """Store float32 ``x`` in the pointers' element type (float32, float16: the hardware's round to nearest
    even), or with ``BF16`` as the rounded bits of bfloat16 into int16 pointers."""
    if BF16:
        tl.store(ptrs, bf16_bits(x), mask=mask)
    else:
        tl.store(ptrs, x.to(ptrs.dtype.element_ty), mask=mask)


_INF = tl.constexpr(float("inf"))


@triton.jit
def online_lse_step(x, mx, k, s, t, c, wsum, w, wmask, STATS: tl.constexpr, SMOOTH: tl.constexpr,
                    AXIS: tl.constexpr):
    """One tile of an online log-sum-exp along ``AXIS`` of the (capped, masked to −inf) logits ``x``.

    Running per row: mx the maximum, k the shift (mx where finite, else the old k: 0 while every logit
    is −inf), s = Σ exp(z − k), with ``STATS`` t = Σ e·(z − k) (the entropy's sum), with ``SMOOTH``
    c = Σ w·(z − k) (label smoothing's) over the columns seen, wsum = Σ w over the columns seen before
    this tile; w (class weights, 0 at masked columns) and wmask broadcast against x. When the shift
    grows every sum is carried over exactly: e·(z − k) and w·(z − k) keep one sign, so nothing cancels.
    Returns the new (mx, k, s, t, c).
    """
    mx_new = tl.maximum(mx, tl.max(x, AXIS))
    k_new = tl.where((mx_new > -_INF) & (mx_new < _INF), mx_new, k)
    shift = k - k_new  # <= 0
    alpha = tl.where(mx > -_INF, tl.exp(shift), 0.0)  # the old sums are 0 while mx is -inf
    if AXIS == 1:
        d = x - k_new[:, None]
    else:
        d = x - k_new
    e = tl.exp(d)  # 0 at masked columns and -inf logits
    if STATS:
        t = alpha * (t + shift * s) + tl.sum(tl.where(e > 0.0, e * d, 0.0), AXIS)
    s = alpha * s + tl.sum(e, AXIS)
    if SMOOTH:
        c = c + shift * wsum + tl.sum(tl.where(wmask, w * d, 0.0), AXIS)
    return mx_new, k_new, s, t, c


@triton.jit
def smoothing_weights(cw_ptr, cols, mask, HAS_CW: tl.constexpr):
    """Label smoothing's class weights w_c of the columns ``cols`` (1 without ``HAS_CW``), 0 where
    ``mask`` is off."""
    if HAS_CW:
        return load_f32(cw_ptr + cols, mask, 0.0, False)
    else:
        return tl.where(mask, 1.0, 0.0)
