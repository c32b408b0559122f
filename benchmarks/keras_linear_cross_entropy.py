"""Benchmark: xent.keras.linear_cross_entropy (forward + backward under jax.jit) against Keras'
SparseCategoricalCrossentropy(from_logits=True) on the full logits, on CPU with the JAX backend.

Implementations:
    xent        jax.value_and_grad(lambda h, W: xent.keras.linear_cross_entropy(h, W, y))
    keras_sce   jax.value_and_grad(lambda h, W: SparseCategoricalCrossentropy(from_logits=True)(y, h @ W))
    xent_plain  jax.value_and_grad(lambda h, W: xent.keras.cross_entropy(h @ W, y))   (full logits too)

Method: every (implementation, shape) runs in its own fresh process (KERAS_BACKEND=jax). The child builds
the inputs (h [N, D], W [D, V] float32, y [N]) and compiles the jitted step ahead of time, frees what it
can (malloc_trim), resets the kernel's peak-RSS counter (/proc/self/clear_refs "5"; where that is refused,
ru_maxrss is used and includes the compilation) and reads the RSS; then it runs the step once: extra peak
memory = VmHWM − that RSS (it includes the returned gradients, [N, D] + [D, V], for every
implementation, and anything the first execution allocates for good). Then --steps steps are timed.
Ratios are of medians measured in the same invocation.

    python benchmarks/keras_linear_cross_entropy.py                     # 1024×256×8192, a minute
    python benchmarks/keras_linear_cross_entropy.py --shape 4096x512x32000 --repeats 3
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

IMPLS = ("xent", "keras_sce", "xent_plain")
TARGETS = {"mem": 0.15, "time": 1.2}  # xent ÷ keras_sce


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _trim():
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child(spec: dict) -> dict:
    import resource

    import jax
    import numpy as np

    import keras
    import xent.keras as xk

    n, d, v = spec["shape"]
    rng = np.random.default_rng(0)
    h = jax.numpy.asarray(rng.standard_normal((n, d), dtype=np.float32))
    w = jax.numpy.asarray(rng.standard_normal((d, v), dtype=np.float32) * (1.0 / d**0.5))
    y = jax.numpy.asarray(rng.integers(0, v, n).astype(np.int32))
    chunk = spec.get("chunk", "auto")
    sce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    loss = {
        "xent": lambda h, w: xk.linear_cross_entropy(h, w, y, chunk_size=chunk),
        "keras_sce": lambda h, w: sce(y, h @ w),
        "xent_plain": lambda h, w: xk.cross_entropy(h @ w, y),
    }[spec["impl"]]
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(h, w).compile()
    _trim()
    reset = _reset_peak()
    base_kb = _status_kb("VmRSS") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # the first execution is the memory measurement: whatever it allocates, once or every time, counts
    out = step(h, w)
    jax.block_until_ready(out)
    peak_kb = _status_kb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    value = float(out[0])
    del out
    times = []
    for _ in range(spec["steps"]):
        t0 = time.perf_counter()
        out = step(h, w)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t0)
        del out
    return {"impl": spec["impl"], "shape": spec["shape"], "loss": value,
            "time_s": statistics.median(times), "times": times, "extra_mb": (peak_kb - base_kb) / 1024,
            "peak_reset": reset, "jax": jax.__version__, "keras": keras.__version__}


def run_child(spec: dict, timeout: float) -> dict:
    env = dict(os.environ, KERAS_BACKEND="jax")
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if p.returncode != 0:
        last = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"exit {p.returncode}"
        return {"impl": spec["impl"], "error": last}
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="1024x256x8192", help="NxDxV (default 1024x256x8192)")
    ap.add_argument("--repeats", type=int, default=1, help="fresh processes per implementation")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per process")
    ap.add_argument("--chunk", default="auto", help="xent's chunk_size")
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    shape = tuple(int(x) for x in args.shape.lower().split("x"))
    chunk = args.chunk if args.chunk == "auto" else int(args.chunk)
    impls = args.impls.split(",")
    rows = []
    for r in range(args.repeats):
        for impl in impls[r % len(impls):] + impls[: r % len(impls)]:  # rotate the order each round
            res = run_child({"impl": impl, "shape": shape, "steps": args.steps, "chunk": chunk}, timeout=3600)
            print(json.dumps(res), flush=True)
            rows.append(res)
    med = {}
    for impl in impls:
        ok = [x for x in rows if x.get("impl") == impl and "error" not in x]
        if ok:
            med[impl] = {k: statistics.median(x[k] for x in ok) for k in ("time_s", "extra_mb", "loss")}
    lines = ["# xent.keras.linear_cross_entropy vs Keras SparseCategoricalCrossentropy, JAX on CPU",
             "", f"Shape N×D×V = {'×'.join(map(str, shape))} float32, chunk_size={chunk}, "
             f"{args.repeats} process(es) × {args.steps} steps, median; "
             f"{datetime.datetime.now().isoformat(timespec='minutes')}, {os.cpu_count()} CPUs, "
             f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}.", "",
             "| implementation | loss | time s | extra MB | time × keras_sce | mem × keras_sce |",
             "|---|---:|---:|---:|---:|---:|"]
    base = med.get("keras_sce")
    for impl, m in med.items():
        tr = f"{m['time_s'] / base['time_s']:.2f}" if base else "n/a"
        mr = f"{m['extra_mb'] / base['extra_mb']:.3f}" if base else "n/a"
        lines.append(f"| {impl} | {m['loss']:.6f} | {m['time_s']:.3f} | {m['extra_mb']:.0f} | {tr} | {mr} |")
    if base and "xent" in med:
        t = med["xent"]["time_s"] / base["time_s"]
        m = med["xent"]["extra_mb"] / base["extra_mb"]
        verdict = {k: "met" if r <= TARGETS[k] else "MISSED" for k, r in (("mem", m), ("time", t))}
        lines += ["", f"Targets: memory ≤ {TARGETS['mem']}× ({m:.3f}: {verdict['mem']}), "
                  f"time ≤ {TARGETS['time']}× ({t:.2f}: {verdict['time']})."]
    command = " ".join(["python benchmarks/keras_linear_cross_entropy.py", *(argv or sys.argv[1:])])
    lines += ["", f"Command: `{command}`"]
    table = "\n".join(lines) + "\n"
    print(table)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"keras_linear_cross_entropy_{'x'.join(map(str, shape))}")
    with open(stem + ".md", "w") as f:
        f.write(table)
    with open(stem + ".csv", "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["impl", "N", "D", "V", "loss", "time_s", "extra_mb", "peak_reset"])
        for x in rows:
            if "error" not in x:
                wr.writerow([x["impl"], *x["shape"], x["loss"], x["time_s"], x["extra_mb"], x["peak_reset"]])
    return 0


if __name__ == "__main__":
    sys.exit(main())
