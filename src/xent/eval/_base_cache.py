"""A base model kept on disk for ``xent compare``: its final hidden states at the scored positions.

``xent eval --save-base DIR`` writes, beside its own results:
    manifest.json         what fixes the numbers: the tokenizer's hash, the texts' hash (SHA-256 over every
                          document read, in order), the data files' hash, the window and batch options, the
                          base model's hash, the states' dtype, the scored rows of every batch, the head's
                          final-logit transform (scale, soft-cap), vocabulary and hidden sizes; the size
                          and SHA-256 of each tensor file; and its own checksum (``sha256``, over the rest)
    states.safetensors    "hidden" [N, D]: the decoder's last hidden states of the N scored positions, in
                          the model's dtype, in the order the batches are run
    head.safetensors      "weight" [V, D] (and "bias" [V]) of the output embeddings

The cache is written into a temporary directory beside DIR and renamed to DIR at the end (never a
half-written cache); the CLI locks DIR (a lock file beside it) for the whole run, as ``--out`` is locked.
Its files follow the user's umask. Before use, every file is checked: regular files only (a FIFO or a
device is refused, never waited on), the manifest read with a size bound and its checksum verified (a
hand-edited scale or soft-cap is refused), each tensor file's size and SHA-256 (scaled or swapped states,
another model's head), then the tensors' names, dtypes and shapes against the manifest. Any of these is an
EvalError naming the file: the numbers are never computed from a cache that is not what was written.
This is integrity, not authentication: someone who rewrites every hash can make any cache.

``xent compare --base-cache DIR --model M`` forms the very batches the two-model compare forms, and
projects the cached states of each with the cached head a chunk at a time, exactly as the base model's
fused head would (the same matmul on the same states, the same float32 transform): the base's logits,
and with them every number, are those of the two-model compare, bit for bit, with only M loaded. The
states are the same only for the same batches, so the tokenizer, the texts, the windows (max length,
stride, BOS, preset) and the batches (batch size, padding side) must be those of the cache: a mismatch is
refused (the options and tokenizer before any work; the texts where a batch's scored rows differ, and at
the end by their hash). One process only (not under torch.distributed). The states are held in memory
until the end of ``eval`` (N × D × 2 bytes in bfloat16).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from types import SimpleNamespace

import torch

from .. import _linear
from . import _files
from ._errors import EvalError
from ._head import ModelHead

FORMAT = 2
MANIFEST, STATES, HEAD = "manifest.json", "states.safetensors", "head.safetensors"
MAX_MANIFEST_BYTES = 64 << 20  # one integer per batch: millions of batches
_WINDOWS = ("max_length", "stride", "bos", "bos_id", "preset", "extend_last", "words")
_BATCHES = ("batch_size", "padding_side", "checkpoint_every")
_DTYPES = ("float32", "bfloat16", "float16", "float64")
_AGAIN = "write it again with xent eval --save-base"


def tokenizer_sha256(tokenizer) -> str:
    """SHA-256 of what fixes a tokenizer's ids: its serialisation (a fast tokenizer) or its vocabulary,
    and its BOS/EOS/PAD ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    special = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    return hashlib.sha256((text + json.dumps(special)).encode()).hexdigest()


class TextHash:
    """Wraps a (file, text) stream and hashes every text read (length-prefixed UTF-8, in order)."""

    def __init__(self, stream):
        self.stream, self.h = stream, hashlib.sha256()

    def __iter__(self):
        for file, text in self.stream:
            data = text.encode("utf-8", "surrogatepass")
            self.h.update(f"{file}:{len(data)}:".encode())
            self.h.update(data)
            yield file, text

    def hexdigest(self) -> str:
        return self.h.hexdigest()


def lock(directory: str) -> _files.OutputLock:
    """The lock a run holds on a cache directory while it computes and writes it (not taken yet): a
    file beside it, ``.NAME.xent.lock``, since the directory itself is replaced when the cache is put in
    place. A second run into the same directory is refused while the first runs."""
    target = os.path.abspath(directory)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    return _files.OutputLock(directory, path=os.path.join(parent, f".{os.path.basename(target)}.xent.lock"),
                             flag="--save-base")


def save(directory: str, head: ModelHead, states: list[torch.Tensor], manifest: dict) -> None:
    """Write the cache (states [N_b, D] of each batch, in run order) into a temporary directory beside
    ``directory``, then rename it to ``directory`` (which must still be missing or empty)."""
    from safetensors.torch import save_file

    if not head.fused:
        raise EvalError(f"save-base needs the fused head (the decoder's hidden states); {head.reason}")
    target = os.path.abspath(directory)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.", suffix=".tmp", dir=parent)
    try:
        d = head.weight.shape[1]
        hidden = torch.cat(states) if states else torch.zeros(0, d, dtype=head.out.weight.dtype)
        save_file({"hidden": hidden.contiguous()}, os.path.join(tmp, STATES))
        tensors = {"weight": head.out.weight.detach().cpu().contiguous()}
        if head.out.bias is not None:
            tensors["bias"] = head.out.bias.detach().cpu().contiguous()
        save_file(tensors, os.path.join(tmp, HEAD))
        body = {"format": FORMAT, **manifest, "dtype": str(hidden.dtype).removeprefix("torch."),
                "rows": [len(s) for s in states], "vocab": head.vocab, "hidden_size": int(d),
                # where the head's matmul operands start past a 64-byte boundary: a one-row chunk is a
                # matrix-vector product whose rounding on the CPU depends on it (see _placed)
                "offsets": {"weight": head.weight.data_ptr() % 64,
                            "bias": None if head.bias is None else head.bias.data_ptr() % 64},
                "transform": {"scale": head.out.hidden_scale, "softcap": head.out.softcap},
                "files": {name: _sealed(os.path.join(tmp, name)) for name in (STATES, HEAD)}}
        with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as f:
            json.dump({**body, "sha256": _files.json_sha256(body)}, f, indent=1, allow_nan=False)
            f.flush()
            os.fsync(f.fileno())
        for name in (STATES, HEAD, MANIFEST, ""):  # "": the directory (mkdtemp makes it 0700)
            _files.follow_umask(os.path.join(tmp, name))
        _put_in_place(tmp, target, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _sealed(path: str) -> dict:
    """The size and SHA-256 of a file just written, flushed to disk (the rename that follows must not
    put a cache in place whose data a crash could still lose)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
        os.fsync(f.fileno())
        return {"bytes": f.tell(), "sha256": h.hexdigest()}


def _put_in_place(tmp: str, target: str, directory: str) -> None:
    """Rename the finished cache to ``target``: atomic, and refused by the OS when ``target`` is no
    longer missing or empty (another run filled it meanwhile: that run's cache is kept)."""
    try:
        if os.name == "nt" and os.path.isdir(target) and not os.listdir(target):  # pragma: no cover
            os.rmdir(target)  # Windows does not rename over a directory
        os.rename(tmp, target)
    except OSError:
        if os.path.lexists(target):
            raise EvalError(f"save-base: {directory!r} was filled by another run while this one ran: its "
                            "cache is kept and this run's is not written") from None
        raise


def load_manifest(directory: str) -> dict:
    """The manifest of a cache, checked: a regular file of at most MAX_MANIFEST_BYTES, this format,
    its own checksum, and every field the right type (EvalError naming the file otherwise)."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.isdir(directory):
        raise EvalError(f"base-cache: {directory!r} is not a directory (a cache written by xent eval "
                        "--save-base DIR)")
    try:
        with _files.open_regular(path) as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except EvalError as err:
        raise EvalError(f"base-cache: {err}: is {directory!r} a directory written by xent eval --save-base?"
                        ) from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise _damaged(path, f"larger than {MAX_MANIFEST_BYTES >> 20} MiB")
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise _damaged(path, f"not JSON: {type(err).__name__}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("format"), int):
        raise _damaged(path, "not a manifest written by xent eval --save-base")
    if manifest["format"] != FORMAT:
        raise EvalError(f"base-cache: {path} is a format-{manifest['format']} cache, this xent reads format "
                        f"{FORMAT}: {_AGAIN}")
    body = {k: v for k, v in manifest.items() if k != "sha256"}
    if manifest.get("sha256") != _files.json_sha256(body):
        raise _damaged(path, "its checksum does not match its contents: edited or cut short")
    _check_manifest(manifest, path)
    for name in (STATES, HEAD):  # cheap checks first (the hashes are checked when the files are read)
        with _open_file(directory, name) as f:
            _check_size(f, os.path.join(directory, name), manifest["files"][name])
    return manifest


def _open_file(directory: str, name: str):
    try:
        return _files.open_regular(os.path.join(directory, name))
    except EvalError as err:
        raise EvalError(f"base-cache: {err}: {_AGAIN}") from None


def _check_size(f, path: str, record: dict) -> None:
    size = os.fstat(f.fileno()).st_size
    if size != record["bytes"]:
        raise _damaged(path, f"{size} bytes, the manifest says {record['bytes']}")


def _damaged(path: str, why: str) -> EvalError:
    return EvalError(f"base-cache: {path} is damaged ({why}): {_AGAIN}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


_SHA256 = re.compile(r"[0-9a-f]{64}")


def _check_manifest(m: dict, path: str) -> None:
    """Every field compare reads, of the right type and range (a manifest written by another version, or
    edited and re-sealed, must fail here rather than inside the run)."""
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise _damaged(path, what)

    for key, kind in (("tokenizer_sha256", str), ("texts_sha256", str), ("base_model_sha256", str),
                      ("options", dict), ("dtype", str), ("rows", list), ("vocab", int),
                      ("hidden_size", int), ("offsets", dict), ("transform", dict), ("files", dict)):
        need(key in m, f"no {key!r}")
        need(isinstance(m[key], kind) and not isinstance(m[key], bool), f"{key!r} is not a {kind.__name__}")
    need(m.get("data_sha256") is None or isinstance(m["data_sha256"], str), "'data_sha256' is not a string")
    missing = [k for k in (*_WINDOWS, *_BATCHES) if k not in m["options"]]
    need(not missing, f"options lack {', '.join(missing)}")
    need(_is_int(m["options"]["checkpoint_every"]) and m["options"]["checkpoint_every"] >= 1,
         "options.checkpoint_every is not a positive integer")
    need(m["dtype"] in _DTYPES, f"dtype {m['dtype']!r} is not a floating type")
    need(all(_is_int(r) and r >= 0 for r in m["rows"]), "'rows' holds other than counts")
    need(m["vocab"] >= 1 and m["hidden_size"] >= 1, "vocab or hidden_size below 1")
    t = m["transform"]
    need(set(t) == {"scale", "softcap"}, "transform is not {scale, softcap}")
    need(_is_number(t["scale"]) and t["scale"] != 0, f"transform.scale {t['scale']!r}")
    need(t["softcap"] is None or (_is_number(t["softcap"]) and t["softcap"] > 0),
         f"transform.softcap {t['softcap']!r}")
    need(all(m["offsets"].get(k) is None or (_is_int(m["offsets"][k]) and 0 <= m["offsets"][k] < 64)
             for k in ("weight", "bias")), "offsets out of range")
    need(set(m["files"]) == {STATES, HEAD}, f"files is not {{{STATES}, {HEAD}}}")
    for name, rec in m["files"].items():
        need(isinstance(rec, dict) and _is_int(rec.get("bytes")) and rec["bytes"] >= 0
             and isinstance(rec.get("sha256"), str) and _SHA256.fullmatch(rec["sha256"]) is not None,
             f"files.{name} is not {{bytes, sha256}}")


def _read_tensors(directory: str, name: str, record: dict) -> dict[str, torch.Tensor]:
    """The tensors of a cache file, once its size and SHA-256 are the manifest's."""
    from safetensors.torch import load_file

    path = os.path.join(directory, name)
    with _open_file(directory, name) as f:
        _check_size(f, path, record)
        h = hashlib.sha256()
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    if h.hexdigest() != record["sha256"]:
        raise _damaged(path, "its SHA-256 is not the manifest's: changed since it was written")
    try:
        return load_file(path)
    except Exception as err:  # safetensors' own error type is not public API
        raise _damaged(path, f"not a safetensors file: {_files.first_line(err)}") from None


def _check_tensors(head: dict, states: dict, m: dict, directory: str) -> None:
    """The tensors' names, dtypes and shapes against the manifest (vocabulary V, hidden size D)."""
    v, d = m["vocab"], m["hidden_size"]

    def need(ok: bool, name: str, what: str) -> None:
        if not ok:
            raise _damaged(os.path.join(directory, name), what)

    need(set(head) in ({"weight"}, {"weight", "bias"}), HEAD, f"tensors {sorted(head)}, not weight [, bias]")
    w, b = head["weight"], head.get("bias")
    need(w.is_floating_point() and w.dim() == 2, HEAD, f"weight is {w.dtype} {list(w.shape)}")
    need(tuple(w.shape) == (v, d), HEAD, f"weight is {list(w.shape)}, the manifest says [{v}, {d}]")
    if b is not None:
        need(b.dtype == w.dtype and tuple(b.shape) == (v,), HEAD, f"bias is {b.dtype} {list(b.shape)}, not "
             f"{w.dtype} [{v}]")
    need(set(states) == {"hidden"}, STATES, f"tensors {sorted(states)}, not hidden")
    h = states["hidden"]
    need(str(h.dtype).removeprefix("torch.") == m["dtype"], STATES,
         f"hidden is {h.dtype}, the manifest says {m['dtype']}")
    n = sum(m["rows"])
    need(tuple(h.shape) == (n, d), STATES, f"hidden is {list(h.shape)}, the manifest says [{n}, {d}]")


def check_run(manifest: dict, *, tokenizer, opts) -> None:
    """EvalError naming the first difference between the cache and this run's tokenizer and options."""
    if manifest["tokenizer_sha256"] != tokenizer_sha256(tokenizer):
        raise EvalError("base-cache: the tokenizer differs from the base model's (the cache's token ids "
                        "would not be this run's)")
    config = opts.config()
    for keys, what in ((_WINDOWS, "windows"), (_BATCHES[:2], "batches (the hidden states are those of "
                                                               "the same batches only)")):
        for k in keys:
            if manifest["options"][k] != config[k]:
                raise EvalError(f"base-cache: {k} is {config[k]!r} here but {manifest['options'][k]!r} in "
                                f"the cache: the {what} must be the cache's")


def _placed(t: torch.Tensor, offset: int | None) -> torch.Tensor:
    """A contiguous copy of t (on the CPU) whose data starts ``offset`` bytes past a 64-byte boundary, as
    the base model's own weight did: a CPU matrix-vector product (a chunk of one row) is not packed, and
    its summation order, so its rounding, can follow the operand's alignment. Unchanged elsewhere."""
    size = t.element_size()
    if offset is None or t.device.type != "cpu" or offset % size:
        return t
    buf = torch.empty(t.numel() + 128 // size, dtype=t.dtype)
    shift = ((offset - buf.data_ptr() % 64) % 64) // size
    out = buf[shift : shift + t.numel()].view(t.shape)
    out.copy_(t)
    return out


class CachedHead(ModelHead):
    """The base model's fused head on cached states: ``chunks`` projects the next batch's states."""

    def __init__(self, directory: str, manifest: dict, device):
        head = _read_tensors(directory, HEAD, manifest["files"][HEAD])
        states = _read_tensors(directory, STATES, manifest["files"][STATES])
        _check_tensors(head, states, manifest, directory)
        self.hidden_all = states["hidden"]
        rows = manifest["rows"]
        self.model, self.name, self.temperature = None, "the cached base model", 1.0
        self.device = torch.device(device)
        self.mode, self.reason = "fused", None
        t = manifest["transform"]
        self.out = SimpleNamespace(weight=head["weight"], bias=head.get("bias"), hidden_scale=t["scale"],
                                   softcap=t["softcap"])
        self.vocab = int(manifest["vocab"])
        self.mm_dtype = _linear.matmul_dtype(head["weight"].dtype, self.device)
        offsets = manifest.get("offsets") or {}
        self.weight = _placed(head["weight"].to(self.device, self.mm_dtype), offsets.get("weight"))
        self.bias = None if head.get("bias") is None else _placed(head["bias"].to(self.device, self.mm_dtype),
                                                                  offsets.get("bias"))
        self.rows, self.batch, self.start = rows, 0, 0

    @property
    def kind(self) -> str:
        return "cached"

    def decide(self, batch) -> None:
        return None

    @torch.no_grad()
    def chunks(self, batch, rows, cols, size: int):
        b = self.batch
        if b >= len(self.rows) or self.rows[b] != len(rows):
            want = self.rows[b] if b < len(self.rows) else "none"
            raise EvalError(f"base-cache: batch {b} scores {len(rows)} positions here and {want} in the "
                            "cache: the texts are not the cache's")
        # a fresh copy, as the base's own head gathers a fresh [N, D] tensor: a CPU matmul's rounding can
        # depend on where its input starts in memory (a slice of the cache starts anywhere)
        h = self.hidden_all[self.start : self.start + len(rows)].to(self.device, copy=True)
        self.batch, self.start = b + 1, self.start + len(rows)
        for s in range(0, len(rows), size):
            yield s, self.project(h[s : s + size])

    def check_done(self) -> None:
        if self.batch != len(self.rows):
            raise EvalError(f"base-cache: the cache holds {len(self.rows)} batches and this run formed "
                            f"{self.batch}: the texts are not the cache's")
