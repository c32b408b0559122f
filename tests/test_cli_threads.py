"""The default --threads of xent eval, compare and train: the free cores, never more than torch's default.

torch's default (one thread per physical core) oversubscribes a shared machine: threads spin waiting
for each other (`xent train --objective emo --steps 30`: 96.9 s against 3.3 s on one thread).
"""

import os

import pytest

from xent.cli import _threads


@pytest.fixture
def machine(monkeypatch):
    """Set the usable CPUs, the 1-minute load average and OMP_NUM_THREADS of a pretend machine."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)

    def set_(cpus, load, omp=None):
        monkeypatch.setattr(_threads, "usable_cpus", lambda: cpus)
        monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
        if omp is not None:
            monkeypatch.setenv("OMP_NUM_THREADS", str(omp))

    return set_


@pytest.mark.parametrize("cpus, load, torch_default, expected", [
    (2, 6.8, 2, 1),     # 2 cores shared with busy neighbours: 1 thread, not 2 that spin
    (2, 0.0, 2, 2),     # an idle machine keeps torch's default
    (16, 0.3, 8, 8),    # never more than torch's default (physical cores)
    (16, 10.4, 8, 6),   # 16 − 10 busy = 6 free
    (4, 3.6, 4, 1),     # 4 − round(3.6) = 0: still 1
])
def test_default_is_the_free_cores(machine, cpus, load, torch_default, expected):
    machine(cpus, load)
    assert _threads.default_threads(torch_default) == expected


def test_omp_num_threads_is_the_users_choice(machine):
    machine(2, 6.8, omp=2)
    assert _threads.default_threads(2) == 2  # torch read OMP_NUM_THREADS=2 at start-up: kept


def test_no_load_average_keeps_torchs_default(machine, monkeypatch):
    machine(8, 0.0)

    def unavailable():
        raise OSError("no load average")

    monkeypatch.setattr(os, "getloadavg", unavailable)
    assert _threads.default_threads(4) == 4


def test_usable_cpus_is_within_the_affinity_mask():
    assert 1 <= _threads.usable_cpus() <= len(os.sched_getaffinity(0))


def test_cpu_threads_sets_and_restores(machine):
    import torch

    before = torch.get_num_threads()
    machine(1, 5.0)  # busy: the default is 1
    with _threads.cpu_threads(None):
        assert torch.get_num_threads() == 1
    with _threads.cpu_threads(3):
        assert torch.get_num_threads() == 3
    assert torch.get_num_threads() == before
