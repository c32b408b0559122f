#!/usr/bin/env bash
# The one prepared device check: the CUDA tests, then the GPU benchmark (benchmarks/gpu_bench.py),
# in under 8 minutes on an H200. Needs a CUDA machine with PyTorch (and Triton for Liger/CCE); no network.
#
#   benchmarks/gpu_check.sh OUT_DIR [WHEELS_DIR]
#
# WHEELS_DIR (optional) holds the baselines' wheels, installed with --no-index; prepare it where pip has
# the network:  pip download --no-deps -d WHEELS_DIR liger-kernel cut-cross-entropy
# (both are pure Python; they need torch and triton, which the GPU machine has). A missing baseline is
# skipped and named in the table. Writes OUT_DIR/cuda_tests.log, bench.log, gpu_bench.csv, gpu_bench.md.
set -uo pipefail
out=${1:?usage: benchmarks/gpu_check.sh OUT_DIR [WHEELS_DIR]}
wheels=${2:-}
cd "$(dirname "$0")/.."
mkdir -p "$out"
py=${PYTHON:-python3}
if [ -n "$wheels" ]; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/xent-site "$wheels"/*.whl \
    && export PYTHONPATH=/tmp/xent-site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
"$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
  torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA DEVICE")' | tee "$out/device.txt"
# 1. the correctness tests on every device (the CUDA cases carry the cuda marker)
timeout 150 "$py" -m pytest -q -m cuda -p no:cacheprovider -x \
  tests/test_linear.py tests/test_losses_fused.py tests/test_causal.py tests/test_exactness.py \
  tests/parallel/test_vocab_single.py 2>&1 | tee "$out/cuda_tests.log"
tests=${PIPESTATUS[0]}
# 2. the benchmark: every (implementation, shape) in a fresh process
timeout 330 "$py" benchmarks/gpu_bench.py --out "$out" 2>&1 | tee "$out/bench.log"
bench=${PIPESTATUS[0]}
echo "gpu_check: tests exit $tests, benchmark exit $bench"
[ "$tests" = 0 ] && [ "$bench" = 0 ]
