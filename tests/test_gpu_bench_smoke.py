"""benchmarks/gpu_bench.py, the GPU benchmark of benchmarks/gpu_check.sh, run on the CPU with a tiny shape
(--smoke) so that it cannot rot while no GPU is at hand: every implementation that exists here runs in
its own process and is checked against the float64 reference; a missing baseline is skipped by name."""

import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_bench.py"


@pytest.mark.slow
def test_gpu_bench_smoke(tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--smoke", str(tmp_path), "--impls", "naive", "xent_mb1", "liger"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = {r["impl"]: r for r in csv.DictReader(open(tmp_path / "gpu_bench.csv"))}
    assert set(rows) == {"naive", "xent_mb1", "liger"}
    for impl in ("naive", "xent_mb1"):
        r = rows[impl]
        assert r["status"] == "ok", r
        assert float(r["time_s"]) > 0
        # float32 on the CPU: both within float32 rounding of the float64 reference
        for err in ("loss_err", "dw_err", "dh_err"):
            assert math.isfinite(float(r[err])) and float(r[err]) < 1e-5, (impl, err, r[err])
    liger = rows["liger"]["status"]
    assert liger.startswith("skipped") or liger == "ok", liger  # skipped cleanly where it is not installed
    table = (tmp_path / "gpu_bench.md").read_text()
    assert "| xent_mb1 |" in table and "| naive | " in table
