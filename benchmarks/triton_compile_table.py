"""Registers, spills and shared memory of every configuration of the Triton row kernel, fused forward and
fused backward, compiled for sm_90 (and sm_100 where this Triton targets it; the backward for sm_90) on a
machine without a GPU; written to benchmarks/results/triton_compile.md.

    python benchmarks/triton_compile_table.py [--arch 90 100] [--out benchmarks/results/triton_compile.md]

Each configuration is compiled in a child process without TRITON_INTERPRET by ``python -m
xent._triton._compile`` (the wheel's ptxas and cuobjdump; see that module). Besides the configurations the
launcher can choose (marked "launcher"), it compiles a few wider tiles to show where they stop fitting.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def compile_all(archs: list[int], kernel: str = "rows") -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    flags = ["grad", "all", "no_grad"] if kernel == "rows" else ["plain", "all"]
    if kernel == "backward":
        archs = [a for a in archs if a == 90]  # the backward is checked for sm_90 only
    cmd = [sys.executable, "-m", "xent._triton._compile", "--kernel", kernel, "--flags", *flags, "--arch",
           *map(str, archs)]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if run.returncode != 0:
        sys.exit(run.stderr[-3000:])
    return [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]


def wider(archs: list[int]) -> list[dict]:
    """A few tiles wider than the launcher's caps (not chosen by it), to show the cost of going wider."""
    code = (
        "import json, torch\n"
        "from dataclasses import asdict\n"
        "from xent._triton._compile import compile_row\n"
        "from xent._triton._config import RowConfig\n"
        f"for arch in {archs!r}:\n"
        "    f32, b16 = torch.float32, torch.bfloat16\n"
        "    for dt, cfg in ((f32, RowConfig(4096, 8)), (f32, RowConfig(8192, 32)),\n"
        "                    (b16, RowConfig(8192, 16)), (b16, RowConfig(16384, 32))):\n"
        "        for flags in ('all', 'no_grad'):\n"
        "            print(json.dumps(asdict(compile_row(cfg, dt, flags, arch))), flush=True)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=1800)
    if run.returncode != 0:
        sys.exit(run.stderr[-3000:])
    return [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="*", default=None)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "triton_compile.md"))
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    import triton

    from xent._triton._compile import supported_archs

    archs = args.arch or supported_archs()
    rows = [dict(r, chosen="launcher") for r in compile_all(archs)] + [dict(r, chosen="wider")
                                                                      for r in wider(archs)]
    lines = [
        "# Triton kernels: compiled resources per configuration",
        "",
        "## The row kernel (cross-entropy rows after a cuBLAS projection)",
        "",
        f"Compiled on a machine without a GPU ({platform.machine()}, Python {platform.python_version()}) by "
        f"`python benchmarks/triton_compile_table.py` with triton {triton.__version__} (its own ptxas and "
        "cuobjdump). Registers and stack per thread from `cuobjdump --dump-resource-usage`; spill "
        "stores/loads (bytes per thread) from `ptxas -v` on the kernel's PTX; shared memory per program is "
        "Triton's allocation plus the cubin's static part (the limit: 232,448 B per block with the opt-in "
        "attribute on H100 and B200). Flags: `grad` = the gradient pass only, `all` = class weights, "
        "label smoothing, soft-cap, statistics and the gradient, `no_grad` = losses and statistics. "
        "\"launcher\" rows are every configuration `xent._triton._config.row_config` can choose; "
        "\"wider\" rows are not chosen, shown for the choice (xent/_triton/_config.py explains it). "
        "Nothing here has run on a GPU.",
        "",
        "| arch | dtype | flags | BLOCK_V | warps | registers | spill stores | spill loads | stack "
        "| shared B | |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| sm_{r['arch']} | {r['dtype']} | {r['flags']} | {r['block_v']} | {r['num_warps']} | "
                     f"{r['registers']} | {r['spill_stores']} | {r['spill_loads']} | {r['stack']} | "
                     f"{r['shared']} | {r['chosen']} |")
    lines += [
        "",
        "## The fused no-grad forward (projection and log-sum-exp in one kernel)",
        "",
        "Every configuration of `xent._triton._config.FUSED_CONFIGS` for each operand variant: float32 "
        "dots in TF32 or exact (`ieee`), bf16 on its tensor cores (the GPU variant; the interpreter tests "
        "the float32 variant on the same exact values), float16. `plain` = cross-entropy only, `all` = "
        "bias, class weights, label smoothing, soft-cap, statistics. Shared memory is the pipelined h and "
        "W tiles.",
        "",
        "| arch | operands | flags | BLOCK_N×BLOCK_V×BLOCK_D | warps | stages | registers | spill stores "
        "| spill loads | stack | shared B |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in compile_all(archs, "fused"):
        lines.append(f"| sm_{r['arch']} | {r['dtype']} | {r['flags']} | {r['block_n']}×{r['block_v']}×"
                     f"{r['block_d']} | {r['num_warps']} | {r['num_stages']} | {r['registers']} | "
                     f"{r['spill_stores']} | {r['spill_loads']} | {r['stack']} | {r['shared']} |")
    lines += [
        "",
        "## The fused backward (logits recomputed tile by tile; dH and dW in two kernels, no atomics)",
        "",
        "Every configuration of `xent._triton._config.BACKWARD_CONFIGS` for each operand variant, both "
        "kernels: `grad_hidden` (one program per BLOCK_N rows, dH) and `grad_weight` (one program per "
        "BLOCK_V classes, dW and the bias gradient). `plain` = cross-entropy, `all` = bias, class weights, "
        "label smoothing, soft-cap. Shared memory is the pipelined h and W tiles of the logits dot and the "
        "float32 operands of the gradient dot. sm_90 only.",
        "",
        "| arch | kernel | operands | flags | BLOCK_N×BLOCK_V×BLOCK_D | warps | stages | registers "
        "| spill stores | spill loads | stack | shared B |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in compile_all(archs, "backward"):
        lines.append(f"| sm_{r['arch']} | {r['kernel']} | {r['dtype']} | {r['flags']} | {r['block_n']}×"
                     f"{r['block_v']}×{r['block_d']} | {r['num_warps']} | {r['num_stages']} | "
                     f"{r['registers']} | {r['spill_stores']} | {r['spill_loads']} | {r['stack']} | "
                     f"{r['shared']} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
