"""report.html's parts: numbers rounded for reading, reliability bins drawn with their weight."""

from __future__ import annotations

import math

import pytest

from xent.eval._html import THIN_BIN_SHARE, compact_count, draw_reliability, readable


def test_numbers_are_rounded_to_four_significant_digits():
    cases = {4.123456789012345: "4.123", 0.0023456789: "0.002346", 61.72490234: "61.72",
             12345.678: "12346", 1.0: "1.000", -0.5: "-0.5000", 0.0: "0", 3: "3", None: "–",
             math.nan: "–", 1.234e-12: "1.234e-12"}
    for value, text in cases.items():
        assert readable(value) == text, value
    assert readable([58.1, 65.6312]) == "[58.10, 65.63]"
    for x in (4.123456789012345, 0.0023456789, 987.654321, 0.1234567):  # 4 significant digits, no more
        digits = readable(x).replace("0.", "", 1).lstrip("0").replace(".", "")
        assert len(digits) == 4 and float(readable(x)) == pytest.approx(x, rel=5e-4)


def test_reliability_bins_with_few_tokens_are_grey_and_every_bin_shows_its_count():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgba

    counts = [5000, 13, 2, 0, 800, 30000, 120]
    bins = [{"bin": [b / 15, (b + 1) / 15], "tokens": n, "confidence": (b + 0.5) / 15 if n else None,
             "accuracy": 0.9 if b == 5 else (b / 15 if n else None)} for b, n in enumerate(counts)]
    fig, ax = plt.subplots()
    draw_reliability(ax, bins, color="tab:blue")
    shown = [n for n in counts if n]
    total = sum(shown)
    bars = ax.patches
    assert len(bars) == len(shown)
    for bar, n in zip(bars, shown):
        thin = n < THIN_BIN_SHARE * total  # 1 % of 35 935 tokens: 359
        assert (bar.get_facecolor()[:3] == to_rgba("tab:blue")[:3]) != thin, n
    assert [t.get_text() for t in ax.texts] == [compact_count(n) for n in shown]
    assert [compact_count(n) for n in (13, 9999, 30000, 1_234_567)] == ["13", "9999", "30k", "1.23M"]
    plt.close(fig)
