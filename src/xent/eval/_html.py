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


def _loss_colour(loss: float, scale: float) -> str:
    x = max(0.0, min(1.0, loss / scale))  # 0 → white, scale (e.g. 2·mean NLL) → saturated red
    return f"rgba(220, 40, 40, {x:.3f})"


def _rank_colour(rank: int) -> str:
    return next(colour for bound, colour, _ in RANK_BANDS if rank <= bound)


def _plots(out_dir: str, summary: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    bins = [b for b in summary.get("calibration", []) if b["tokens"]]
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="calibrated")
    ax.bar([sum(b["bin"]) / 2 for b in bins], [b["accuracy"] for b in bins], width=1 / 15, alpha=0.6,
           edgecolor="black", label="accuracy")
    ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o-", color="C3", ms=3,
            label="mean confidence")
    ax.set(xlabel="top-1 probability", ylabel="top-1 accuracy", xlim=(0, 1), ylim=(0, 1),
           title=f"reliability (ECE {summary['ece']:.4f})")
    ax.legend(loc="upper left", fontsize=8)
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
    keys = ["tokens", "documents", "nll_mean", "nll_se_token", "nll_se_document", "perplexity",
            "perplexity_ci95", "bits_per_byte", "top1_accuracy", "top5_accuracy", "entropy_mean", "ece",
            "brier"]
    table = "".join(f"<tr><td>{k}</td><td>{html.escape(str(summary.get(k)))}</td></tr>" for k in keys)
    legend = " ".join(f'<span style="background:{c}">{label}</span>' for _, c, label in RANK_BANDS)
    shown = f"first {len(rows)} scored tokens" + (" (truncated)" if len(rows) == max_tokens else "")
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>xent eval report</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 70em; margin: 2em auto; }}
.doc {{ font-family: ui-monospace, monospace; white-space: pre-wrap; line-height: 1.6; }}
.docid {{ display: block; color: #888; font-size: 80%; }}
td {{ padding: 0 1em 0 0; }}
</style></head><body>
<h1>xent eval</h1>
<p>model <code>{html.escape(str(summary["config"].get("model", "")))}</code></p>
<table>{table}</table>
<h2>Plots</h2>
{"".join(f'<img src="{name}" alt="{name}">' for name in plots)}
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
