"""The harness closes each trap of Triton's interpreter (triton_harness.py), and xent's bf16, float16 and
tanh helpers compute what a GPU computes: checked exhaustively or against float64."""

from __future__ import annotations

import pytest

pytest.importorskip("triton.language", reason="triton is not installed (pip install -c constraints.txt "
                                                "-e '.[test]')")
import torch  # noqa: E402
import triton  # noqa: E402
import triton_test_kernels as K  # noqa: E402
from triton_harness import assert_rounded  # noqa: E402


def copy(src: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """src → float32 → dtype through the kernels' helpers (bf16 as int16 bits)."""
    dst = torch.empty(src.shape, dtype=dtype)

    def bits(t):
        return t.view(torch.int16) if t.dtype == torch.bfloat16 else t

    grid = (triton.cdiv(src.numel(), 4096),)
    K.copy_kernel[grid](bits(src), bits(dst), src.numel(),
                        SRC_BF16=src.dtype == torch.bfloat16, DST_BF16=dtype == torch.bfloat16, BLOCK=4096)
    return dst


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit patterns, any NaN equal to any NaN."""
    nan = a.isnan() & b.isnan()
    return bool(((a.view(torch.int16) == b.view(torch.int16)) | nan).all()) if a.element_size() == 2 else \
        bool(((a.view(torch.int32) == b.view(torch.int32)) | nan).all())


def test_bf16_load_is_exact_for_every_pattern():
    """All 65536 bf16 values, subnormals included (the interpreter's own conversion flushes them)."""
    every = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    assert same_bits(copy(every, torch.float32), every.float())


def rounding_cases() -> torch.Tensor:
    """float32 values whose rounding to 16 bits is decided by the last bits: exact ties between an even and
    an odd neighbour, just either side of ties, overflow to inf, subnormals, NaN, ±inf, random."""
    g = torch.Generator().manual_seed(0)
    hi = torch.randint(0, 1 << 16, (4000,), generator=g, dtype=torch.int64)
    low = torch.tensor([0x0000, 0x7FFF, 0x8000, 0x8001, 0xFFFF, 0x0001, 0x4000, 0xC000], dtype=torch.int64)
    bits = (hi.unsqueeze(1) << 16 | low).reshape(-1)
    bits = torch.cat([bits, torch.randint(0, 1 << 32, (4000,), generator=g, dtype=torch.int64)])
    bits = torch.where(bits >= 1 << 31, bits - (1 << 32), bits).to(torch.int32)
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 3.4e38, -3.4e38, 1e-40,
                            -1e-42, 65504.0, 65520.0, 6e-8, 2.9e-8, 1e-5])
    return torch.cat([bits.view(torch.float32), special])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_stores_round_to_nearest_even(dtype):
    """float32 → bf16 (the kernels' integer rounding) and float32 → float16 (the hardware's conversion)
    give torch's .to(dtype) bit for bit."""
    x = rounding_cases()
    assert same_bits(copy(x, dtype), x.to(dtype))


def test_a_truncating_store_would_be_caught():
    """The half-precision gradient check of test_triton_rows rejects truncation (the interpreter's own bf16
    store), which is off by up to one unit in the last place."""
    ref = torch.randn(64, 300, dtype=torch.float64)
    bits = ref.float().view(torch.int32)
    truncated = (bits & ~0xFFFF).view(torch.float32).to(torch.bfloat16)  # drop the low half: exact
    assert_rounded(ref.to(torch.bfloat16), ref)
    with pytest.raises(AssertionError, match="not rounded to nearest"):
        assert_rounded(truncated, ref)


@pytest.mark.parametrize("kernel", [K.bf16_arith_kernel, K.bf16_cast_kernel], ids=["arithmetic", "cast"])
def test_bf16_arithmetic_or_conversion_in_a_kernel_fails_loudly(kernel):
    x = torch.randn(16).to(torch.bfloat16)
    with pytest.raises(Exception, match="bf16"):
        kernel[(1,)](x, torch.empty(16), BLOCK=16)


@pytest.mark.parametrize("store", [False, True], ids=["load", "store"])
def test_out_of_bounds_access_is_caught(harness, store):
    """One element past the end of a tensor (memory the interpreter would silently read or write) fails."""
    x, o = torch.arange(8.0), torch.zeros(8)
    K.shifted_copy_kernel[(1,)](x, o, 8, 0, STORE_SHIFT=store, BLOCK=8)  # in bounds: fine
    assert torch.equal(o, x) and harness.loads == 1 and harness.stores == 1
    with pytest.raises(Exception, match="outside every tensor argument"):
        K.shifted_copy_kernel[(1,)](x, o, 8, 1, STORE_SHIFT=store, BLOCK=8)


def test_float_arguments_arrive_as_float32():
    out = torch.zeros(1, dtype=torch.float64)
    K.float_arg_kernel[(1,)](out, 0.1)
    assert out.item() == float(torch.tensor(0.1, dtype=torch.float32))


def test_tf32_dot_rounds_its_operands(harness):
    """fp32 tl.dot in TF32 multiplies operands rounded to a 10-bit mantissa (an H100 does; the bare
    interpreter multiplies exactly); "ieee" stays exact."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(16, 16, generator=g), torch.randn(16, 16, generator=g)

    def tf32(x):  # half away from zero, written differently from the harness: via float64 rounding
        m, e = torch.frexp(x.double())
        return (torch.sign(m) * torch.floor(m.abs() * 2048 + 0.5) / 2048 * 2.0**e).float()

    out = torch.empty(16, 16)
    K.dot_kernel[(1,)](a, b, out, TF32=True, M=16)
    expected = tf32(a).double() @ tf32(b).double()
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6)
    assert (out.double() - a.double() @ b.double()).abs().max() > 1e-4  # visibly not exact
    assert harness.tf32_dots == 1
    K.dot_kernel[(1,)](a, b, out, TF32=False, M=16)
    torch.testing.assert_close(out.double(), a.double() @ b.double(), rtol=1e-6, atol=1e-6)


def test_tanh_within_a_few_ulp():
    """tanh written with exp (libdevice's returns None in the interpreter): ≤ 4 ulp of float64's, odd,
    ±1 at ±inf, across both of its branches."""
    base = torch.cat([torch.linspace(0, 12, 20001), torch.logspace(-30, 1, 2000), torch.tensor([0.625])])
    n = base.numel()
    x = torch.cat([base, -base, torch.tensor([float("inf"), -float("inf")])])
    out = torch.empty_like(x)
    K.tanh_kernel[(triton.cdiv(x.numel(), 4096),)](x, out, x.numel(), BLOCK=4096)
    ref = torch.tanh(x.double())
    ulp = torch.finfo(torch.float32).eps * ref.abs().clamp(min=torch.finfo(torch.float32).tiny)
    assert ((out.double() - ref).abs() <= 4 * ulp).all()
    assert torch.equal(out[:n], -out[n : 2 * n]) and out[-2:].tolist() == [1.0, -1.0]
