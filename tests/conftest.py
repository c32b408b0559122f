"""Fixtures shared by every test directory."""

import importlib
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

#: Every module that defines Triton kernels: each must be decorated under TRITON_INTERPRET=1.
KERNEL_MODULES = ("xent._triton._rows", "xent._triton._fused", "xent._triton._backward",
                  "triton_test_kernels")


def _import_triton_interpreted() -> None:
    """Imports triton and the Triton kernel modules under TRITON_INTERPRET=1, first thing in the session.

    @triton.jit decides when a function is decorated whether it is interpreted, so the kernels of
    tests/triton run on CPU tensors only if triton is first imported under the variable; other tests
    import it earlier through torch (its OpInfo samples, torch.compile), which made tests/triton skip
    itself in a full run. The variable is restored afterwards, so that outside tests/triton xent never
    takes CPU tensors for the Triton backend (tests/triton/conftest.py sets it for each of its tests).
    Imported first, triton also loads before any TensorFlow (xent.keras): in the other order LLVM's
    duplicate command-line options abort the process."""
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"  # before find_spec("triton.language"), which imports triton
    sys.path.insert(0, str(Path(__file__).parent / "triton"))
    try:
        if importlib.util.find_spec("triton") is None or importlib.util.find_spec("triton.language") is None:
            return
        for name in KERNEL_MODULES:
            importlib.import_module(name)
    finally:
        sys.path.pop(0)
        if before is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = before


_import_triton_interpreted()


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
