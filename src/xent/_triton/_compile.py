"""Ahead-of-time compilation of xent's Triton kernels for a GPU architecture, on a machine without one.

Triton's wheel ships ``ptxas`` and ``cuobjdump``, so ``triton.compile(..., target=GPUTarget("cuda", 90,
32))`` builds the sm_90 cubin of a kernel here; its metadata (with ``cuobjdump --dump-resource-usage``
on the cubin) gives the shared memory per program, the registers and stack per thread, and ``ptxas -v``
on its PTX the spill stores and loads. The compile test (tests/triton/test_triton_compile.py) and
benchmarks/triton_compile_table.py use this for every configuration the launcher can choose
(:mod:`xent._triton._config`).

Run it in a process without ``TRITON_INTERPRET`` (kernels are decorated as interpreted otherwise):
``python -m xent._triton._compile [--kernel rows|fused|backward] [--arch 90 100] [--flags ...] [--widest]``
prints one JSON line per compiled configuration.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ._config import (
    BACKWARD_CONFIGS,
    FUSED_CONFIGS,
    SHARED_LIMIT,
    FusedConfig,
    RowConfig,
    backward_variant,
    row_configs,
)

_PTR = {torch.float32: "*fp32", torch.bfloat16: "*i16", torch.float16: "*fp16"}  # bf16 moves as int16 bits
#: Feature sets compiled per configuration: the common training call and the one that uses every option.
FLAG_SETS = {
    "grad": dict(HAS_SCALE=True, HAS_WY=False, SMOOTH=False, HAS_CW=False, SOFTCAP=False, STATS=False),
    "all": dict(HAS_SCALE=True, HAS_WY=True, SMOOTH=True, HAS_CW=True, SOFTCAP=True, STATS=True),
    "no_grad": dict(HAS_SCALE=False, HAS_WY=False, SMOOTH=False, HAS_CW=False, SOFTCAP=False, STATS=True),
}


@dataclass
class Compiled:
    """One compiled configuration and its resources (per thread: registers, spills; per program: shared)."""

    kernel: str
    arch: int
    dtype: str
    flags: str
    block_v: int
    num_warps: int
    shared: int
    shared_limit: int
    registers: int | None
    spill_stores: int | None
    spill_loads: int | None
    stack: int | None
    seconds: float
    block_n: int | None = None  # the fused forward's rows per program, D step and pipeline stages
    block_d: int | None = None
    num_stages: int | None = None


def supported_archs() -> list[int]:
    """The CUDA architectures this Triton can compile for among 90 (Hopper) and 100 (Blackwell)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    out = []
    for arch in (90, 100):
        try:
            make_backend(GPUTarget("cuda", arch, 32))
            out.append(arch)
        except Exception:  # noqa: BLE001 - any failure means "not this arch"
            continue
    return out


def _cuobjdump() -> str | None:
    import triton

    shipped = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(shipped) if shipped.exists() else shutil.which("cuobjdump")


def resource_usage(cubin: bytes) -> dict:
    """Registers, spill stores/loads and local memory per thread of a cubin, from cuobjdump (the wheel's;
    empty when there is none)."""
    tool = _cuobjdump()
    if tool is None:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        out = subprocess.run([tool, "--dump-resource-usage", str(path)], capture_output=True, text=True,
                             timeout=60).stdout
    found = {}
    for key, name in (("REG", "registers"), ("STACK", "stack"), ("SHARED", "static_shared")):
        match = re.search(rf"\b{key}:(\d+)", out)
        if match:
            found[name] = int(match.group(1))
    return found


def _ptxas(arch: int) -> str | None:
    """The ptxas Triton itself runs for ``arch`` (the wheel ships one per PTX generation)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(arch).path
    except Exception:  # noqa: BLE001 - no NVIDIA backend: no ptxas
        return None


def spills(ptx: str, arch: int) -> tuple[int | None, int | None]:
    """Spill stores and loads (bytes per thread) from ``ptxas -v`` on the kernel's PTX (the wheel's
    ptxas; None, None without one)."""
    tool = _ptxas(arch)
    if tool is None:
        return None, None
    gpu = f"sm_{arch}a"  # Triton targets the arch-specific variant (wgmma, tcgen05)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.ptx"
        path.write_text(ptx)
        # the options Triton's own make_cubin passes (triton/backends/nvidia/compiler.py)
        run = subprocess.run([tool, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}", str(path),
                              "-o", str(Path(tmp) / "k.o")], capture_output=True, text=True, timeout=120)
    match = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", run.stdout + run.stderr)
    return (int(match.group(1)), int(match.group(2))) if match else (None, None)


def _build(kernel, signature: dict, constexprs: dict, aligned: tuple, num_warps: int, num_stages: int | None,
           arch: int) -> dict:
    """Compile one specialisation of ``kernel`` for sm_``arch``; its resources as :class:`Compiled`'s
    fields (shared, registers, spill_stores, spill_loads, stack, seconds)."""
    import time

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if not isinstance(kernel, triton.runtime.jit.JITFunction):
        raise RuntimeError("the kernels were decorated as interpreted: compile without TRITON_INTERPRET")
    signature = dict(signature)
    for name in constexprs:
        signature[name] = "constexpr"
    # 16-byte aligned pointers and row strides, as torch's allocations and the launchers' chunks give
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names) if name in aligned}
    src = ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": num_warps} if num_stages is None else {"num_warps": num_warps,
                                                                    "num_stages": num_stages}
    started = time.perf_counter()
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    seconds = time.perf_counter() - started
    usage = resource_usage(compiled.asm["cubin"])
    stores, loads = spills(compiled.asm["ptx"], arch)
    # shared memory per program: Triton's dynamic allocation (metadata) plus the cubin's static part
    shared = int(compiled.metadata.shared) + usage.get("static_shared", 0)
    return dict(shared=shared, shared_limit=SHARED_LIMIT.get(arch, 0), registers=usage.get("registers"),
                spill_stores=stores, spill_loads=loads, stack=usage.get("stack"), seconds=round(seconds, 2))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def compile_row(cfg: RowConfig, dtype: torch.dtype, flags: str, arch: int) -> Compiled:
    """Compile the row kernel in configuration ``cfg`` for ``dtype`` logits, feature set ``flags`` (a key
    of :data:`FLAG_SETS`) and sm_``arch``."""
    from ._rows import KERNEL

    signature = {
        "z_ptr": _PTR[dtype], "stride_z": "i32", "target_ptr": "*i64", "scale_ptr": "*fp32",
        "stride_scale": "i32", "wy_ptr": "*fp32", "cw_ptr": "*fp32", "loss_ptr": "*fp32",
        "stats_ptr": "*fp32", "V": "i32", "z_coef": "fp32", "softcap": "fp32", "eps": "fp32",
    }
    constexprs = dict(FLAG_SETS[flags], BF16=dtype == torch.bfloat16, BLOCK_V=cfg.block_v)
    aligned = ("z_ptr", "target_ptr", "loss_ptr", "stats_ptr", "stride_z")
    built = _build(KERNEL, signature, constexprs, aligned, cfg.num_warps, None, arch)
    return Compiled("ce_rows", arch, _dtype_name(dtype), flags, cfg.block_v, cfg.num_warps, **built)


#: The fused forward's feature sets: plain cross-entropy, and every option with the statistics.
FUSED_FLAG_SETS = {
    "plain": dict(HAS_BIAS=False, HAS_WY=False, SMOOTH=False, HAS_CW=False, SOFTCAP=False, STATS=False),
    "all": dict(HAS_BIAS=True, HAS_WY=True, SMOOTH=True, HAS_CW=True, SOFTCAP=True, STATS=True),
}
#: The fused forward's operand variants: (name, dtype, TF32); bf16 compiles its GPU variant (bf16 dots).
FUSED_VARIANTS = (("float32_tf32", torch.float32, True), ("float32_ieee", torch.float32, False),
                  ("bfloat16", torch.bfloat16, False), ("float16", torch.float16, False))


def compile_fused(cfg: FusedConfig, variant: str, flags: str, arch: int) -> Compiled:
    """Compile the fused forward in configuration ``cfg`` for an operand ``variant`` (a name of
    :data:`FUSED_VARIANTS`), feature set ``flags`` (a key of :data:`FUSED_FLAG_SETS`) and sm_``arch``."""
    from ._fused import KERNEL

    _, dtype, tf32 = next(v for v in FUSED_VARIANTS if v[0] == variant)
    signature = {
        "h_ptr": _PTR[dtype], "stride_h": "i32", "w_ptr": _PTR[dtype], "stride_w": "i32",
        "b_ptr": _PTR[dtype], "target_ptr": "*i64", "wy_ptr": "*fp32", "cw_ptr": "*fp32",
        "loss_ptr": "*fp32", "stats_ptr": "*fp32",
        "N": "i32", "V": "i32", "D": "i32", "z_coef": "fp32", "softcap": "fp32", "eps": "fp32",
    }
    bf16 = dtype == torch.bfloat16
    constexprs = dict(FUSED_FLAG_SETS[flags], BF16=bf16, FP16=dtype == torch.float16, HALF_DOT=bf16,
                      TF32=tf32, BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d)
    built = _build(KERNEL, signature, constexprs,
                   ("h_ptr", "w_ptr", "stride_h", "stride_w", "target_ptr", "loss_ptr", "stats_ptr"),
                   cfg.num_warps, cfg.num_stages, arch)
    return Compiled("fused_forward", arch, variant, flags, cfg.block_v, cfg.num_warps, **built,
                    block_n=cfg.block_n, block_d=cfg.block_d, num_stages=cfg.num_stages)


#: The fused backward's feature sets: plain cross-entropy (h and W gradients), and every option with the
#: bias gradient.
BACKWARD_FLAG_SETS = {
    "plain": dict(HAS_BIAS=False, SMOOTH=False, HAS_CW=False, SOFTCAP=False),
    "all": dict(HAS_BIAS=True, SMOOTH=True, HAS_CW=True, SOFTCAP=True),
}


def compile_backward(cfg: FusedConfig, kernel: str, variant: str, flags: str, arch: int) -> Compiled:
    """Compile one kernel of the fused backward (``kernel``: "grad_hidden" or "grad_weight") in
    configuration ``cfg`` for an operand ``variant`` (:data:`FUSED_VARIANTS`), feature set ``flags`` (a key
    of :data:`BACKWARD_FLAG_SETS`) and sm_``arch``."""
    from ._backward import KERNELS

    _, dtype, tf32 = next(v for v in FUSED_VARIANTS if v[0] == variant)
    signature = {
        "h_ptr": _PTR[dtype], "stride_h": "i32", "w_ptr": _PTR[dtype], "stride_w": "i32",
        "b_ptr": _PTR[dtype], "target_ptr": "*i64", "lse_ptr": "*fp32", "pc_ptr": "*fp32", "gy_ptr": "*fp32",
        "gw_ptr": "*fp32", "cw_ptr": "*fp32",
    }
    outputs = {"dh_ptr": "*fp32"} if kernel == "grad_hidden" else {"dw_ptr": "*fp32", "db_ptr": "*fp32"}
    signature.update(outputs)
    signature.update({"N": "i32", "V": "i32", "D": "i32", "softcap": "fp32"})
    bf16 = dtype == torch.bfloat16
    constexprs = dict(BACKWARD_FLAG_SETS[flags], BF16=bf16, FP16=dtype == torch.float16, HALF_DOT=bf16,
                      TF32=tf32, GRAD_TF32=tf32 or dtype != torch.float32, BLOCK_N=cfg.block_n,
                      BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d)
    if kernel == "grad_weight":
        constexprs.update(WEIGHT_GRAD=True, BIAS_GRAD=constexprs["HAS_BIAS"])
    aligned = ("h_ptr", "w_ptr", "stride_h", "stride_w", "target_ptr", "lse_ptr", "pc_ptr", "gy_ptr",
               "gw_ptr", "dh_ptr", "dw_ptr")
    built = _build(KERNELS[kernel], signature, constexprs, aligned, cfg.num_warps, cfg.num_stages, arch)
    return Compiled(kernel, arch, variant, flags, cfg.block_v, cfg.num_warps, **built, block_n=cfg.block_n,
                    block_d=cfg.block_d, num_stages=cfg.num_stages)


def every_row_config(flag_sets=("all",)):
    """(cfg, dtype, flags) for every configuration the launcher can choose, per feature set."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for cfg in row_configs(torch.empty((), dtype=dtype).element_size()):
            for flags in flag_sets:
                yield cfg, dtype, flags


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel", choices=("rows", "fused", "backward"), default="rows")
    parser.add_argument("--arch", type=int, nargs="*", default=None, help="default: every supported one")
    parser.add_argument("--flags", nargs="*", default=["all"],
                        help=f"rows: of {sorted(FLAG_SETS)}; fused, backward: of {sorted(FUSED_FLAG_SETS)}")
    parser.add_argument("--widest", action="store_true", help="rows: only the widest tile per dtype")
    args = parser.parse_args(argv)
    archs = args.arch or supported_archs()
    for arch in archs:
        if args.kernel == "backward":
            for variant, dtype, tf32 in FUSED_VARIANTS:
                key = backward_variant(torch.empty((), dtype=dtype).element_size(), tf32)
                for cfg in BACKWARD_CONFIGS[key]:
                    for flags in args.flags:
                        for kernel in ("grad_hidden", "grad_weight"):
                            found = compile_backward(cfg, kernel, variant, flags, arch)
                            print(json.dumps(asdict(found)), flush=True)
            continue
        if args.kernel == "fused":
            for itemsize, configs in FUSED_CONFIGS.items():
                for variant, dtype, _ in FUSED_VARIANTS:
                    if torch.empty((), dtype=dtype).element_size() != itemsize:
                        continue
                    for cfg in configs:
                        for flags in args.flags:
                            print(json.dumps(asdict(compile_fused(cfg, variant, flags, arch))), flush=True)
            continue
        for cfg, dtype, flags in every_row_config(tuple(args.flags)):
            if args.widest and cfg != row_configs(torch.empty((), dtype=dtype).element_size())[-1]:
                continue
            print(json.dumps(asdict(compile_row(cfg, dtype, flags, arch))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
