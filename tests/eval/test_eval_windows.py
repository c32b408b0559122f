"""Which tokens are scored, with which context: hand-worked windows and exactly-once properties."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xent.eval import llama_cpp_windows, sliding_windows, transformers_windows

I = -100


def test_sliding_windows_by_hand():
    # x = 10..19, L = 4, S = 2, no BOS: x0 is never scored (nothing predicts it). Window k starts at
    # input 2k; it scores the targets no earlier window scored. x5 is predicted from x2..x4 (the window
    # starting at 2), not from x4 alone as transformers' page would do.
    x = list(range(10, 20))
    windows = sliding_windows(x, max_length=4, stride=2, bos="none")
    got = [(w.input_ids, w.labels, w.positions) for w in windows]
    assert got == [
        ([10, 11, 12, 13], [11, 12, 13, 14], [1, 2, 3, 4]),
        ([12, 13, 14, 15], [I, I, 15, 16], [-1, -1, 5, 6]),
        ([14, 15, 16, 17], [I, I, 17, 18], [-1, -1, 7, 8]),
        ([16, 17, 18], [I, I, 19], [-1, -1, 9]),
    ]


def test_disjoint_windows_score_the_boundary_tokens():
    # S = L: disjoint inputs; each window scores all L of its predictions, so the first input of a
    # window (x3, x6) was the last target of the previous one: nothing is lost at the boundary.
    x = list(range(10, 18))
    got = [(w.input_ids, w.labels) for w in sliding_windows(x, max_length=3, stride=3, bos="first", bos_id=0)]
    assert got == [([0, 10, 11], [10, 11, 12]), ([12, 13, 14], [13, 14, 15]), ([15, 16], [16, 17])]


def test_bos_every_starts_each_window_with_bos():
    # each window: BOS + 2 document tokens predicting 3 targets; x3 and x6 are predicted from BOS alone
    x = list(range(10, 17))
    got = [(w.input_ids, w.labels) for w in sliding_windows(x, max_length=3, stride=3, bos="every", bos_id=0)]
    assert got == [([0, 10, 11], [10, 11, 12]), ([0, 13, 14], [13, 14, 15]), ([0], [16])]


def test_extend_last_window_like_lm_eval():
    # lm-evaluation-harness rolling windows, L = 4, prefix token 0, x = 10..19 (worked from its
    # get_rolling_token_windows + make_disjoint_window): ([0,10,11,12] → 10..13),
    # ([13,14,15,16] → 14..17), last window moved back to 4 inputs ([15,16,17,18] → 18,19).
    x = list(range(10, 20))
    got = [(w.input_ids, w.labels)
           for w in sliding_windows(x, max_length=4, stride=4, bos="first", bos_id=0, extend_last=True)]
    assert got == [([0, 10, 11, 12], [10, 11, 12, 13]), ([13, 14, 15, 16], [14, 15, 16, 17]),
                   ([15, 16, 17, 18], [I, I, 18, 19])]


def test_transformers_page_windows_by_hand():
    # The page's loop, L = 4, S = 2: x4 is scored by the second window from x2, x3 only; and with
    # S = L = 3 the first token of each later window (x3, x6) is never scored.
    x = list(range(10, 20))
    got = [(w.input_ids, w.labels) for w in transformers_windows(x, max_length=4, stride=2)]
    assert got == [([10, 11, 12, 13], [11, 12, 13, I]), ([12, 13, 14, 15], [I, 14, 15, I]),
                   ([14, 15, 16, 17], [I, 16, 17, I]), ([16, 17, 18, 19], [I, 18, 19, I])]
    got = [(w.input_ids, w.labels) for w in transformers_windows(x[:8], max_length=3, stride=3)]
    assert got == [([10, 11, 12], [11, 12, I]), ([13, 14, 15], [14, 15, I]), ([16, 17], [17, I])]


def test_llama_cpp_chunks_by_hand():
    # 21 tokens + BOS = 22 → 2 chunks of 8 (6 dropped); chunk 2's first token (7) becomes BOS; the
    # logits at 4, 5, 6 predict chunk[5], chunk[6], chunk[7].
    x = list(range(21))
    got = [(w.input_ids, w.labels, w.positions) for w in llama_cpp_windows(x, max_length=8, bos_id=99)]
    assert got == [
        ([99, 0, 1, 2, 3, 4, 5, 6], [I, I, I, I, 4, 5, 6, I], [-1, -1, -1, -1, 4, 5, 6, -1]),
        ([99, 8, 9, 10, 11, 12, 13, 14], [I, I, I, I, 12, 13, 14, I], [-1, -1, -1, -1, 12, 13, 14, -1]),
    ]


@settings(max_examples=150, deadline=None)
@given(n=st.integers(0, 60), L=st.integers(3, 16), data=st.data(),
       bos=st.sampled_from(["first", "every", "none"]), extend=st.booleans())
def test_every_token_scored_once_with_its_own_past_as_context(n, L, data, bos, extend):
    S = data.draw(st.integers(1, L))
    x = [100 + i for i in range(n)]
    windows = sliding_windows(x, max_length=L, stride=S, bos=bos, bos_id=7, extend_last=extend)
    scored = []
    for w in windows:
        assert 1 <= len(w.input_ids) <= L
        for j, (label, pos) in enumerate(zip(w.labels, w.positions)):
            if label == I:
                continue
            scored.append(pos)
            assert label == x[pos]
            # the context is the window's inputs up to j: a contiguous run of the document ending just
            # before the target, after a BOS when there is one
            context = w.input_ids[: j + 1]
            doc_part = [t for t in context if t != 7]
            assert doc_part == x[pos - len(doc_part) : pos]
            if len(doc_part) < len(context):
                assert context[0] == 7 and len(context) == len(doc_part) + 1
    first = 0 if bos != "none" else 1
    assert sorted(scored) == scored == list(range(first, n))  # once each, in order


@pytest.mark.parametrize("S", [1, 3, 8])
def test_scored_tokens_get_the_most_context_available(S):
    # with bos none, L = 8: target t (t ≥ 1) sees min(t, L) tokens when it is in the first window;
    # later, at least L − S + 1 tokens (the window start is at most S − 1 inputs behind the previous end)
    x = list(range(40))
    for w in sliding_windows(x, max_length=8, stride=S, bos="none"):
        for j, pos in enumerate(w.positions):
            if pos >= 0:
                assert j + 1 >= min(pos, 8 - S + 1)
