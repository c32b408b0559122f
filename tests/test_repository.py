"""The repository stands alone: its licence, its packaging metadata, and docs/REFERENCE.md, whose worked
numbers are the ones the code is held to."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import xent

ROOT = Path(__file__).resolve().parents[1]


def test_license_is_the_one_pyproject_declares():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"  # an SPDX expression, not the deprecated table
    assert project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "END OF TERMS AND CONDITIONS" in text


def test_metadata_builds_without_a_deprecation_warning(tmp_path):
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"setuptools {setuptools.__version__} predates SPDX licence strings (build-system: >=77)")
    for name in ("pyproject.toml", "LICENSE", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "src", tmp_path / "src",
                    ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    (tmp_path / "meta").mkdir()
    code = ("import setuptools.build_meta as b; "
            "print(b.prepare_metadata_for_build_wheel('meta'))")
    out = subprocess.run([sys.executable, "-W", "always", "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, check=True)
    assert "Deprecat" not in out.stderr, out.stderr
    metadata = (tmp_path / "meta" / out.stdout.strip().splitlines()[-1] / "METADATA").read_text()
    assert "License-Expression: Apache-2.0" in metadata and "License-File: LICENSE" in metadata


def test_docs_and_tests_cite_the_repository_reference():
    docs = [ROOT / "README.md", *ROOT.joinpath("docs").rglob("*.md"), *ROOT.joinpath("tests").rglob("*.py")]
    for path in docs:
        if path.name == "test_repository.py":
            continue
        assert "shared/REFERENCE" not in path.read_text(encoding="utf-8"), path  # not in a clone


REFERENCE = (ROOT / "docs" / "REFERENCE.md").read_text(encoding="utf-8")
X = torch.tensor([[2.0, 1.0, 0.1], [0.5, 2.5, 0.3], [1.5, 0.5, 2.0]], dtype=torch.float64)
Y = torch.tensor([0, -100, 2])
TEACHER = torch.tensor([[1.0, 2.0, 0.5], [0.2, 1.8, 0.9], [2.2, 0.1, 1.0]], dtype=torch.float64)
W = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)

# the first column of the §2 table -> the options it stands for
TABLE_CALLS = {
    "`cross_entropy(X, y)`": {},
    "`weight=[1, 2, 3]`": {"weight": W},
    "`label_smoothing=0.1`": {"label_smoothing": 0.1},
    "`weight=[1, 2, 3], label_smoothing=0.1`": {"weight": W, "label_smoothing": 0.1},
    "`softcap=30`": {"softcap": 30.0},
}


def _numbers(text: str) -> list[float]:
    return [float(n) for n in re.findall(r"-?\d+\.\d+", text)]


def test_reference_table_is_what_cross_entropy_computes():
    rows = {}
    for line in REFERENCE.split("## 2.")[1].split("## 3.")[0].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0] in TABLE_CALLS:
            rows[cells[0]] = cells
    assert rows.keys() == TABLE_CALLS.keys()
    for call, (_, none, mean) in rows.items():
        kwargs = TABLE_CALLS[call]
        want_none = _numbers(none)
        got_none = xent.cross_entropy(X, Y, reduction="none", **kwargs)
        assert got_none[[0, 2]].tolist() == pytest.approx(want_none, abs=1e-9), call
        assert got_none[1].item() == 0.0
        assert xent.cross_entropy(X, Y, **kwargs).item() == pytest.approx(_numbers(mean)[0], abs=1e-9), call
    z_row = next(line for line in REFERENCE.splitlines() if line.startswith("| `z_loss=1e-4`"))
    z0, z1, mean = _numbers(z_row)
    assert xent.cross_entropy(X, Y, z_loss=1e-4).item() == pytest.approx(mean, abs=1e-9)
    lse = torch.logsumexp(X[[0, 2]], dim=-1)
    assert (1e-4 * lse.square()).tolist() == pytest.approx([z0, z1], abs=1e-9)
    assert xent.cross_entropy(X, torch.full((3,), -100)).item() == 0.0


def _stated(pattern: str) -> float:
    match = re.search(pattern, REFERENCE.split("## 3.")[1], flags=re.S)
    assert match, pattern
    return float(match.group(1))


def test_reference_worked_numbers_of_the_other_losses():
    cases = [
        (r"Worked, γ=0.1, b=0:.*?mean (\d\.\d+)", xent.tailr_loss(X, Y, gamma=0.1)),
        (r"\*\*GOLD-δ\*\*.*?Worked: mean (\d\.\d+)", xent.gold_loss(X, Y)),
        (r"Worked with α=1:\s+mean (\d\.\d+)", xent.focal_loss(X, Y, gamma=2.0)),
        (r"Worked with ε=1: mean\s+(\d\.\d+)", xent.poly_loss(X, Y, epsilon=1.0)),
        (r"forward KL mean (\d\.\d+)", xent.distill_loss(X, TEACHER, Y, kind="forward_kl")),
        (r"reverse KL mean (\d\.\d+)", xent.distill_loss(X, TEACHER, Y, kind="reverse_kl")),
        (r"JSD\(β=0.5\) mean (\d\.\d+)", xent.distill_loss(X, TEACHER, Y, kind="jsd", beta=0.5)),
        (r"equals the cross-entropy \((\d\.\d+) on X, y",
         xent.emo_loss(X, Y, cost_embedding=torch.randn(3, 5, dtype=torch.float64))),
    ]
    for pattern, got in cases:
        assert got.item() == pytest.approx(_stated(pattern), abs=1e-9), pattern


def test_wheel_carries_the_cpu_kernel_source(tmp_path):
    """The fused head's CPU kernel is compiled from its C source on first use: the wheel must ship it."""
    pytest.importorskip("setuptools")
    for name in ("pyproject.toml", "LICENSE", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "src", tmp_path / "src",
                    ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    code = "import setuptools.build_meta as b; print(b.build_wheel('dist'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    wheel = tmp_path / "dist" / out.stdout.strip().splitlines()[-1]
    with zipfile.ZipFile(wheel) as zf:
        source = zf.read("xent/_kernels/ce_rows.c").decode()
    assert source == (ROOT / "src/xent/_kernels/ce_rows.c").read_text()
