"""Row backends: what computes a loss on one chunk of logits, in place.

The chunk loop (:mod:`xent._engine._loop`) projects a chunk of C valid tokens to a ``[C, V]`` buffer of
logits and hands it to a row backend. The backend returns the C per-token losses, overwrites the buffer
with their gradient when an upstream scale is given, and fills the training statistics when asked. The
loop then runs the gradient matmuls on the same buffer. It knows nothing of the loss or of the backend
beyond this interface; a loss says what it needs (:class:`RowRequest`, built from the loss's own
:meth:`xent.losses.TokenLoss.row_spec`), a backend says whether it can do it (:meth:`RowBackend.can_serve`).
A backend whose kernels project as well may take a whole pass instead (:meth:`RowBackend.fuses`,
:meth:`RowBackend.fused_pass`): then the loop forms no chunk at all.

Backends:

- ``"torch"`` (:class:`TorchRows`): any :class:`xent.losses.TokenLoss`, in torch ops, a cache-sized block
  of rows at a time: the loss's closed-form gradient when it has one, else autograd on the block.
- ``"cpu_kernel"`` (:class:`CpuKernelRows`): plain cross-entropy (class weights, z-loss) and token
  log-probs (temperature, with or without the entropy; no soft-capping) on the CPU in one compiled C pass
  per chunk (:func:`xent._cpu_kernel.ce_rows_`).
- ``"triton"``: CUDA, written against this interface in ``xent._engine._triton`` (loaded when present).

The evaluation head asks a backend for the evaluation statistics of a chunk of final logits instead of a
loss (:meth:`RowBackend.eval_rows`: loss, entropy, top-1 probability, Brier, rank of the target; one
definition, the torch backend's, which the CPU kernel computes in its one pass over each row);
:func:`eval_rows` picks the backend.

:func:`select` picks one: ``backend="auto"`` takes the first of :data:`AUTO_ORDER` that can serve the
call (environment variables such as ``XENT_CPU_KERNEL`` only change what "auto" may take, see
:mod:`xent._engine`); a named backend that cannot serve the call is a one-line ``ValueError`` saying why.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

from .. import _cpu_kernel
from ..losses._base import CrossEntropyRows, LogProbRows, TokenLoss

#: The loss sees a chunk a block of rows at a time, about this many bytes of float32 logits: the block
#: stays in cache across the loss's passes over it, and an autograd loss's temporaries are per block.
BLOCK_BYTES = 8 * 2**20


@dataclass(frozen=True)
class RowRequest:
    """What one fused call needs from a row backend; fixed for the call, the same for every chunk.

    loss: the :class:`xent.losses.TokenLoss` (the torch backend runs it; a kernel reads ``spec``).
    spec: the loss's closed form as a kernel can compute it (:class:`xent.losses._base.CrossEntropyRows`:
        class weights, label smoothing, z-loss coefficient, soft-cap; :class:`xent.losses._base.LogProbRows`:
        token log-probs, temperature, soft-cap, with or without the entropy), or None when only torch ops
        compute this loss (any loss that is not exactly :class:`xent.losses.CrossEntropy` or the token
        log-probs). A backend serves only the spec types it knows.
    logits_dtype: the dtype of the ``[C, V]`` chunks (the projection's): float32, bfloat16, float16 or
        float64.
    compute_dtype: the dtype of the losses, statistics and scales: float32 (float64 for float64 inputs).
    device: where the chunks live.
    grad: whether chunks come with an upstream ``scale`` (gradients wanted) in this pass.
    stats: whether the training statistics are wanted (a ``[C, 3]`` ``stats`` per chunk).
    bias_grad: whether the backend must accumulate the bias gradient (Σ over rows of the gradient).
    extra_heads: extra heads' logits ``[C, V]`` the loss takes after (logits, target), e.g. a teacher's.
    token_extras: per-token tensors the loss takes after those (a sparse teacher's ids and log-probs).
    num_outputs: values per token (1, or K > 1 with ``scale`` ``[C, K]``: log-probs with entropy).

    Ignored tokens never reach a backend: the engine drops them before the projection, so every target
    of a chunk is a class id in [0, V).
    """

    loss: TokenLoss
    spec: CrossEntropyRows | LogProbRows | None
    logits_dtype: torch.dtype
    compute_dtype: torch.dtype
    device: torch.device
    grad: bool = False
    stats: bool = False
    bias_grad: bool = False
    extra_heads: int = 0
    token_extras: int = 0
    num_outputs: int = 1


class RowBackend:
    """The interface. A backend is stateless; per-call scratch comes from :meth:`scratch`."""

    #: The name ``backend=`` takes.
    name: str = ""

    def can_serve(self, request: RowRequest) -> str | None:
        """None when this backend computes ``request`` exactly, else the reason it cannot (one line, e.g.
        "label smoothing is not implemented by the CPU kernel"), which a forced ``backend=`` raises."""
        raise NotImplementedError

    def scratch(self, request: RowRequest, max_rows: int, num_classes: int):
        """Per-call working memory, made once before the first chunk and passed to every
        :meth:`rows_` of the call (e.g. a float32 block for half logits); None when none is needed."""
        return None

    def rows_(self, request: RowRequest, z: torch.Tensor, target: torch.Tensor, scale: torch.Tensor | None, *,
              w_y: torch.Tensor | None = None, stats: torch.Tensor | None = None, extra: tuple = (),
              grad_bias: torch.Tensor | None = None, bias_alpha: float = 1.0, scratch=None) -> torch.Tensor:
        """One chunk, in place. Returns the per-token losses ``[C]`` (``[C, K]`` for K outputs) in the
        request's compute dtype (float32; float64 for float64 inputs).

        z: ``[C, V]`` logits in ``request.logits_dtype`` (float32, bfloat16 or float16 for a kernel), rows
            contiguous (``z.stride(1) == 1``; the row stride may exceed V). Overwritten: with ``scale``,
            on return z holds the gradient d(Σ_r scale_r·ℓ_r)/dz in z's dtype (formed in float32, then
            rounded); without ``scale`` its contents are undefined afterwards.
        target: ``[C]`` int64 class ids, all in [0, V).
        scale: ``[C]`` (``[C, K]``) upstream gradient per token in the compute dtype (the reduction's
            1/denominator, or the caller's per-token gradient, times the per-token weight w_t), or None
            for no gradient (losses and statistics only).
        w_y: ``[C]`` class weight of each row's target (the loss's ``spec.class_weight[target]``), None
            for all 1; the torch backend takes it from the loss itself.
        stats: ``[C, 3]`` contiguous, compute dtype: filled with each row's (correct, entropy, lse) of the
            soft-capped logits, as :func:`xent.losses._base.logit_stats` defines them; None: not wanted.
        extra: the loss's extra tensors for these rows: ``request.extra_heads`` ``[C, V]`` logits in
            ``logits_dtype``, then ``request.token_extras`` ``[C, ...]`` per-token tensors.
        grad_bias: ``[V]`` float accumulator when ``request.bias_grad``: += bias_alpha·Σ_rows gradient.
        bias_alpha: the factor the chunk's gradient carries into ``grad_bias`` (float16 chunks are formed
            at unit scale, see the loop).
        scratch: what :meth:`scratch` returned for this call.
        """
        raise NotImplementedError

    def fuses(self, request: RowRequest) -> bool:
        """Whether :meth:`fused_pass` computes this pass whole, the projection included, so that the loop
        forms no ``[C, V]`` logits at all. False by default."""
        return False

    def fused_pass(self, request: RowRequest, hidden: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None, target: torch.Tensor, scale: torch.Tensor | None,
                   need: tuple[bool, bool, bool], *, w_y: torch.Tensor | None = None,
                   stats: torch.Tensor | None = None, scratch=None) -> tuple:
        """A whole pass where :meth:`fuses` says so: (per-token losses ``[n]``, grad hidden ``[n, D]``,
        grad weight ``[V, D]``, grad bias ``[V]``), those the chunk loop would give with :meth:`rows_` for
        the logits ``hidden @ weight.T + bias``, computed without writing them. hidden ``[n, D]`` (the
        valid rows only), weight ``[V, D]`` and bias ``[V]`` in ``request.logits_dtype``; ``scale`` [n] or
        None (no gradient: the three gradients None); ``need`` which gradients are wanted (None for the
        others); gradients in float32; ``target``, ``w_y``, ``stats`` and ``scratch`` as in :meth:`rows_`,
        for all n rows."""
        raise NotImplementedError

    def can_eval(self, z: torch.Tensor) -> str | None:
        """None when :meth:`eval_rows` takes this chunk of final logits, else why not (one line)."""
        return f"the {self.name} backend computes no evaluation statistics"

    def eval_rows(self, z: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """The evaluation statistics (:data:`EVAL_STATS`) of each row of final logits ``z`` [C, V] float32
        (rows contiguous; only read) against ``target`` [C], class ids in
        [0, V), in the backend's one pass over each row. With q = softmax(z), m = max z and
        S = Σ_c exp(z_c − m), float32 [C] each:

        - ``loss`` −log q_y = (m − z_y) + log S;
        - ``entropy`` −Σ_c q_c log q_c = log S − Σ_c q_c (z_c − m) (a −inf logit adds 0);
        - ``top1_prob`` max_c q_c = 1/S (the ECE's confidence; top-1 correct is rank = 1);
        - ``brier`` Σ_c (q_c − [c = y])² = Σ_c q_c² − 2 q_y + 1;

        and ``rank`` [C] int64, 1 + #{c : z_c > z_y} (1 = most probable, ties in the target's favour), V + 1
        where the loss is not finite (so a row of NaN is never a top-k hit). A row with a NaN, +inf or only
        −inf logits gets NaN statistics. The torch backend is the reference definition; a kernel agrees
        with it to float32 rounding and gives the same ranks."""
        raise NotImplementedError

    def accumulate_(self, dst: torch.Tensor, src: torch.Tensor, alpha: float, fresh: bool) -> None:
        """``dst = (0 if fresh else dst) + alpha·src``: a float32 weight-gradient slice ``dst`` from a half
        product ``src`` (the loop's half weight gradient). Torch ops by default; a backend may do it in
        one pass."""
        if not fresh:
            dst.add_(src, alpha=alpha)
        elif alpha != 1.0:
            dst.copy_(src).mul_(alpha)
        else:
            dst.copy_(src)


def block_rows(num_classes: int, min_rows: int = 1) -> int:
    """Rows of a block of about :data:`BLOCK_BYTES` of float32 logits (at least ``min_rows``)."""
    return max(1, min_rows, BLOCK_BYTES // (4 * num_classes))


def row_blocks(rows: int, num_classes: int, min_rows: int = 1):
    """Slices of ``range(rows)``: as few blocks as :func:`block_rows` allows, of equal size (no small
    tail block)."""
    count = -(-rows // block_rows(num_classes, min_rows))
    step = -(-rows // count) if rows else 1
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


class TorchRows(RowBackend):
    """Any loss, in torch ops, a block of rows at a time (half blocks through a float32 copy): the loss's
    closed form (:meth:`xent.losses.TokenLoss.value_and_grad`, with the statistics from the same pass when
    it has :meth:`~xent.losses.TokenLoss.value_grad_stats`), else autograd on each block."""

    name = "torch"

    def can_serve(self, request: RowRequest) -> str | None:
        return None

    def scratch(self, request: RowRequest, max_rows: int, num_classes: int):
        if request.logits_dtype == request.compute_dtype:
            return None
        rows = min(max_rows, block_rows(num_classes, request.loss.min_block_rows))
        return torch.empty((rows, num_classes), dtype=request.compute_dtype, device=request.device)

    def rows_(self, request, z, target, scale, *, w_y=None, stats=None, extra=(), grad_bias=None,
              bias_alpha=1.0, scratch=None):
        loss, dt = request.loss, request.compute_dtype
        c, num_classes = z.shape
        per_token = torch.empty((c, *((request.num_outputs,) if request.num_outputs > 1 else ())), dtype=dt,
                                device=z.device)
        for blk in row_blocks(c, num_classes, loss.min_block_rows):
            zb, t = z[blk], target[blk]
            x = zb if scratch is None else scratch[: blk.stop - blk.start].copy_(zb)
            xe = [e[blk].to(dt) if i < request.extra_heads else e[blk] for i, e in enumerate(extra)]
            if scale is None:
                if stats is not None:
                    stats[blk] = loss.stats(x, t)
                per_token[blk] = loss(x, t, *xe)
                continue
            s = scale[blk]
            if loss.has_closed_form_grad and stats is not None:  # the statistics from the same pass
                value, g, stats[blk] = loss.value_grad_stats(x, t, s, *xe)  # g may overwrite x
            elif loss.has_closed_form_grad:
                value, g = loss.value_and_grad(x, t, s, *xe)  # g may overwrite x
            else:
                if stats is not None:
                    stats[blk] = loss.stats(x, t)
                with torch.enable_grad():
                    x = x.detach().requires_grad_(True)
                    value = loss(x, t, *xe)
                    (g,) = torch.autograd.grad(value, x, grad_outputs=s.to(value.dtype))
                value = value.detach()
            per_token[blk] = value
            if grad_bias is not None:
                grad_bias.add_(g.sum(dim=0), alpha=bias_alpha)
            if g.data_ptr() != zb.data_ptr():
                zb.copy_(g)  # the chunk's gradient, in the logits' dtype, where its logits were
        return per_token


    def can_eval(self, z):
        if z.dtype != torch.float32:
            return f"evaluation statistics take float32 logits, not {z.dtype}"
        return None

    @torch.no_grad()
    def eval_rows(self, z, target):
        # on the CPU a cache-sized block of rows at a time, so that the passes over a block run in cache
        blocks = row_blocks(*z.shape) if z.device.type == "cpu" else [slice(0, z.shape[0])]
        parts = [_eval_block(z[b], target[b]) for b in blocks]
        return {k: torch.cat([p[k] for p in parts]) for k in EVAL_STATS}


#: The evaluation statistics :meth:`RowBackend.eval_rows` returns, in this order.
EVAL_STATS = ("loss", "entropy", "top1_prob", "brier", "rank")


def _eval_block(x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """The reference definition of :meth:`RowBackend.eval_rows` on a block of rows x, in torch ops (x is
    only read: z = x − m and e = exp(z) are block-sized temporaries, in cache)."""
    V = x.shape[-1]
    m = x.amax(-1)  # [C]
    z_y = x.gather(-1, y[:, None]).squeeze(-1)
    e = torch.empty_like(x)
    # rank: 1 + count(x > z_y), the comparison written as 0/1 floats (exact below 2^24 classes), which
    # sums several times faster on the CPU than a bool tensor
    rank = torch.gt(x, z_y[:, None], out=e).sum(-1).long() + 1
    z = x - m[:, None]  # z − m ≤ 0: exp cannot overflow
    torch.exp(z, out=e)
    S = e.sum(-1)
    log_s = S.log()
    loss = (m - z_y) + log_s
    ez = torch.linalg.vecdot(e, z)  # Σ e (z − m)
    bad = ez.isnan() & torch.isfinite(m)  # a −inf logit: e = 0 times z − m = −inf; it adds nothing
    if bad.any():
        ez[bad] = torch.where(e[bad] > 0, e[bad] * z[bad], torch.zeros_like(z[bad])).sum(-1)
    q_y = torch.exp(z_y - m) / S
    # NaN compares false, so a row of NaN logits would rank its target first: a row whose loss is not
    # finite gets rank V + 1 (below every class), never a top-1 or top-5 hit
    rank = torch.where(torch.isfinite(loss), rank, torch.full_like(rank, V + 1))
    return {
        "loss": loss,
        "entropy": log_s - ez / S,
        "top1_prob": 1.0 / S,  # the max's e is exp(0) = 1
        "brier": torch.linalg.vecdot(e, e) / (S * S) - 2 * q_y + 1,
        "rank": rank,
    }


class CpuKernelRows(RowBackend):
    """Cross-entropy (class weights, z-loss) and token log-probs (temperature, with or without the
    entropy) on the CPU: one compiled C pass per chunk of float32 or bfloat16 logits
    (:func:`xent._cpu_kernel.ce_rows_`; log q_y is −cross-entropy of z/T, its gradient cross-entropy's
    scaled by −a/T), and the one-pass bfloat16 accumulation of the weight gradient
    (:func:`xent._cpu_kernel.accumulate_`). ``XENT_CPU_KERNEL=0`` disables it."""

    name = "cpu_kernel"

    def can_serve(self, request: RowRequest) -> str | None:
        spec = request.spec
        if not isinstance(spec, (CrossEntropyRows, LogProbRows)):
            return (f"the CPU kernel computes cross-entropy and token log-probs only, not "
                    f"{type(request.loss).__name__}")
        if isinstance(spec, CrossEntropyRows) and (spec.label_smoothing > 0.0 or spec.softcap is not None):
            return "the CPU kernel has no label smoothing or soft-capping"
        if spec.softcap is not None:
            return "the CPU kernel has no soft-capping"
        if request.device.type != "cpu":
            return f"the CPU kernel runs on the CPU, not {request.device.type}"
        if request.compute_dtype != torch.float32 or request.logits_dtype not in (torch.float32,
                                                                                  torch.bfloat16):
            return (f"the CPU kernel takes float32 or bfloat16 logits with float32 losses, not "
                    f"{request.logits_dtype} (projection dtype)")
        outputs = 2 if isinstance(spec, LogProbRows) and spec.with_entropy else 1
        if request.bias_grad or request.extra_heads or request.token_extras or request.num_outputs != outputs:
            return "the CPU kernel computes no bias gradient, extra heads or several outputs per token"
        if isinstance(spec, LogProbRows) and request.stats:
            return "the CPU kernel computes training statistics with cross-entropy only"
        if not _cpu_kernel.usable(request.device, request.logits_dtype, request.compute_dtype):
            return f"the CPU kernel is {_cpu_kernel.kernel_status()}"
        return None

    def rows_(self, request, z, target, scale, *, w_y=None, stats=None, extra=(), grad_bias=None,
              bias_alpha=1.0, scratch=None):
        spec = request.spec
        if isinstance(spec, CrossEntropyRows):
            return _cpu_kernel.ce_rows_(z, target, scale, w_y, spec.z_coef, stats)
        # log q_y = −CE(z/T): the kernel's cross-entropy of u = z/T, its gradient scaled by −a (the kernel
        # applies 1/T); with the entropy, the kernel's statistics hold H(q) and b scales its gradient
        a, b = (scale, None) if scale is None or not spec.with_entropy else (scale[:, 0], scale[:, 1])
        st = torch.empty((z.shape[0], 3), dtype=torch.float32) if spec.with_entropy else None
        nll = _cpu_kernel.ce_rows_(z, target, None if a is None else -a, None, 0.0, st,
                                   inv_temperature=1.0 / spec.temperature, entropy_scale=b)
        return nll.neg_() if st is None else torch.stack([nll.neg_(), st[:, 1]], dim=-1)

    def can_eval(self, z):
        if z.device.type != "cpu" or z.dtype != torch.float32 or z.stride(-1) != 1:
            return (f"the CPU kernel takes row-contiguous float32 logits on the CPU, not {z.dtype} on "
                    f"{z.device}")
        if not _cpu_kernel.usable(z.device, torch.float32, torch.float32):
            return f"the CPU kernel is {_cpu_kernel.kernel_status()}"
        return None

    def eval_rows(self, z, target):
        stats, rank = _cpu_kernel.eval_rows(z, target)
        return {**dict(zip(EVAL_STATS[:4], stats.unbind(0))), "rank": rank}

    def accumulate_(self, dst, src, alpha, fresh):
        if src.dtype != torch.bfloat16:
            return super().accumulate_(dst, src, alpha, fresh)
        _cpu_kernel.accumulate_(dst, src, alpha, fresh)


#: The backends by name; an optional one (module path) is imported the first time it is asked for: its
#: module defines ``BACKEND``, a :class:`RowBackend` instance whose ``name`` is the key.
BACKENDS: dict[str, RowBackend] = {"torch": TorchRows(), "cpu_kernel": CpuKernelRows()}
OPTIONAL = {"triton": "xent._triton._backend"}
UNAVAILABLE: dict[str, str] = {}  # optional backends that did not import, and why
#: What backend="auto" tries, in order: the first that can serve the call. The Triton backend is not in it
#: yet: it is proven under Triton's CPU interpreter and compiled for sm_90/sm_100, but has never run on a
#: GPU (docs/cuda.md); backend="triton" forces it. It joins "auto" once benchmarks/gpu_check.sh has run.
AUTO_ORDER = ("cpu_kernel", "torch")
NAMES = ("auto", *sorted({*BACKENDS, *OPTIONAL}))


def get(name: str) -> RowBackend | str:
    """The backend called ``name``, or why it is not available (an optional one that does not import)."""
    if name in BACKENDS:
        return BACKENDS[name]
    if name not in UNAVAILABLE:
        try:
            BACKENDS[name] = importlib.import_module(OPTIONAL[name]).BACKEND
            return BACKENDS[name]
        except ImportError as err:  # the module itself, or what it needs (triton), is not installed
            UNAVAILABLE[name] = f"the {name} backend is not available ({err})"
    return UNAVAILABLE[name]


def check_backend(backend) -> None:
    if not isinstance(backend, str) or backend not in NAMES:
        raise ValueError(f"backend must be one of {NAMES}, got {backend!r}")


def eval_rows(z: torch.Tensor, target: torch.Tensor, backend: str = "auto") -> dict[str, torch.Tensor]:
    """The evaluation statistics of a chunk of final logits (:meth:`RowBackend.eval_rows`) by ``backend``,
    or for "auto" the first of :data:`AUTO_ORDER` that takes the chunk (a named one that cannot: a
    one-line ValueError saying why)."""
    check_backend(backend)
    if backend != "auto":
        found = get(backend)
        reason = found if isinstance(found, str) else found.can_eval(z)
        if reason is not None:
            raise ValueError(f"backend={backend!r} cannot compute evaluation statistics here: {reason}")
        return found.eval_rows(z, target)
    for name in AUTO_ORDER:
        found = BACKENDS.get(name)
        if found is not None and found.can_eval(z) is None:
            return found.eval_rows(z, target)
    raise ValueError(f"no backend computes evaluation statistics of {z.dtype} logits")


def select(request: RowRequest, backend: str = "auto") -> RowBackend:
    """The row backend for ``request``: ``backend`` itself (a one-line ValueError naming why when it cannot
    serve the call), or for "auto" the first of :data:`AUTO_ORDER` that can."""
    if backend != "auto":
        found = get(backend)
        reason = found if isinstance(found, str) else found.can_serve(request)
        if reason is not None:
            raise ValueError(f"backend={backend!r} cannot serve this call: {reason}")
        return found
    for name in AUTO_ORDER:
        if name in OPTIONAL and name not in BACKENDS and request.device.type == "cpu":
            continue  # an optional (GPU) backend is not imported for a CPU call
        found = get(name)
        if not isinstance(found, str) and found.can_serve(request) is None:
            return found
    raise AssertionError("the torch backend serves every call")
