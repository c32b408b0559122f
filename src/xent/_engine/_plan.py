"""The plan of a fused call: how many tokens per chunk, which dtype the head is projected in, and the
:class:`Plan` that carries a call's rows, loss and options to the chunk loop."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from ..losses._base import TokenLoss

#: Memory for one chunk's [C, V] logits buffers when chunk_size="auto"; XENT_CHUNK_MB overrides it.
#: On the CPU a cache-friendly 64 MiB; on CUDA 1 GiB, because small chunks leave the GEMMs short of
#: rows (Liger and PyTorch's chunked loss size chunks by the inputs' footprint for the same reason).
#: The CUDA numbers are provisional: benchmarks/gpu_check.sh sweeps XENT_CHUNK_MB to fix them.
DEFAULT_CHUNK_MB = {"cpu": 64, "cuda": 1024}
#: Fewer tokens than this per chunk make the call markedly slower per token: every chunk reads and
#: writes the [V, D] float32 weight-gradient accumulator once, 8·V·D bytes against 6·C·V·D flops (at
#: 2048×512×128256 float32 on the CPU: 1.21× the three-matmul floor with C = 256, 1.13× with C = 512).
#: So "auto" never goes below it unless there are fewer tokens.
MIN_AUTO_CHUNK = {"cpu": 512, "cuda": 1024}
#: "auto" chunks are a multiple of this many tokens: the GEMMs' row blocking leaves a ragged tail otherwise
#: (4096×512×32000 bf16 on 2 AMD EPYC cores, forward + backward, × the three-matmul floor, one process,
#: median of 6 paired rounds: 1.08× with 1024-token chunks, 1.09× with 1152 or 960, 1.11× with 1040,
#: 1.13× with 1056, 1.18× with 1048, the 64 MiB budget's own size).
CHUNK_ALIGN = 64
def auto_chunk_size(num_tokens: int, num_classes: int, bytes_per_logit: int = 4, device="cpu") -> int:
    """Tokens per chunk such that the chunk's [C, V] buffers (``bytes_per_logit`` bytes per token and
    class in all) fit the budget (XENT_CHUNK_MB, else 64 MiB on the CPU and 1 GiB on CUDA), but at least
    MIN_AUTO_CHUNK tokens (512; 1024 on CUDA), a multiple of CHUNK_ALIGN tokens, and at most every token."""
    kind = "cuda" if torch.device(device).type == "cuda" else "cpu"
    budget = chunk_budget_mb(kind) * 2**20
    chunk = max(int(budget // (bytes_per_logit * num_classes)), MIN_AUTO_CHUNK[kind])
    chunk -= chunk % CHUNK_ALIGN
    return max(1, min(chunk, num_tokens))


def chunk_tokens(chunk_size, num_tokens: int, num_classes: int, bytes_per_logit: int, device) -> int:
    """The chunk of a fused call: ``chunk_size`` itself, or for "auto" :func:`auto_chunk_size` of the call's
    tokens on its device (one place, so no fused function forgets the device's budget)."""
    if chunk_size != "auto":
        return chunk_size
    return auto_chunk_size(max(num_tokens, 1), num_classes, bytes_per_logit, device)


def chunk_budget_mb(kind: str = "cpu") -> float:
    """XENT_CHUNK_MB (MiB of logits per chunk) if set, else DEFAULT_CHUNK_MB for the device kind."""
    raw = os.environ.get("XENT_CHUNK_MB")
    if raw is None:
        return float(DEFAULT_CHUNK_MB[kind])
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"XENT_CHUNK_MB must be a number of MiB > 0, got {raw!r}")
    return value


_FLOAT_OUT_MM: dict[str, bool] = {}


def float_out_mm(device: torch.device) -> bool:
    """Whether half GEMMs can write float32 results directly here (``torch.addmm(..., out_dtype=
    torch.float32)``, CUDA in recent PyTorch): then the half weight gradient is accumulated in float32 by
    the GEMM itself, with no [V, D] temporary per chunk. Probed once per device type."""
    kind = device.type
    if kind not in _FLOAT_OUT_MM:
        try:
            a = torch.ones((2, 2), dtype=torch.bfloat16, device=device)
            acc = torch.ones((2, 2), dtype=torch.float32, device=device)
            torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
            _FLOAT_OUT_MM[kind] = bool((acc == 3.0).all())
        except (RuntimeError, TypeError, NotImplementedError):
            _FLOAT_OUT_MM[kind] = False
    return _FLOAT_OUT_MM[kind]


def matmul_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype the projections run in: the inputs' own, except float16 on CPU, whose matmuls are ~4×
    slower than float32 there (1024×512 @ 512×32000 on 2 AMD EPYC cores: 920 ms vs 225 ms), so it is
    projected in float32. Half matmuls
    accumulate in float32 inside the GEMM; only their [C, V] / [C, D] / [V, D] outputs are rounded."""
    if dtype == torch.float16 and device.type == "cpu":
        return torch.float32
    return dtype


def projection_dtype_for(hidden: torch.Tensor, projection_dtype) -> torch.dtype:
    """The dtype the head is projected in: :func:`matmul_dtype` by default (None); else
    ``projection_dtype``, which must be the inputs' dtype or, for half inputs, torch.float32 (then the
    weight is copied to float32 once per call and each chunk of hidden states is upcast: log-probs as
    exact as a float32 model's head, at the price of float32 matmuls)."""
    if projection_dtype is None:
        return matmul_dtype(hidden.dtype, hidden.device)
    allowed = [hidden.dtype] + ([torch.float32] if hidden.dtype in (torch.float16, torch.bfloat16) else [])
    if not isinstance(projection_dtype, torch.dtype) or projection_dtype not in allowed:
        raise ValueError(
            f"projection_dtype must be None or one of {allowed} for inputs of dtype {hidden.dtype}, "
            f"got {projection_dtype!r}"
        )
    return projection_dtype


@dataclass
class Plan:
    """What the chunk loop and the autograd Function need besides the differentiable tensors."""

    loss: TokenLoss
    rows: torch.Tensor  # [n] rows of hidden2d that have a valid target
    target: torch.Tensor  # [n] their target ids
    chunk: int
    compute_dtype: torch.dtype  # the loss's: float32, or float64 for float64 inputs
    extras: tuple = ()  # ((hidden2d, weight, bias), ...) heads projected without gradient, e.g. a teacher
    mm_dtype: torch.dtype | None = None  # the projections'; None: compute_dtype
    weights: torch.Tensor | None = None  # [n] per-token weights w_t (compute dtype), None: all 1
    stats: torch.Tensor | None = None  # [n, 3] filled by the forward pass with the training statistics
    per_token: torch.Tensor | None = None  # [n] w_t·ℓ_t, kept by the forward pass when stats are wanted
    token_extras: tuple = ()  # ([n, ...], ...) per-token data the loss takes after the heads' logits
    backend: str = "auto"  # the row backend asked for (xent._engine._backends.select)

    def chunks(self):
        """Slices of the n rows, ``chunk`` at a time."""
        n = self.rows.numel()
        for start in range(0, n, self.chunk):
            yield slice(start, min(start + self.chunk, n))
