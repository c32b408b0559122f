"""Small Triton kernels the harness tests launch (test_triton_harness.py). They live in their own module
because conftest.py imports it while TRITON_INTERPRET is set: @triton.jit decides at decoration time
whether a kernel is interpreted."""

import triton
import triton.language as tl

from xent._triton._common import load_f32, store_f32, tanh_f32


@triton.jit
def copy_kernel(src_ptr, dst_ptr, n, SRC_BF16: tl.constexpr, DST_BF16: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    store_f32(dst_ptr + offs, load_f32(src_ptr + offs, mask, 0.0, SRC_BF16), mask, DST_BF16)


@triton.jit
def bf16_arith_kernel(x_ptr, o_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    tl.store(o_ptr + offs, (x * x).to(tl.float32))


@triton.jit
def bf16_cast_kernel(x_ptr, o_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(o_ptr + offs, tl.load(x_ptr + offs).to(tl.float32))


@triton.jit
def shifted_copy_kernel(x_ptr, o_ptr, n, shift, STORE_SHIFT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    if STORE_SHIFT:
        tl.store(o_ptr + offs + shift, tl.load(x_ptr + offs, mask=mask), mask=mask)
    else:
        tl.store(o_ptr + offs, tl.load(x_ptr + offs + shift, mask=mask), mask=mask)


@triton.jit
def float_arg_kernel(o_ptr, a):
    tl.store(o_ptr, a * 1.0)


@triton.jit
def dot_kernel(a_ptr, b_ptr, o_ptr, TF32: tl.constexpr, M: tl.constexpr):
    r = tl.arange(0, M)
    a = tl.load(a_ptr + r[:, None] * M + r[None, :])
    b = tl.load(b_ptr + r[:, None] * M + r[None, :])
    if TF32:
        c = tl.dot(a, b, input_precision="tf32")
    else:
        c = tl.dot(a, b, input_precision="ieee")
    tl.store(o_ptr + r[:, None] * M + r[None, :], c)


@triton.jit
def tanh_kernel(x_ptr, o_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(o_ptr + offs, tanh_f32(tl.load(x_ptr + offs, mask=mask)), mask=mask)
