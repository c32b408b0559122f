"""Paired timing of ``xent.linear_log_probs`` against fused cross-entropy, in one process (issue 21 item 3).

Forward + backward of ``xent.linear_log_probs(h, W, y).mean()`` (and with ``with_entropy=True``,
``lp.mean() + 0.01 * entropy.mean()``) against ``xent.linear_cross_entropy(h, W, y)`` at N×D×V =
4096×512×32000, the shape of ``linear_cross_entropy.py --new``. The three run in turn in each round (the
order rotated), after one warm-up call each, and each round gives a ratio to that round's cross-entropy:
the medians of those paired ratios are printed, in wall time and in process CPU time. On a machine shared
with other jobs the paired ratios hold where single timings do not; ``--threads 1`` is the least disturbed.

    python benchmarks/log_probs_paired.py --dtypes float32 bfloat16 --threads 1 2 --rounds 5
    PYTHONPATH=/path/to/other/src python benchmarks/log_probs_paired.py ...   # another commit, same script
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import xent

N, D, V = 4096, 512, 32000
NAMES = ("ce", "log_probs", "log_probs_entropy")


def _step(name, h, w, y):
    if name == "ce":
        return xent.linear_cross_entropy(h, w, y)
    if name == "log_probs":
        return xent.linear_log_probs(h, w, y).mean()
    lp, ent = xent.linear_log_probs(h, w, y, with_entropy=True)
    return lp.mean() + 0.01 * ent.mean()


def measure(dtype: torch.dtype, threads: int, rounds: int) -> dict[str, list[tuple[float, float]]]:
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(N, D, generator=g) * 0.5).to(dtype).requires_grad_()
    w = (torch.randn(V, D, generator=g) * 0.05).to(dtype).requires_grad_()
    y = torch.randint(0, V, (N,), generator=g)

    def once(name):
        h.grad = w.grad = None
        t0, c0 = time.perf_counter(), time.process_time()
        _step(name, h, w, y).backward()
        return time.perf_counter() - t0, time.process_time() - c0

    for name in NAMES:  # warm-up: the kernel's build or load, the allocator, the BLAS threads
        once(name)
    times = {name: [] for name in NAMES}
    for r in range(rounds):
        for name in NAMES[r % 3 :] + NAMES[: r % 3]:
            times[name].append(once(name))
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    print(f"xent {xent.__file__}, torch {torch.__version__}, load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} logical CPUs")
    print("| dtype | threads | function | wall s | cpu s | paired wall × CE | paired cpu × CE | load |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for dtype_name in args.dtypes:
        for threads in args.threads:
            times = measure(getattr(torch, dtype_name), threads, args.rounds)
            load = os.getloadavg()[0]
            for name in NAMES:
                ratio = [statistics.median(a[i] / b[i] for a, b in zip(times[name], times["ce"]))
                         for i in (0, 1)]
                med = [statistics.median(t[i] for t in times[name]) for i in (0, 1)]
                print(f"| {dtype_name} | {threads} | {name} | {med[0]:.3f} | {med[1]:.3f} | {ratio[0]:.3f} | "
                      f"{ratio[1]:.3f} | {load:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
