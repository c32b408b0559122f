"""The fused head's cross-entropy rows on the CPU, as one compiled C kernel (``_kernels/ce_rows.c``).

Plain torch makes one pass over a chunk's [C, V] logits per operation (copy to float32, max, subtract,
exp, sum, scale, copy back); the kernel reads each row once, keeps its float32 copy in cache, and writes
the gradient once. Same formulas, same float32 arithmetic: the cross-entropy gradients it writes are
those of the plain path to the last bit in the tests, the loss differs by float32 rounding. Token
log-probs use the same rows: log q_y is −cross-entropy of z/T (an inverse temperature argument; u − max u
is formed as (z − max z)/T), and with the entropy the kernel adds H(q)'s gradient in the same pass; they
agree with the torch ops to float32 rounding.

It is built on first use with the machine's C compiler (``$CC``, a command that may carry arguments such
as ``ccache gcc``, else ``cc``; about a second), for this CPU (``-march=native``), and cached under
``$XENT_CACHE_DIR/kernels`` (else ``$XDG_CACHE_HOME/xent/kernels``, else ``~/.cache/xent/kernels``) in a
file named by a hash of the source, the compiler, the flags, the CPU's identifying lines of
``/proc/cpuinfo`` and the compiler's own resolution of ``-march=native``. Rows are split over
``torch.get_num_threads()`` threads of OpenMP: the library links ``libgomp.so.1``, which resolves to the
runtime torch has already loaded (Linux builds of torch use libgomp), so the kernel runs on torch's own
worker threads, warm from the GEMM before it; a second pool would compete with them while they spin
(measured: 1.6× slower kernel).

Loading a library runs its code, so a library is loaded only from where no one else can have written it:

- the cache folders xent creates are made with mode 0700, whatever the umask;
- the cache folder (symlinks in its path resolved) must be a folder owned by the effective user, with
  no group or other write permission, and every folder above it owned by that user or root and writable
  by no one else unless sticky (as ``/tmp``);
- the library must be a regular file (not a symlink) owned by the effective user, not writable by group
  or others, whose SHA-256 equals the one recorded beside it (``<name>.so.sha256``, written atomically
  when it was built, checked by the same rules). A library that fails these checks in a trusted folder
  is rebuilt in place (a truncated or damaged file is never mapped); a compiler's output is loaded and
  checked (non-empty, the expected ABI) before it is cached.

When the cache folder fails a check or cannot be created or entered (``HOME=/nonexistent``, another
user's home), the kernel is built in a fresh private temporary folder (:func:`tempfile.mkdtemp`, 0700),
loaded from there, and the folder removed: correct, one build per process. :func:`kernel_status` says
where the library was loaded from and why the cache was not used. docs/cpu_kernel.md has the details.

``XENT_CPU_KERNEL``: ``auto`` (default: used where it builds, else plain torch), ``0`` (never), ``1``
(always: an error when it cannot be built). :func:`kernel_status` says which, and why.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("_kernels") / "ce_rows.c"
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fopenmp", "-fPIC", "-shared"]
_ABI = 7
_CPUINFO = "/proc/cpuinfo"
# The /proc/cpuinfo fields that say which CPU it is and which instructions it has (x86 'flags', Arm
# 'Features' and 'CPU part', s390x 'features' and 'facilities', RISC-V 'isa', 'uarch' and 'marchid',
# POWER 'cpu' and 'revision'), never the ones that change from run to run (MHz, bogomips).
_CPU_FIELDS = frozenset({
    "flags", "features", "facilities", "vendor_id", "cpu family", "model", "model name", "cpu", "isa",
    "uarch", "mmu", "mvendorid", "marchid", "mimpid", "revision", "machine", "cpu implementer",
    "cpu architecture", "cpu variant", "cpu part", "cpu revision",
})
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


def _cpu_identity() -> str:
    """The CPU's identifying lines of /proc/cpuinfo (each distinct line once: a big.LITTLE machine lists
    both kinds of core), and the machine type; ``platform.processor()`` where there is no cpuinfo."""
    lines = set()
    try:
        with open(_CPUINFO, errors="replace") as f:
            for line in f:
                field, colon, value = line.partition(":")
                if colon and field.strip().lower() in _CPU_FIELDS:
                    lines.add(f"{field.strip().lower()}: {value.strip()}")
    except OSError:
        pass
    return "\n".join([*sorted(lines), platform.machine(), "" if lines else platform.processor()])


def _native_target(cc: list[str]) -> str:
    """What the compiler makes of ``-march=native`` on this machine: the -m options (gcc) or target CPU
    and features (clang) of the compile command its driver prints for ``-###``."""
    try:
        run = subprocess.run([*cc, "-march=native", "-###", "-S", "-x", "c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    words = []
    for line in run.stderr.splitlines():
        try:
            tokens = shlex.split(line)
        except ValueError:
            continue
        for before, token in zip(["", *tokens], tokens):
            # gcc: "-march=znver3" -mavx2 ...; clang: "-target-cpu" "znver3" "-target-feature" "+avx2"
            if token.startswith("-m") or before in ("-target-cpu", "-target-feature"):
                words.append(token)
    return " ".join(words)


def _compiler() -> list[str] | None:
    cc = shlex.split(os.environ.get("CC", ""))
    if cc:
        return cc
    found = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    return [found] if found else None


def _cache_key(cc: list[str]) -> str:
    """A hash of everything the library's bytes depend on; raises OSError or SubprocessError when the
    compiler cannot be run."""
    version = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    parts = [_SOURCE.read_bytes(), shlex.join(cc).encode(), version.encode(), " ".join(_FLAGS).encode(),
             _cpu_identity().encode(), _native_target(cc).encode()]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:20]


def _writable_by_others(st: os.stat_result) -> bool:
    return bool(st.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def _untrusted_folder(folder: Path) -> str | None:
    """Why a library in ``folder`` could have been written by someone else, or None: the folder must be
    a real folder of the effective user's that only they can write, and every folder above it the
    user's or root's, writable by no one else unless sticky (/tmp: no one can rename another's entry)."""
    euid = os.geteuid()
    st = os.lstat(folder)
    if not stat.S_ISDIR(st.st_mode):
        return f"{folder} is not a folder"
    if st.st_uid != euid:
        return f"{folder} belongs to uid {st.st_uid}, not to this user ({euid})"
    if _writable_by_others(st):
        return f"{folder} is writable by others (mode {stat.S_IMODE(st.st_mode):04o})"
    for above in folder.parents:
        st = os.lstat(above)
        if st.st_uid not in (euid, 0):
            return f"{above} belongs to uid {st.st_uid}"
        if _writable_by_others(st) and not st.st_mode & stat.S_ISVTX:
            return f"{above} is writable by others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def _private_cache_dir() -> tuple[Path | None, str]:
    """The cache folder, created where missing (each new folder 0700) and resolved, or None and why it
    cannot hold a library to load."""
    wanted = Path(os.path.abspath(_cache_dir()))
    try:
        for folder in [*reversed(wanted.parents), wanted]:
            if os.path.isdir(folder):
                continue
            try:
                os.mkdir(folder, 0o700)
            except FileExistsError:  # made by a concurrent process: judged below like any other
                continue
            os.chmod(folder, 0o700)  # mkdir's mode is masked by the umask: 0700 exactly, whatever it is
        folder = Path(os.path.realpath(wanted))
        reason = _untrusted_folder(folder)
    except OSError as err:  # cannot be created or entered
        return None, f"{wanted} cannot be used ({err.strerror or err})"
    return (None, reason) if reason else (folder, "")


def _read_checked(path: Path, limit: int | None = None, fresh: bool = False) -> tuple[bytes | None, str]:
    """The bytes of ``path`` (at most ``limit``) when it is a regular file of the effective user's that
    no one else can write, else None and why not. Opened without following a symlink, and without
    blocking on a FIFO. ``fresh``: our compiler's output, first set to 0700 (the linker's mode follows
    the umask)."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except OSError as err:  # ELOOP: a symlink
        return None, f"{path.name} cannot be opened as a regular file ({err.strerror or err})"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None, f"{path.name} is not a regular file"
        if st.st_uid != os.geteuid():
            return None, f"{path.name} belongs to uid {st.st_uid}"
        if fresh:
            os.fchmod(fd, 0o700)
            st = os.fstat(fd)
        if _writable_by_others(st):
            return None, f"{path.name} is writable by others (mode {stat.S_IMODE(st.st_mode):04o})"
        chunks, left = [], st.st_size if limit is None else min(limit, st.st_size)
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks), ""
    finally:
        os.close(fd)


def _digest_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _load(path: Path, data: bytes) -> tuple[ctypes.CDLL | None, str]:
    """dlopen ``path``, whose checked bytes are ``data``, and declare its functions."""
    if not data:
        return None, f"{path.name} is empty"
    try:
        lib = ctypes.CDLL(str(path))
        if lib.xent_ce_rows_abi() != _ABI:
            return None, f"{path} has another ABI"
        p, i, f = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
        for fn in (lib.xent_ce_rows_f32, lib.xent_ce_rows_bf16):
            fn.argtypes = [p, i, i, i, p, p, p, p, f, f, p, p, ctypes.c_int]
            fn.restype = ctypes.c_int
        lib.xent_acc_bf16.argtypes = [p, p, i, f, ctypes.c_int, ctypes.c_int]
        lib.xent_acc_bf16.restype = None
    except (OSError, AttributeError) as err:
        return None, f"loading {path} failed ({err})"
    return lib, ""


def _load_cached(path: Path) -> tuple[ctypes.CDLL | None, str]:
    """The library cached at ``path`` (in a trusted folder) if it passes the checks, else None and why
    not ("" when there is none)."""
    if not os.path.lexists(path):
        return None, ""
    data, reason = _read_checked(path)
    if data is None:
        return None, reason
    recorded, reason = _read_checked(_digest_path(path), limit=128)
    if recorded is None:
        return None, f"no SHA-256 recorded for it: {reason}"
    if hashlib.sha256(data).hexdigest() != recorded.decode("ascii", "replace").strip():
        return None, f"{path.name} differs from the SHA-256 recorded when it was built"
    return _load(path, data)


def _compile(cc: list[str], folder: Path, path: Path | None) -> tuple[ctypes.CDLL | None, str]:
    """Build the library into ``folder`` (a trusted one), check and load it, and, when ``path`` is given,
    cache it there with its SHA-256. Nothing but the cached pair is left behind, Ctrl-C included."""
    name = shlex.join(cc)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(fd)
    try:
        try:
            run = subprocess.run([*cc, *_FLAGS, "-o", tmp, str(_SOURCE)], capture_output=True, text=True,
                                 timeout=120)
        except (OSError, subprocess.SubprocessError) as err:
            return None, f"unavailable: building {_SOURCE.name} with {name} failed ({err})"
        if run.returncode != 0:
            last = (run.stderr.strip().splitlines() or ["?"])[-1]
            return None, f"unavailable: {name} failed to build {_SOURCE.name}: {last}"
        data, reason = _read_checked(Path(tmp), fresh=True)
        if data == b"":
            return None, f"unavailable: {name} exited 0 without writing a library"
        lib, why = (None, reason) if data is None else _load(Path(tmp), data)
        if lib is None:
            return None, f"unavailable: {name} exited 0 but its output does not load: {why}"
        if path is not None:
            os.replace(tmp, path)  # atomic: a concurrent process sees the whole file or none
            digest_fd, digest_tmp = tempfile.mkstemp(suffix=".sha256", dir=folder)
            try:
                with os.fdopen(digest_fd, "w") as f:
                    f.write(hashlib.sha256(data).hexdigest() + "\n")
                os.replace(digest_tmp, _digest_path(path))
            finally:
                if os.path.lexists(digest_tmp):
                    os.unlink(digest_tmp)
        return lib, ""
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def _build() -> tuple[ctypes.CDLL | None, str]:
    if platform.system() == "Windows":
        return None, "unavailable: not built on Windows"
    cc = _compiler()
    if cc is None:
        return None, "unavailable: no C compiler (set CC)"
    try:
        key = _cache_key(cc)
    except (OSError, subprocess.SubprocessError) as err:
        return None, f"unavailable: {shlex.join(cc)} --version failed ({err})"
    started = time.perf_counter()
    folder, why_not = _private_cache_dir()
    if folder is not None:
        path = folder / f"ce_rows-{key}.so"
        lib, why_not = _load_cached(path)
        if lib is not None:
            return lib, f"compiled (cached: {path})"
        try:
            lib, status = _compile(cc, folder, path)
        except OSError as err:  # a folder of ours that cannot be written
            why_not = f"{folder} cannot be written ({err.strerror or err})"
        else:
            if lib is None:
                return None, status
            how = f"built in {time.perf_counter() - started:.1f} s: {path}"
            if why_not:
                how += f"; the cached one was not loaded: {why_not}"
            return lib, f"compiled ({how})"
    try:
        private = tempfile.mkdtemp(prefix="xent-kernel-")  # mode 0700, a new name: no one else's
    except OSError as err:
        return None, f"unavailable: {why_not}, and no private temporary folder ({err.strerror or err})"
    try:
        reason = _untrusted_folder(Path(os.path.realpath(private)))
        if reason:
            return None, f"unavailable: {why_not}, and the temporary folder is not private: {reason}"
        try:
            lib, status = _compile(cc, Path(private), None)
        except OSError as err:
            return None, f"unavailable: {why_not}, and building in {private} failed ({err.strerror or err})"
        if lib is None:
            return None, status
        took = time.perf_counter() - started
        return lib, (f"compiled (built in {took:.1f} s in a private temporary folder, loaded from {private}"
                     f" and removed; not cached: {why_not})")
    finally:
        shutil.rmtree(private, ignore_errors=True)


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
             z_coef: float, stats: torch.Tensor | None = None, *, inv_temperature: float = 1.0,
             entropy_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of each row of ``z`` [C, V] (float32 or bfloat16, rows contiguous) at the logits
    u = t·z (t = ``inv_temperature`` > 0, 1 for plain cross-entropy), ``z`` overwritten with its gradient
    t·scale_r·(p·(a_r + 2·z_coef·lse_r) − a_r·onehot(y_r)), p = softmax(u), a_r = w_y[r] (1 without).
    Returns the float32 losses a_r·(lse_r − u_{r,y}) + z_coef·lse_r² [C]. A row with a NaN, +inf or only
    −inf gets a NaN loss and gradient. ``scale`` None: the losses (and statistics) alone, no gradient
    written (``z`` may still be overwritten). ``stats``: a contiguous float32 [C, 3] filled with each row's
    (correct, entropy, lse) of u, as :func:`xent.losses._base.logit_stats` defines them.
    ``entropy_scale`` [C] (with ``scale``): the gradient of entropy_scale_r·H(p) is added to the row's,
    −t·entropy_scale_r·p ⊙ (log p + H) (token log-probs with their entropy)."""
    lib = _library()
    rows, num_classes = z.shape
    assert z.stride(1) == 1 and z.dtype in (torch.float32, torch.bfloat16)
    assert stats is None or (stats.dtype == torch.float32 and stats.is_contiguous()
                             and stats.shape == (rows, 3))
    assert inv_temperature > 0.0 and (entropy_scale is None or scale is not None)
    target = target.to(torch.int64).contiguous()
    scale, entropy_scale, w_y = (None if x is None else x.to(torch.float32).contiguous()
                                 for x in (scale, entropy_scale, w_y))
    loss = torch.empty(rows, dtype=torch.float32)
    fn = lib.xent_ce_rows_bf16 if z.dtype == torch.bfloat16 else lib.xent_ce_rows_f32

    if rows == 0:
        return loss
    threads = max(1, min(torch.get_num_threads(), rows // MIN_ROWS_PER_THREAD))
    failed = fn(z.data_ptr(), z.stride(0), rows, num_classes, target.data_ptr(),
                *(None if x is None else x.data_ptr() for x in (scale, entropy_scale, w_y)),
                float(z_coef), float(inv_temperature), loss.data_ptr(),
                None if stats is None else stats.data_ptr(), threads)
    if failed:  # the rows' scratch could not be allocated
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


def eval_rows(z: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The evaluation statistics of each row of float32 logits ``z`` [C, V] (rows contiguous; only read)
    against in-range ``target`` [C], in one compiled pass per row: float32 [4, C] (loss −log q_y, entropy
    −Σ q log q, top-1 probability, Brier Σ_c (q_c − [c = y])²) and the target's rank [C] int64,
    1 + #{c : z_c > z_y} (ties in the target's favour), V + 1 where the loss is not finite. A row with a
    NaN, +inf or only −inf logits gets NaN statistics (as :meth:`xent._engine.RowBackend.eval_rows`
    defines them)."""
    lib = _library()
    rows, num_classes = z.shape
    assert z.stride(1) == 1 and z.dtype == torch.float32
    fn = lib.xent_eval_rows_f32
    if fn.restype is not None:  # declared once per library
        p, i = ctypes.c_void_p, ctypes.c_int64
        fn.argtypes = [p, i, i, i, p, p, p, ctypes.c_int]
        fn.restype = None
    target = target.to(torch.int64).contiguous()
    stats = torch.empty((4, rows), dtype=torch.float32)
    rank = torch.empty(rows, dtype=torch.int64)
    if rows:
        threads = max(1, min(torch.get_num_threads(), rows // MIN_ROWS_PER_THREAD))
        fn(z.data_ptr(), z.stride(0), rows, num_classes, target.data_ptr(), stats.data_ptr(), rank.data_ptr(),
           threads)
    return stats, rank
