"""tests/parallel: CPU gloo process groups spawned per module (see dist_launch.py)."""

import sys
from pathlib import Path

import pytest

# the shared float64 references (tests/reference.py), also for the spawned ranks (they inherit sys.path)
_TESTS = str(Path(__file__).resolve().parents[1])
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

if not __import__("torch").distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)
