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
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a result file gets the usual permissions
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


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


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def weights_sha256(model_dir: str) -> str:
    """SHA-256 over the weight files of a model directory (names and bytes, in sorted order)."""
    h = hashlib.sha256()
    names = sorted(n for n in os.listdir(model_dir) if n.endswith(WEIGHT_SUFFIXES))
    for name in names:
        h.update(name.encode() + b"\0")
        with open(os.path.join(model_dir, name), "rb") as f:
            for block in iter(lambda f=f: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


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
    """The saved state if it was written by the same run (same fingerprint), else EvalError."""
    path = os.path.join(directory, _checkpoint_name(rank))
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        state = json.load(f)
    if state.get("fingerprint") != fingerprint:
        raise EvalError(f"{path} was written by a different run (model, data or options differ): "
                        "remove it or drop --resume")
    return state


def save_checkpoint(directory: str, fingerprint: dict, state: dict, rank: int = 0) -> None:
    write_json(os.path.join(directory, _checkpoint_name(rank)), {"fingerprint": fingerprint, **state})


def remove_checkpoint(directory: str, rank: int = 0) -> None:
    path = os.path.join(directory, _checkpoint_name(rank))
    if os.path.exists(path):
        os.remove(path)


def _checkpoint_name(rank: int) -> str:
    return CHECKPOINT if rank == 0 else f"checkpoint.rank{rank}.json"
