"""Issue 16 item 4: fused cross-entropy in bfloat16 against its three-matmul floor, paired in one process.

On a shared machine the wall time of one call moves by ±15 % from minute to minute, more than the gap
being measured. So every round times, back to back in one process, the floor, xent with its compiled
CPU kernel, xent with plain torch ops (XENT_CPU_KERNEL=0) and xent keeping its chunk buffer, in a
rotating order, and the ratio is taken within the round; the table gives the median and the quartiles
of those per-round ratios.

    floor       Z = h @ W.T, dh = Z @ W, dW = Z.T @ h into preallocated bf16 buffers (Z stands in for dZ),
                on the valid rows (every row is valid here)
    xent        xent.linear_cross_entropy(h, W, y) forward + backward (chunk_size="auto")
    xent_torch  the same with XENT_CPU_KERNEL=0
    xent_keep   xent with XENT_KEEP_CHUNK_BUFFER=1 (the chunk buffer kept between calls: no page faults)

    python benchmarks/bf16_floor.py                       # 4096×512×32000, 15 rounds
    python benchmarks/bf16_floor.py --shape 4096x1024x32000 --rounds 9 --dtype float32
    python benchmarks/bf16_floor.py --no-grad --rounds 9   # a validation loss: against h @ W.T alone

Writes results/bf16_floor.md and .csv (or --out DIR).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import statistics
import sys
import time

import torch

import xent
from linear_cross_entropy import _cpu_model  # this folder: the scripts run as `python benchmarks/...`
from xent._cpu_kernel import kernel_status


def _quartiles(xs):
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return q[0], statistics.median(xs), q[2]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="4096x512x32000", help="NxDxV")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--no-grad", action="store_true",
                   help="the loss alone under torch.no_grad (a validation loss); the floor is then h @ W.T")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    n, d, v = (int(x) for x in args.shape.split("x"))
    dt = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(n, d, generator=g) * 0.5).to(dt).requires_grad_()
    w = (torch.randn(v, d, generator=g) * 0.05).to(dt).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g)
    z, gh, gw = torch.zeros(n, v, dtype=dt), torch.zeros(n, d, dtype=dt), torch.zeros(v, d, dtype=dt)

    def floor():
        with torch.no_grad():
            torch.mm(h, w.t(), out=z)
            if not args.no_grad:
                torch.mm(z, w, out=gh)
                torch.mm(z.t(), h, out=gw)

    def fused(kernel: str, keep: str = "0"):
        def call():
            os.environ["XENT_CPU_KERNEL"], os.environ["XENT_KEEP_CHUNK_BUFFER"] = kernel, keep
            h.grad = w.grad = None
            if args.no_grad:
                with torch.no_grad():
                    xent.linear_cross_entropy(h, w, y)
            else:
                xent.linear_cross_entropy(h, w, y).backward()
        return call

    impls = {"floor": floor, "xent": fused("auto"), "xent_torch": fused("0"), "xent_keep": fused("auto", "1")}
    status = kernel_status()
    for f in impls.values():  # warm-up: builds the kernel, touches the buffers
        f()
    times = {k: [] for k in impls}
    names = list(impls)
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for k in order:
            t0 = time.perf_counter()
            impls[k]()
            times[k].append(time.perf_counter() - t0)
        print(f"round {r}: " + "  ".join(f"{k} {times[k][-1] * 1e3:.0f} ms" for k in names), flush=True)

    rows = []
    for k in names:
        ratios = [t / f for t, f in zip(times[k], times["floor"])]
        lo, mid, hi = _quartiles(ratios)
        rows.append({"impl": k, "median_ms": statistics.median(times[k]) * 1e3, "ratio_median": mid,
                     "ratio_q1": lo, "ratio_q3": hi})
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, ("bf16" if args.dtype == "bfloat16" else args.dtype) + "_floor"
                        + ("_no_grad" if args.no_grad else ""))
    with open(stem + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    command = "python benchmarks/bf16_floor.py " + " ".join(argv if argv is not None else sys.argv[1:])
    floor_name = "one-matmul floor, no gradient" if args.no_grad else "three-matmul floor"
    lines = [
        f"# Fused cross-entropy vs its {floor_name}, {args.dtype}, {n}×{d}×{v}",
        "",
        f"`{command.strip()}` — {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"{_cpu_model()}, {os.cpu_count()} logical CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), xent {xent.__version__}; {args.rounds} rounds, each timing "
        f"the {len(names)} back to back in one process (rotating order); ratios are per round, then the "
        "median and quartiles.",
        "",
        f"CPU kernel: {status}.",
        "",
        "| impl | median ms | × floor (median) | × floor (quartiles) |",
        "|---|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(f"| {row['impl']} | {row['median_ms']:.0f} | {row['ratio_median']:.3f} | "
                     f"{row['ratio_q1']:.3f}–{row['ratio_q3']:.3f} |")
    text = "\n".join(lines) + "\n"
    with open(stem + ".md", "w") as f:
        f.write(text)
    print()
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
