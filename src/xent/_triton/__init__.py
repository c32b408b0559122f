"""xent's Triton kernels: the fused head's CUDA backend (docs/cuda.md says what has run where).

triton is imported only when a kernel is first called, so ``import xent`` stays light and works without
it. The kernels run on CUDA tensors, or on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``
set before triton is first imported), which is how the tests prove them against float64 on a machine
without a GPU (tests/triton/).

- :func:`ce_rows_`: the row kernel, cross-entropy rows of a chunk of logits after the projection, the
  gradient written in place; the same contract as the C kernel's :func:`xent._cpu_kernel.ce_rows_`, plus
  soft-capping and label smoothing.
- :func:`fused_ce_forward`: the no-grad forward with the projection fused in: the losses (and
  statistics) of ``h @ W.T + bias`` without writing any logits.
- :func:`fused_ce_backward`: the gradients of those losses with respect to h, W and the bias, the logits
  recomputed tile by tile (two kernels, no atomics), none written.
- :func:`available`: whether triton can be imported and run here, and why not.
"""

from __future__ import annotations

import importlib.util
import os

import torch

__all__ = ["available", "ce_rows_", "fused_ce_backward", "fused_ce_forward", "interpreted"]


def interpreted() -> bool:
    """Whether Triton's CPU interpreter runs the kernels (``TRITON_INTERPRET`` set to a true value)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def available(device: torch.device | str | None = None) -> tuple[bool, str]:
    """(usable, reason): whether the Triton kernels can run on ``device`` (CUDA; or the CPU under the
    interpreter)."""
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install triton, or xent[test])"
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cpu" and not interpreted():
        return False, "CPU tensors run the Triton kernels only under TRITON_INTERPRET=1"
    if dev is not None and dev.type not in ("cpu", "cuda"):
        return False, f"Triton kernels run on CUDA (or the CPU interpreter), not {dev.type}"
    return True, "interpreter" if interpreted() else "compiled"


def _check_float(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")


def ce_rows_(z: torch.Tensor, target: torch.Tensor, scale: torch.Tensor | None, w_y: torch.Tensor | None,
             z_coef: float, stats: torch.Tensor | None = None, *, softcap: float | None = None,
             label_smoothing: float = 0.0, class_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of each row of ``z`` [C, V] (float32, bfloat16 or float16, rows contiguous), with,
    when ``scale`` [C] is given, its gradient written over ``z`` in ``z``'s dtype. Returns the float32
    losses [C]:

        ℓ_r = (1−ε)·a_r·(lse_r − z_{r,y}) + (ε/V)·Σ_c w_c·(lse_r − z_{r,c}) + z_coef·lse_r²
        ∂ℓ_r/∂z_{r,j} · scale_r = scale_r·(p_j·((1−ε)a_r + (ε/V)Σw + 2·z_coef·lse_r)
                                  − (1−ε)a_r·[j = y_r] − (ε/V)·w_j)

    a_r = ``w_y[r]`` (the class weight of the target; 1 without), w = ``class_weight`` [V] (1 without;
    only read with label smoothing ε > 0, which then needs it whenever ``w_y`` is given), z first
    soft-capped (z ← c·tanh(z/c), the gradient times 1 − tanh²) when ``softcap`` = c. ``target`` [C]
    holds in-range ids (no ignored rows: the engine drops them before the projection). ``scale`` None:
    the losses alone, ``z`` untouched. ``stats``: a contiguous float32 [C, 3] filled with each row's
    (correct, entropy, lse) of :func:`xent.losses._base.logit_stats` (of the capped logits). A row with
    a NaN, or whose capped maximum is ±inf, gets NaN everywhere (as the C kernel). Computed in float32;
    bf16 gradients rounded to nearest even.
    """
    if not isinstance(z, torch.Tensor) or z.dim() != 2:
        raise ValueError(f"z must be a 2-D tensor [C, V], got {getattr(z, 'shape', type(z).__name__)}")
    if z.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"z must be float32, bfloat16 or float16, got {z.dtype}")
    rows, num_classes = z.shape
    if z.stride(1) != 1 and num_classes > 1:
        raise ValueError(f"z's rows must be contiguous, got strides {tuple(z.stride())}")
    ok, why = available(z.device)
    if not ok:
        raise RuntimeError(f"the Triton row kernel cannot run here: {why}")
    _check_rows(rows, num_classes, target, w_y, z_coef, stats, softcap, label_smoothing, class_weight)
    if scale is not None and tuple(scale.shape) != (rows,):
        raise ValueError(f"scale must be [{rows}], got {tuple(scale.shape)}")
    from . import _rows  # imports triton

    scale = None if scale is None else scale.to(torch.float32)  # an expanded scalar stays one (stride 0)
    target, w_y, class_weight = _as_kernel_args(target, w_y, class_weight, z.device)
    return _rows.launch(z, target, scale, w_y, float(z_coef), stats, softcap, float(label_smoothing),
                        class_weight)


def _check_rows(rows, num_classes, target, w_y, z_coef, stats, softcap, label_smoothing, class_weight):
    """The checks the row kernel and the fused forward share: one line naming the bad argument."""
    if tuple(target.shape) != (rows,):
        raise ValueError(f"target must be [{rows}], got {tuple(target.shape)}")
    _check_float("z_coef", z_coef)
    _check_float("label_smoothing", label_smoothing)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if softcap is not None:
        _check_float("softcap", softcap)
        if not softcap > 0.0:
            raise ValueError(f"softcap must be > 0, got {softcap}")
    if label_smoothing > 0.0 and w_y is not None and class_weight is None:
        raise ValueError("label smoothing with class weights (w_y) needs class_weight [V]")
    for name, t, shape in (("w_y", w_y, (rows,)), ("class_weight", class_weight, (num_classes,))):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} must be {list(shape)}, got {tuple(t.shape)}")
    if stats is not None and (stats.dtype != torch.float32 or not stats.is_contiguous()
                              or tuple(stats.shape) != (rows, 3)):
        raise ValueError(f"stats must be a contiguous float32 [{rows}, 3], got {stats.dtype} "
                         f"{tuple(stats.shape)}")


def _as_kernel_args(target, w_y, class_weight, device):
    f32 = torch.float32
    target = target.to(torch.int64).contiguous()
    w_y = None if w_y is None else w_y.to(f32).contiguous()
    class_weight = None if class_weight is None else class_weight.to(device=device, dtype=f32).contiguous()
    return target, w_y, class_weight


def _check_head(h, w, bias, input_precision, what: str) -> None:
    """The checks the fused forward and backward share on h [N, D], w [V, D], bias [V] and the precision."""
    for name, t in (("h", h), ("w", w)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D tensor, got {getattr(t, 'shape', type(t).__name__)}")
        if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
        if t.stride(1) != 1:
            raise ValueError(f"{name}'s rows must be contiguous, got strides {tuple(t.stride())}")
    if w.dtype != h.dtype or w.shape[1] != h.shape[1]:
        raise ValueError(f"w must be [V, {h.shape[1]}] in {h.dtype}, got {tuple(w.shape)} in {w.dtype}")
    if bias is not None and (bias.dtype != h.dtype or tuple(bias.shape) != (w.shape[0],)
                             or not bias.is_contiguous()):
        raise ValueError(f"bias must be a contiguous [{w.shape[0]}] in {h.dtype}, got "
                         f"{tuple(bias.shape)} in {bias.dtype}")
    if input_precision not in (None, "ieee", "tf32"):
        raise ValueError(f"input_precision must be None, 'ieee' or 'tf32', got {input_precision!r}")
    ok, why = available(h.device)
    if not ok:
        raise RuntimeError(f"the Triton {what} cannot run here: {why}")


def fused_ce_forward(h: torch.Tensor, w: torch.Tensor, target: torch.Tensor,
                     w_y: torch.Tensor | None = None, z_coef: float = 0.0,
                     stats: torch.Tensor | None = None, *, bias: torch.Tensor | None = None,
                     softcap: float | None = None, label_smoothing: float = 0.0,
                     class_weight: torch.Tensor | None = None,
                     input_precision: str | None = None) -> torch.Tensor:
    """The losses of :func:`ce_rows_` (no gradient) of the logits ``h @ w.T + bias``, computed without
    writing them: the projection and the online log-sum-exp run in one kernel. ``h`` [C, D] and ``w``
    [V, D] (and ``bias`` [V]) in one dtype, float32, bfloat16 or float16, rows contiguous; the products
    are summed in float32. ``input_precision`` for float32 inputs: "ieee" (exact products) or "tf32"
    (a GPU's tensor cores: operands rounded to a 10-bit mantissa, ~1e-3 relative); by default "tf32"
    exactly when torch's own float32 matmuls may use it (``torch.get_float32_matmul_precision()`` is not
    "highest"), so the result is that of projecting with torch, then :func:`ce_rows_`. Returns the
    float32 losses [C]; ``stats`` as in :func:`ce_rows_`.
    """
    _check_head(h, w, bias, input_precision, "fused forward")
    rows = h.shape[0]
    _check_rows(rows, w.shape[0], target, w_y, z_coef, stats, softcap, label_smoothing, class_weight)
    from . import _fused  # imports triton

    target, w_y, class_weight = _as_kernel_args(target, w_y, class_weight, h.device)
    # bf16 dots on bf16 operands on a GPU; under the interpreter (whose bf16 dot is wrong) the same
    # exact products in float32
    return _fused.launch(h, w, bias, target, w_y, float(z_coef), stats, softcap, float(label_smoothing),
                         class_weight, _tf32(input_precision), not interpreted())


def _tf32(input_precision: str | None) -> bool:
    """Whether float32 dots run in TF32: as asked, else as torch's own float32 matmuls would."""
    if input_precision is None:
        return torch.get_float32_matmul_precision() != "highest"
    return input_precision == "tf32"


def fused_ce_backward(h: torch.Tensor, w: torch.Tensor, target: torch.Tensor, lse: torch.Tensor,
                      scale: torch.Tensor, w_y: torch.Tensor | None = None, z_coef: float = 0.0, *,
                      bias: torch.Tensor | None = None, softcap: float | None = None,
                      label_smoothing: float = 0.0, class_weight: torch.Tensor | None = None,
                      input_precision: str | None = None, need: tuple[bool, bool, bool] = (True, True, True)):
    """The gradients of Σ_r scale_r·ℓ_r, the losses ℓ of :func:`fused_ce_forward` (the same arguments),
    with respect to ``h``, ``w`` and ``bias``, recomputing the logits tile by tile: no logits and no
    gradient of them are written (:mod:`xent._triton._backward`). ``lse`` [N]: each row's log-sum-exp of
    the (capped) logits, as the forward's ``stats[:, 2]`` gives it; ``scale`` [N]: the upstream gradient
    of each row. ``need``: which of (grad h, grad w, grad bias) to compute. Returns float32
    (grad_h [N, D], grad_w [V, D], grad_bias [V]), None for those not wanted (grad_bias also without a
    bias); the weight and bias gradients are accumulated in float32. A row with a NaN ``lse`` gets NaN
    gradients. ``input_precision`` as in :func:`fused_ce_forward`, for the recomputed logits and the
    gradient products (which run in TF32 for half inputs: exact for their values, g rounded to 10 bits).
    """
    _check_head(h, w, bias, input_precision, "fused backward")
    rows, num_classes = h.shape[0], w.shape[0]
    _check_rows(rows, num_classes, target, w_y, z_coef, None, softcap, label_smoothing, class_weight)
    for name, t in (("lse", lse), ("scale", scale)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (rows,):
            raise ValueError(f"{name} must be a tensor [{rows}], got {getattr(t, 'shape', type(t).__name__)}")
    if not (isinstance(need, tuple) and len(need) == 3 and all(isinstance(x, bool) for x in need)):
        raise TypeError(f"need must be a tuple of three bools, got {need!r}")
    from . import _backward  # imports triton

    f32 = torch.float32
    target, w_y, class_weight = _as_kernel_args(target, w_y, class_weight, h.device)
    lse, scale = lse.to(f32).contiguous(), scale.to(f32)
    eps = float(label_smoothing)
    smooth = eps > 0.0
    a = torch.ones_like(lse) if w_y is None else w_y
    wsum = class_weight.sum() if smooth and class_weight is not None else float(num_classes)
    # the row kernel's factors, per row: p·pc − [j = y]·gy − w_j·gw
    pc = (scale * ((1.0 - eps) * a + (eps / num_classes) * wsum + 2.0 * float(z_coef) * lse)).contiguous()
    gy = (scale * (1.0 - eps) * a).contiguous()
    gw = (scale * (eps / num_classes)).contiguous()
    return _backward.launch(h, w, bias, target, lse, pc, gy, gw, class_weight, softcap, smooth,
                            _tf32(input_precision), not interpreted(), need)
