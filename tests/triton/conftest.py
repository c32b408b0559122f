"""The Triton kernels run on CPU tensors under Triton's interpreter, inside the harness of
triton_harness.py (every load and store bounds-checked, asserts firing, bf16 use and bare float arguments
closed off, TF32 dots rounded as a GPU rounds them). Each test module here skips, with the reason, when
triton is not installed."""

import importlib
import importlib.util
import sys

import pytest

SKIP_REASON = "triton is not installed (pip install -c constraints.txt -e '.[test]')"

# @triton.jit decides at decoration time whether a function is interpreted: triton's own library when
# triton is first imported, a kernel when its module is. tests/conftest.py imports triton and every kernel
# module (KERNEL_MODULES) under TRITON_INTERPRET=1 when the session starts, before anything else can.
# find_spec("triton.language"): triton's own submodule, never this tests/triton folder
HAVE_TRITON = (importlib.util.find_spec("triton") is not None
               and importlib.util.find_spec("triton.language") is not None)
_standard = sys.modules.get("triton.language.standard")
INTERPRETED = HAVE_TRITON and type(getattr(_standard, "sum", None)).__name__ == "InterpretedFunction"


@pytest.fixture(autouse=True)
def harness(monkeypatch):
    """Every test here runs its kernels inside the harness, with TRITON_INTERPRET=1; yields its record of
    launches."""
    if not HAVE_TRITON:
        pytest.skip(SKIP_REASON)
    if not INTERPRETED:
        pytest.skip("triton was imported before tests/conftest.py set TRITON_INTERPRET: run tests/triton "
                    "in a process of its own")
    import triton_harness

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with triton_harness.checked() as record:
        yield record
