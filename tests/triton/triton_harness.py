"""Closes the traps of Triton's CPU interpreter (issue 22) so a kernel that passes here computes what it
computes on a GPU, or fails loudly:

- bounds: every masked load and store is checked, address by address, against the elements of the
  tensors passed to the launch (an unmasked out-of-bounds access would silently read a neighbour);
- asserts: ``tl.device_assert`` is evaluated (the interpreter skips it, and its own check never fires);
- bf16: any bf16 arithmetic, dot or conversion raises (the interpreter keeps bf16 as uint16 and numpy
  computes on the bits; its conversions flush subnormals and truncate): kernels move bf16 through its
  bits (xent/_triton/_common.py), so nothing in them may touch the bf16 type;
- float arguments are rounded to float32, as a GPU receives them (the interpreter passes Python floats);
- ``tl.dot`` in TF32 rounds its float32 operands to TF32 (10-bit mantissa, round half away from zero, as
  ``cvt.rna.tf32.f32``), where the interpreter multiplies them exactly;
- autotuning with several configurations is not used (the launcher picks one configuration).

What it cannot close: programs run one after another, so races and atomic ordering are never exercised
(the kernels use no atomics), and timing means nothing here.
"""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import torch
import triton.language as tl
from triton.runtime import interpreter as interp


class InterpreterTrap(AssertionError):
    """A kernel did something whose interpreted result would differ from a GPU's."""


def _addresses(t: torch.Tensor) -> np.ndarray:
    """The byte address of every element of the view ``t``."""
    offsets = torch.zeros((), dtype=torch.int64)
    for size, stride in zip(t.shape, t.stride()):
        offsets = offsets.unsqueeze(-1) + torch.arange(size, dtype=torch.int64) * stride
    return (t.data_ptr() + offsets.reshape(-1).numpy().astype(np.uint64) * t.element_size()).astype(np.uint64)


class Record:
    """What the harness saw: launches, loads and stores checked."""

    def __init__(self):
        self.launches = 0
        self.loads = 0
        self.stores = 0
        self.allowed = np.empty(0, dtype=np.uint64)
        self.tf32_dots = 0

    def check(self, ptrs, mask, what: str) -> None:
        addrs = ptrs.data[mask.data] if mask is not None else ptrs.data.reshape(-1)
        addrs = np.asarray(addrs, dtype=np.uint64).reshape(-1)
        if addrs.size == 0:
            return
        at = np.searchsorted(self.allowed, addrs)
        inside = (at < self.allowed.size) & (self.allowed[np.minimum(at, self.allowed.size - 1)] == addrs)
        if not inside.all():
            raise InterpreterTrap(f"{what} outside every tensor argument: {int((~inside).sum())} of "
                                  f"{addrs.size} addresses (first {int(addrs[~inside][0]):#x})")


def _bf16(*handles) -> bool:
    return any(getattr(h, "dtype", None) is not None and h.dtype.scalar == tl.bfloat16 for h in handles)


def _tf32(x: np.ndarray) -> np.ndarray:
    """float32 rounded to TF32's 10-bit mantissa, half away from zero (cvt.rna.tf32.f32)."""
    bits = x.astype(np.float32).view(np.uint32)
    finite = np.isfinite(x)
    rounded = np.where(finite, (bits + np.uint32(0x1000)) & np.uint32(0xFFFFE000), bits)
    return rounded.astype(np.uint32).view(np.float32)


@contextlib.contextmanager
def checked():
    """Runs the kernels launched inside it under the checks above; yields a :class:`Record`."""
    record = Record()
    builder = interp.interpreter_builder
    cls = type(builder)
    saved = {name: getattr(cls, name) for name in (
        "create_masked_load", "create_masked_store", "create_assert", "binary_op", "unary_op", "cast_impl",
        "create_fp_to_fp", "create_dot", "create_fma")}
    saved_init = interp.GridExecutor._init_args_hst
    saved_cvt = interp._implicit_cvt
    saved_options = builder.options

    def init_args(self, args_dev, kwargs):
        args_hst, kwargs_hst = saved_init(self, args_dev, kwargs)
        tensors = [a for a in [*args_hst, *kwargs_hst.values()] if isinstance(a, torch.Tensor)]
        if any(t.device.type != "cpu" for t in tensors):
            raise InterpreterTrap("the harness runs CPU tensors only")
        record.allowed = np.unique(np.concatenate([_addresses(t) for t in tensors] or
                                                  [np.empty(0, dtype=np.uint64)]))
        record.launches += 1
        return args_hst, kwargs_hst

    def implicit_cvt(arg):
        if isinstance(arg, float):  # a GPU receives an fp32 scalar
            return tl.tensor(interp.TensorHandle(np.array([arg], dtype=np.float32), tl.float32), tl.float32)
        return saved_cvt(arg)

    def masked_load(self, ptrs, mask, other, cache_policy, is_volatile):
        record.loads += 1
        record.check(ptrs, mask, "a load")
        return saved["create_masked_load"](self, ptrs, mask, other, cache_policy, is_volatile)

    def masked_store(self, ptrs, value, mask, cache_policy):
        record.stores += 1
        record.check(ptrs, mask, "a store")
        if _bf16(value):
            raise InterpreterTrap("a bf16 store: the interpreter's bf16 values are not a GPU's")
        return saved["create_masked_store"](self, ptrs, value, mask, cache_policy)

    def assert_(self, condition, message):
        if not np.all(condition.data):
            raise InterpreterTrap(f"device_assert failed: {message}")

    def no_bf16(name):
        def op(self, *args, **kwargs):
            if _bf16(*args, *kwargs.values()):
                raise InterpreterTrap(f"bf16 {name} in a kernel: the interpreter computes it wrongly")
            return saved[name](self, *args, **kwargs)
        return op

    def cast(self, src, dst_type):
        if _bf16(src) or dst_type.scalar == tl.bfloat16:
            raise InterpreterTrap("a bf16 conversion in a kernel: the interpreter's flushes subnormals and "
                                  "truncates; move bf16 through its bits (xent/_triton/_common.py)")
        return saved["cast_impl"](self, src, dst_type)

    def fp_to_fp(self, src, dst_type, rounding_mode):
        if _bf16(src) or dst_type.scalar == tl.bfloat16:
            raise InterpreterTrap("a bf16 conversion in a kernel")
        return saved["create_fp_to_fp"](self, src, dst_type, rounding_mode)

    def dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if _bf16(a, b):
            raise InterpreterTrap("a bf16 tl.dot: the interpreter multiplies the bits, not the values")
        if (input_precision is not None and "TF32" == str(input_precision).split(".")[-1].upper()
                and a.data.dtype == np.float32 and b.data.dtype == np.float32):
            record.tf32_dots += 1
            a = interp.TensorHandle(_tf32(a.data), a.dtype.scalar)
            b = interp.TensorHandle(_tf32(b.data), b.dtype.scalar)
        return saved["create_dot"](self, a, b, d, input_precision, max_num_imprecise_acc)

    patches = {
        "create_masked_load": masked_load, "create_masked_store": masked_store, "create_assert": assert_,
        "binary_op": no_bf16("binary_op"), "unary_op": no_bf16("unary_op"), "cast_impl": cast,
        "create_fp_to_fp": fp_to_fp, "create_dot": dot, "create_fma": no_bf16("create_fma"),
    }
    try:
        for name, fn in patches.items():
            setattr(cls, name, fn)
        interp.GridExecutor._init_args_hst = init_args
        interp._implicit_cvt = implicit_cvt
        builder.options = dataclasses.replace(saved_options, debug=True)
        yield record
    finally:
        for name, fn in saved.items():
            setattr(cls, name, fn)
        interp.GridExecutor._init_args_hst = saved_init
        interp._implicit_cvt = saved_cvt
        builder.options = saved_options


def spacing(r: torch.Tensor) -> torch.Tensor:
    """float64 distance from |r| (a half tensor) to the next representable value above it."""
    a = r.abs()
    return (torch.nextafter(a, torch.full_like(a, float("inf"))).double() - a.double())


def assert_rounded(got: torch.Tensor, ref: torch.Tensor) -> None:
    """A half-precision result within half a unit in the last place of the float64 reference, plus float32
    noise (a few ulp of the row's largest gradient: p·coef − (ε/V)·w_j cancels where they are close):
    rounded to nearest, as a GPU stores it. A truncating store fails this for about half of all
    elements (test_triton_harness.py checks that it does)."""
    err = (got.double() - ref).abs()
    noise = 2e-7 * ref.abs().amax(dim=-1, keepdim=True)
    bound = 0.5 * spacing(ref.to(got.dtype)) * (1 + 1e-3) + noise + 1e-30
    bad = err > bound
    assert not bad.any(), f"{int(bad.sum())} of {bad.numel()} not rounded to nearest: max err {err.max():.3g}"
