"""xent: exact, memory-lean cross-entropy for language models.

The public API is flat: ``xent.cross_entropy``, ``xent.causal_lm_loss``, ``xent.count_items``; loss
objects live in ``xent.losses``, modules in ``xent.nn``. ``import xent`` needs only PyTorch.
"""

from . import losses
from ._causal import causal_lm_loss, count_items
from .losses._cross_entropy import cross_entropy

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "causal_lm_loss",
    "count_items",
    "cross_entropy",
    "losses",
    "nn",
]


def __getattr__(name):
    # xent.nn imports torch.nn modules only; loaded on first use to keep `import xent` light.
    if name == "nn":
        import importlib

        return importlib.import_module(".nn", __name__)
    raise AttributeError(f"module 'xent' has no attribute {name!r}")
