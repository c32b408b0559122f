"""EMO: earth mover distance to the one-hot target under a cosine cost between token embeddings.

docs/REFERENCE.md §3 is the contract. The V×V cost matrix is never built: for a one-hot target the
transport plan is forced, so DEMD = Σ_i q_i C(i, y) = 1 − (Êᵀq)·ê_y costs one [N, V] @ [V, d] product.
"""

from __future__ import annotations

import torch

from ._base import TokenLoss, exp_in_place
from ._focal import nll_of_target, plain_loss

MODES = ("demd", "emo1", "emo2")

# The papers' guard against dividing by a vanishing loss in the stop-gradient ratios (a division, not a
# log: it only matters when DEMD or the NLL is ~0, where the ratio's term contributes ~0 anyway).
_RATIO_EPS = 1e-10


class EMO(TokenLoss):
    r"""Earth Mover distance Optimisation (Ren et al., ICLR 2024, "EMO: Earth Mover Distance Optimization
    for Auto-Regressive Language Modeling", arXiv 2310.04691; code: DRSY/EMO).

    Cost C(i, j) = 1 − cos(e_i, e_j) from a frozen embedding E ``[V, d]`` (the paper: a copy of the LM
    head taken before fine-tuning; any matrix with the same V works). Ê is E with unit rows, computed
    once here; E gets no gradient. For the one-hot target y:

    .. math::
        \mathrm{DEMD} = \sum_i q_i\, C(i, y) = 1 - (\hat E^\top q)\cdot \hat e_y, \qquad
        \frac{\partial\,\mathrm{DEMD}}{\partial z_j} = q_j\,(C(j, y) - \mathrm{DEMD})

    DEMD alone sharpens q onto the neighbourhood of y, so the paper mixes it with MLE:

    - ``mode="emo1"`` (the paper's choice for language modelling and SFT):
      ℓ = ½·(mle + sg(mle/DEMD)·DEMD). Its value equals the cross-entropy; its gradient is half MLE's plus
      DEMD's rescaled to MLE's size. ``ratio_cap`` caps sg(mle/DEMD) (the PyPI package uses 3.0).
    - ``mode="emo2"``: ℓ = sg(DEMD/mle)·mle + DEMD (``ratio_cap`` caps sg(DEMD/mle)).
    - ``mode="demd"``: ℓ = DEMD.

    Computed in float32 whatever the input dtype (the reference code's bf16 path gives negative or NaN
    losses). A zero row of E has no direction: its token is at cost 1 from every token. On the fused path
    (:func:`xent.linear_loss`) the gradient is closed-form (:meth:`value_and_grad`): one [C, d] @ [d, V]
    product per chunk on top of cross-entropy's work.
    """

    def __init__(self, *, cost_embedding: torch.Tensor, mode: str = "emo1", ratio_cap: float | None = None,
                 softcap: float | None = None):
        super().__init__(softcap=softcap)
        if not isinstance(cost_embedding, torch.Tensor) or not cost_embedding.is_floating_point():
            raise TypeError(
                "cost_embedding must be a floating-point tensor of shape [V, d], got "
                f"{type(cost_embedding).__name__}"
                + (f" of dtype {cost_embedding.dtype}" if isinstance(cost_embedding, torch.Tensor) else "")
            )
        if cost_embedding.dim() != 2 or cost_embedding.shape[1] < 1:
            raise ValueError(
                f"cost_embedding must have shape [V, d], got shape {tuple(cost_embedding.shape)}"
            )
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if ratio_cap is not None:
            if mode == "demd":
                raise ValueError("ratio_cap applies to modes 'emo1' and 'emo2'; got mode='demd'")
            if not ratio_cap > 0.0:
                raise ValueError(f"ratio_cap must be None or > 0, got {ratio_cap}")
        with torch.no_grad():
            e = cost_embedding.detach()
            e = e.to(torch.float64 if e.dtype == torch.float64 else torch.float32)
            # Unit rows; a zero row stays zero (F.normalize divides by max(‖e‖, 1e-12)).
            self.unit_embedding = torch.nn.functional.normalize(e, dim=1)  # Ê [V, d]
        self.mode = mode
        self.ratio_cap = None if ratio_cap is None else float(ratio_cap)

    def check(self, num_classes: int) -> None:
        if self.unit_embedding.shape[0] != num_classes:
            raise ValueError(
                f"cost_embedding must have shape [V, d] with V = {num_classes} (the logits' vocabulary), "
                f"got shape {tuple(self.unit_embedding.shape)}"
            )

    def _unit_embedding_like(self, logits: torch.Tensor) -> torch.Tensor:
        """Ê on the logits' device and dtype, converted once and kept: the fused path calls this per chunk,
        and copying a [V, d] matrix to the GPU every chunk would cost more than the loss."""
        e = self.unit_embedding
        if e.device == logits.device and e.dtype == logits.dtype:
            return e
        cached = getattr(self, "_converted", None)
        if cached is None or cached.device != logits.device or cached.dtype != logits.dtype:
            cached = self._converted = e.to(device=logits.device, dtype=logits.dtype)
        return cached

    def demd(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """DEMD per token, [...]; logits [..., V], target [...]."""
        e = self._unit_embedding_like(logits)  # Ê [V, d], no grad
        q = torch.softmax(logits, dim=-1)  # [..., V]
        expected = q @ e  # Êᵀq per token [..., d]
        similarity = (expected * e[target]).sum(dim=-1)  # (Êᵀq)·ê_y ∈ [−1, 1]
        # 1 − s is ≥ 0 in exact arithmetic; rounding can leave −1e-7 when q sits on y, which would flip
        # the sign of the ratios below. The clamp keeps the gradient wherever DEMD > 0.
        return (1.0 - similarity).clamp(min=0.0)

    def _ratio(self, mle: torch.Tensor, demd: torch.Tensor) -> torch.Tensor:
        """The stop-gradient ratio that rescales one term to the other's size (already detached)."""
        num, den = (mle, demd) if self.mode == "emo1" else (demd, mle)
        ratio = (num / (den + _RATIO_EPS)).detach()
        return ratio if self.ratio_cap is None else ratio.clamp(max=self.ratio_cap)

    def token_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        demd = self.demd(logits, target)
        if self.mode == "demd":
            return demd
        mle = nll_of_target(logits, target)
        ratio = self._ratio(mle, demd)
        if self.mode == "emo1":
            return 0.5 * (mle + ratio * demd)
        return ratio * mle + demd

    has_closed_form_grad = True
    # its [R, d] @ [d, V] cost product: at R = 64 it runs at 61 % of its R = 512 speed (d = 512, V = 32000)
    min_block_rows = 512

    def value_and_grad(self, logits: torch.Tensor, target: torch.Tensor, scale: torch.Tensor):
        """Closed form for the fused path: logits [N, V] are overwritten; one [N, V] cost buffer more.

        With c_j = C(j, y) = 1 − ê_j·ê_y (one [N, d] @ [d, V] product), DEMD = Σ_j q_j c_j and every mode
        has the gradient q ⊙ (a + b·(c − DEMD)) − a·onehot_y: (a, b) = (½, ½r) for emo1, (r, 1) for emo2,
        (0, 1) for demd, r the stop-gradient ratio. Soft-capping adds the factor 1 − (z/c)².
        """
        rows, tanh, q, sumexp, _, mle, _ = exp_in_place(logits, target, self.softcap)
        q.div_(sumexp.unsqueeze(-1))  # softmax [N, V], in the logits' buffer
        e = self._unit_embedding_like(logits)
        cost = torch.addmm(torch.ones((), dtype=q.dtype, device=q.device), e[target], e.t(), alpha=-1.0)
        # Σ_j q_j c_j as a batched dot product (no third [N, V] temporary); clamped as in demd().
        demd = (q.unsqueeze(1) @ cost.unsqueeze(2)).reshape(-1).clamp(min=0.0)
        if self.mode == "demd":
            value, a, b = demd, torch.zeros_like(demd), torch.ones_like(demd)
        else:
            ratio = self._ratio(mle, demd)
            if self.mode == "emo1":
                value, a, b = 0.5 * (mle + ratio * demd), torch.full_like(demd, 0.5), 0.5 * ratio
            else:
                value, a, b = ratio * mle + demd, ratio, torch.ones_like(demd)
        a, b = a * scale, b * scale
        grad = cost.sub_(demd.unsqueeze(-1)).mul_(b.unsqueeze(-1)).add_(a.unsqueeze(-1)).mul_(q)
        grad[rows, target] -= a
        if tanh is not None:
            grad.mul_(1.0 - tanh.square_())
        return value, grad


def emo_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    cost_embedding: torch.Tensor,
    mode: str = "emo1",
    ratio_cap: float | None = None,
    softcap: float | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items=None,
    token_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """EMO loss of logits ``[..., V]`` against ids ``[...]`` with a frozen ``cost_embedding`` ``[V, d]``.

    Formula, modes and settings in :class:`EMO`. For a training loop, build ``xent.losses.EMO`` once:
    this function row-normalises ``cost_embedding`` on every call. ``ignore_index``, ``reduction``,
    ``num_items`` and ``token_weights`` behave exactly as in :func:`xent.cross_entropy`.

    Example:
        >>> import torch, xent
        >>> x = torch.tensor([[2.0, 1.0, 0.1], [0.5, 2.5, 0.3], [1.5, 0.5, 2.0]])
        >>> e = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
        >>> round(xent.emo_loss(x, torch.tensor([0, -100, 2]), cost_embedding=e, mode="demd").item(), 6)
        0.202057
    """
    loss = EMO(cost_embedding=cost_embedding, mode=mode, ratio_cap=ratio_cap, softcap=softcap)
    return plain_loss(loss, logits, target, ignore_index=ignore_index, reduction=reduction,
                      num_items=num_items, token_weights=token_weights)
