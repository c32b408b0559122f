"""Training metrics returned beside the loss (``return_stats=True``): raw sums over a call's valid tokens.

Sums, not means, so that they add up exactly over micro-batches and ranks: sum the stats of every
micro-batch of a step (``+``), all-reduce them over the data-parallel ranks (:meth:`TokenStats.all_reduce`,
one SUM of six numbers), and only then divide (:meth:`TokenStats.means`). Averaging per-micro-batch means
would weigh a short micro-batch like a long one (the late-2024 transformers gradient-accumulation bug, here
for the metrics).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

#: Columns of the per-token statistics the losses produce ([..., 3]); the loss itself is added by the
#: reduction (:func:`xent._reduce.sum_token_stats`).
STAT_COLUMNS = ("correct", "entropy", "lse")


@dataclass(frozen=True)
class TokenStats:
    """Detached 0-dim tensors summed over the valid tokens of one call (a token is valid when its target
    is not ``ignore_index`` and its per-token weight, if any, is not 0).

    - ``loss_sum``: Σ w_t·ℓ_t, the call's loss under ``reduction="sum"`` (w_t the per-token weight, 1
      without ``token_weights``); ``loss_sum / tokens`` is the mean loss when there are no class or token
      weights;
    - ``tokens``: the number of valid tokens (int64);
    - ``correct``: how many valid tokens have their target among the largest logits: z_y = max_c z_c (a tie
      for the maximum counts as correct, as rank 1 does in ``xent eval``; int64);
    - ``entropy_sum``: Σ H(q), H = −Σ_c q_c log q_c;
    - ``z_loss_sum``: Σ s·(logsumexp z)², the z-loss terms (s the loss's ``z_loss``; 0 without one);
    - ``lse_sum``: Σ logsumexp z.

    All are of the logits the loss sees (after soft-capping), unweighted except ``loss_sum``; float sums
    are float64, counts int64, on the inputs' device.
    """

    loss_sum: torch.Tensor
    tokens: torch.Tensor
    correct: torch.Tensor
    entropy_sum: torch.Tensor
    z_loss_sum: torch.Tensor
    lse_sum: torch.Tensor

    def __add__(self, other: TokenStats) -> TokenStats:
        if not isinstance(other, TokenStats):
            return NotImplemented
        return TokenStats(*(getattr(self, f.name) + getattr(other, f.name).to(getattr(self, f.name).device)
                            for f in fields(self)))

    def to_tensor(self) -> torch.Tensor:
        """The six sums as one float64 tensor [6] (counts are exact below 2**53), in field order."""
        return torch.stack([getattr(self, f.name).to(torch.float64) for f in fields(self)])

    @classmethod
    def from_tensor(cls, values: torch.Tensor) -> TokenStats:
        """Inverse of :meth:`to_tensor`."""
        parts = [values[i] for i in range(len(fields(cls)))]
        parts[1], parts[2] = parts[1].round().to(torch.int64), parts[2].round().to(torch.int64)
        return cls(*parts)

    def all_reduce(self, group=None) -> TokenStats:
        """The sums over every rank of ``group`` (torch.distributed, default the world): one all-reduce
        SUM of a float64 [6] tensor. A collective: every rank calls it."""
        import torch.distributed as dist

        values = self.to_tensor()
        dist.all_reduce(values, op=dist.ReduceOp.SUM, group=group)
        return TokenStats.from_tensor(values)

    def means(self) -> dict[str, float]:
        """Per-token means, for logging: loss (loss_sum/tokens), accuracy, entropy, z_loss, lse. Every
        mean is 0.0 when no token was valid (as the loss is)."""
        n = int(self.tokens)
        div = (lambda x: float(x) / n) if n else (lambda x: 0.0)
        return {"loss": div(self.loss_sum), "accuracy": div(self.correct), "entropy": div(self.entropy_sum),
                "z_loss": div(self.z_loss_sum), "lse": div(self.lse_sum)}
