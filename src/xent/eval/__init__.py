"""Evaluation of causal language models: cross-entropy, perplexity and calibration on a corpus,
computed exactly (REFERENCE.md §4), and the comparison of two models on the same tokens.

``evaluate(model, tokenizer, documents, **options) -> EvalResult`` is the Python API of ``xent eval``;
``compare(base, model, tokenizer, documents, **options) -> CompareResult`` that of ``xent compare``
(a ``ByteCompareResult``, bits per byte, when the models' tokenizers differ);
``mauve(p_texts, q_texts, model=, tokenizer=) -> MauveResult`` is MAUVE with features from a local model
(needs ``pip install xent[mauve]``).
Needs transformers (``pip install xent[hf]``).
"""

from ._compare import CompareResult, compare
from ._compare_bytes import ByteCompareResult
from ._data import Corpus
from ._errors import EvalError
from ._evaluate import EvalResult, evaluate
from ._mauve import MauveResult, mauve
from ._windows import Window, llama_cpp_windows, sliding_windows, transformers_windows

__all__ = [
    "ByteCompareResult",
    "CompareResult",
    "Corpus",
    "EvalError",
    "EvalResult",
    "MauveResult",
    "Window",
    "compare",
    "evaluate",
    "llama_cpp_windows",
    "mauve",
    "sliding_windows",
    "transformers_windows",
]
