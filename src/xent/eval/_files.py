"""Files: atomic writes, hashes of weights, and the resume checkpoint.

Every file is written to a temporary name in its destination directory and renamed over the target
(``os.replace`` is atomic on POSIX and Windows), so an interrupted run never leaves a half-written file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable

from ._errors import EvalError

CHECKPOINT = "checkpoint.json"


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Call write(tmp_path) then rename tmp_path to path; the temp file is removed on failure."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        # after writing: mkstemp makes 0600, and a writer may replace the file with its own 0600 one
        follow_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def follow_umask(path: str) -> None:
    """Give a file (0o666) or directory (0o777) the permissions the user's umask gives a new one: mkstemp
    and mkdtemp make them 0600/0700, and some writers (safetensors) 0600, which a teammate sharing the
    results cannot read."""
    import stat

    umask = os.umask(0)
    os.umask(umask)
    full = 0o777 if stat.S_ISDIR(os.stat(path).st_mode) else 0o666
    os.chmod(path, full & ~umask)


def write_text(path: str, text: str) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)


def json_safe(obj):
    """obj with NaN and ±inf replaced by None (null): summary.json stays standard JSON."""
    if isinstance(obj, float):
        return obj if obj == obj and abs(obj) != float("inf") else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json(path: str, obj) -> None:
    write_text(path, json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n")


# The weight files transformers' from_pretrained reads, in the order it looks for them (a single file
# before a sharded index; see transformers.modeling_utils._get_resolved_checkpoint_files).
SAFETENSORS_NAMES = ("model.safetensors", "model.safetensors.index.json")
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def loaded_weight_files(model_dir: str, *, safetensors: bool) -> list[str]:
    """The weight files from_pretrained(model_dir) loads: the single file, or a sharded index and the
    shards it names (sorted). Other files (optimizer.pt, extra .bin files) are never read."""
    for name in SAFETENSORS_NAMES if safetensors else PICKLE_NAMES:
        if not os.path.lexists(os.path.join(model_dir, name)):
            continue
        if not name.endswith(".index.json"):
            return [name]
        index = _regular_file(model_dir, name)
        try:
            with open(index, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise EvalError(f"{index} is not a valid shard index ({type(err).__name__})") from None
        if not all(isinstance(s, str) for s in shards):
            raise EvalError(f"{index} is not a valid shard index (a shard name is not a string)")
        return [name, *shards]
    return []


def weights_sha256(model_dir: str, *, safetensors: bool | None = None) -> str:
    """SHA-256 over the weight files from_pretrained loads (names and bytes, see
    :func:`loaded_weight_files`); ``safetensors`` None: the safetensors files if there are any. Only
    regular files are read (a link to one is followed): a FIFO or a device is an EvalError."""
    if safetensors is None:
        safetensors = any(os.path.lexists(os.path.join(model_dir, n)) for n in SAFETENSORS_NAMES)
    h = hashlib.sha256()
    for name in loaded_weight_files(model_dir, safetensors=safetensors):
        h.update(name.encode() + b"\0")
        with open(_regular_file(model_dir, name), "rb") as f:
            for block in iter(lambda f=f: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _regular_file(directory: str, name: str) -> str:
    """directory/name if it is (or links to) a regular file inside reach, else EvalError."""
    path = os.path.join(directory, name)
    _check_regular(path, lambda: os.stat(path))
    return path


def _check_regular(path: str, stat_of: Callable[[], os.stat_result]) -> os.stat_result:
    import stat

    try:
        st = stat_of()
    except OSError as err:
        raise EvalError(f"cannot read {path}: {err.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise EvalError(f"{path} is not a regular file")
    return st


def open_regular(path: str):
    """``path`` opened for binary reading if it is (or links to) a regular file, else EvalError: a FIFO
    blocks open() until a writer comes, a device (/dev/zero) never ends. Checked before opening and on
    the open file (O_NONBLOCK: a FIFO swapped in between does not block the open either)."""
    _check_regular(path, lambda: os.stat(path))
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as err:
        raise EvalError(f"cannot read {path}: {err.strerror}") from None
    try:
        _check_regular(path, lambda: os.fstat(fd))
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def state_dict_sha256(model) -> str:
    """SHA-256 over a model's parameters and buffers (names, dtypes, shapes and bytes)."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_checkpoint(directory: str, fingerprint: dict, rank: int = 0) -> dict | None:
    """The saved state if it was written by the same run (same fingerprint), else EvalError.

    A checkpoint that is not the JSON object save_checkpoint wrote (truncated, empty, binary, edited
    by hand: its checksum no longer matches) is refused with an EvalError naming the file; the state's
    contents are checked by the caller (see xent.eval._evaluate)."""
    path = os.path.join(directory, _checkpoint_name(rank))
    if not os.path.lexists(path):
        return None
    damaged = f"{path} is damaged"
    hint = "remove it (and drop --resume) to start again"
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CHECKPOINT_BYTES + 1)
    except OSError as err:
        raise EvalError(f"cannot read {path}: {err.strerror}") from None
    if len(raw) > MAX_CHECKPOINT_BYTES:
        raise EvalError(f"{damaged} (larger than {MAX_CHECKPOINT_BYTES >> 20} MiB): {hint}")
    try:
        state = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        reason = "empty" if not raw.strip() else f"not JSON: {first_line(err)}"
        raise EvalError(f"{damaged} ({reason}): {hint}") from None
    if not isinstance(state, dict) or not {"fingerprint", "sha256"} <= set(state):
        raise EvalError(f"{damaged} (not a checkpoint written by xent eval): {hint}")
    body = {k: v for k, v in state.items() if k != "sha256"}
    if state["sha256"] != json_sha256(body):
        raise EvalError(f"{damaged} (its checksum does not match: edited or cut short): {hint}")
    if state["fingerprint"] != fingerprint:
        differ = _differences(state["fingerprint"], fingerprint)
        raise EvalError(f"{path} was written by a different run ({', '.join(differ) or 'options'} "
                        "differ): resume with the same model, data and options, or remove it and drop "
                        "--resume")
    return body


def save_checkpoint(directory: str, fingerprint: dict, state: dict, rank: int = 0) -> None:
    body = json_safe({"fingerprint": fingerprint, **state})
    write_json(os.path.join(directory, _checkpoint_name(rank)), {**body, "sha256": json_sha256(body)})


def remove_checkpoint(directory: str, rank: int = 0) -> None:
    path = os.path.join(directory, _checkpoint_name(rank))
    if os.path.lexists(path):
        os.remove(path)
    remove_stale_temporaries(directory, [_checkpoint_name(rank)])


def remove_stale_temporaries(directory: str, names: list[str]) -> None:
    """Remove the ``.NAME.*.tmp`` files atomic_write leaves when a process is killed mid-write."""
    import glob

    for name in names:
        for tmp in glob.glob(os.path.join(glob.escape(directory), f".{glob.escape(name)}.*.tmp")):
            try:
                os.remove(tmp)
            except FileNotFoundError:
                pass


MAX_CHECKPOINT_BYTES = 64 << 20  # a checkpoint holds a few thousand integers per data file


def json_sha256(body: dict) -> str:
    """SHA-256 of a JSON object's canonical text (sorted keys): a file's checksum of its own contents."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, allow_nan=False).encode()).hexdigest()



def _differences(saved, wanted, prefix: str = "") -> list[str]:
    """The keys (dotted) whose values differ between two fingerprints."""
    if not (isinstance(saved, dict) and isinstance(wanted, dict)):
        return [prefix.rstrip(".") or "fingerprint"]
    keys = sorted(set(saved) | set(wanted), key=str)
    out = []
    for k in keys:
        a, b = saved.get(k, _MISSING), wanted.get(k, _MISSING)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}")
    return out


_MISSING = object()


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__



def checkpoint_path(directory: str, rank: int = 0) -> str:
    return os.path.join(directory, _checkpoint_name(rank))


def _checkpoint_name(rank: int) -> str:
    return CHECKPOINT if rank == 0 else f"checkpoint.rank{rank}.json"


# -- the output directory's lock ------------------------------------------------------------------------

LOCK = ".xent.lock"


class OutputLock:
    """An exclusive lock on an output directory, held while one run writes into it.

    ``fcntl.flock`` on ``DIR/.xent.lock`` (rank r > 0 of a torchrun job: ``.xent.rank{r}.lock``, so the
    ranks of one run do not exclude each other while a second run's ranks are refused). The OS releases
    the lock when the process ends however it ends, so a killed run never blocks a later ``--resume``.
    The file (holding the owner's pid) is removed on release. Where fcntl does not exist (Windows) no
    lock is taken. ``path``: the lock file elsewhere (a directory that is replaced as a whole, as the
    base cache is, is locked from beside it); ``flag``: the option named in the error. ``join``: share
    the lock when this process holds it already, taken without join (``xent eval`` locks --out before it
    loads the model, then evaluate locks its checkpoint_dir, the same directory); a lock taken with join
    is never shared, so two evaluate calls into one directory exclude each other.
    """

    held: set[str] = set()  # the lock files this process holds, taken without join (real paths)

    def __init__(self, directory: str, rank: int = 0, *, path: str | None = None, flag: str = "--out",
                 join: bool = False):
        self.directory, self.flag, self.join = directory, flag, join
        self.path = path or os.path.join(directory, LOCK if rank == 0 else f".xent.rank{rank}.lock")
        self.fd: int | None = None
        self.key = os.path.realpath(self.path)
        self.nested = False

    def acquire(self) -> OutputLock:
        """Take the lock, or EvalError naming the directory (and the other run's pid) if it is held.
        OSError (a read-only directory, ...) is raised as is."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return self
        if self.join and self.key in OutputLock.held:
            self.nested = True
            return self
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise EvalError(f"{self.directory} is in use by another xent run{self._owner()}: wait "
                                f"for it to finish or choose another {self.flag}") from None
            except BaseException:
                os.close(fd)
                raise
            # The holder removes the file when it releases the lock: if that happened between our open
            # and flock, we hold a lock on a removed file; try again on the current one.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd = fd
        if not self.join:
            OutputLock.held.add(self.key)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return self

    def _owner(self) -> str:
        try:
            with open(self.path, encoding="ascii") as f:
                pid = f.read(32).strip()
        except (OSError, ValueError):
            return ""
        return f" (pid {pid})" if pid.isdigit() else ""

    def release(self) -> None:
        if self.nested:  # the holder it joined releases the lock
            self.nested = False
            return
        if self.fd is None:
            return
        if not self.join:
            OutputLock.held.discard(self.key)
        try:
            os.remove(self.path)  # while still holding the lock: see acquire
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class LockedDirectory:
    """A run's output directory: :meth:`open` makes it if missing and takes its :class:`OutputLock`
    (``rank``, ``flag``, ``join`` as there); :meth:`close` releases the lock and removes the directory
    again if this run made it and left it empty (rank 0 only: the other ranks share it). An OSError (a
    path that cannot be made or written) or EvalError (in use by another run) from :meth:`open` leaves
    nothing behind."""

    def __init__(self, directory: str, rank: int = 0, *, flag: str = "--out", join: bool = False):
        self.directory, self.rank = directory, rank
        self.lock = OutputLock(directory, rank, flag=flag, join=join)
        self.created = False

    def open(self) -> LockedDirectory:
        try:
            os.makedirs(self.directory)
            self.created = True
        except FileExistsError:  # as it should be, or made meanwhile by another rank of this run
            pass
        try:
            self.lock.acquire()
        except BaseException:
            self._remove_if_created()
            raise
        return self

    def close(self) -> None:
        self.lock.release()
        self._remove_if_created()

    def _remove_if_created(self) -> None:
        if self.created and self.rank == 0:
            try:
                os.rmdir(self.directory)  # only if empty
            except OSError:
                pass
