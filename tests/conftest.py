"""Fixtures shared by every test directory."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread, and far faster when the CPU is shared (no spinning)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Every available device: the CPU always, CUDA when present. The CUDA cases carry the `cuda` marker, so
# `pytest -m cuda` runs exactly them on a GPU machine (benchmarks/gpu_check.sh does); CI has only the CPU.
DEVICES = [pytest.param("cpu", id="cpu")]
if torch.cuda.is_available():
    DEVICES.append(pytest.param("cuda", id="cuda", marks=pytest.mark.cuda))


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)
