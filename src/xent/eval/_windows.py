"""Which tokens of a document are scored, and with which context.

A document's token ids ``x`` (no special tokens) become windows of at most ``max_length`` model inputs.
A window carries pre-shifted labels: ``labels[j]`` is the token predicted by the logits at input ``j``
(-100 when it is not scored), so no shift happens downstream.

Sliding windows (transformers' "perplexity of fixed-length models", counted in predictions). Windows
start every ``stride`` inputs; each window scores the predictions not scored by an earlier window, so
every token is scored exactly once, with the context of the first window whose inputs reach its
predecessor (the most context any window offers). With stride = max_length the windows are disjoint and
each scores all of its max_length predictions. transformers' page counts in inputs instead: a token at
the start of a window is scored by the next window with stride fewer tokens of context, and with
stride = max_length it is never scored (one token lost per window boundary).

``bos``: "first" prepends BOS to the document (its first token is scored, predicted from BOS alone);
"every" starts every window with BOS followed by max_length − 1 document tokens; "none" prepends
nothing (the document's first token is not scored).
"""

from __future__ import annotations

from dataclasses import dataclass

IGNORE = -100


@dataclass(frozen=True)
class Window:
    input_ids: list[int]  # [T], T <= max_length
    labels: list[int]  # [T], labels[j] predicted by the logits at input j, IGNORE if not scored
    positions: list[int]  # [T], index in the document of labels[j] (-1 where IGNORE)


def sliding_windows(
    ids: list[int],
    *,
    max_length: int,
    stride: int,
    bos: str = "first",
    bos_id: int | None = None,
    extend_last: bool = False,
) -> list[Window]:
    """Windows of one document; see the module docstring. ``extend_last`` moves the last window back
    so that it holds max_length inputs (lm-evaluation-harness's rolling windows), scoring the same
    tokens with more context."""
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must be in [1, max_length={max_length}], got {stride}")
    prefix = [bos_id] if bos in ("first", "every") else []
    # src: the sequence labels are read from; target t of src is src[t]; doc index = t - shift.
    src = prefix + list(ids) if bos == "first" else list(ids)
    shift = len(src) - len(ids)
    every = bos == "every"
    first_target = 0 if every else 1  # with a per-window BOS, src[0] is predicted from it
    n = len(src)
    windows: list[Window] = []
    scored_end = first_target  # targets below this are scored already
    begin = 0
    while scored_end < n:
        # Window inputs: [BOS] + src[begin : begin + L - 1] (every) or src[begin : begin + L]; input j
        # predicts target begin + j (every) or begin + j + 1: L predictions, fewer at the end.
        if extend_last and begin + max_length + first_target >= n:
            begin = max(0, n - first_target - max_length)
        count = min(max_length, n - first_target - begin)
        t0 = begin + first_target
        if every:
            inputs = [bos_id] + src[begin : begin + count - 1]
        else:
            inputs = src[begin : begin + count]
        labels, positions = [], []
        for j in range(count):
            t = t0 + j
            scored = t >= scored_end
            labels.append(src[t] if scored else IGNORE)
            positions.append(t - shift if scored else -1)
        windows.append(Window(inputs, labels, positions))
        scored_end = t0 + count
        begin += stride
    return windows


def transformers_windows(ids: list[int], *, max_length: int, stride: int, bos_id: int | None = None
                         ) -> list[Window]:
    """transformers' page "Perplexity of fixed-length models", as its loop is written: window k holds
    the inputs src[kS : kS + L] (src = [BOS] + ids with a bos_id, else ids) with labels masked before
    the previous window's end; the model shifts labels, so input j predicts src[kS + j + 1] and the
    window's first label is never predicted. With S < L every token but the first is scored once, with
    one token less context than :func:`sliding_windows` gives it; with S = L the first token of each
    later window is never scored. The page's count (valid labels − 1 per window) is off by one for
    each later window; the count here is of the predicted labels."""
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must be in [1, max_length={max_length}], got {stride}")
    src = ([bos_id] if bos_id is not None else []) + list(ids)
    shift, n = len(src) - len(ids), len(src)
    windows: list[Window] = []
    prev_end = 0
    for begin in range(0, n, stride):
        end = min(begin + max_length, n)
        trg_len = end - prev_end  # target_ids[:, :-trg_len] = -100
        labels, positions = [IGNORE] * (end - begin), [-1] * (end - begin)
        for j in range(end - begin - 1):
            t = begin + j + 1
            if t >= end - trg_len:
                labels[j], positions[j] = src[t], t - shift
        windows.append(Window(src[begin:end], labels, positions))
        prev_end = end
        if end == n:
            break
    return windows


def llama_cpp_windows(ids: list[int], *, max_length: int, bos_id: int | None) -> list[Window]:
    """llama.cpp ``perplexity``: the text (BOS first when the tokenizer has one) is cut into
    len // max_length chunks (the remainder is dropped); each chunk's first token is replaced by BOS and
    only the second half is scored: the logits at j in [L/2, L−1) predicting chunk[j + 1]. A text of
    fewer than 2·max_length tokens (BOS included) gives no window: llama-perplexity refuses it ("you need
    at least 2·n_ctx tokens")."""
    src = ([bos_id] if bos_id is not None else []) + list(ids)
    shift = len(src) - len(ids)
    L, first = max_length, max_length // 2
    if len(src) < 2 * L:
        return []
    windows = []
    for k in range(len(src) // L):
        chunk = src[k * L : (k + 1) * L]
        if bos_id is not None:
            chunk[0] = bos_id
        labels = [IGNORE] * L
        positions = [-1] * L
        for j in range(first, L - 1):
            labels[j] = chunk[j + 1]
            positions[j] = k * L + j + 1 - shift
        windows.append(Window(chunk, labels, positions))
    return windows
