"""Per-token loss objects: the same definition serves the plain path and the fused path.

Use them with :func:`xent.linear_loss`, e.g. ``xent.linear_loss(h, W, y, loss=xent.losses.CrossEntropy())``.
"""

from ._base import TokenLoss
from ._cross_entropy import CrossEntropy
from ._distill import Distill
from ._eaft import EAFT
from ._emo import EMO
from ._focal import Focal, Poly
from ._regularized import DFT, EntropyRegularized
from ._rho1 import Rho1
from ._sparse_distill import SparseDistill
from ._tailr import GOLD, TaiLr

__all__ = ["TokenLoss", "CrossEntropy", "EMO", "TaiLr", "GOLD", "DFT", "Focal", "Poly", "EntropyRegularized",
           "Distill", "EAFT", "SparseDistill", "Rho1"]
