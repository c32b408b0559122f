"""The xent demo: tiny language models trained offline with different objectives, measured and drawn.

:func:`run_demo` is what ``xent demo`` runs. The parts are usable on their own:
:func:`stdlib_documents` (natural text every Python has), :class:`MarkovSource` (text of known
entropy), :func:`train_tokenizer` and :func:`build_model`.
"""

from ._config import DemoConfig
from ._markov import MarkovSource
from ._model import build_model, tokenize_documents, train_tokenizer
from ._run import run_demo, synthetic_gap
from ._text import stdlib_documents

__all__ = ["DemoConfig", "MarkovSource", "build_model", "run_demo", "stdlib_documents", "synthetic_gap",
           "tokenize_documents", "train_tokenizer"]
