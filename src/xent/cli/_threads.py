"""How many CPU threads torch uses in ``xent eval``, ``compare`` and ``train``: ``--threads``.

torch starts one thread per physical core, whatever else runs. On a shared machine that oversubscribes
the cores and its threads spin waiting for each other: ``xent train --objective emo --steps 30`` took
96.9 s with torch's default against 3.3 s on one thread, ``xent eval`` 36 s against 12 s. The default
here is the cores left free: the CPUs this process may use minus the 1-minute load average, at least 1
and at most torch's own default. ``OMP_NUM_THREADS`` in the environment (torchrun sets it to 1 per
process) is used as it is. ``xent demo`` uses one thread (``DemoConfig.threads``) so its numbers do not
depend on the machine.
"""

from __future__ import annotations

import contextlib
import os

HELP = ("torch CPU threads (default: the free cores, i.e. the usable CPUs minus the 1-minute load "
        "average, at least 1 and at most torch's default; OMP_NUM_THREADS if set)")


def add_threads_argument(p) -> None:
    p.add_argument("--threads", type=int, metavar="N", help=HELP)


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota if any."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            n = min(n, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return n


def default_threads(torch_default: int) -> int:
    """The free cores: usable CPUs minus the 1-minute load average, clamped to [1, torch_default]."""
    if os.environ.get("OMP_NUM_THREADS"):
        return torch_default  # torch read it at start-up: the user's choice
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average (Windows): torch's default
        return torch_default
    return max(1, min(torch_default, usable_cpus() - round(load)))


def check_threads(threads) -> None:
    from . import CommandError

    if threads is not None and threads < 1:
        raise CommandError(f"--threads must be at least 1, got {threads}")


@contextlib.contextmanager
def cpu_threads(threads: int | None):
    """torch uses ``threads`` (None: :func:`default_threads`) CPU threads inside; restored after."""
    import torch

    check_threads(threads)
    before = torch.get_num_threads()
    torch.set_num_threads(threads or default_threads(before))
    try:
        yield
    finally:
        torch.set_num_threads(before)
