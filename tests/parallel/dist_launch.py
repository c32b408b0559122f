"""Run a function on N CPU processes joined by a gloo process group (torch.multiprocessing spawn).

The rendezvous is a FileStore in a temporary directory and gloo talks over the loopback interface only,
so no port is chosen and nothing leaves 127.0.0.1. Each rank returns a picklable value; a rank that
raises fails the caller with its traceback; a run that outlives ``timeout`` is killed.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank, world, directory, fn, args):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # 127.0.0.1 only
    torch.set_num_threads(1)  # two shared cores: one thread per rank
    store = dist.FileStore(os.path.join(directory, "store"), world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        out = fn(rank, world, *args)
        dist.barrier()  # no rank closes its connections while another still talks to it
    finally:
        dist.destroy_process_group()
    with open(os.path.join(directory, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(out, f)
    # The result is on disk: skip the interpreter's teardown of torch, transformers and their threads,
    # which is not under test and could only turn a finished run into a crash.
    os._exit(0)


def run(world: int, fn, *args, timeout: float = 120.0) -> list:
    """fn(rank, world, *args) on ``world`` processes; returns the per-rank results in rank order."""
    with tempfile.TemporaryDirectory() as directory:
        ctx = mp.start_processes(_entry, args=(world, directory, fn, args), nprocs=world, join=False,
                                 start_method="spawn")
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                for p in ctx.processes:  # only the processes this call started
                    if p.is_alive():
                        p.kill()
                raise TimeoutError(f"{getattr(fn, '__name__', fn)} on {world} ranks ran over {timeout} s")
        results = []
        for rank in range(world):
            with open(os.path.join(directory, f"rank{rank}.pkl"), "rb") as f:
                results.append(pickle.load(f))
        return results


def run_cases(world: int, fn, names, *args, timeout: float = 120.0) -> dict:
    """fn(rank, world, names, *args) returns {name: None or an error text}; merged over the ranks."""
    merged = {name: [] for name in names}
    for rank, out in enumerate(run(world, fn, list(names), *args, timeout=timeout)):
        for name, err in out.items():
            if err is not None:
                merged[name].append(f"rank {rank}: {err}")
    return {name: "\n".join(errs) or None for name, errs in merged.items()}


def each_case(names, check):
    """In a worker: check(name) for every name, recording failures instead of stopping, so every rank
    runs the same sequence of collectives."""
    import traceback

    out = {}
    for name in names:
        try:
            check(name)
            out[name] = None
        except Exception:
            out[name] = traceback.format_exc(limit=6)
    return out
