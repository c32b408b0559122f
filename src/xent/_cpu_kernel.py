"""The fused head's cross-entropy rows on the CPU, as one compiled C kernel (``_kernels/ce_rows.c``).

Plain torch makes one pass over a chunk's [C, V] logits per operation (copy to float32, max, subtract,
exp, sum, scale, copy back); the kernel reads each row once, keeps its float32 copy in cache, and writes
the gradient once. Same formulas, same float32 arithmetic: the gradients it writes are those of the
plain path to the last bit in the tests, the loss differs by float32 rounding.

It is built on first use with the machine's C compiler (``$CC``, else ``cc``; about a second), for this
CPU (``-march=native``), and cached under ``$XENT_CACHE_DIR`` (else ``$XDG_CACHE_HOME/xent``, else
``~/.cache/xent``) in a file named by a hash of the source, the compiler, the flags and the CPU's
features. Rows are split over ``torch.get_num_threads()`` threads of OpenMP: the library links
``libgomp.so.1``, which resolves to the runtime torch has already loaded (Linux builds of torch use
libgomp), so the kernel runs on torch's own worker threads, warm from the GEMM before it; a second pool
would compete with them while they spin (measured: 1.6× slower kernel).

``XENT_CPU_KERNEL``: ``auto`` (default: used where it builds, else plain torch), ``0`` (never), ``1``
(always: an error when it cannot be built). :func:`kernel_status` says which, and why.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("_kernels") / "ce_rows.c"
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fopenmp", "-fPIC", "-shared"]
_ABI = 5
#: Rows per thread below which fewer threads take the rows.
MIN_ROWS_PER_THREAD = 8

_lock = threading.Lock()
_state: dict = {}  # "lib", "status"


def _mode() -> str:
    raw = os.environ.get("XENT_CPU_KERNEL", "auto").strip().lower()
    if raw not in ("auto", "0", "1"):
        raise ValueError(f"XENT_CPU_KERNEL must be auto, 0 or 1, got {raw!r}")
    return raw


def _cache_dir() -> Path:
    if os.environ.get("XENT_CACHE_DIR"):
        return Path(os.environ["XENT_CACHE_DIR"]) / "kernels"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "xent" / "kernels"


def _cpu_features() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


def _compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc:
        return cc
    return shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _build() -> tuple[ctypes.CDLL | None, str]:
    if platform.system() == "Windows":
        return None, "unavailable: not built on Windows"
    cc = _compiler()
    if cc is None:
        return None, "unavailable: no C compiler (set CC)"
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as err:
        return None, f"unavailable: {cc} --version failed ({err})"
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(
        b"\0".join([source, version.encode(), " ".join(_FLAGS).encode(), _cpu_features().encode(),
                    platform.machine().encode()])
    ).hexdigest()[:20]
    started = time.perf_counter()
    for directory in (_cache_dir(), Path(tempfile.gettempdir()) / f"xent-kernels-{os.getuid()}"):
        path = directory / f"ce_rows-{key}.so"
        built = False
        if not path.exists():
            try:
                directory.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(suffix=".so", dir=directory)
                os.close(fd)
            except OSError:
                continue  # an unwritable cache: the next directory
            try:
                run = subprocess.run([cc, *_FLAGS, "-o", tmp, str(_SOURCE)], capture_output=True, text=True,
                                     timeout=120)
                if run.returncode != 0:
                    os.unlink(tmp)
                    last = (run.stderr.strip().splitlines() or ["?"])[-1]
                    return None, f"unavailable: {cc} failed to build {_SOURCE.name}: {last}"
                os.replace(tmp, path)  # atomic: a concurrent process sees the whole file or none
                built = True
            except (OSError, subprocess.SubprocessError) as err:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                return None, f"unavailable: building {_SOURCE.name} with {cc} failed ({err})"
        try:
            lib = ctypes.CDLL(str(path))
            if lib.xent_ce_rows_abi() != _ABI:
                return None, f"unavailable: {path} has another ABI"
        except (OSError, AttributeError) as err:
            return None, f"unavailable: loading {path} failed ({err})"
        p, i, f = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
        for fn in (lib.xent_ce_rows_f32, lib.xent_ce_rows_bf16):
            fn.argtypes = [p, i, i, i, p, p, p, f, p, p, ctypes.c_int]
            fn.restype = ctypes.c_int
        lib.xent_acc_bf16.argtypes = [p, p, i, f, ctypes.c_int, ctypes.c_int]
        lib.xent_acc_bf16.restype = None
        how = f"built in {time.perf_counter() - started:.1f} s" if built else "cached"
        return lib, f"compiled ({how}: {path})"
    return None, "unavailable: no writable cache directory"


def _library() -> ctypes.CDLL | None:
    mode = _mode()
    if mode == "0":
        return None
    with _lock:
        if "lib" not in _state:
            _state["lib"], _state["status"] = _build()
    if _state["lib"] is None and mode == "1":
        raise RuntimeError(f"XENT_CPU_KERNEL=1 but the CPU kernel is {_state['status']}")
    return _state["lib"]


def kernel_status() -> str:
    """How the fused head computes cross-entropy rows on the CPU: the compiled kernel (and where it is),
    or plain torch and why."""
    if _mode() == "0":
        return "disabled (XENT_CPU_KERNEL=0): plain torch"
    lib = _library()
    return _state["status"] if lib is not None else f"{_state['status']}: plain torch"


def usable(device: torch.device, mm_dtype: torch.dtype, compute_dtype: torch.dtype) -> bool:
    """Whether the kernel can take a chunk in ``mm_dtype`` whose loss is computed in ``compute_dtype``."""
    return (device.type == "cpu" and compute_dtype == torch.float32
            and mm_dtype in (torch.float32, torch.bfloat16) and _library() is not None)


def ce_rows_(z: torch.Tensor, target: torch.Tensor, scale: torch.Tensor | None, w_y: torch.Tensor | None,
             z_coef: float, stats: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of each row of ``z`` [C, V] (float32 or bfloat16, rows contiguous), overwritten with
    its gradient scale_r·(p·(a_r + 2·z_coef·lse_r) − a_r·onehot(y_r)), a_r = w_y[r] (1 without). Returns
    the float32 losses a_r·(lse_r − z_{r,y}) + z_coef·lse_r² [C]. A row with a NaN, +inf or only −inf
    gets a NaN loss and gradient. ``scale`` None: the losses (and statistics) alone, no gradient
    written (``z`` may still be overwritten). ``stats``: a contiguous float32 [C, 3] filled with each row's
    (correct, entropy, lse) as :func:`xent.losses._base.logit_stats` defines them."""
    lib = _library()
    rows, num_classes = z.shape
    assert z.stride(1) == 1 and z.dtype in (torch.float32, torch.bfloat16)
    assert stats is None or (stats.dtype == torch.float32 and stats.is_contiguous()
                             and stats.shape == (rows, 3))
    target = target.to(torch.int64).contiguous()
    scale = None if scale is None else scale.to(torch.float32).contiguous()
    w_y = None if w_y is None else w_y.to(torch.float32).contiguous()
    loss = torch.empty(rows, dtype=torch.float32)
    fn = lib.xent_ce_rows_bf16 if z.dtype == torch.bfloat16 else lib.xent_ce_rows_f32

    if rows == 0:
        return loss
    threads = max(1, min(torch.get_num_threads(), rows // MIN_ROWS_PER_THREAD))
    failed = fn(z.data_ptr(), z.stride(0), rows, num_classes, target.data_ptr(),
                None if scale is None else scale.data_ptr(),
                None if w_y is None else w_y.data_ptr(), float(z_coef), loss.data_ptr(),
                None if stats is None else stats.data_ptr(), threads)
    if failed:  # the bfloat16 rows' scratch could not be allocated
        raise MemoryError(f"xent's CPU kernel could not allocate {num_classes} floats of scratch per thread")
    return loss


#: Elements below which accumulate_ runs on one thread.
MIN_ACC_PER_THREAD = 1 << 16


def accumulate_(dst: torch.Tensor, src: torch.Tensor, alpha: float = 1.0, fresh: bool = False) -> None:
    """``dst = (0 if fresh else dst) + alpha·src`` for a contiguous float32 ``dst`` and a bfloat16 ``src``
    of its shape (any strides): one pass, where torch's mixed-dtype ``add_`` makes two."""
    lib = _library()
    assert dst.dtype == torch.float32 and src.dtype == torch.bfloat16 and dst.is_contiguous()
    assert dst.shape == src.shape
    src = src.contiguous()
    n = dst.numel()
    threads = max(1, min(torch.get_num_threads(), n // MIN_ACC_PER_THREAD))
    lib.xent_acc_bf16(dst.data_ptr(), src.data_ptr(), n, float(alpha), int(fresh), threads)
