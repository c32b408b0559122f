"""xent: exact, memory-lean cross-entropy for language models.

The public API is flat: ``xent.cross_entropy``, ``xent.causal_lm_loss``, ``xent.count_items``; loss
objects live in ``xent.losses``, modules in ``xent.nn``. ``import xent`` needs only PyTorch;
``xent.keras`` (Keras 3, any backend) is imported on first use.
"""

from . import losses
from ._causal import causal_lm_loss, count_items
from ._linear import linear_cross_entropy, linear_distill_loss, linear_loss, linear_sparse_distill_loss
from ._logprobs import linear_log_probs, log_probs
from ._multi_token import linear_multi_token_loss, multi_token_loss
from ._selective import linear_rho1_loss
from ._stats import TokenStats
from .losses._binary import binary_cross_entropy, binary_cross_entropy_with_logits
from .losses._cross_entropy import cross_entropy
from .losses._distill import distill_loss
from .losses._eaft import eaft_loss
from .losses._emo import emo_loss
from .losses._focal import focal_loss, poly_loss
from .losses._regularized import dft_loss, entropy_regularized_loss
from .losses._rho1 import rho1_loss
from .losses._sparse_distill import sparse_distill_loss
from .losses._tailr import gold_loss, tailr_loss

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "TokenStats",
    "causal_lm_loss",
    "count_items",
    "cross_entropy",
    "dft_loss",
    "distill_loss",
    "eaft_loss",
    "emo_loss",
    "entropy_regularized_loss",
    "eval",
    "focal_loss",
    "gold_loss",
    "integrations",
    "keras",
    "linear_cross_entropy",
    "linear_distill_loss",
    "linear_log_probs",
    "linear_loss",
    "linear_multi_token_loss",
    "linear_rho1_loss",
    "linear_sparse_distill_loss",
    "log_probs",
    "losses",
    "multi_token_loss",
    "nn",
    "parallel",
    "poly_loss",
    "rho1_loss",
    "sparse_distill_loss",
    "tailr_loss",
    "train",
]


# Subpackages loaded on first attribute access, so `import xent` stays light (STYLE.md §9).
_LAZY_SUBMODULES = ("nn", "eval", "parallel", "integrations", "keras")
# Functions whose modules pull in more than torch: name -> (module, attribute).
_LAZY_FUNCTIONS = {"train": (".training", "train")}


def __getattr__(name):
    import importlib

    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _LAZY_FUNCTIONS:
        module, attr = _LAZY_FUNCTIONS[name]
        return getattr(importlib.import_module(module, __name__), attr)
    raise AttributeError(f"module 'xent' has no attribute {name!r}")
