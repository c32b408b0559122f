"""The Triton kernels run on CPU tensors under Triton's interpreter, inside the harness of
triton_harness.py (every load and store bounds-checked, asserts firing, bf16 use and bare float arguments
closed off, TF32 dots rounded as a GPU rounds them). Each test module here skips, with the reason, when
triton is not installed."""

import importlib.util
import os

# Before triton is first imported: @triton.jit decorates a kernel as interpreted only if this is set then.
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

# find_spec("triton.language"): triton's own submodule, never this tests/triton folder
HAVE_TRITON = importlib.util.find_spec("triton") is not None and importlib.util.find_spec("triton.language")
SKIP_REASON = "triton is not installed (pip install -c constraints.txt -e '.[test]')"


@pytest.fixture(autouse=True)
def harness():
    """Every test here runs its kernels inside the harness; yields its record of launches."""
    if not HAVE_TRITON:
        pytest.skip(SKIP_REASON)
    import triton_harness

    with triton_harness.checked() as record:
        yield record
