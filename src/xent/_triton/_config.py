"""Launch configurations of xent's Triton kernels: pure Python, no triton import (the compile checks and
the docs enumerate them without a GPU).

The row kernel (:mod:`xent._triton._rows`) runs one program per row of a [C, V] chunk and walks the row in
tiles of ``block_v`` columns, twice (the online log-sum-exp, then the gradient). It holds no shared-memory
tile of its own (reductions only: about 1 KiB), so its limit is registers: a tile is
``block_v / (32·num_warps)`` elements per thread, with several float32 values live per element. The
choice, from the compiled metadata (benchmarks/results/triton_compile.md, sm_90 and sm_100):

- ``block_v`` = the next power of two ≥ V, capped at 4096 for float32 inputs and 8192 for bf16/fp16
  (the same 16 KiB of logits per tile in flight); never below 128.
- ``num_warps`` = ``block_v / 256`` clamped to [4, 32]: at most 8 elements per thread, 24–64
  registers. 16 per thread (8192 columns on 16 warps) takes up to 86 registers and ptxas spills 8 bytes
  per thread in its no-gradient variant; wider tiles (16384) compile but only lengthen each program.

Every configuration :func:`row_config` can return is listed by :func:`row_configs`;
tests/triton/test_triton_compile.py compiles each for sm_90 (and the widest for sm_100) and checks it
fits the shared memory and spills at most :data:`MAX_SPILL_BYTES` per thread (ptxas spills a word or two
in a few variants whatever the width, e.g. 4 bytes for sm_100 float16 at 8192 columns; two words stay in
L1). None of this has been timed on a GPU (docs/cuda.md): the caps
are set from the compiled metadata alone, to be revised by benchmarks/gpu_check.sh.
"""

from __future__ import annotations

from dataclasses import dataclass

#: The widest tile per input element size in bytes (4: float32; 2: bf16, fp16).
ROW_BLOCK_CAP = {4: 4096, 2: 8192}
ROW_BLOCK_MIN = 128
#: Spill bytes per thread the compile check tolerates: a word or two that ptxas spills in some variants.
MAX_SPILL_BYTES = 16
#: H100 (sm_90) shared memory per block with the opt-in attribute; B200 (sm_100) the same.
SHARED_LIMIT = {90: 232_448, 100: 232_448}


@dataclass(frozen=True)
class RowConfig:
    """One launch configuration of the row kernel: columns per tile and warps per program."""

    block_v: int
    num_warps: int


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def row_config(num_classes: int, itemsize: int) -> RowConfig:
    """The row kernel's configuration for rows of ``num_classes`` logits of ``itemsize`` bytes."""
    block = min(max(_next_pow2(num_classes), ROW_BLOCK_MIN), ROW_BLOCK_CAP[itemsize])
    return RowConfig(block, min(32, max(4, block // 256)))


def row_configs(itemsize: int) -> list[RowConfig]:
    """Every configuration :func:`row_config` can return for inputs of ``itemsize`` bytes."""
    out, block = [], ROW_BLOCK_MIN
    while block <= ROW_BLOCK_CAP[itemsize]:
        out.append(row_config(block, itemsize))
        block *= 2
    return out


@dataclass(frozen=True)
class FusedConfig:
    """One launch configuration of the fused no-grad forward (:mod:`xent._triton._fused`): rows per
    program, vocabulary columns per tile, hidden columns per dot step, warps and pipeline stages."""

    block_n: int
    block_v: int
    block_d: int
    num_warps: int
    num_stages: int


#: The fused forward's configurations by input element size; the launcher takes the first whose tiles are
#: not much wider than the problem. Shared memory is about num_stages·(block_n + block_v)·block_d·itemsize
#: (the staged h and W tiles); benchmarks/results/triton_compile.md lists what each compiles to.
FUSED_CONFIGS = {
    4: (FusedConfig(64, 128, 32, 8, 3), FusedConfig(16, 64, 32, 4, 2)),
    2: (FusedConfig(64, 128, 64, 8, 3), FusedConfig(16, 64, 32, 4, 2)),
}


def fused_config(rows: int, num_classes: int, hidden: int, itemsize: int) -> FusedConfig:
    """The fused forward's configuration for ``rows`` × ``hidden`` inputs against ``num_classes`` classes
    of ``itemsize`` bytes: the large tiles, or the small ones when the problem is smaller than a tile."""
    big, small = FUSED_CONFIGS[itemsize]
    if rows <= small.block_n or num_classes <= small.block_v or hidden <= small.block_d:
        return small
    return big


#: The fused backward's configurations (:mod:`xent._triton._backward`, both kernels), by operand variant:
#: "half" (bf16, float16), "tf32" (float32 in TF32), "ieee" (float32 exact: its dots are FMA loops, not
#: tensor cores, and at 64×128 tiles ptxas spilled 6.5 KB per thread), chosen as :func:`fused_config`
#: chooses: the large tiles, or the small ones for a problem smaller than a tile. Shared memory holds the
#: staged h and W tiles of the logits dot and the float32 operands of the gradient dot (g [block_n,
#: block_v] and a block_d slice of W or h). One pipeline stage in float32: with two the dW kernel took 255
#: registers and spilled 24 bytes (benchmarks/results/triton_compile.md lists what each compiles to).
BACKWARD_CONFIGS = {
    "half": (FusedConfig(64, 128, 32, 8, 2), FusedConfig(16, 64, 32, 4, 1)),
    "tf32": (FusedConfig(64, 128, 32, 8, 1), FusedConfig(16, 64, 32, 4, 1)),
    "ieee": (FusedConfig(32, 64, 32, 8, 1), FusedConfig(16, 64, 32, 4, 1)),
}


def backward_variant(itemsize: int, tf32: bool) -> str:
    """The key of :data:`BACKWARD_CONFIGS` for inputs of ``itemsize`` bytes (float32 dots in TF32 or not)."""
    return "half" if itemsize == 2 else "tf32" if tf32 else "ieee"


def backward_config(rows: int, num_classes: int, hidden: int, variant: str) -> FusedConfig:
    """The fused backward's configuration for an operand ``variant`` (:func:`backward_variant`), as
    :func:`fused_config` picks the forward's."""
    big, small = BACKWARD_CONFIGS[variant]
    if rows <= small.block_n or num_classes <= small.block_v or hidden <= small.block_d:
        return small
    return big
