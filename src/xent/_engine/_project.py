"""The projection: a chunk of hidden states times the head, into a [C, V] buffer reused by every chunk."""

from __future__ import annotations

import os
import threading

import torch

_kept = threading.local()  # .buffers: {dtype: 1-D CPU tensor}, this thread's kept chunk buffers


def chunk_buffer(shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The [C, V] logits buffer of a call. With XENT_KEEP_CHUNK_BUFFER=1, on the CPU, it is kept for the
    thread's next call (grown when a call needs more): a buffer over glibc's 32 MiB mmap ceiling is
    otherwise a fresh mapping at every call, ~16 ms of page faults per 64 MiB (1.5 % of a 4096×512×32000
    bf16 step). Not the default: the kept buffer also lives through the caller's backward, which raised
    that step's extra peak memory from 137 to 166 MB. :func:`release_buffers` frees it. CUDA's caching
    allocator already reuses memory, so CUDA buffers are never kept."""
    numel = shape[0] * shape[1]
    if device.type != "cpu" or os.environ.get("XENT_KEEP_CHUNK_BUFFER", "0") != "1":
        return torch.empty(shape, dtype=dtype, device=device)
    kept = _kept.__dict__.setdefault("buffers", {})
    flat = kept.get(dtype)
    if flat is None or flat.numel() < numel:
        kept.pop(dtype, None)  # free the smaller one before allocating
        flat = kept[dtype] = torch.empty(numel, dtype=dtype)
    return flat[:numel].view(shape)


def release_buffers() -> None:
    """Frees this thread's kept CPU chunk buffers (XENT_KEEP_CHUNK_BUFFER=1, :func:`chunk_buffer`)."""
    _kept.__dict__.pop("buffers", None)


def project(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, out=None) -> torch.Tensor:
    """[C, D] @ [D, V] (+ [V]) -> [C, V] logits, into ``out`` when given (a buffer the loss may overwrite)."""
    if b is not None:
        return torch.addmm(b, h, w.t(), out=out)
    return torch.mm(h, w.t(), out=out)


def as_dtype(x: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``x`` in ``dtype`` (the same tensor when it already is), None for None."""
    return None if x is None else x.to(dtype)
