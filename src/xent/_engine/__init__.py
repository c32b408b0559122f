"""The fused engine: ``loss(hidden @ weight.T + bias, target)`` a chunk of tokens at a time.

Only one chunk of logits ``[C, V]`` (and its gradient, in the same buffer) exists at any moment. The
engine is generic over the per-token loss (:class:`xent.losses.TokenLoss`) and over the row backend that
computes it on a chunk; every fused public function (:mod:`xent._linear`, :mod:`xent._logprobs`,
:mod:`xent._selective`, :mod:`xent._multi_token`, :mod:`xent.parallel`) and the evaluation head use it
through the names below, never through a module's private names.

Parts, each its own module:

- the plan (:mod:`._plan`): tokens per chunk (:func:`chunk_tokens`), the projection dtype
  (:func:`projection_dtype_for`, :func:`matmul_dtype`) and the :class:`Plan` of a call;
- row selection (:mod:`._rows`): :func:`valid_rows` drops ignored and weight-0 tokens before the
  projection; :func:`check_head` checks a head's shapes;
- the projection (:mod:`._project`): :func:`project` into a chunk buffer reused by every chunk;
- the chunk loop (:mod:`._loop`): :func:`run`, one pass over the chunks;
- the autograd Function (:mod:`._function`): :class:`LinearLoss`;
- the row backends (:mod:`._backends`): :class:`RowBackend` is the interface (one chunk of logits, in
  place: the loss rows, the gradient rows and the statistics asked for); ``"torch"`` serves any loss,
  ``"cpu_kernel"`` plain cross-entropy and token log-probs on the CPU (the loss declares which through
  :meth:`xent.losses.TokenLoss.row_spec`), ``"triton"`` cross-entropy on CUDA where it is installed.

Work per call, for the n valid tokens:

- mean/sum with gradients: the three matmuls that cannot be avoided (logits, grad hidden, grad weight)
  all run in the forward; backward only rescales the stored gradients by the upstream scalar.
- reduction="none" with gradients: the forward computes the losses; backward recomputes each chunk of
  logits with the per-token upstream gradients (one extra matmul).
- no gradient needed (evaluation): one matmul.

Half-precision inputs are projected in their own dtype (as ``hidden @ weight.T`` would be; the GEMM
accumulates in float32), the loss and its gradient are computed in float32, and the weight and bias
gradients are accumulated over chunks in float32; gradients are returned in the inputs' dtypes. float16
on CPU is the exception: its matmuls are slow there, so it is projected in float32 from a float32 copy
of the weight (:func:`matmul_dtype`).

Choosing the row backend: the fused functions take ``backend="auto"`` (the default), ``"torch"``,
``"cpu_kernel"`` or ``"triton"``. A named backend that cannot serve the call (a loss it does not
compute, a device or dtype it does not take) raises a one-line ``ValueError`` saying why. "auto" takes
the first of ``cpu_kernel``, ``torch`` that can serve the call (``triton`` joins it once it has run on a
GPU: it is proven under Triton's interpreter and compiled for sm_90 only; docs/cuda.md). Environment
variables only change what "auto" may do and how big its chunks are; they never override a named backend:

- ``XENT_CPU_KERNEL``: ``auto`` (default: the CPU kernel where it builds), ``0`` (never), ``1`` (an
  error when it cannot be built). :func:`xent._cpu_kernel.kernel_status` says which, and why.
  (``XENT_CACHE_DIR`` is where the kernel is cached.)
- ``XENT_CHUNK_MB``: MiB of logits per chunk for ``chunk_size="auto"`` (64 on the CPU, 1024 on CUDA).
- ``XENT_KEEP_CHUNK_BUFFER=1``: keep the CPU chunk buffer between calls (:func:`chunk_buffer`).
"""

from ._backends import (
    BLOCK_BYTES,
    EVAL_STATS,
    RowBackend,
    RowRequest,
    block_rows,
    check_backend,
    eval_rows,
    row_blocks,
    select,
)
from ._function import LinearLoss
from ._loop import row_request, run
from ._plan import (
    CHUNK_ALIGN,
    DEFAULT_CHUNK_MB,
    MIN_AUTO_CHUNK,
    Plan,
    auto_chunk_size,
    chunk_budget_mb,
    chunk_tokens,
    float_out_mm,
    matmul_dtype,
    projection_dtype_for,
)
from ._project import as_dtype, chunk_buffer, project, release_buffers
from ._rows import check_head, valid_rows


def check_serves(plan: Plan, device, bias_grad: bool) -> None:
    """At the door: a named ``plan.backend`` can serve the call's passes (a one-line ValueError if not)."""
    if plan.backend != "auto":
        select(row_request(plan, device, grad=True, bias_grad=bias_grad), plan.backend)


__all__ = [
    "BLOCK_BYTES", "CHUNK_ALIGN", "DEFAULT_CHUNK_MB", "MIN_AUTO_CHUNK", "LinearLoss", "Plan", "RowBackend",
    "RowRequest", "as_dtype", "auto_chunk_size", "block_rows", "check_backend", "check_head",
    "check_serves", "chunk_budget_mb", "chunk_buffer", "chunk_tokens", "float_out_mm", "matmul_dtype",
    "project", "projection_dtype_for", "release_buffers", "row_blocks", "row_request", "run", "select",
    "valid_rows",
]
__all__ += ["EVAL_STATS", "eval_rows"]  # the evaluation head's statistics (RowBackend.eval_rows)
