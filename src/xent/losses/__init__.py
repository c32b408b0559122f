"""Per-token loss objects: the same definition serves the plain path and the fused path.

Use them with :func:`xent.linear_loss`, e.g. ``xent.linear_loss(h, W, y, loss=xent.losses.CrossEntropy())``.
"""

from ._base import TokenLoss
from ._cross_entropy import CrossEntropy

__all__ = ["TokenLoss", "CrossEntropy"]
