"""Where the CPU kernel's library comes from (xent/_cpu_kernel.py): loading a library runs its code, so it
is loaded only from folders no one else can write, as a regular file of this user's whose SHA-256 is the
one recorded when it was built; otherwise it is built in a private temporary folder. Also the cache key
(two CPUs never share one), compilers that fail quietly, and interrupted builds.

"Another user" is real where the tests run as root (``chown`` to another uid, capabilities dropped in a
subprocess) and simulated otherwise (``os.geteuid`` patched, or the permissions a user has). A planted
library writes a mark file from its constructor: no mark, no code of it ran. Anything that could crash
the process (a truncated library is a SIGBUS when mapped) runs in a subprocess.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import xent
from xent import _cpu_kernel

CC = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
pytestmark = pytest.mark.skipif(sys.platform == "win32" or CC is None,
                                reason="no C compiler to build the kernel")

SRC = str(Path(xent.__file__).resolve().parents[1])
ROOT = hasattr(os, "geteuid") and os.geteuid() == 0

# A library that passes for the kernel (its functions, doing nothing) and proves it ran by writing a file.
PLANTED = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void) {
    const char *mark = getenv("XENT_TEST_PLANTED_MARK");
    FILE *f = mark ? fopen(mark, "w") : NULL;
    if (f) { fputs("planted code ran\n", f); fclose(f); }
}
int xent_ce_rows_abi(void) { return XENT_ABI; }
int xent_ce_rows_f32(void) { return 0; }
int xent_ce_rows_bf16(void) { return 0; }
void xent_acc_bf16(void) {}
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One build of the real kernel: a cache folder holding it (and its SHA-256)."""
    root = tmp_path_factory.mktemp("built")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XENT_CACHE_DIR", str(root))
        mp.delenv("CC", raising=False)
        lib, status = _cpu_kernel._build()
    assert lib is not None, status
    return root / "kernels"


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """The temporary folder the private builds go to, to see that they leave nothing."""
    folder = tmp_path / "tmp"
    folder.mkdir(mode=0o700)
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


@pytest.fixture
def cache(built, tmp_path, monkeypatch, private_tmp):
    """A fresh XENT_CACHE_DIR holding a copy of that build, the kernel required, its state reset; the
    cached library's path."""
    shutil.copytree(built, tmp_path / "cache" / "kernels")
    os.chmod(tmp_path / "cache", 0o700)
    monkeypatch.setenv("XENT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("XENT_CPU_KERNEL", "1")
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(_cpu_kernel, "_state", {})
    (library,) = (tmp_path / "cache" / "kernels").glob("ce_rows-*.so")
    return library


@pytest.fixture
def planted(tmp_path, monkeypatch):
    """Someone else's library (path) and the file its constructor writes when it runs."""
    source, library, mark = tmp_path / "planted.c", tmp_path / "planted.so", tmp_path / "planted-ran"
    source.write_text(PLANTED.replace("XENT_ABI", str(_cpu_kernel._ABI)))  # it passes every check but trust
    subprocess.run([CC, "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    monkeypatch.setenv("XENT_TEST_PLANTED_MARK", str(mark))
    return library, mark


def _plant(library: Path, planted: Path, *, symlink: bool = False) -> None:
    """Put ``planted`` in the cache as ``library``, with its SHA-256 recorded beside it (an attacker who
    can write the folder writes both)."""
    library.unlink()
    if symlink:
        library.symlink_to(planted)
    else:
        shutil.copyfile(planted, library)
        os.chmod(library, 0o700)
    digest = hashlib.sha256(planted.read_bytes()).hexdigest()
    library.with_name(library.name + ".sha256").write_text(digest + "\n")


def _assert_losses_right():
    """The fused head equals torch on a small problem (kernel or torch ops, whichever is loaded)."""
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(40, 16, generator=g), torch.randn(57, 16, generator=g)
    y = torch.randint(0, 57, (40,), generator=g)
    loss = xent.linear_cross_entropy(h, w, y)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(h @ w.T, y))


def _recorded(library: Path) -> str:
    return library.with_name(library.name + ".sha256").read_text().strip()


@pytest.mark.parametrize("how", ["folder world-writable", "parent world-writable", "folder a symlink",
                                 "folder of another user"])
def test_untrusted_folder_is_not_loaded_from(cache, planted, private_tmp, how):
    """A cache folder someone else can write: its library is never loaded, the kernel is built in a
    private temporary folder (removed after loading) and the status says where and why."""
    library, mark = planted
    _plant(cache, library)
    kernels = cache.parent
    if how == "folder world-writable":
        os.chmod(kernels, 0o777)
    elif how == "parent world-writable":
        os.chmod(kernels.parent, 0o777)  # anyone could rename kernels/ and put their own in its place
    elif how == "folder a symlink":  # to a folder someone else can write
        moved = kernels.with_name("elsewhere")
        kernels.rename(moved)
        os.chmod(moved, 0o777)
        kernels.symlink_to(moved)
    else:
        if not ROOT:
            pytest.skip("chown to another user needs root")
        os.chown(kernels, 12345, 12345)
    status = _cpu_kernel.kernel_status()
    assert not mark.exists(), status
    assert status.startswith("compiled (built in") and "private temporary folder" in status, status
    reason = "belongs to uid 12345" if how == "folder of another user" else "writable by others (mode 0777)"
    assert reason in status, status
    assert list(private_tmp.iterdir()) == []
    _assert_losses_right()


@pytest.mark.parametrize("how", ["symlink", "other bytes", "owner", "euid"])
def test_untrusted_library_is_not_loaded(cache, planted, monkeypatch, how):
    """In a folder of this user's, a library that is a symlink, differs from its recorded SHA-256 or is
    not this user's is not loaded: it is rebuilt in place (one owner check simulated by os.geteuid)."""
    library, mark = planted
    if how == "other bytes":  # the recorded SHA-256 is the genuine library's
        recorded = _recorded(cache)
        _plant(cache, library)
        cache.with_name(cache.name + ".sha256").write_text(recorded)
    else:
        _plant(cache, library, symlink=how == "symlink")
    if how == "owner":
        if not ROOT:
            pytest.skip("chown to another user needs root")
        os.chown(cache, 12345, 12345)
        os.chown(cache.with_name(cache.name + ".sha256"), 12345, 12345)
    if how == "euid":  # every file and folder here belongs to another user now: nothing is loaded
        monkeypatch.setenv("XENT_CPU_KERNEL", "auto")
        monkeypatch.setattr(os, "geteuid", lambda: 12345)
        status = _cpu_kernel.kernel_status()
        assert not mark.exists(), status
        assert "belongs to uid" in status and status.endswith("plain torch"), status
        _assert_losses_right()
        return
    status = _cpu_kernel.kernel_status()
    assert not mark.exists(), status
    why = {"symlink": "cannot be opened as a regular file", "other bytes": "differs from the SHA-256",
           "owner": "belongs to uid 12345"}[how]
    assert status.startswith("compiled (built in") and f"{cache}; the cached one was not loaded" in status
    assert why in status, status
    assert not cache.is_symlink() and cache.stat().st_uid == os.geteuid()
    assert _recorded(cache) == hashlib.sha256(cache.read_bytes()).hexdigest()
    _assert_losses_right()


def _run_python(code: str, env: dict, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, **env, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          **kw)


def test_truncated_library_is_rebuilt(cache):
    """A cached library cut short (a full disk, a killed copy) is detected by its SHA-256 and rebuilt;
    mapped, it would be a SIGBUS on every run. In a subprocess, so a crash cannot take pytest with it."""
    data = cache.read_bytes()
    cache.write_bytes(data[: len(data) // 2])
    code = ("import torch, xent\nfrom xent._cpu_kernel import kernel_status\n"
            "h, w, y = torch.randn(9, 4), torch.randn(7, 4), torch.randint(0, 7, (9,))\n"
            "torch.testing.assert_close(xent.linear_cross_entropy(h, w, y),"
            " torch.nn.functional.cross_entropy(h @ w.T, y))\nprint(kernel_status())")
    run = _run_python(code, {"XENT_CACHE_DIR": os.environ["XENT_CACHE_DIR"], "XENT_CPU_KERNEL": "1"})
    assert run.returncode == 0, (run.returncode, run.stderr[-2000:])
    assert "differs from the SHA-256 recorded when it was built" in run.stdout, run.stdout
    assert cache.read_bytes() == data and _recorded(cache) == hashlib.sha256(data).hexdigest()


ENTER = """
import ctypes, os, sys
if os.geteuid() == 0 and sys.argv[-1] != "dropped":
    # root without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH, so that file permissions apply to it: dropped
    # from the bounding set (PR_CAPBSET_DROP), which takes effect at the next exec
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):
        if libc.prctl(24, cap, 0, 0, 0) != 0:
            print("cannot drop CAP_DAC_OVERRIDE here:", os.strerror(ctypes.get_errno()))
            sys.exit(77)
    os.execv(sys.executable, [sys.executable, *sys.argv, "dropped"])
import torch, xent
from xent import _cpu_kernel
locked, nonexistent, others = sys.argv[1:4]
try:
    os.listdir(locked)
    print("permissions are not enforced here")
    sys.exit(77)
except PermissionError:
    pass
for name, env in [("no home", {"HOME": nonexistent}), ("another's home", {"HOME": others}),
                  ("locked cache", {"XENT_CACHE_DIR": locked})]:
    for var in ("HOME", "XDG_CACHE_HOME", "XENT_CACHE_DIR"):
        os.environ.pop(var, None)
    os.environ.update(env)
    _cpu_kernel._state.clear()
    h, w, y = torch.randn(9, 4), torch.randn(7, 4), torch.randint(0, 7, (9,))
    loss = xent.linear_cross_entropy(h, w, y)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(h @ w.T, y))
    print(name + ":", _cpu_kernel.kernel_status())
"""


def test_cache_that_cannot_be_entered(tmp_path):
    """A cache path that cannot be created or entered (HOME=/nonexistent for a service account, another
    user's home, a folder of mode 0000) gives a private temporary build: the fused head works, no
    traceback. Real permissions in a subprocess: root runs it without CAP_DAC_OVERRIDE."""
    base = tmp_path / "perm"
    (base / "ro").mkdir(parents=True)
    (base / "locked").mkdir()
    (base / "home").mkdir()
    (base / "tmp").mkdir(mode=0o700)
    script = base / "enter.py"
    script.write_text(ENTER)
    os.chmod(base / "ro", 0o555)  # HOME=<ro>/nonexistent cannot be created, as /nonexistent for a user
    os.chmod(base / "locked", 0)
    os.chmod(base / "home", 0o700 if ROOT else 0)
    if ROOT:
        os.chown(base / "home", 12345, 12345)
    args = [str(base / "locked"), str(base / "ro" / "nonexistent"), str(base / "home")]
    env = {**os.environ, "TMPDIR": str(base / "tmp"), "XENT_CPU_KERNEL": "auto",
           "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    try:
        run = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True,
                             timeout=300)
    finally:
        for name in ("ro", "locked", "home"):
            os.chmod(base / name, 0o700)
    if run.returncode == 77:
        pytest.skip(run.stdout.strip())
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr[-3000:]
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 3, run.stdout
    for line in lines:
        assert line.split(": ", 1)[1].startswith("compiled (built in"), line
        assert "private temporary folder" in line and "cannot be used" in line, line
    assert list((base / "tmp").iterdir()) == []  # the private folders are gone, no shared fallback either


@pytest.mark.parametrize("how", ["below a file", "permission denied"])
def test_cache_that_cannot_be_created(tmp_path, monkeypatch, private_tmp, how):
    """A cache that cannot be created, in this process: below a regular file (for root too), or where
    mkdir is refused (simulated, as for HOME=/nonexistent without root): a private build."""
    monkeypatch.setenv("XENT_CPU_KERNEL", "1")
    monkeypatch.setattr(_cpu_kernel, "_state", {})
    if how == "below a file":
        (tmp_path / "file").write_text("")
        monkeypatch.setenv("XENT_CACHE_DIR", str(tmp_path / "file" / "cache"))
    else:
        home, real_mkdir = tmp_path / "nonexistent", os.mkdir

        def mkdir(path, *args, **kw):
            if str(path).startswith(str(home)):
                raise PermissionError(13, "Permission denied", str(path))
            return real_mkdir(path, *args, **kw)

        monkeypatch.setattr(os, "mkdir", mkdir)
        monkeypatch.setenv("HOME", str(home))
        monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
        monkeypatch.delenv("XENT_CACHE_DIR", raising=False)
    status = _cpu_kernel.kernel_status()
    assert status.startswith("compiled (built in") and "private temporary folder" in status, status
    assert ("Not a directory" if how == "below a file" else "Permission denied") in status, status
    assert list(private_tmp.iterdir()) == []
    _assert_losses_right()


def test_umask_does_not_open_the_cache(tmp_path, monkeypatch):
    """Under umask 000 the folders xent creates are 0700 and the library and its SHA-256 are writable by
    this user alone."""
    monkeypatch.setenv("XENT_CACHE_DIR", str(tmp_path / "a" / "b"))
    monkeypatch.setenv("XENT_CPU_KERNEL", "1")
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(_cpu_kernel, "_state", {})
    before = os.umask(0)
    try:
        status = _cpu_kernel.kernel_status()
    finally:
        os.umask(before)
    assert status.startswith("compiled (built in"), status
    for folder in (tmp_path / "a", tmp_path / "a" / "b", tmp_path / "a" / "b" / "kernels"):
        assert folder.stat().st_mode & 0o777 == 0o700, folder
    files = list((tmp_path / "a" / "b" / "kernels").iterdir())
    assert len(files) == 2 and all(f.stat().st_mode & 0o022 == 0 for f in files)


def test_compiler_without_output(tmp_path, monkeypatch):
    """A 'compiler' that exits 0 and writes nothing leaves no library cached: auto gives torch's numbers
    (the same as XENT_CPU_KERNEL=0), XENT_CPU_KERNEL=1 a one-line error."""
    true = shutil.which("true")
    if true is None:
        pytest.skip("no true(1)")
    monkeypatch.setenv("XENT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", true)
    monkeypatch.setenv("XENT_CPU_KERNEL", "auto")
    monkeypatch.setattr(_cpu_kernel, "_state", {})
    status = _cpu_kernel.kernel_status()
    assert status.startswith(f"unavailable: {true} exited 0 without writing a library"), status
    assert list((tmp_path / "kernels").iterdir()) == []
    g = torch.Generator().manual_seed(3)
    h, w = torch.randn(30, 8, generator=g), torch.randn(19, 8, generator=g)
    y = torch.randint(0, 19, (30,), generator=g)
    auto = xent.linear_cross_entropy(h, w, y)
    monkeypatch.setenv("XENT_CPU_KERNEL", "0")
    assert torch.equal(auto, xent.linear_cross_entropy(h, w, y))
    monkeypatch.setenv("XENT_CPU_KERNEL", "1")
    one_line = r"^XENT_CPU_KERNEL=1 but the CPU kernel is unavailable: .* exited 0 without writing a library$"
    with pytest.raises(RuntimeError, match=one_line):
        xent.linear_cross_entropy(h, w, y)


def test_compiler_command_with_arguments(tmp_path, monkeypatch):
    """CC is a command line (``ccache gcc``, ``gcc -pipe``), split as a shell would."""
    monkeypatch.setenv("XENT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", f"{CC} -pipe")
    monkeypatch.setenv("XENT_CPU_KERNEL", "1")
    monkeypatch.setattr(_cpu_kernel, "_state", {})
    assert _cpu_kernel.kernel_status().startswith("compiled (built in")
    _assert_losses_right()


@pytest.mark.parametrize("folder", ["cache", "private"])
def test_interrupted_build_leaves_nothing(tmp_path, monkeypatch, private_tmp, folder):
    """Ctrl-C while the compiler writes: the interrupt goes through, and no partial library is left in
    the cache or in a temporary folder."""
    monkeypatch.setenv("XENT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("XENT_CPU_KERNEL", "1")
    monkeypatch.setattr(_cpu_kernel, "_state", {})
    (tmp_path / "cache" / "kernels").mkdir(parents=True, mode=0o700)
    os.chmod(tmp_path / "cache", 0o700)
    if folder == "private":
        os.chmod(tmp_path / "cache" / "kernels", 0o777)
    real_run = subprocess.run

    def run(argv, *args, **kw):
        if "-o" in argv and argv[argv.index("-o") + 1] != os.devnull:  # the build itself
            Path(argv[argv.index("-o") + 1]).write_bytes(b"\x7fELF partial")
            raise KeyboardInterrupt
        return real_run(argv, *args, **kw)

    monkeypatch.setattr(subprocess, "run", run)
    with pytest.raises(KeyboardInterrupt):
        _cpu_kernel.kernel_status()
    assert list((tmp_path / "cache" / "kernels").iterdir()) == []
    assert list(private_tmp.iterdir()) == []


CPUINFO = {  # per-CPU blocks as the kernels print them, two CPUs each
    "riscv-u74": "processor\t: {n}\nhart\t\t: {n}\nisa\t\t: rv64imafdc\nmmu\t\t: sv39\n"
                 "uarch\t\t: sifive,u74-mc\n",
    "riscv-c910": "processor\t: {n}\nhart\t\t: {n}\nisa\t\t: rv64imafdcv\nmmu\t\t: sv39\n"
                  "uarch\t\t: thead,c910\n",
    "power9": "processor\t: {n}\ncpu\t\t: POWER9, altivec supported\nclock\t\t: {mhz}.000000MHz\n"
              "revision\t: 2.2 (pvr 004e 1202)\n",
    "power10": "processor\t: {n}\ncpu\t\t: POWER10, altivec supported\nclock\t\t: {mhz}.000000MHz\n"
               "revision\t: 2.0 (pvr 0080 0200)\n",
    "s390x-z14": "vendor_id       : IBM/S390\nbogomips per cpu: {mhz}.00\n"
                 "features\t: esan3 zarch stfle msa ldisp eimm dfp edat etf3eh highgprs te vx vxd gs\n",
    "s390x-z15": "vendor_id       : IBM/S390\nbogomips per cpu: {mhz}.00\n"
                 "features\t: esan3 zarch stfle msa ldisp eimm dfp edat etf3eh highgprs vx vxe gs vxe2\n",
}


def test_cache_key_tells_cpus_apart(tmp_path, monkeypatch):
    """CPUs whose cpuinfo has no 'flags' line (RISC-V, POWER, s390x), where platform.processor() is ''
    on Linux, get keys of their own; what changes from run to run (MHz, bogomips) does not change it."""
    monkeypatch.setattr(_cpu_kernel.platform, "processor", lambda: "")
    monkeypatch.setattr(_cpu_kernel, "_native_target", lambda cc: "")  # cpuinfo alone tells them apart

    def key(text):
        path = tmp_path / "cpuinfo"
        path.write_text(text)
        monkeypatch.setattr(_cpu_kernel, "_CPUINFO", str(path))
        return _cpu_kernel._cache_key([CC])

    keys = {}
    for name, block in CPUINFO.items():
        keys[name] = key("\n".join(block.format(n=n, mhz=2000) for n in range(2)))
        assert key("\n".join(block.format(n=n, mhz=3100 + n) for n in range(2))) == keys[name], name
    assert len(set(keys.values())) == len(keys), keys
    # the compiler's reading of -march=native is in the key too
    monkeypatch.setattr(_cpu_kernel, "_native_target", lambda cc: "-march=znver3")
    assert key(CPUINFO["power9"].format(n=0, mhz=2000)) != keys["power9"]


def test_native_target_is_read_from_the_compiler():
    """The compiler's resolution of -march=native: the same twice, and a CPU name where it is gcc or
    clang on this machine."""
    version = subprocess.run([CC, "--version"], capture_output=True, text=True).stdout.lower()
    target = _cpu_kernel._native_target([CC])
    assert target == _cpu_kernel._native_target([CC])
    if "gcc" in version or "clang" in version:  # resolved: a CPU name, not "native"
        assert target and "-march=native" not in target.split(), target


def test_loaded_library_is_the_checked_one(cache):
    """The library in use is the cached file whose SHA-256 was checked."""
    status = _cpu_kernel.kernel_status()
    assert status == f"compiled (cached: {cache})"
    lib = _cpu_kernel._library()
    assert isinstance(lib, ctypes.CDLL) and Path(lib._name) == cache
    assert _recorded(cache) == hashlib.sha256(cache.read_bytes()).hexdigest()
