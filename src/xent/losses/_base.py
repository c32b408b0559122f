"""The per-token loss protocol: the unit every xent loss is written in.

A :class:`TokenLoss` maps float32 (or float64) logits ``[..., V]`` and in-range target ids ``[...]`` to
per-token losses ``[...]``. It knows nothing of ignored tokens, reductions or chunking: the plain path
(:func:`xent._reduce.apply_token_loss`) and the fused path (:func:`xent.linear_loss`) both call the same
object, so a loss written once is fused for free.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import _validate as V


@dataclass(frozen=True)
class CrossEntropyRows:
    """A loss's declaration that it is exactly cross-entropy with these options, so a row backend with a
    closed form of its own (a compiled kernel) may compute it instead of the loss's torch code:

    ℓ = (1−ε)·w_y·(lse z − z_y) + (ε/V)·Σ_c w_c (lse z − z_c) + z_coef·(lse z)², z ← c·tanh(z/c) first.

    class_weight: ``[V]`` w_c or None (all 1). label_smoothing: ε. z_coef: the z-loss coefficient as the
    rows see it (the option times a class-weighted mean's count scale; a float, or a 0-d float32 tensor
    under a class-weighted mean, read with ``float()`` by a backend that needs a number). softcap: c or
    None."""

    class_weight: torch.Tensor | None
    label_smoothing: float
    z_coef: float | torch.Tensor
    softcap: float | None


@dataclass(frozen=True)
class LogProbRows:
    """A loss's declaration that it is exactly the token log-probability (with ``with_entropy``, also the
    entropy) of q = softmax(cap(z)/T), so a row backend with a closed form of its own may compute it:

    values log q_y = −(lse u − u_y) (and H(q) = −Σ_c q_c log q_c), u = cap(z)/T; for upstream gradients a
    (of log q_y) and b (of H) the gradient w.r.t. u is a·(onehot_y − q) − b·q ⊙ (log q + H), then times
    1/T (and 1 − tanh²(z/c) under soft-capping), i.e. cross-entropy's row gradient of u scaled by −a/T,
    plus the entropy's.

    temperature: T > 0. softcap: c or None. with_entropy: whether each token has the two values
    (log q_y, H) and a ``[C, 2]`` upstream scale."""

    temperature: float
    softcap: float | None
    with_entropy: bool


class TokenLoss:
    """Base class. Subclasses implement :meth:`token_loss`; options live on the instance.

    ``softcap`` (Gemma 2) is applied here, before the loss sees the logits: z ← c·tanh(z/c).
    """

    #: Extra per-token tensors the loss takes after (logits, target), e.g. teacher logits.
    num_extra: int = 0
    #: Values per token: K > 1 returns ``[..., K]`` and takes a ``[..., K]`` upstream ``scale`` (token
    #: log-probs with their entropy, :func:`xent.linear_log_probs`); the reductions take K = 1 only.
    num_outputs: int = 1
    #: The z-loss coefficient s of the loss's s·(logsumexp z)² term, 0 for losses without one: the
    #: training statistics (``return_stats``) report Σ s·lse² with it.
    z_loss: float = 0.0
    #: The fused path hands the loss a chunk a cache-sized block of rows at a time; a loss that runs a
    #: matmul of its own per block (EMO's costs) asks for at least this many rows, for BLAS efficiency.
    min_block_rows: int = 1

    def __init__(self, *, softcap: float | None = None):
        V.check_options(softcap=softcap)
        self.softcap = softcap

    def __call__(self, logits: torch.Tensor, target: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        if self.softcap is not None:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        return self.token_loss(logits, target, *extra)

    def token_loss(self, logits: torch.Tensor, target: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def token_weight(self, target: torch.Tensor) -> torch.Tensor | None:
        """Per-token class weight w_y in the denominator of reduction="mean"; None means 1. (Per-token
        weights w_t are the caller's, applied by the reduction and the fused engine: no loss sees them.)"""
        return None

    def row_spec(self) -> CrossEntropyRows | LogProbRows | None:
        """What a row backend other than torch ops may compute in this loss's place: a
        :class:`CrossEntropyRows` when the loss is exactly that cross-entropy, a :class:`LogProbRows` when it
        is exactly the token log-probability, else None (the default: only the loss's own torch code
        computes it). A backend serves only the spec types it knows."""
        return None

    def check(self, num_classes: int) -> None:
        """Validates options that depend on the vocabulary size (e.g. a class-weight length)."""

    def for_mean(self, count_scale: torch.Tensor) -> TokenLoss:
        """The loss to use under a class-weighted reduction="mean", whose denominator is Σ_valid w_y.

        ``count_scale`` = Σ_valid w_t·w_y / Σ_valid w_t (w_t the per-token weights, 1 without them: then
        Σ_valid w_y / the count of valid tokens). A term that must be averaged over the valid tokens rather
        than over Σ w_t·w_y (cross-entropy's z-loss) is multiplied by it, so Σ w_t·ℓ / Σ w_t·w_y gives that
        term's w_t-weighted mean. Losses without such a term return themselves."""
        return self

    # A closed-form gradient, when a loss has one, lets the fused path skip autograd.
    has_closed_form_grad: bool = False

    def value_and_grad(self, logits: torch.Tensor, target: torch.Tensor, scale: torch.Tensor, *extra):
        """Returns (per-token loss [N], d(Σ scale·loss)/d logits [N, V]); may overwrite ``logits``.
        ``extra``: the loss's extra per-token tensors, as :meth:`token_loss` takes them."""
        raise NotImplementedError

    def stats(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-token training statistics [..., 3] (correct, entropy, lse; :data:`xent._stats.STAT_COLUMNS`)
        of the logits this loss sees (soft-capped), without gradient; ``logits`` is left alone."""
        with torch.no_grad():
            z = logits if self.softcap is None else self.softcap * torch.tanh(logits / self.softcap)
            return logit_stats(z, target)

    def value_grad_stats(self, logits: torch.Tensor, target: torch.Tensor, scale: torch.Tensor, *extra):
        """:meth:`value_and_grad` plus :meth:`stats` [N, 3]; a loss that has the softmax's parts at hand in
        its closed form overrides it to compute them in the same pass (cross-entropy)."""
        stats = self.stats(logits, target)  # before value_and_grad overwrites the logits
        return (*self.value_and_grad(logits, target, scale, *extra), stats)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not isinstance(v, torch.Tensor))
        return f"{type(self).__name__}({opts})"


def cap_in_place(logits: torch.Tensor, softcap: float | None):
    """z ← c·tanh(z/c) in the buffer itself; returns (logits, tanh or None), tanh kept for the chain rule
    factor 1 − tanh² of a closed-form gradient."""
    if softcap is None:
        return logits, None
    tanh = torch.tanh(logits / softcap)
    return torch.mul(tanh, softcap, out=logits), tanh


def row_max(logits: torch.Tensor) -> torch.Tensor:
    """m = max_c z_c [..., 1], the shift of every log-sum-exp here; no gradient flows through it (the
    results do not depend on it). A row of all −inf gets 0 (its log-sum-exp stays −inf); a row holding +inf
    keeps m = +inf, so z − m is NaN there and its loss and gradient are NaN, as torch's cross_entropy gives
    them (and the CPU kernel), never +inf."""
    m = logits.detach().amax(dim=-1, keepdim=True)
    return torch.where(m == float("-inf"), torch.zeros_like(m), m)


class _LogSumExpAbout(torch.autograd.Function):
    """rel = log Σ_c exp(z_c − m) about a constant shift m [..., 1]. Autograd would keep the [..., V]
    temporary z − m for backward; this keeps only z (alive anyway) and m, and forms the gradient
    softmax(z) = exp((z − m) − rel) when it is needed. Under create_graph rel is recomputed from z, so a
    double backward (a gradient penalty) differentiates through it exactly."""

    @staticmethod
    def forward(ctx, z, m):
        rel = torch.logsumexp(z - m, dim=-1)
        ctx.save_for_backward(z, m, rel)
        return rel

    @staticmethod
    def backward(ctx, grad):
        z, m, rel = ctx.saved_tensors
        if torch.is_grad_enabled():
            rel = torch.logsumexp(z - m, dim=-1)
        return grad.unsqueeze(-1) * torch.exp((z - m) - rel.unsqueeze(-1)), None


def nll_and_shift(logits: torch.Tensor, target: torch.Tensor):
    """(−log q_y, m, rel) per token for logits [..., V] and in-range ids [...]: m the row max and
    rel = log Σ_c exp(z_c − m), so lse z = m + rel (use rel itself where lse − m is wanted).

    −log q_y = (m − z_y) + log Σ_c exp(z_c − m): both parts are small where the logits are large, so the
    precision does not fall as the logits grow (lse − z_y loses the digits of lse: at an offset of 1e4,
    5e-4 in float32). A row of equal values gives exactly log V."""
    m = row_max(logits)
    rel = _LogSumExpAbout.apply(logits, m)  # log Σ exp(z − m) ∈ [0, log V]
    m = m.squeeze(-1)
    z_y = logits.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return (m - z_y) + rel, m, rel


def logit_stats(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(correct, H(q), logsumexp z) per token [..., 3] of logits [..., V] and in-range ids [...].

    correct = 1 where z_y is a maximum of the row (ties count as correct: no logit exceeds z_y, rank 1),
    else 0. The one definition behind ``return_stats``; the fused cross-entropy computes the same in its
    closed form's pass (:meth:`xent.losses.CrossEntropy.value_grad_stats`)."""
    nll, m, rel = nll_and_shift(logits, target)
    z_y = logits.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    correct = (z_y >= logits.amax(dim=-1)).to(logits.dtype)
    return torch.stack([correct, entropy(logits, m, rel), m + rel], dim=-1)


def check_first_order(what: str) -> None:
    """Called in a closed-form backward: under create_graph=True (a double backward, e.g. a gradient
    penalty) the returned gradient would have no graph and the second-order term would be silently 0."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{what} computes its gradient in closed form and is first-order only: it cannot differentiate "
            "twice (backward with create_graph=True). Use the plain path on materialised logits for a "
            "gradient penalty or other double backward."
        )


def exp_in_place(logits: torch.Tensor, target: torch.Tensor, softcap: float | None, centred: bool = False,
                 w: torch.Tensor | None = None, stats: bool = False):
    """The shared start of a closed-form gradient on a [N, V] chunk, which it overwrites.

    Caps (z ← c·tanh(z/c)), then turns the buffer into e = exp(z − m), m = max z. Returns (rows, tanh or
    None (for the chain factor 1 − tanh²), e [N, V], Σe [N], lse [N], −log q_y [N], centred [N] or None)
    with −log q_y = (m − z_y) + log Σe (no cancellation at large logits) and, when asked, the centred
    sum Σ_c w_c (z_c − m) (w = 1 without ``w``) for label smoothing, formed before the exponential.

    With ``stats`` an eighth value: the training statistics [N, 3] (correct, H(q), lse) of
    :func:`logit_stats`, from the same pass: correct is s_y = 0 (z_y is a maximum), and
    H = log Σe − Σ_c e_c s_c / Σe with s = z − m needs e beside s, so e is formed in a temporary block,
    dotted with s row by row, and copied back into the buffer (two in-cache passes more).
    """
    rows = torch.arange(logits.shape[0], device=logits.device)
    logits, tanh = cap_in_place(logits, softcap)
    z_y = logits[rows, target]
    m = row_max(logits)
    shifted = logits.sub_(m)  # in place: the logits are not needed past this point
    summed = None
    if centred:
        summed = shifted.sum(dim=-1) if w is None else shifted @ w
    if stats:
        s = floored(shifted)  # finite, so 0·s = 0 where e = 0 (a −inf logit)
        e_tmp = torch.exp(s)
        sumexp = e_tmp.sum(dim=-1)
        mean_s = (e_tmp.unsqueeze(1) @ s.unsqueeze(2)).reshape(-1) / sumexp  # Σ q s ≤ 0, a batched dot
        correct = (s[rows, target] == 0).to(s.dtype)
        e = s.copy_(e_tmp)
        del e_tmp
    else:
        e = shifted.exp_()
        sumexp = e.sum(dim=-1)
    rel = sumexp.log()
    m = m.squeeze(-1)
    out = (rows, tanh, e, sumexp, m + rel, (m - z_y) + rel, summed)
    if stats:
        return (*out, torch.stack([correct, rel - mean_s, m + rel], dim=-1))
    return out


def floored(s: torch.Tensor) -> torch.Tensor:
    """s = z − m in place with −inf (a masked logit) floored at the dtype's lowest finite value: exp(s)
    stays exactly 0, and products with s stay finite (0·s = 0, never 0·(−inf) = NaN)."""
    return s.clamp_(min=torch.finfo(s.dtype).min)


def entropy(logits: torch.Tensor, m: torch.Tensor, rel: torch.Tensor) -> torch.Tensor:
    """H(q) = −Σ q log q per token, differentiable, for logits [..., V] with m their row max and
    rel = log Σ exp(z − m) [...] (as :func:`nll_and_shift` gives them).

    Formed as rel − Σ q·s with s = z − m ≤ 0: non-negative parts, no cancellation. A −inf logit has
    q = 0 and adds 0·log 0 = 0, with a zero gradient whatever the upstream gradient."""
    s = floored(logits - m.unsqueeze(-1))
    q = torch.exp(s - rel.unsqueeze(-1))
    qs = torch.where(q > 0, q * s, torch.zeros_like(s))  # a finite 0 (not huge·0) where q = 0
    return rel - qs.sum(dim=-1)


def log_prob_entropy_and_grad(logits, target, softcap, temperature, a, b=None):
    """The shared closed form of token log-probs, entropy regularisation and their mixtures.

    On a [N, V] chunk of raw logits (overwritten with the gradient), with q = softmax(cap(z)/T):
    returns (log q_y [N], H(q) [N] or None when ``b`` is None, d(Σ a·log q_y + b·H)/dz [N, V]) for
    per-token coefficients a, b [N]. With u = cap(z)/T and s = u − max u:

        ∂log q_y/∂u = onehot_y − q,   ∂H/∂u_i = −q_i (log q_i + H),   log q_i + H = s_i − Σ_j q_j s_j,

    so the gradient is a·onehot − b·(q⊙s) − q·(a − b·Σ q s) (q⊙s is finite where q = 0), times 1/T and,
    under soft-capping, 1 − tanh²(z/c). The entropy needs one more [N, V] block (q beside s).
    """
    rows = torch.arange(logits.shape[0], device=logits.device)
    logits, tanh = cap_in_place(logits, softcap)
    if temperature != 1.0:
        logits.div_(temperature)
    s = floored(logits.sub_(row_max(logits)))  # s = u − m ≤ 0, in the buffer
    s_y = s[rows, target]
    ent = None
    if b is None:
        q = s.exp_()  # in place: s is not needed again
        sumexp = q.sum(dim=-1)
        grad = q.mul_((-a / sumexp).unsqueeze(-1))  # −a·q
    else:
        q = torch.exp(s)
        sumexp = q.sum(dim=-1)
        q.div_(sumexp.unsqueeze(-1))
        mean_s = (q.unsqueeze(1) @ s.unsqueeze(2)).reshape(-1)  # Σ q s ≤ 0, a batched dot
        ent = sumexp.log() - mean_s
        grad = s.mul_(q).mul_(-b.unsqueeze(-1)).sub_(q.mul_((a - b * mean_s).unsqueeze(-1)))
    log_q_y = s_y - sumexp.log()  # (u_y − m) − log Σ exp(u − m): no cancellation at large logits
    grad[rows, target] += a
    if temperature != 1.0:
        grad.div_(temperature)
    if tanh is not None:
        grad.mul_(1.0 - tanh.square_())
    return log_q_y, ent, grad
