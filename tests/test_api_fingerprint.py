"""benchmarks/api_fingerprint.py (issue 21's "behaviour unchanged" check: hashes of the values and gradients
of every public function, float32 and bfloat16, kernel on and off) keeps running against the current API
and keeps covering every public loss function."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys

import xent

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_fingerprint_runs_and_covers_every_public_function(tmp_path):
    out = tmp_path / "fingerprint.txt"
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "src")}
    script = os.path.join(ROOT, "benchmarks", "api_fingerprint.py")
    run = subprocess.run([sys.executable, script, "--out", str(out)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = out.read_text().splitlines()
    calls, total = lines[:-1], lines[-1]
    assert re.fullmatch(r"total [0-9a-f]{64}", total)
    assert len(calls) >= 200 and all(re.fullmatch(r"kernel=[01] torch\.\w+ \S+ [0-9a-f]{64}( \S+)?", c)
                                      for c in calls), calls[:3]
    names = {c.split()[2].split("/")[0] for c in calls}
    # the loss functions the package has loaded (the lazy subpackages such as xent.keras are left alone)
    public = {n for n in xent.__all__ if n in vars(xent) and inspect.isfunction(vars(xent)[n])} - {"train"}
    assert public and public <= names, sorted(public - names)
