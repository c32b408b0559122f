"""Benchmark: fused linear + loss (forward + backward) against named baselines, on CPU.

Implementations (issue 3):
    xent           xent.linear_cross_entropy(h, W, y)
    xent_torch     the same with XENT_CPU_KERNEL=0: its loss rows in plain torch ops instead of the
                   compiled CPU kernel (xent/_cpu_kernel.py), to show what the kernel buys
    naive          F.cross_entropy(h @ W.T, y)                       (holds the [N, V] logits)
    torch_chunked  F.linear_cross_entropy(h, W, y, options=torch.nn.LinearCrossEntropyOptions())
    cce            cut_cross_entropy.linear_cross_entropy(h, W, y, impl="torch_compile")
    floor          the three bare matmuls of forward + backward into preallocated buffers:
                   Z = h @ W.T, dh = dZ @ W, dW = dZ.T @ h (Z doubles as dZ; its [N, V] buffer is
                   allocated before the measurement, so the floor's extra memory excludes it)

With --losses (issue 4), on one shape: xent.linear_loss(h, W, y, loss=L) ("fused") against the plain
path on materialised logits, e.g. xent.tailr_loss(h @ W.T, y, gamma=0.1) ("plain"), for every loss of
xent.losses that exists, and fused cross-entropy as the yardstick.

Method (details in benchmarks/README.md): every measurement runs in its own fresh process; rounds
interleave the implementations round-robin (the order rotates each round); the table reports medians
and ratios of medians against baselines measured in the same invocation. In each process: inputs
(h and W with requires_grad) are built, one warm-up forward + backward on min(N, 1024) tokens (after
h.grad and W.grad are allocated) compiles what compiles, the gradients are zeroed in place, freed heap
is returned to the OS (malloc_trim), the kernel's peak-RSS counter is reset (/proc/self/clear_refs "5")
and the RSS is read; then one forward + backward on all N tokens is timed (with --calls K, K of them
in a row, and the time is their median: a training loop's steady state), and extra peak memory =
VmHWM after it − that RSS. Before any timing a correctness guard compares each implementation's loss
and gradients on a small shape with a float64 reference; one that fails is reported and not timed.

    python benchmarks/linear_cross_entropy.py --shapes small               # minutes
    python benchmarks/linear_cross_entropy.py --shapes all --repeats 3     # the issue's shapes
    python benchmarks/linear_cross_entropy.py --losses --repeats 3         # issue 4's loss table
    python benchmarks/linear_cross_entropy.py --new --repeats 3            # issue 13's functions
    python benchmarks/linear_cross_entropy.py --new --only log_probs log_probs_entropy   # and fused CE

With --new (issue 13), at 4096×512×32000 float32 and bfloat16, each against fused cross-entropy
(``new:ce``, xent.linear_cross_entropy) measured in the same run: token log-probs with and without the
entropy, return_stats, EAFT, Rho-1 (reference losses given, ratio 0.6), multi-token prediction (K = 3
streams of N tokens each; its time is reported per stream), sparse-teacher distillation (top-32 ids),
and (bfloat16 only) projection_dtype=torch.float32. The correctness guard compares each with the same
function on float64 inputs.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

CE_IMPLS = ("xent", "xent_torch", "naive", "torch_chunked", "cce", "floor")
SHAPES = {
    # (N tokens, D hidden, V vocab, dtype)
    "small": [(1024, 256, 8192, "float32"), (1024, 256, 8192, "bfloat16")],
    "all": [  # the longest last
        (4096, 512, 32000, "float32"),
        (4096, 512, 32000, "bfloat16"),
        (4096, 1024, 32000, "float32"),
        (8192, 512, 128256, "float32"),
    ],
}
LOSS_SHAPE = (4096, 512, 32000, "float32")
# name in xent.losses -> (options, name of the plain-path functional in xent)
LOSSES = {
    "CrossEntropy": ({}, "cross_entropy"),
    "EMO": ({"cost_embedding": None}, "emo_loss"),  # None: a frozen copy of the LM head W, as in the paper
    "TaiLr": ({"gamma": 0.1}, "tailr_loss"),
    "GOLD": ({}, "gold_loss"),
    "Focal": ({"gamma": 2.0}, "focal_loss"),
    "Poly": ({"epsilon": 1.0}, "poly_loss"),
}
GUARD_SHAPE = (512, 48, 1003)  # odd sizes, N >= D so the chunked paths really chunk
WARMUP_TOKENS = 1024
# Targets of issues 3 and 4, as ratios of medians measured in the same invocation.
BF16_FLOOR_TARGET = 1.10  # issue 16
CE_TARGETS = [  # (column, baseline, quantity, bound)
    ("time × naive", "naive", "time", 1.0),
    ("time × torch_chunked", "torch_chunked", "time", 0.8),
    ("time × floor", "floor", "time", 1.15),
    ("mem × naive", "naive", "mem", 0.10),
    ("mem × torch_chunked", "torch_chunked", "mem", 0.5),
]
# issue 13: name -> (bound on time × fused CE (per stream for MTP), streams, bound on memory × fused CE);
# None: reported, no target. Log-probs (issue 21): reduction="none" recomputes each chunk's logits in
# backward, 4 matmuls against cross-entropy's 3 (the floor is 1.33×).
NEW = {
    "new:ce": (None, 1, None),
    "new:log_probs": (1.4, 1, 1.1),
    "new:log_probs_entropy": (1.4, 1, 1.1),
    "new:return_stats": (1.02, 1, None),
    "new:eaft": (1.1, 1, None),
    "new:rho1": (1.1, 1, None),
    "new:mtp3": (1.1, 3, None),
    "new:sparse_kd32": (1.1, 1, None),
    "new:ce_projection_f32": (None, 1, None),
}
NEW_SHAPES = [(4096, 512, 32000, "float32"), (4096, 512, 32000, "bfloat16")]
LOSS_TIME_BOUND = 1.3  # fused loss time ≤ 1.3 × fused cross-entropy time
LOSS_MEM_BOUND = 0.10  # fused loss extra memory ≤ 0.10 × its plain path's

# ---------------------------------------------------------------------------------------------------
# Child side: everything that imports torch runs in a fresh process.


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _release_free_heap() -> None:
    # glibc keeps freed small/medium blocks mapped; give them back so the baseline RSS is live memory only.
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: RSS may then include freed-but-cached heap
        pass


def _reset_peak_rss() -> None:
    # Writing "5" to clear_refs resets VmHWM (the peak RSS) to the current RSS (Linux >= 4.0).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _inputs(n, d, v, dtype_name, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, dtype_name)
    # Unit-variance hidden states, W ~ N(0, 1/D): logits ~ N(0, 1), as in a freshly initialised LM head.
    h = torch.randn(n, d, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(v, d, generator=g) / d**0.5).to(dtype).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g)
    return h, w, y


def _loss_fn(impl: str, w_frozen=None):
    """impl -> f(h, W, y) returning a scalar loss to call .backward() on."""
    import torch
    import torch.nn.functional as F

    if impl == "naive":
        return lambda h, w, y: F.cross_entropy(h @ w.T, y)
    if impl == "torch_chunked":
        opts = torch.nn.LinearCrossEntropyOptions()
        return lambda h, w, y: F.linear_cross_entropy(h, w, y, options=opts)
    if impl == "cce":
        from cut_cross_entropy import linear_cross_entropy as cce_lce

        return lambda h, w, y: cce_lce(h, w, y, impl="torch_compile")
    import xent

    if impl == "xent":
        return lambda h, w, y: xent.linear_cross_entropy(h, w, y)
    if impl == "xent_torch":  # the gradients are formed in the forward call, so the setting covers them

        def plain_rows(h, w, y):
            before = os.environ.get("XENT_CPU_KERNEL")
            os.environ["XENT_CPU_KERNEL"] = "0"
            try:
                return xent.linear_cross_entropy(h, w, y)
            finally:
                if before is None:
                    del os.environ["XENT_CPU_KERNEL"]
                else:
                    os.environ["XENT_CPU_KERNEL"] = before

        return plain_rows
    if impl.startswith("new:"):
        return _new_fn(impl[4:])
    kind, _, name = impl.partition(":")  # "fused:TaiLr" / "plain:TaiLr"
    opts, functional = LOSSES[name]
    opts = {k: (w_frozen if k == "cost_embedding" else val) for k, val in opts.items()}
    if kind == "fused":
        loss = getattr(xent.losses, name)(**opts)
        return lambda h, w, y: xent.linear_loss(h, w, y, loss=loss)
    if kind == "plain":
        fn = getattr(xent, functional)
        return lambda h, w, y: fn(h @ w.T, y, **opts)
    raise ValueError(f"unknown implementation {impl!r}")


def _new_fn(name: str):
    """issue 13's functions as f(h, W, y) -> a scalar to call .backward() on."""
    import torch

    import xent

    if name == "ce":
        return lambda h, w, y: xent.linear_cross_entropy(h, w, y)
    if name == "return_stats":
        return lambda h, w, y: xent.linear_cross_entropy(h, w, y, return_stats=True)[0]
    if name == "ce_projection_f32":
        return lambda h, w, y: xent.linear_cross_entropy(
            h, w, y, projection_dtype=torch.float32 if h.dtype in (torch.bfloat16, torch.float16) else None)
    if name == "log_probs":
        return lambda h, w, y: xent.linear_log_probs(h, w, y).mean()
    if name == "log_probs_entropy":
        def f(h, w, y):
            lp, ent = xent.linear_log_probs(h, w, y, with_entropy=True)
            return lp.mean() + 0.01 * ent.mean()
        return f
    if name == "eaft":
        loss = xent.losses.EAFT()
        return lambda h, w, y: xent.linear_loss(h, w, y, loss=loss)
    if name == "rho1":
        cache = {}

        def f(h, w, y):
            if y.shape not in cache:
                g = torch.Generator().manual_seed(3)
                ref = torch.rand(y.shape, generator=g, dtype=torch.float64) * 10  # float32: no ties
                cache[y.shape] = ref.to(torch.float64 if h.dtype == torch.float64 else torch.float32)
            return xent.linear_rho1_loss(h, w, y, ref_losses=cache[y.shape], ratio=0.6)
        return f
    if name == "mtp3":
        def f(h, w, y):
            return xent.linear_multi_token_loss(torch.stack([h, h, h]), w, y)
        return f
    if name == "sparse_kd32":
        cache = {}

        def f(h, w, y):
            key = (y.shape[0], w.shape[0])
            if key not in cache:  # a teacher's top-32 ids and log-probs: distinct ids, mass < 1
                g = torch.Generator().manual_seed(4)
                # 32 distinct ids per token without a [N, V] temporary: a random start plus 0, 997, 2·997...
                # (997 is prime and does not divide V here, so the 32 residues are distinct)
                start = torch.randint(0, w.shape[0], (y.shape[0], 1), generator=g)
                ids = (start + 997 * torch.arange(32)) % w.shape[0]
                lp = torch.log_softmax(torch.randn(y.shape[0], 33, generator=g), -1)[:, :32]
                cache[key] = (ids, lp.to(torch.float64 if h.dtype == torch.float64 else torch.float32))
            ids, lp = cache[key]
            return xent.linear_sparse_distill_loss(h, w, ids, lp, y)
        return f
    raise ValueError(f"unknown implementation new:{name}")


def _floor_step(h, w, buffers, k):
    import torch

    z, gh, gw = buffers
    with torch.no_grad():
        torch.mm(h[:k], w.t(), out=z[:k])  # logits        [k, V]
        torch.mm(z[:k], w, out=gh[:k])  # grad hidden   [k, D]  (z stands in for dZ)
        torch.mm(z[:k].t(), h[:k], out=gw)  # grad weight   [V, D]


def child_measure(spec: dict) -> dict:
    """One fresh process, one implementation: warm-up, then ``calls`` timed forward + backward."""
    import torch

    n, d, v, dtype_name, impl = spec["n"], spec["d"], spec["v"], spec["dtype"], spec["impl"]
    h, w, y = _inputs(n, d, v, dtype_name)
    k = min(n, WARMUP_TOKENS)
    if impl == "floor":
        # Preallocated and touched (zeros writes every page) before the baseline: excluded from extra.
        buffers = (torch.zeros(n, v, dtype=h.dtype), torch.zeros(n, d, dtype=h.dtype),
                   torch.zeros(v, d, dtype=h.dtype))
        _floor_step(h, w, buffers, k)

        def step():
            _floor_step(h, w, buffers, n)
    else:
        w_frozen = w.detach().clone()  # EMO's cost embedding: an input, allocated before the baseline
        fn = _loss_fn(impl, w_frozen)
        # The gradients exist before the warm-up, as in a training step. The warm-up inputs are copies,
        # not views like h[:k]: torch.compile guards on views' bases and would recompile on the timed call.
        h.grad, w.grad = torch.zeros_like(h), torch.zeros_like(w)  # [N, D], [V, D]
        h_warm, y_warm = h[:k].detach().clone().requires_grad_(), y[:k].clone()
        fn(h_warm, w, y_warm).backward()  # compiles what compiles
        del h_warm, y_warm
        if impl not in ("naive", "torch_chunked", "cce"):  # xent's own functions
            from xent._linear import release_buffers

            release_buffers()  # kept only with XENT_KEEP_CHUNK_BUFFER=1: then the timed call counts it again

        def step():
            fn(h, w, y).backward()

    with torch.no_grad():
        for p in (h, w):
            if p.grad is not None:
                p.grad.zero_()
    _release_free_heap()
    _reset_peak_rss()
    base_kb = _status_kb("VmRSS")
    times, cpu_times = [], []
    for _ in range(spec.get("calls", 1)):  # the same step again: a training loop's steady state
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    seconds, cpu_seconds = statistics.median(times), statistics.median(cpu_times)
    peak_kb = _status_kb("VmHWM")
    kernel = {}
    if impl == "xent":
        from xent._cpu_kernel import kernel_status

        kernel = {"cpu_kernel": kernel_status()}
    return {
        **kernel,
        "time_s": seconds,
        "cpu_s": cpu_seconds,
        "extra_peak_mb": (peak_kb - base_kb) / 1024,
        "base_rss_mb": base_kb / 1024,
        "threads": torch.get_num_threads(),
    }


def _rel_err(a, ref) -> float:
    return float((a.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def child_guard(spec: dict) -> dict:
    """Loss and gradients of every implementation on a small shape vs a float64 reference.

    Tolerances: float32 1e-4 (loss) and 1e-3 (gradients, max error relative to max |g|); bfloat16 inputs
    are judged against the naive same-dtype error: max(2 × that error, 2e-2 loss / 5e-2 gradients).
    """
    n, d, v = GUARD_SHAPE
    out = {}
    for dtype_name in spec["dtypes"]:
        h, w, y = _inputs(n, d, v, dtype_name, seed=1)
        w_frozen = w.detach().clone()
        # The reference: the same (rounded) inputs in float64, plain path; for a loss, its own functional.
        refs = {}
        ref_of = {i: "naive" if i in CE_IMPLS else i if i.startswith("new:")
                  else "plain:" + i.partition(":")[2] for i in spec["impls"]}
        for impl in spec["impls"]:
            if impl == "floor":
                continue
            ref_impl = ref_of[impl]
            if ref_impl not in refs:
                h64 = h.detach().double().requires_grad_()
                w64 = w.detach().double().requires_grad_()
                loss = _loss_fn(ref_impl, w_frozen.double())(h64, w64, y)
                loss.backward()
                refs[ref_impl] = (loss.detach(), h64.grad, w64.grad)
        results = {}
        for impl in spec["impls"]:
            if impl == "floor":
                continue
            ref_loss, ref_gh, ref_gw = refs[ref_of[impl]]
            try:
                hi, wi = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
                loss = _loss_fn(impl, w_frozen)(hi, wi, y)
                loss.backward()
                errs = (_rel_err(loss.detach(), ref_loss), _rel_err(hi.grad, ref_gh),
                        _rel_err(wi.grad, ref_gw))
                results[impl] = {"loss": float(loss), "ref": float(ref_loss), "errs": errs}
            except Exception as e:  # noqa: BLE001 - reported, that implementation is then not timed
                results[impl] = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:200]}
        yard = results.get("naive", {}).get("errs", (0.0, 0.0, 0.0))
        for r in results.values():
            if "error" in r:
                r["ok"] = False
                continue
            if dtype_name == "float32" or dtype_name == "float64":
                tol = (1e-4, 1e-3, 1e-3)
            else:
                tol = (max(2 * yard[0], 2e-2), max(2 * yard[1], 5e-2), max(2 * yard[2], 5e-2))
            r["tol"] = tol
            r["ok"] = all(e <= t for e, t in zip(r["errs"], tol))
        out[dtype_name] = results
    return out


# ---------------------------------------------------------------------------------------------------
# Parent side: no torch import; orchestrates fresh processes and writes the tables.


def _run_child(mode: str, spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, json.dumps(spec)]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr.strip().splitlines() or [f"exit code {p.returncode}"])[-1]
        return {"error": f"exit {p.returncode}: {tail[:200]}"}
    return json.loads(lines[-1])


def _mem_available_mb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return float("inf")


def _naive_need_mb(n, v, dtype_name) -> float:
    # At most three [N, V] tensors live at once: in backward the saved log-probabilities, their gradient
    # and the logits' gradient (measured: 1500 MB extra at 4096×32000 float32, 3 × 500 MB).
    return 3 * n * v * (2 if dtype_name == "bfloat16" else 4) / 2**20


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def _fmt(x, spec=".2f"):
    return "—" if x is None or x != x else format(x, spec)


def _check(x, bound):
    if x is None or x != x:
        return "n/a"
    return f"{'✅' if x <= bound else '❌'} {x:.2f}×"


def _cce_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("cut_cross_entropy") is not None


def _cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), also for the other benchmarks' headers."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "?"


def _host() -> str:
    return f"{_cpu_model()}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}"


def _torch_version() -> str:
    code = "import torch, xent; print(torch.__version__, xent.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return out.stdout.strip() or "?"


def _write(args, stem, rows, impls, shapes, guard_rows, notes, finished) -> str:
    """Writes the CSV and the markdown (after every shape, so an interrupted run leaves its results)."""
    notes = notes + sorted({f"{r['impl']} ({r['n']}x{r['d']}x{r['v']} {r['dtype']}): {r['error']}"
                            for r in rows if r["error"]})
    loads = [r["loadavg"] for r in rows if r.get("loadavg") is not None]
    if loads:  # the machine may be shared: what else was running shows in the load
        notes.append(f"Load average (1 min) when each process started: {min(loads):.1f} to {max(loads):.1f} "
                     f"on {os.cpu_count()} logical CPUs.")
    if not finished:
        notes.append("Partial: the run was still going when this was written.")
    with open(os.path.join(args.out, stem + ".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["n"])
        writer.writeheader()
        writer.writerows(rows)

    command = "python benchmarks/linear_cross_entropy.py " + " ".join(sys.argv[1:])
    header = [
        f"# {_title(args)}: "
        "forward + backward, CPU",
        "",
        f"`{command}` — {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"torch/xent {_torch_version()}, {_host()}, {args.repeats} fresh processes per cell, "
        f"{args.calls} timed call{'s' if args.calls > 1 else ''} in each "
        "(medians; rounds interleaved round-robin).",
        "",
    ]
    if args.new:
        body = _new_tables(rows, impls, shapes)
    elif args.losses:
        body = _loss_tables(rows, impls, shapes[0])
    else:
        body = _ce_tables(rows, impls, shapes)
    body += ["", "Correctness guard (before timing; small shape "
             f"N, D, V = {GUARD_SHAPE}, errors relative to a float64 reference: loss, grad h, grad W):", "",
             "| dtype | impl | loss | reference | rel. err loss | grad h | grad W | ok |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for dtype_name, impl, r in guard_rows:
        if "error" in r:
            body.append(f"| {dtype_name} | {impl} | — | — | — | — | — | ❌ {r['error']} |")
        else:
            e = r["errs"]
            body.append(f"| {dtype_name} | {impl} | {r['loss']:.6f} | {r['ref']:.6f} | {e[0]:.1e} | "
                        f"{e[1]:.1e} | {e[2]:.1e} | {'✅' if r['ok'] else '❌'} |")
    if notes:
        body += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    text = "\n".join(header + body) + "\n"
    with open(os.path.join(args.out, stem + ".md"), "w") as f:
        f.write(text)
    return text


def run(args) -> int:
    os.makedirs(args.out, exist_ok=True)
    stem = "new_functions" if args.new else "linear_loss" if args.losses else "linear_cross_entropy"
    if args.new and args.only:
        stem += "_" + "_".join(args.only)
    notes = []
    if args.new:
        impls = [i for i in NEW if not args.only or i == "new:ce" or i[4:] in args.only]
        shapes = _parse_shapes(args.shapes) if args.shapes else NEW_SHAPES
    elif args.losses:
        available = _available_losses()
        for name in LOSSES:
            if name not in available:
                notes.append(f"xent.losses.{name} (or xent.{LOSSES[name][1]}) does not exist yet: skipped.")
        impls = [f"{kind}:{name}" for name in LOSSES if name in available for kind in ("fused", "plain")]
        shapes = _parse_shapes(args.shapes)[:1] if args.shapes else [LOSS_SHAPE]
    else:
        impls = list(args.impls)
        if "cce" in impls and not _cce_available():
            impls.remove("cce")
            notes.append("cut-cross-entropy is not installed (`pip install -c constraints.txt "
                         "cut-cross-entropy`): its baseline is missing from this run.")
        shapes = _parse_shapes(args.shapes or "small")

    dtypes = sorted({s[3] for s in shapes})
    print(f"correctness guard on {GUARD_SHAPE} ({', '.join(dtypes)}) ...", flush=True)
    guard = _run_child("guard", {"dtypes": dtypes, "impls": impls}, timeout=args.timeout)
    if "error" in guard:
        print(f"guard failed to run: {guard['error']}", file=sys.stderr)
        return 1
    guard_rows = []
    for dtype_name, results in guard.items():
        for impl, r in results.items():
            guard_rows.append((dtype_name, impl, r))
            if not r["ok"]:
                what = r.get("error") or f"errors {r['errs']} above tolerance {r['tol']}"
                notes.append(f"{impl} ({dtype_name}) failed the correctness guard ({what}): not timed.")
    failed = {(d, i) for d, i, r in guard_rows if not r["ok"]}

    rows = []  # one per measurement
    for n, d, v, dtype_name in shapes:
        todo = [i for i in impls if (dtype_name, i) not in failed
                and not (i == "new:ce_projection_f32" and dtype_name == "float32")]  # the same as new:ce
        for r in range(args.repeats):
            order = todo[r % len(todo):] + todo[: r % len(todo)]  # rotate: no implementation always first
            for impl in order:
                spec = {"n": n, "d": d, "v": v, "dtype": dtype_name, "impl": impl, "calls": args.calls}
                row = dict(spec, round=r, time_s=None, cpu_s=None, extra_peak_mb=None, base_rss_mb=None,
                           threads=None, loadavg=os.getloadavg()[0], error="")
                naive_like = impl == "naive" or impl.startswith("plain:")
                if naive_like and _mem_available_mb() < 1.15 * _naive_need_mb(n, v, dtype_name):
                    row["error"] = (f"skipped: needs ~{_naive_need_mb(n, v, dtype_name):.0f} MB, "
                                    f"{_mem_available_mb():.0f} MB available")
                else:
                    started = time.perf_counter()
                    res = _run_child("measure", spec, timeout=args.timeout)
                    res["wall_s"] = time.perf_counter() - started
                    row.update({k: res[k] for k in res if k in row})
                    row["error"] = res.get("error", "")
                    status = res.get("cpu_kernel")
                    if status and not any(note.startswith("xent's CPU kernel") for note in notes):
                        notes.append(f"xent's CPU kernel (XENT_CPU_KERNEL=auto): {status}.")
                rows.append(row)
                shown = row["error"] or (f"{row['time_s']:.3f} s  +{row['extra_peak_mb']:.0f} MB  "
                                         f"(process {res['wall_s']:.0f} s, load {row['loadavg']:.1f})")
                print(f"  {n}x{d}x{v} {dtype_name:8s} round {r} {impl:22s} {shown}", flush=True)
        _write(args, stem, rows, impls, shapes, guard_rows, notes, finished=False)

    text = _write(args, stem, rows, impls, shapes, guard_rows, notes, finished=True)
    print()
    print(text)
    return 0


def _cells(rows):
    cells = {}
    for r in rows:
        if r["error"]:
            continue
        key = (r["n"], r["d"], r["v"], r["dtype"], r["impl"])
        c = cells.setdefault(key, {"time": [], "cpu": [], "mem": []})
        c["time"].append(r["time_s"])
        c["cpu"].append(r["cpu_s"])
        c["mem"].append(r["extra_peak_mb"])
    return {key: {"time": _median(c["time"]), "cpu": _median(c["cpu"]), "mem": _median(c["mem"]),
                  "runs": len(c["time"]),
                  "spread": (max(c["time"]) - min(c["time"])) / _median(c["time"])}
            for key, c in cells.items()}


def _ratio(cells, key, impl, base, quantity):
    a, b = cells.get(key + (impl,)), cells.get(key + (base,))
    if a is None or b is None or not b[quantity] > 0:
        return None
    return a[quantity] / b[quantity]


def _ce_tables(rows, impls, shapes):
    cells = _cells(rows)
    out = ["| N×D×V | dtype | impl | time s | spread | cpu s | × naive | × torch_chunked | × floor "
           "| extra peak MB | mem × naive | mem × torch_chunked |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n, d, v, dt in shapes:
        key = (n, d, v, dt)
        for impl in impls:
            c = cells.get(key + (impl,))
            if c is None:
                continue
            name = "floor (3 matmuls; [N,V] buffer excluded)" if impl == "floor" else impl
            t = [_fmt(_ratio(cells, key, impl, b, "time")) for b in ("naive", "torch_chunked", "floor")]
            m = [_fmt(_ratio(cells, key, impl, b, "mem"), ".3f") for b in ("naive", "torch_chunked")]
            out.append(f"| {n}×{d}×{v} | {dt} | {name} | {c['time']:.3f} | {c['spread']:.0%} | "
                       f"{c['cpu']:.2f} | {' | '.join(t)} | {c['mem']:.0f} | {' | '.join(m)} |")
    out += ["", "Targets for xent (issue 3), ratios of medians of wall time and extra peak RSS: ✅ met, "
            "❌ missed. In brackets, the same time ratio on process CPU time (less sensitive to other jobs "
            "on the machine).",
            "",
            "| N×D×V | dtype | " + " | ".join(f"{col} ≤ {b}" for col, _, _, b in CE_TARGETS) + " |",
            "|---|---|" + "---|" * len(CE_TARGETS)]
    for n, d, v, dt in shapes:
        key = (n, d, v, dt)
        marks = []
        for _, base, q, bound in CE_TARGETS:
            ratio, cpu = _ratio(cells, key, "xent", base, q), _ratio(cells, key, "xent", base, "cpu")
            marks.append(_check(ratio, bound) + (f" ({cpu:.2f}×)" if q == "time" and ratio and cpu else ""))
        out.append(f"| {n}×{d}×{v} | {dt} | " + " | ".join(marks) + " |")
    for n, d, v, dt in shapes:  # issue 16: half precision within 10 % of its own three-matmul floor
        ratio, cpu = (_ratio(cells, (n, d, v, dt), "xent", "floor", q) for q in ("time", "cpu"))
        if dt == "bfloat16" and ratio:
            out += ["", f"Issue 16, bfloat16 time × floor ≤ {BF16_FLOOR_TARGET} at {n}×{d}×{v}: "
                    f"{_check(ratio, BF16_FLOOR_TARGET)}" + (f" ({cpu:.2f}× on CPU time)" if cpu else "")]
    return out


def _loss_tables(rows, impls, shape):
    cells = _cells(rows)
    n, d, v, dt = shape
    key = (n, d, v, dt)
    names = [i.partition(":")[2] for i in impls if i.startswith("fused:")]
    out = [f"Shape N×D×V = {n}×{d}×{v}, {dt}. fused = `xent.linear_loss(h, W, y, loss=xent.losses.X(...))`; "
           "plain = `xent.x_loss(h @ W.T, y, ...)`.", "",
           f"| loss | fused s | plain s | fused × plain | fused × fused CE ≤ {LOSS_TIME_BOUND} "
           f"| fused extra MB | plain extra MB | mem fused × plain ≤ {LOSS_MEM_BOUND} |",
           "|---|---:|---:|---:|---|---:|---:|---|"]
    for name in names:
        f, p = cells.get(key + ("fused:" + name,)), cells.get(key + ("plain:" + name,))
        vs_plain = _ratio(cells, key, "fused:" + name, "plain:" + name, "time")
        vs_ce = _ratio(cells, key, "fused:" + name, "fused:CrossEntropy", "time")
        mem = _ratio(cells, key, "fused:" + name, "plain:" + name, "mem")
        out.append(f"| {name} | {_fmt(f and f['time'], '.3f')} | {_fmt(p and p['time'], '.3f')} | "
                   f"{_fmt(vs_plain)} | {_check(vs_ce, LOSS_TIME_BOUND)} | {_fmt(f and f['mem'], '.0f')} | "
                   f"{_fmt(p and p['mem'], '.0f')} | {_check(mem, LOSS_MEM_BOUND)} |")
    return out


def _title(args) -> str:
    if args.new:
        return "issue 13: new fused functions"
    return "xent.linear_loss per loss" if args.losses else "Fused linear + cross-entropy"


def _new_tables(rows, impls, shapes):
    cells = _cells(rows)
    out = ["Each against fused cross-entropy (`new:ce` = `xent.linear_cross_entropy(h, W, y)`) measured in "
           "the same run; mtp3 (K = 3 streams of N tokens) per stream (its time / 3). Time ratios of "
           "medians of wall time, CPU-time ratio in brackets; extra = extra peak RSS.", "",
           "| N×D×V | dtype | impl | time s | spread | cpu s | × fused CE (per stream) | target "
           "| extra peak MB | mem × fused CE | mem target |",
           "|---|---|---|---:|---:|---:|---:|---|---:|---:|---|"]
    for n, d, v, dt in shapes:
        key = (n, d, v, dt)
        for impl in impls:
            c = cells.get(key + (impl,))
            if c is None:
                continue
            bound, streams, mem_bound = NEW[impl]
            t = _ratio(cells, key, impl, "new:ce", "time")
            cpu = _ratio(cells, key, impl, "new:ce", "cpu")
            t, cpu = (None if t is None else t / streams), (None if cpu is None else cpu / streams)
            mark = "—" if bound is None else f"{_check(t, bound)} (≤ {bound})"
            mem = _ratio(cells, key, impl, "new:ce", "mem")
            mem_mark = "—" if mem_bound is None else f"{_check(mem, mem_bound)} (≤ {mem_bound})"
            out.append(f"| {n}×{d}×{v} | {dt} | {impl[4:]} | {c['time']:.3f} | {c['spread']:.0%} | "
                       f"{c['cpu']:.2f} | {_fmt(t)} ({_fmt(cpu)}) | {mark} | "
                       f"{c['mem']:.0f} | {_fmt(mem)} | {mem_mark} |")
    return out


def _available_losses() -> list[str]:
    code = ("import json, xent; print(json.dumps([n for n, (o, fn) in json.loads(input()).items() "
            "if hasattr(xent.losses, n) and hasattr(xent, fn)]))")
    p = subprocess.run([sys.executable, "-c", code], input=json.dumps(LOSSES), capture_output=True, text=True)
    return json.loads(p.stdout) if p.returncode == 0 else []


def _parse_shapes(value: str):
    if value in SHAPES:
        return SHAPES[value]
    shapes = []
    for item in value.split(","):  # e.g. 2048x256x16000:float32
        dims, _, dtype_name = item.partition(":")
        n, d, v = (int(x) for x in dims.split("x"))
        shapes.append((n, d, v, dtype_name or "float32"))
    return shapes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=None,
                   help="small | all | a comma list like 2048x256x16000:float32 (default: small; with "
                   f"--losses, {LOSS_SHAPE})")
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per implementation and shape")
    p.add_argument("--calls", type=int, default=1,
                   help="timed calls per process (time: their median; memory: the peak over all of them)")
    p.add_argument("--impls", nargs="+", default=list(CE_IMPLS), choices=CE_IMPLS)
    p.add_argument("--losses", action="store_true",
                   help="issue 4: each xent loss, fused vs plain, on one shape; ignores --impls")
    p.add_argument("--new", action="store_true",
                   help="issue 13: log-probs, return_stats, EAFT, Rho-1, MTP, sparse KD, projection_dtype "
                   "against fused CE, at 4096x512x32000 float32 and bfloat16; ignores --impls")
    p.add_argument("--only", nargs="+", choices=[i[4:] for i in NEW if i != "new:ce"],
                   help="with --new: only these functions (and fused CE, their baseline); the table is "
                   "written to new_functions_<names>.md")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--timeout", type=float, default=1800, help="seconds per process")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        mode, spec = args.child[0], json.loads(args.child[1])
        print(json.dumps(child_measure(spec) if mode == "measure" else child_guard(spec)))
        return 0
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
