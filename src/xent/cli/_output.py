"""Checks shared by the commands, done before any model is loaded: the output directory (usable,
writable, not in use by another run) and the device."""

from __future__ import annotations

import os


def describe(err: OSError) -> str:
    """An OSError as one line: "PATH: reason" (no Python internals)."""
    if err.strerror:
        return f"{err.filename}: {err.strerror}" if err.filename else err.strerror
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


class OutputDir:
    """``--out DIR`` of a command, checked and locked before the work starts.

    ``open()`` refuses a path that is a file, a broken symbolic link or a directory that cannot be written,
    creates the directory if needed and takes its lock (xent.eval._files.OutputLock: a second run into
    the same directory is refused). ``close()`` releases the lock and removes the directory again if this
    run created it and left it empty (a run that failed on bad input leaves nothing behind).
    """

    def __init__(self, path: str | None, *, flag: str = "--out", rank: int = 0):
        self.path, self.flag, self.rank = path, flag, rank
        self.place = None

    def open(self) -> OutputDir:
        from xent.eval import EvalError
        from xent.eval._files import LockedDirectory

        from . import CommandError

        path = self.path
        if path is None:
            return self
        if os.path.islink(path) and not os.path.exists(path):
            raise CommandError(f"{self.flag} {path} is a broken symbolic link (to {os.readlink(path)})")
        if os.path.exists(path) and not os.path.isdir(path):
            raise CommandError(f"{self.flag} {path} exists and is not a directory")
        try:
            self.place = LockedDirectory(path, self.rank).open()
        except OSError as err:
            raise CommandError(f"{self.flag} {path} cannot be written ({describe(err)})") from None
        except EvalError as err:  # in use by another run
            raise CommandError(str(err)) from None
        return self

    def close(self) -> None:
        if self.place is not None:
            self.place.close()
            self.place = None

    def __enter__(self) -> OutputDir:
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()


def check_device(device: str, flag: str = "--device") -> None:
    """CommandError unless ``device`` names a torch device that exists here (cpu, cuda[:N], mps...)."""
    import torch

    from . import CommandError

    try:
        d = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise CommandError(f"{flag} {device!r} is not a device (cpu, cuda, cuda:N, mps)") from None
    if d.type == "cpu":
        return
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise CommandError(f"{flag} {device}: CUDA is not available")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise CommandError(f"{flag} {device}: there are {torch.cuda.device_count()} CUDA device(s)")
        return
    if d.type == "mps":
        available = torch.backends.mps.is_available()
    else:
        backend = getattr(torch, d.type, None)
        available = bool(getattr(backend, "is_available", lambda: False)())
    if not available:
        raise CommandError(f"{flag} {device}: no {d.type} device is available")
