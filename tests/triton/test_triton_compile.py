"""Every configuration the row kernel's launcher can choose compiles for sm_90 (Hopper), and the widest
per dtype for sm_100 (Blackwell) where this Triton targets it, and so does every configuration of the
fused forward for sm_90, on this GPU-less machine (the wheel's ptxas), within the device's shared memory
and spilling at most a word or two (xent._triton._compile)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton.language", reason="triton is not installed (pip install -c constraints.txt "
                                                "-e '.[test]')")
import torch  # noqa: E402

from xent._triton._compile import FUSED_VARIANTS  # noqa: E402
from xent._triton._config import (  # noqa: E402
    BACKWARD_CONFIGS,
    FUSED_CONFIGS,
    MAX_SPILL_BYTES,
    SHARED_LIMIT,
    backward_config,
    backward_variant,
    fused_config,
    row_config,
    row_configs,
)


def compile_configs(*args: str) -> list[dict]:
    """Runs the compiler in a process without TRITON_INTERPRET (this one decorates kernels as
    interpreted); one dict per compiled configuration."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    run = subprocess.run([sys.executable, "-m", "xent._triton._compile", *args], capture_output=True,
                         text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    return [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]


def check_resources(found: list[dict]) -> None:
    for c in found:
        what = f"{c['dtype']} BLOCK_V={c['block_v']} num_warps={c['num_warps']} sm_{c['arch']}"
        assert c["shared"] <= SHARED_LIMIT[c["arch"]], f"{what}: {c['shared']} B of shared memory"
        assert c["registers"] is not None and c["registers"] <= 255, what
        assert c["spill_stores"] is not None, f"{what}: no ptxas report"
        assert c["spill_stores"] <= MAX_SPILL_BYTES and c["spill_loads"] <= MAX_SPILL_BYTES, f"{what}: {c}"


@pytest.mark.slow  # compiles with ptxas: 5-20 s each on two cores
def test_every_launch_configuration_compiles_for_sm90():
    """Every tile configuration with every option on (the most registers), and the widest per dtype in
    the other variants (benchmarks/triton_compile_table.py compiles them all)."""
    found = compile_configs("--arch", "90", "--flags", "all")
    expected = {(str(dt).removeprefix("torch."), cfg.block_v, cfg.num_warps)
                for dt in (torch.float32, torch.bfloat16, torch.float16)
                for cfg in row_configs(torch.empty((), dtype=dt).element_size())}
    assert {(c["dtype"], c["block_v"], c["num_warps"]) for c in found} == expected
    check_resources(found)
    widest = compile_configs("--arch", "90", "--widest", "--flags", "grad", "no_grad")
    assert len(widest) == 6
    check_resources(widest)


@pytest.mark.slow  # compiles with ptxas: 5-20 s each on two cores
def test_widest_configurations_compile_for_sm100():
    from xent._triton._compile import supported_archs

    if 100 not in supported_archs():
        pytest.skip("this Triton does not target sm_100")
    found = compile_configs("--arch", "100", "--widest", "--flags", "all")
    assert len(found) == 3
    check_resources(found)


@pytest.mark.slow  # compiles with ptxas: 5-20 s each on two cores
def test_fused_forward_compiles_for_sm90():
    """Every configuration of the fused forward, each operand variant (float32 in TF32 and exact, bf16 on
    its tensor cores, float16), with every option (the most registers; benchmarks/triton_compile_table.py
    adds the plain variant): within shared memory, spilling at most a word or two."""
    found = compile_configs("--kernel", "fused", "--arch", "90", "--flags", "all")
    assert len(found) == sum(len(c) for c in FUSED_CONFIGS.values()) * 2  # two operand variants each
    check_resources(found)


@pytest.mark.slow  # compiles with ptxas: about 14 s for the 32 kernels on two cores
def test_fused_backward_compiles_for_sm90():
    """Both kernels of the fused backward (dH, dW with the bias gradient) in every configuration and
    operand variant, plain and with every option: within shared memory, spilling at most a word or two."""
    found = compile_configs("--kernel", "backward", "--arch", "90", "--flags", "plain", "all")
    expected = {(variant, cfg.block_n, cfg.block_v, flags, kernel)
                for variant, dtype, tf32 in FUSED_VARIANTS
                for cfg in BACKWARD_CONFIGS[backward_variant(dtype.itemsize, tf32)]
                for flags in ("plain", "all") for kernel in ("grad_hidden", "grad_weight")}
    assert {(c["dtype"], c["block_n"], c["block_v"], c["flags"], c["kernel"]) for c in found} == expected
    check_resources(found)


def test_launcher_only_chooses_listed_configurations():
    for itemsize in (4, 2):
        listed = set(row_configs(itemsize))
        for v in (1, 2, 100, 127, 128, 129, 1000, 4096, 32000, 128256, 151936, 256000, 10**7):
            assert row_config(v, itemsize) in listed
            for n, d in ((1, 64), (5000, 2048), (16384, 16)):
                assert fused_config(n, v, d, itemsize) in FUSED_CONFIGS[itemsize]
                for tf32 in (False, True):
                    key = backward_variant(itemsize, tf32)
                    assert backward_config(n, v, d, key) in BACKWARD_CONFIGS[key]
