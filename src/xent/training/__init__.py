"""Training with any xent objective: :func:`train`, its :class:`TrainConfig`, and the objectives by name.

``xent.train`` is :func:`train`. Needs transformers only for the model you pass in.
"""

from ._loop import TrainConfig, TrainResult, as_sequences, evaluate_ce, lr_at, train
from ._objectives import OBJECTIVES, make_objective

__all__ = ["OBJECTIVES", "TrainConfig", "TrainResult", "as_sequences", "evaluate_ce", "lr_at",
           "make_objective", "train"]
