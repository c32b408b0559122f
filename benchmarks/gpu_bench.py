"""Benchmark: fused linear + cross-entropy on a GPU (forward + backward, bfloat16), against named baselines.

Implementations (each skipped cleanly when missing):
    naive             F.cross_entropy((h @ W.T).float(), y)    bf16 matmul, float32 loss; holds [N, V]
    torch_chunked     F.linear_cross_entropy(h, W, y)            where this torch has it
    liger             liger_kernel's LigerFusedLinearCrossEntropyLoss
    cce               cut_cross_entropy.linear_cross_entropy(h, W, y, impl="cce")   (filters small grads)
    cce_kahan_full_c  the same with impl="cce_kahan_full_c"      where that CCE version has it
    xent              xent.linear_cross_entropy(h, W, y)           backend="auto"
    xent_torch        the same with backend="torch"                the chunk loop's torch-ops rows
    xent_triton       the same with backend="triton"               fused forward + recomputing backward
    xent_triton_rows  backend="triton", TritonRows.fused_backward off: cuBLAS chunks + the Triton row kernel
    xent_mbN          xent with XENT_CHUNK_MB=N (the chunk-budget sweep that fixes the CUDA default)

Shapes (N tokens × D hidden × V vocabulary): trl 16384×2048×248320 (TRL PR 6858), cce 8192×2304×256000
(the CCE paper), llama 8192×4096×128256. The matmul floor is 6·N·D·V flops.

Every (implementation, shape) runs in its own fresh process: inputs are built, two warm-up steps run
(Triton / torch.compile compile there), then the median of the timed forward + backward steps (CUDA
events) is reported with the peak memory allocated above the inputs (torch.cuda.max_memory_allocated
after reset, minus what was allocated before the step: the gradients h.grad and W.grad count). Then the
loss and gradients are compared with a float64 reference computed in row chunks on the same device:
relative errors of the loss, of dW and of dh. The naive bf16 path's errors are the yardstick ("no worse
than the naive path").

    python benchmarks/gpu_bench.py --out OUT_DIR                   # on a CUDA machine (~5 min on an H200)
    python benchmarks/gpu_bench.py --smoke OUT_DIR                 # CPU, tiny shapes: the test suite runs it

Writes OUT_DIR/gpu_bench.csv and OUT_DIR/gpu_bench.md (the table, ratios against naive and cce).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time

SHAPES = {
    "trl": (16384, 2048, 248320),
    "cce": (8192, 2304, 256000),
    "llama": (8192, 4096, 128256),
}
SMOKE_SHAPES = {"tiny": (512, 64, 3001)}
IMPLS = ("naive", "torch_chunked", "liger", "cce", "cce_kahan_full_c", "xent", "xent_torch", "xent_triton",
         "xent_triton_rows")
SWEEP = ("xent_mb256", "xent_mb4096")  # on the first shape only: what the CUDA chunk budget should be
SMOKE_IMPLS = ("naive", "torch_chunked", "xent", "xent_mb1")
REPEATS, SMOKE_REPEATS = 5, 2
REF_ROWS = 1024  # rows of the float64 reference at a time


# ---------------------------------------------------------------------------------------------------
# Child side: one implementation on one shape, in a fresh process.

def _loss_fn(impl: str, device: str = "cuda"):
    import torch
    import torch.nn.functional as F

    if impl == "naive":
        return lambda h, w, y: F.cross_entropy((h @ w.T).float(), y)
    if impl == "torch_chunked":
        if not hasattr(F, "linear_cross_entropy"):
            raise ImportError(f"torch {torch.__version__} has no F.linear_cross_entropy")
        return lambda h, w, y: F.linear_cross_entropy(h, w, y)
    if impl == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        module = LigerFusedLinearCrossEntropyLoss()
        return lambda h, w, y: module(w, h, y)
    if impl.startswith("cce"):
        from cut_cross_entropy import linear_cross_entropy

        return lambda h, w, y: linear_cross_entropy(h, w, y, impl=impl)
    if impl.startswith("xent"):
        if impl.startswith("xent_mb"):
            os.environ["XENT_CHUNK_MB"] = impl[len("xent_mb"):]
        import inspect

        import xent

        if impl in ("xent_torch", "xent_triton", "xent_triton_rows"):
            backend = "torch" if impl == "xent_torch" else "triton"
            if "backend" not in inspect.signature(xent.linear_cross_entropy).parameters:
                raise ImportError("this xent has no backend= argument")
            if backend == "triton":
                from xent._triton import available

                ok, why = available(device)
                if not ok:
                    raise ImportError(f"the Triton backend cannot run on {device}: {why}")
                from xent._triton._backend import TritonRows

                TritonRows.fused_backward = impl == "xent_triton"  # this process runs one impl
            return lambda h, w, y: xent.linear_cross_entropy(h, w, y, backend=backend)
        return lambda h, w, y: xent.linear_cross_entropy(h, w, y)
    raise ValueError(impl)


def _reference(h, w, y):
    """float64 loss (mean over N) and gradients dh, dW, in row chunks of REF_ROWS on h's device."""
    import torch

    n = h.shape[0]
    w64 = w.double()
    loss = torch.zeros((), dtype=torch.float64, device=h.device)
    dh = torch.empty(h.shape, dtype=torch.float64, device=h.device)
    dw = torch.zeros(w.shape, dtype=torch.float64, device=h.device)
    for s in range(0, n, REF_ROWS):
        hc = h[s : s + REF_ROWS].double()
        z = hc @ w64.T
        logp = torch.log_softmax(z, dim=-1)
        yc = y[s : s + REF_ROWS]
        loss -= logp.gather(1, yc[:, None]).sum()
        g = logp.exp_()
        g[torch.arange(g.shape[0], device=g.device), yc] -= 1.0
        g /= n
        dh[s : s + REF_ROWS] = g @ w64
        dw.addmm_(g.T, hc)
        del z, logp, g
    return loss / n, dh, dw


def _rel(a, b) -> float:
    return float((a.double() - b).norm() / b.norm())


def child(spec: dict) -> dict:
    import torch

    impl, (n, d, v), device = spec["impl"], spec["shape"], spec["device"]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    try:
        fn = _loss_fn(impl, device)
    except ImportError as e:
        return {"status": f"skipped: {e}"}
    g = torch.Generator(device=device).manual_seed(0)
    h = (torch.randn(n, d, generator=g, device=device) / 2).to(dtype).requires_grad_()
    w = (torch.randn(v, d, generator=g, device=device) / d**0.5).to(dtype).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g, device=device)

    def step():
        h.grad = w.grad = None
        loss = fn(h, w, y)
        loss.backward()
        return loss

    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    try:
        for _ in range(2):
            step()
        sync()
        times = []
        for _ in range(spec["repeats"]):
            h.grad = w.grad = None
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                loss = fn(h, w, y)
                loss.backward()
                end.record()
                sync()
                times.append(start.elapsed_time(end) / 1e3)
                peak = (torch.cuda.max_memory_allocated() - before) / 2**20
            else:
                t0 = time.perf_counter()
                loss = fn(h, w, y)
                loss.backward()
                times.append(time.perf_counter() - t0)
                peak = float("nan")  # the CPU smoke run measures no memory
    except torch.OutOfMemoryError as e:
        return {"status": f"out of memory: {str(e).splitlines()[0]}"}
    ref_loss, ref_dh, ref_dw = _reference(h.detach(), w.detach(), y)
    return {
        "status": "ok",
        "time_s": statistics.median(times),
        "peak_mb": peak,
        "loss_err": abs(float(loss) - float(ref_loss)) / abs(float(ref_loss)),
        "dw_err": _rel(w.grad, ref_dw),
        "dh_err": _rel(h.grad, ref_dh),
        "tflops": 6 * n * d * v / statistics.median(times) / 1e12,
    }


# ---------------------------------------------------------------------------------------------------
# Parent side: a fresh process per measurement, then the table.

def _run_child(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return {"status": f"failed: {tail[:200]}"}
    return json.loads(lines[-1])


def _fmt(x, spec) -> str:
    return "–" if x is None or x != x else format(x, spec)


def _table(rows, shapes) -> str:
    lines = []
    for shape in shapes:
        got = {r["impl"]: r for r in rows if r["shape"] == shape and r["status"] == "ok"}
        dims = "×".join(map(str, SHAPES.get(shape, SMOKE_SHAPES.get(shape))))
        lines += [f"\n### {shape}: N×D×V = {dims}\n",
                  "| impl | time (ms) | × naive | × cce | TFLOP/s | peak above inputs (MB) | mem × cce "
                  "| loss rel err | dW rel err | dh rel err |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in rows if r["shape"] == shape):
            if r["status"] != "ok":
                lines.append(f"| {r['impl']} | {r['status']} |||||||||")
                continue
            ratio = {b: (r["time_s"] / got[b]["time_s"] if b in got else None) for b in ("naive", "cce")}
            mem = r["peak_mb"] / got["cce"]["peak_mb"] if "cce" in got and got["cce"]["peak_mb"] else None
            lines.append(
                f"| {r['impl']} | {_fmt(1e3 * r['time_s'], '.1f')} | {_fmt(ratio['naive'], '.2f')} | "
                f"{_fmt(ratio['cce'], '.2f')} | {_fmt(r['tflops'], '.0f')} | {_fmt(r['peak_mb'], '.0f')} | "
                f"{_fmt(mem, '.2f')} | {_fmt(r['loss_err'], '.1e')} | {_fmt(r['dw_err'], '.1e')} | "
                f"{_fmt(r['dh_err'], '.1e')} |")
    return "\n".join(lines)


def run(out_dir: str, smoke: bool, impls, shapes, timeout: float, sweep=()) -> int:
    import torch  # the parent only asks what the machine is

    device = "cpu" if smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_bench: no CUDA device (use --smoke on a CPU machine)", file=sys.stderr)
        return 2
    os.makedirs(out_dir, exist_ok=True)
    table_shapes = SMOKE_SHAPES if smoke else SHAPES
    rows = []
    for k, shape in enumerate(shapes):
        for impl in list(impls) + (list(sweep) if k == 0 else []):
            spec = {"impl": impl, "shape": table_shapes[shape], "device": device,
                    "repeats": SMOKE_REPEATS if smoke else REPEATS}
            t0 = time.perf_counter()
            res = _run_child(spec, timeout)
            rows.append({"impl": impl, "shape": shape, **res})
            print(f"{shape:6s} {impl:18s} {res.get('status')} "
                  f"{_fmt(1e3 * res['time_s'], '.1f') + ' ms' if res.get('status') == 'ok' else ''} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    fields = ["impl", "shape", "status", "time_s", "peak_mb", "tflops", "loss_err", "dw_err", "dh_err"]
    with open(os.path.join(out_dir, "gpu_bench.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    dtype = "bfloat16" if device == "cuda" else "float32"
    steps = SMOKE_REPEATS if smoke else REPEATS
    header = (f"# Fused linear + cross-entropy, forward + backward ({dtype})\n\nDevice: {name}; torch "
              f"{torch.__version__}; {steps} timed steps after 2 warm-ups, median; each cell a fresh "
              "process.\n")
    with open(os.path.join(out_dir, "gpu_bench.md"), "w") as f:
        f.write(header + _table(rows, shapes) + "\n")
    print(header + _table(rows, shapes))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="directory for gpu_bench.csv and gpu_bench.md")
    p.add_argument("--smoke", metavar="OUT_DIR", help="CPU, tiny shape, into OUT_DIR (what the tests run)")
    p.add_argument("--impls", nargs="+", default=None)
    p.add_argument("--shapes", nargs="+", default=None, help=f"of {sorted(SHAPES)}")
    p.add_argument("--timeout", type=float, default=120, help="seconds per process")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    if args.smoke:
        shapes = args.shapes or list(SMOKE_SHAPES)
        return run(args.smoke, True, args.impls or SMOKE_IMPLS, shapes, args.timeout)
    if not args.out:
        p.error("--out OUT_DIR (or --smoke OUT_DIR) is required")
    bad = [s for s in (args.shapes or []) if s not in SHAPES]
    if bad:
        p.error(f"--shapes: unknown {bad}; known: {sorted(SHAPES)}")
    return run(args.out, False, args.impls or IMPLS, args.shapes or list(SHAPES), args.timeout,
               () if args.impls else SWEEP)


if __name__ == "__main__":
    sys.exit(main())
