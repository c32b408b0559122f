"""The Triton kernels run on CPU tensors under Triton's interpreter, inside the harness of
triton_harness.py (every load and store bounds-checked, asserts firing, bf16 use and bare float arguments
closed off, TF32 dots rounded as a GPU rounds them). Each test module here skips, with the reason, when
triton is not installed."""

import importlib
import importlib.util
import os
import sys

import pytest

SKIP_REASON = "triton is not installed (pip install -c constraints.txt -e '.[test]')"

# @triton.jit decides at decoration time whether a function is interpreted: triton's own library
# (tl.sum, tl.max ...) when triton is first imported, a kernel when its module is. So triton and every
# kernel module (xent's, the harness tests') are imported here under TRITON_INTERPRET=1; then the
# environment is restored, so that outside these tests xent never takes CPU tensors for the Triton
# backend (it does only under the variable, which the harness fixture sets for each test here).
_triton_before = "triton" in sys.modules
_before = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
try:
    # find_spec("triton.language"): triton's own submodule, never this tests/triton folder
    HAVE_TRITON = (importlib.util.find_spec("triton") is not None
                   and importlib.util.find_spec("triton.language") is not None)
    if HAVE_TRITON:
        for _name in ("xent._triton._rows", "xent._triton._fused", "xent._triton._backward",
                      "triton_test_kernels"):
            importlib.import_module(_name)
finally:
    if _before is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _before
_standard = sys.modules.get("triton.language.standard")
INTERPRETED = HAVE_TRITON and type(getattr(_standard, "sum", None)).__name__ == "InterpretedFunction"


@pytest.fixture(autouse=True)
def harness(monkeypatch):
    """Every test here runs its kernels inside the harness, with TRITON_INTERPRET=1; yields its record of
    launches."""
    if not HAVE_TRITON:
        pytest.skip(SKIP_REASON)
    if not INTERPRETED:
        pytest.skip("triton was imported before tests/triton/conftest.py set TRITON_INTERPRET "
                    f"(already imported: {_triton_before}): run tests/triton in a process of its own")
    import triton_harness

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with triton_harness.checked() as record:
        yield record
