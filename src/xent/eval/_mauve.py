"""``xent.eval.mauve``: MAUVE (Pillutla et al., NeurIPS 2021) between two sets of texts, with the
features from a LOCAL causal LM, computed by the ``mauve-text`` package (``pip install xent[mauve]``).

mauve-text featurises text with gpt2-large, which it downloads. Here the features come from the model
you pass, so nothing is downloaded, and the score says which features it rests on (MAUVE is only
comparable between runs with the same features, quantisation and sample sizes).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

from ._errors import EvalError
from ._options import model_context


@dataclass
class MauveResult:
    """mauve: the area under the divergence frontier, in (0, 1]; 1 for identical histograms.
    frontier_integral: mauve-text's frontier integral (0 for identical histograms; lower is closer).
    num_buckets: the k-means clusters the features were quantised into. p_count, q_count: the texts.
    features: what the features are (model, layer, position, truncation)."""

    mauve: float
    frontier_integral: float
    num_buckets: int
    p_count: int
    q_count: int
    features: str

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


#: Fewer texts than this on a side give a warning: the k-means histograms of a handful of points say little
#: (mauve-text's "auto" quantisation wants |texts|/10 clusters); fewer than 2 on a side are refused.
MIN_TEXTS = 10

# mauve-text 0.4's defaults, passed explicitly so an upgrade that changes them cannot change a score.
DEFAULTS = {"num_buckets": "auto", "mauve_scaling_factor": 5.0, "kmeans_num_redo": 5, "kmeans_max_iter": 500,
            "kmeans_explained_var": 0.9, "divergence_curve_discretization_size": 25}


def mauve(p_texts, q_texts, *, model, tokenizer, max_length: int | None = None, seed: int = 25,
          num_buckets: int | str = "auto", mauve_scaling_factor: float = 5.0, kmeans_num_redo: int = 5,
          kmeans_max_iter: int = 500, batch_size: int = 32) -> MauveResult:
    """MAUVE between texts P (e.g. human continuations) and Q (e.g. a model's samples).

    Each text is featurised by ``model`` (a transformers causal LM; run in eval mode, no gradient):
    the text's tokens (no special tokens) after the tokenizer's BOS, the first ``max_length`` of them
    (default: the model's context) kept, as mauve-text truncates; the feature is the final-layer hidden
    state (``hidden_states[-1]``, after the final norm in GPT-2 and Llama) at the last token, as
    mauve-text featurises with gpt2-large. The features go to ``mauve.compute_mauve`` (PCA to 90 % of
    the variance, k-means with ``num_buckets`` clusters ("auto": min(|P|, |Q|)/10, at least 2),
    ``kmeans_num_redo`` restarts from ``seed``, scaling factor c = ``mauve_scaling_factor``) on the CPU
    with as many threads as torch uses (1 in the demo: the same numbers on any machine).

    Returns a :class:`MauveResult`; ``.features`` names the model and the features. Raises EvalError (a
    ValueError) for an empty set, an empty text, fewer than 2 texts on a side, more ``num_buckets`` than
    texts (k-means cannot make more clusters than points) or a bad option; warns (``UserWarning``) when a
    side has fewer than :data:`MIN_TEXTS` (10) texts, where the score is mostly noise.

    Example:
        >>> r = xent.eval.mauve(human, generated, model=model, tokenizer=tok, seed=0)  # doctest: +SKIP
        >>> r.mauve, r.features  # doctest: +SKIP
    """
    p_texts, q_texts = _texts(p_texts, "p_texts"), _texts(q_texts, "q_texts")
    if max_length is None:
        max_length = model_context(model)
    if max_length is None or max_length < 2:
        raise EvalError(f"max_length must be at least 2 (BOS and one token), got {max_length}")
    if batch_size < 1:
        raise EvalError(f"batch_size must be at least 1, got {batch_size}")
    p = text_features(model, tokenizer, p_texts, max_length=max_length, batch_size=batch_size)
    q = text_features(model, tokenizer, q_texts, max_length=max_length, batch_size=batch_size)
    r = mauve_from_features(p, q, seed=seed, num_buckets=num_buckets,
                            mauve_scaling_factor=mauve_scaling_factor, kmeans_num_redo=kmeans_num_redo,
                            kmeans_max_iter=kmeans_max_iter)
    r.features = feature_description(model, max_length)
    return r


def feature_description(model, max_length: int) -> str:
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    return (f"{name}: final-layer hidden state (hidden_states[-1]) at the last token of each text, the text "
            f"after BOS, at most {max_length} tokens")


def _texts(texts, name: str) -> list[str]:
    if isinstance(texts, (str, bytes)):
        raise EvalError(f"{name} must be a list of strings, not a single {type(texts).__name__}")
    texts = list(texts)
    if not texts:
        raise EvalError(f"{name} is empty: MAUVE needs at least one text on each side")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise EvalError(f"{name}[{i}] is {type(t).__name__}, not a string")
        if not t:
            raise EvalError(f"{name}[{i}] is an empty string: it has no token to featurise")
    return texts


def text_features(model, tokenizer, texts: list[str], *, max_length: int, batch_size: int = 32):
    """[n, D] float32 numpy features: ``hidden_states[-1]`` at each text's last token (see :func:`mauve`).

    Right padding with an attention mask: a causal model's state at a real token never sees the pads."""
    import torch

    bos = tokenizer.bos_token_id
    ids = []
    for i, t in enumerate(texts):
        toks = tokenizer(t, add_special_tokens=False)["input_ids"]
        if not toks:
            raise EvalError(f"text {i} ({t[:40]!r}) has no token")
        ids.append(([bos] if bos is not None else []) + toks)
    ids = [x[:max_length] for x in ids]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.no_grad():
            for start in range(0, len(ids), batch_size):
                chunk = ids[start : start + batch_size]
                T = max(len(x) for x in chunk)
                x = torch.zeros(len(chunk), T, dtype=torch.long)
                mask = torch.zeros(len(chunk), T, dtype=torch.long)
                for row, seq in enumerate(chunk):
                    x[row, : len(seq)] = torch.tensor(seq)
                    mask[row, : len(seq)] = 1
                h = model(input_ids=x.to(device), attention_mask=mask.to(device), output_hidden_states=True,
                          use_cache=False).hidden_states[-1]  # [b, T, D]
                last = torch.tensor([len(seq) - 1 for seq in chunk], device=device)
                out.append(h[torch.arange(len(chunk), device=device), last].float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out).numpy()


def mauve_from_features(p_features, q_features, *, seed: int = 25, num_buckets: int | str = "auto",
                        mauve_scaling_factor: float = 5.0, kmeans_num_redo: int = 5,
                        kmeans_max_iter: int = 500, threads: int | None = None) -> MauveResult:
    """MAUVE of two feature arrays [n_p, D] and [n_q, D], by ``mauve.compute_mauve`` with the options
    given (the rest at mauve-text's defaults, :data:`DEFAULTS`), on the CPU, with ``threads`` threads
    (default: torch's count) for its PCA and k-means, restored afterwards. The sizes are checked as in
    :func:`mauve` (at least 2 rows a side, a warning under :data:`MIN_TEXTS`, at most n_p + n_q buckets)."""
    import numpy as np

    try:
        import faiss
        from mauve import compute_mauve
        from threadpoolctl import threadpool_limits
    except ImportError as err:
        raise ImportError(f"MAUVE needs the mauve-text package ({err.name} is missing): "
                          "pip install 'xent[mauve]'") from None
    p, q = np.asarray(p_features, dtype=np.float32), np.asarray(q_features, dtype=np.float32)
    for name, a in (("p_features", p), ("q_features", q)):
        if a.ndim != 2 or a.shape[0] == 0:
            raise EvalError(f"{name} must be a non-empty [n, D] array, got shape {a.shape}")
        if not np.isfinite(a).all():
            raise EvalError(f"{name} has {int((~np.isfinite(a)).sum())} non-finite values")
    if p.shape[1] != q.shape[1]:
        raise EvalError(f"p_features and q_features have different widths: {p.shape[1]} and {q.shape[1]}")
    if not (num_buckets == "auto" or (isinstance(num_buckets, int) and not isinstance(num_buckets, bool)
                                      and num_buckets >= 2)):
        raise EvalError(f"num_buckets must be 'auto' or an integer >= 2, got {num_buckets!r}")
    _check_sizes(len(p), len(q), num_buckets)
    if threads is None:
        import torch

        threads = torch.get_num_threads()
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads), _faiss_warnings_silenced():
            out = compute_mauve(p_features=p, q_features=q, num_buckets=num_buckets, seed=seed,
                                mauve_scaling_factor=mauve_scaling_factor, kmeans_num_redo=kmeans_num_redo,
                                kmeans_max_iter=kmeans_max_iter,
                                kmeans_explained_var=DEFAULTS["kmeans_explained_var"],
                                divergence_curve_discretization_size=DEFAULTS[
                                    "divergence_curve_discretization_size"],
                                device_id=-1, verbose=False)
    finally:
        faiss.omp_set_num_threads(before)
    return MauveResult(float(out.mauve), float(out.frontier_integral), int(out.num_buckets), len(p), len(q),
                       "given features")


def _check_sizes(n_p: int, n_q: int, num_buckets) -> None:
    """k-means clusters the n_p + n_q points together: no more buckets than points (faiss would fail
    deep inside); a side of one text has no distribution; a side under MIN_TEXTS gets a warning."""
    if min(n_p, n_q) < 2:
        raise EvalError(f"MAUVE needs at least 2 texts on each side (10 or more for a usable score), got "
                        f"{n_p} in P and {n_q} in Q")
    if num_buckets != "auto" and num_buckets > n_p + n_q:
        raise EvalError(f"num_buckets={num_buckets} is more than the {n_p + n_q} texts ({n_p} in P, {n_q} in "
                        "Q) that k-means clusters: use at most that many, or 'auto'")
    if min(n_p, n_q) < MIN_TEXTS:
        import warnings

        warnings.warn(f"MAUVE of {n_p} and {n_q} texts: under {MIN_TEXTS} on a side the k-means histograms "
                      "are too coarse for the score to mean much", UserWarning, stacklevel=3)


@contextlib.contextmanager
def _faiss_warnings_silenced():
    """faiss's k-means prints "WARNING clustering N points to K centroids: please provide at least ..."
    from C++ whenever there are fewer than 39 points per cluster, which is MAUVE's regime by design
    (n/10 clusters); it changes nothing. The process's stderr (fd 2) goes to /dev/null meanwhile."""
    import sys

    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # no real stderr (e.g. captured): nothing to silence
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), fd)
            try:
                yield
            finally:
                os.dup2(saved, fd)
    finally:
        os.close(saved)
