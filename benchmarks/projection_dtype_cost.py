"""The cost of projection_dtype=torch.float32 against the default half projection, in one process.

xent.linear_cross_entropy forward + backward at 4096×512×32000 bfloat16, default (bf16 projection) and
projection_dtype=torch.float32 interleaved (order alternating per round), one warm-up each, median of 5
rounds of wall and process CPU time. The fresh-process table is benchmarks/linear_cross_entropy.py
--new; this is the quick in-process ratio (docs/fused-head.md names this script).

    python benchmarks/projection_dtype_cost.py
"""

import statistics
import time

import torch

import xent


def main():
    torch.manual_seed(0)
    n, d, v = 4096, 512, 32000
    h = torch.randn(n, d).bfloat16().requires_grad_()
    w = (torch.randn(v, d) / d**0.5).bfloat16().requires_grad_()
    y = torch.randint(0, v, (n,))

    def step(pd):
        h.grad = w.grad = None
        t0, c0 = time.perf_counter(), time.process_time()
        xent.linear_cross_entropy(h, w, y, projection_dtype=pd).backward()
        return time.perf_counter() - t0, time.process_time() - c0

    res = {None: [], torch.float32: []}
    step(None)
    step(torch.float32)
    for r in range(5):
        for pd in (None, torch.float32) if r % 2 == 0 else (torch.float32, None):
            res[pd].append(step(pd))
    med = {pd: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v))
           for pd, v in res.items()}
    for pd, (wall, cpu) in med.items():
        print(f"projection_dtype={pd}: wall {wall:.3f} s, cpu {cpu:.3f} s")
    print(f"float32 / default: wall {med[torch.float32][0] / med[None][0]:.2f}x, "
          f"cpu {med[torch.float32][1] / med[None][1]:.2f}x, threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
