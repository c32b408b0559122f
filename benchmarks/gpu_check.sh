#!/usr/bin/env bash
# The one prepared device check: the CUDA tests, then the GPU benchmark (benchmarks/gpu_bench.py),
# in under 8 minutes on an H200. Needs a CUDA machine with PyTorch (and Triton for Liger/CCE); no network.
#
#   benchmarks/gpu_check.sh OUT_DIR [WHEELS_DIR]
#
# WHEELS_DIR (optional) holds the baselines' wheels, installed with --no-index; prepare it where pip has
# the network:  pip download --no-deps -d WHEELS_DIR liger-kernel cut-cross-entropy
# (both are pure Python; they need torch and triton, which the GPU machine has). A missing baseline is
# skipped and named in the table. Writes OUT_DIR/cuda_tests.log, triton_check.log, bench.log,
# gpu_bench.csv, gpu_bench.md.
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
# 1b. the Triton kernels compiled on the device (tests/triton proves them under the CPU interpreter):
# the row kernel at every dtype and option at real vocabulary sizes, and the fused forward, against
# float64 on the same device
timeout 120 "$py" - <<'PY' 2>&1 | tee "$out/triton_check.log"
import sys

import torch
import torch.nn.functional as F
from xent._triton import available, ce_rows_, fused_ce_forward
ok, why = available("cuda")
if not ok:
    print("triton row kernel: not checked:", why)
    sys.exit(0)
failed = 0
for v in (128256, 256000, 1001):
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        for opt in ({}, {"softcap": 30.0, "label_smoothing": 0.1}, {"z": 1e-4}):
            g = torch.Generator(device="cuda").manual_seed(0)
            z = (torch.randn(64, v, generator=g, device="cuda") * 3).to(dt)
            y = torch.randint(0, v, (64,), generator=g, device="cuda")
            scale = torch.rand(64, generator=g, device="cuda") + 0.5
            st = torch.empty(64, 3, device="cuda")
            buf = z.clone()
            loss = ce_rows_(buf, y, scale, None, opt.get("z", 0.0), st, softcap=opt.get("softcap"),
                            label_smoothing=opt.get("label_smoothing", 0.0))
            x = z.double().requires_grad_()
            c = x if "softcap" not in opt else opt["softcap"] * torch.tanh(x / opt["softcap"])
            lse = c.logsumexp(-1)
            ref = F.cross_entropy(c, y, reduction="none", label_smoothing=opt.get("label_smoothing", 0.0))
            ref = ref + opt.get("z", 0.0) * lse**2
            (grad,) = torch.autograd.grad(ref, x, scale.double())
            lerr = float(((loss.double() - ref) / ref.abs().clamp(min=1)).abs().max())
            gerr = float((buf.double() - grad).abs().max() / grad.abs().max())
            serr = float((st[:, 2].double() - lse.detach()).abs().max())
            tol = 1e-5 if dt == torch.float32 else (8e-3 if dt == torch.bfloat16 else 1e-3)
            bad = lerr > 1e-5 or serr > 1e-4 or gerr > tol
            failed += bad
            print(f"V={v} {str(dt)[6:]:8s} {opt}: loss rel {lerr:.1e}, grad rel {gerr:.1e}, lse {serr:.1e}"
                  + ("  FAIL" if bad else ""))
print("triton row kernel:", "FAILED" if failed else "ok")
# the fused no-grad forward (projection in the kernel) against float64 of the same inputs
for dt, prec, tol in ((torch.bfloat16, None, 1e-5), (torch.float32, "ieee", 1e-5),
                      (torch.float32, "tf32", 2e-3)):
    g = torch.Generator(device="cuda").manual_seed(1)
    h = torch.randn(512, 2048, generator=g, device="cuda").to(dt)
    w = (torch.randn(128256, 2048, generator=g, device="cuda") / 45).to(dt)
    y = torch.randint(0, 128256, (512,), generator=g, device="cuda")
    loss = fused_ce_forward(h, w, y, input_precision=prec)
    ref = F.cross_entropy(h.double() @ w.double().T, y, reduction="none")
    err = float(((loss.double() - ref) / ref.abs().clamp(min=1)).abs().max())
    bad = err > tol
    failed += bad
    print(f"fused forward {str(dt)[6:]} {prec}: loss rel {err:.1e}" + ("  FAIL" if bad else ""))
print("triton kernels:", "FAILED" if failed else "ok")
sys.exit(1 if failed else 0)
PY
triton=${PIPESTATUS[0]}
# 2. the benchmark: every (implementation, shape) in a fresh process
timeout 330 "$py" benchmarks/gpu_bench.py --out "$out" 2>&1 | tee "$out/bench.log"
bench=${PIPESTATUS[0]}
echo "gpu_check: tests exit $tests, triton check exit $triton, benchmark exit $bench"
[ "$tests" = 0 ] && [ "$triton" = 0 ] && [ "$bench" = 0 ]
