"""report.html: the summary, the text coloured by per-token loss (loss on hover), a GLTR-style rank
view, and two PNG plots (reliability diagram, loss by context length) referenced by relative path.

Built from tokens.parquet (its first ``max_tokens`` rows) and the summary, so it needs no model.
"""

from __future__ import annotations

import html
import math
import os

from ._files import atomic_write, write_text

# GLTR (Gehrmann et al., 2019): the target's rank under the model, in four bands.
RANK_BANDS = [(10, "#a6f4a6", "top 10"), (100, "#fff59d", "top 100"), (1000, "#ffab91", "top 1000"),
              (math.inf, "#ce93d8", "beyond")]


# The summary rows of the report, with what each means (summary.json keeps every digit).
METRICS = [
    ("tokens", "tokens scored (N)"),
    ("documents", "documents scored (D)"),
    ("nll_mean", "mean loss L̄ = Σℓ / N, ℓ = −ln q(token), in nats per token"),
    ("nll_se_token", "standard error of L̄ treating tokens as independent, s/√N (as llama.cpp prints)"),
    ("nll_se_document", "standard error of L̄ clustered by document, √(D/(D−1)·Σ<sub>d</sub> (S<sub>d</sub> − "
     "L̄·n<sub>d</sub>)²) / N (S<sub>d</sub>, n<sub>d</sub>: a document's summed loss and tokens): honest "
     "when tokens of a document are correlated"),
    ("perplexity", "e<sup>L̄</sup>"),
    ("perplexity_ci95", "95% interval e<sup>L̄ ± 1.96·SE</sup>, with the document-clustered SE"),
    ("bits_per_byte", "bits per byte: Σℓ / (B·ln 2), B the UTF-8 bytes of the scored documents; unlike "
     "perplexity, comparable across tokenizers"),
    ("top1_accuracy", "share of tokens that were the model's most probable token"),
    ("top5_accuracy", "share of tokens among the model's 5 most probable"),
    ("entropy_mean", "mean entropy of the predicted distribution, −Σ q log q, in nats"),
    ("ece", "expected calibration error: tokens in 15 equal-width bins of the top-1 probability, "
     "Σ<sub>b</sub> (n<sub>b</sub>/N)·|accuracy<sub>b</sub> − confidence<sub>b</sub>|; 0 is calibrated"),
    ("brier", "multi-class Brier score Σ<sub>c</sub> (q<sub>c</sub> − [c = y])², in [0, 2], mean over "
     "tokens"),
]


def readable(value, digits: int = 4) -> str:
    """A number for reading: integers as they are, floats to ``digits`` significant digits, without
    an exponent in the usual range; lists element by element; None and NaN as "–"."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(readable(v, digits) for v in value) + "]"
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–" if value is None or math.isnan(value) else str(value)
    if isinstance(value, int):
        return str(value)
    if value == 0:
        return "0"
    decimals = digits - 1 - math.floor(math.log10(abs(value)))
    if decimals > 8:
        return f"{value:.{digits - 1}e}"
    return f"{value:.{max(decimals, 0)}f}"


def _loss_colour(loss: float, scale: float) -> str:
    x = max(0.0, min(1.0, loss / scale))  # 0 → white, scale (e.g. 2·mean NLL) → saturated red
    return f"rgba(220, 40, 40, {x:.3f})"


def _rank_colour(rank: int) -> str:
    return next(colour for bound, colour, _ in RANK_BANDS if rank <= bound)


THIN_BIN_SHARE = 0.01  # reliability bins with fewer than 1 % of the tokens are drawn grey: noisy accuracy


def compact_count(n: int) -> str:
    """A token count for a label: 13, 2361, 45.2k, 1.31M."""
    if n < 10_000:
        return str(n)
    if n < 1_000_000:
        return f"{n / 1e3:.3g}k"
    return f"{n / 1e6:.3g}M"


def draw_reliability(ax, calibration: list[dict], *, color: str = "C0") -> None:
    """A reliability diagram on ``ax`` from the summary's ``calibration`` bins: top-1 accuracy per bin of
    top-1 probability, each bin's (mean confidence, accuracy) point and the diagonal. Each bar is
    labelled with its tokens; bins with fewer than THIN_BIN_SHARE of the tokens are grey, so that a bin
    of 13 tokens does not look like one of thousands."""
    bins = [b for b in calibration if b["tokens"]]
    total = sum(b["tokens"] for b in bins)
    thin = [b["tokens"] < THIN_BIN_SHARE * total for b in bins]
    centers = [sum(b["bin"]) / 2 for b in bins]
    acc = [b["accuracy"] for b in bins]
    width = bins[0]["bin"][1] - bins[0]["bin"][0] if bins else 1.0
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=0.8)
    ax.bar(centers, acc, width=width, color=["#dddddd" if t else color for t in thin], alpha=0.8,
           edgecolor=["#aaaaaa" if t else "black" for t in thin], lw=0.5)
    ax.scatter([b["confidence"] for b in bins], acc, s=9, zorder=3,
               c=["#999999" if t else "black" for t in thin])
    for x, b, t in zip(centers, bins, thin):  # the count just above its bar, never over a bar
        top = max(b["accuracy"], 0.0)
        ax.text(x, top + 0.02, compact_count(b["tokens"]), rotation=90, ha="center", va="bottom", fontsize=6,
                color="#777777" if t else "black")
    # room above accuracy 1 for the counts of the fullest bars
    ax.set(xlim=(0, 1), ylim=(0, 1.16), yticks=[0, 0.2, 0.4, 0.6, 0.8, 1.0], xlabel="top-1 probability",
           ylabel="top-1 accuracy")


def _plots(out_dir: str, summary: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    draw_reliability(ax, summary.get("calibration", []))
    ax.set_title(f"reliability (ECE {summary['ece']:.4f})")
    names.append(_save(fig, out_dir, "reliability.png"))
    buckets = [b for b in summary.get("nll_by_position", []) if b["tokens"]]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([b["start"] for b in buckets], [b["nll_mean"] for b in buckets], "o-")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="tokens of context", ylabel="mean NLL (nats)", title="loss by position")
    names.append(_save(fig, out_dir, "loss_by_position.png"))
    plt.close("all")
    return names


def _save(fig, out_dir: str, name: str) -> str:
    fig.tight_layout()
    atomic_write(os.path.join(out_dir, name), lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    return name


def _token_spans(rows: list[dict], colour) -> str:
    parts, doc = [], None
    for r in rows:
        if r["doc"] != doc:
            if doc is not None:
                parts.append("</p>")
            doc = r["doc"]
            parts.append(f'<p class="doc"><span class="docid">document {doc}</span>')
        tip = f"loss {r['loss']:.3f} nats · rank {r['rank']} · top-1 p {r['top1_prob']:.3f}"
        parts.append(f'<span style="background:{colour(r)}" title="{tip}">{html.escape(r["token"])}</span>')
    if doc is not None:
        parts.append("</p>")
    return "".join(parts)


def write_report(out_dir: str, summary: dict, *, max_tokens: int = 20000) -> str:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(os.path.join(out_dir, "tokens.parquet"))
    rows: list[dict] = []
    for batch in pf.iter_batches(batch_size=4096):
        rows.extend(batch.to_pylist())
        if len(rows) >= max_tokens:
            rows = rows[:max_tokens]
            break
    plots = _plots(out_dir, summary)
    scale = 2 * summary["nll_mean"] if summary.get("nll_mean") else 1.0
    table = "".join(f"<tr><td>{key}</td><td class=num>{html.escape(readable(summary.get(key)))}</td>"
                    f"<td>{text}</td></tr>" for key, text in METRICS)
    legend = " ".join(f'<span style="background:{c}">{label}</span>' for _, c, label in RANK_BANDS)
    shown = f"first {len(rows)} scored tokens" + (" (truncated)" if len(rows) == max_tokens else "")
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>xent eval report</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 70em; margin: 2em auto; }}
.doc {{ font-family: ui-monospace, monospace; white-space: pre-wrap; line-height: 1.6; }}
.docid {{ display: block; color: #888; font-size: 80%; }}
td {{ padding: 0 1em 0 0; vertical-align: top; }} td.num {{ text-align: right; white-space: nowrap; }}
</style></head><body>
<h1>xent eval</h1>
<p>model <code>{html.escape(str(summary["config"].get("model", "")))}</code></p>
<table>{table}</table>
<p>Numbers are rounded to 4 significant digits; <code>summary.json</code> holds them in full.</p>
<h2>Plots</h2>
{"".join(f'<img src="{name}" alt="{name}">' for name in plots)}
<p>Reliability: top-1 accuracy per bin of top-1 probability (dots: the bin's mean probability); the number
over each bar is its tokens, and bins with fewer than {THIN_BIN_SHARE:.0%} of the tokens are grey
(their accuracy is noisy).</p>
<h2>Loss per token</h2>
<p>{shown}; red = higher loss (saturated at {scale:.2f} nats); hover a token for its loss.</p>
{_token_spans(rows, lambda r: _loss_colour(r["loss"], scale))}
<h2>Rank of the target (GLTR)</h2>
<p>{legend}</p>
{_token_spans(rows, lambda r: _rank_colour(r["rank"]))}
</body></html>
"""
    path = os.path.join(out_dir, "report.html")
    write_text(path, page)
    return path
