"""xent for Keras 3: language-model losses on ``keras.ops``, for the JAX, TensorFlow and PyTorch backends.

Importing this module imports Keras (choose the backend first, ``KERAS_BACKEND=jax``); ``import xent``
alone never does. Functions take tensors; the classes are ``keras.losses.Loss`` subclasses for
``model.compile(loss=...)``; :class:`LMHead` is a layer that adds the fused linear + cross-entropy loss.

Every function is the twin of the PyTorch function of the same name (tests/keras checks values and
gradients under JAX and TensorFlow against it).
"""

try:
    import keras
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError("xent.keras needs Keras 3 and a backend: pip install 'xent[keras]'") from err

if not keras.__version__.startswith("3."):  # pragma: no cover
    raise ImportError(f"xent.keras needs Keras 3, found keras {keras.__version__}")

from ._classes import GOLD, BinaryCrossEntropy, CrossEntropy, Focal, Poly, TaiLr
from ._linear import LMHead, linear_cross_entropy
from ._losses import (
    binary_cross_entropy,
    binary_cross_entropy_with_logits,
    causal_lm_loss,
    cross_entropy,
    focal_loss,
    gold_loss,
    poly_loss,
    tailr_loss,
)

__all__ = [
    "GOLD",
    "BinaryCrossEntropy",
    "CrossEntropy",
    "Focal",
    "LMHead",
    "Poly",
    "TaiLr",
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "causal_lm_loss",
    "cross_entropy",
    "focal_loss",
    "gold_loss",
    "linear_cross_entropy",
    "poly_loss",
    "tailr_loss",
]
