"""The package itself: a light import, a small flat API, the console command."""

import subprocess
import sys
from pathlib import Path

import xent


def test_import_needs_only_torch():
    code = (
        "import sys, xent; "
        "heavy = [m for m in ('transformers', 'tokenizers', 'datasets', 'matplotlib', 'rich', 'pyarrow', "
        "'keras', 'tensorflow', 'jax') "
        "if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_public_api_is_listed():
    for name in xent.__all__:
        assert getattr(xent, name) is not None, name
    for name in ("cross_entropy", "causal_lm_loss", "count_items", "linear_cross_entropy", "linear_loss",
                 "binary_cross_entropy"):
        assert name in xent.__all__


def test_version_from_console_and_module():
    console = str(Path(sys.executable).parent / "xent")  # the console script next to this interpreter
    for cmd in ([console, "--version"], [sys.executable, "-m", "xent", "--version"]):
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == f"xent {xent.__version__}"


def test_unknown_attribute():
    import pytest

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        xent.nope  # noqa: B018
