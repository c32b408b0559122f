"""Terminal output: the summary as a rich table, a tokens/s progress bar on stderr."""

from __future__ import annotations

import sys


def _fmt(value, digits=4) -> str:
    if isinstance(value, float) and value != value:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 1e6 else f"{value:.4g}"
    return str(value)


ROWS = [
    ("tokens", "tokens scored"), ("documents", "documents"), ("nll_mean", "NLL (nats/token)"),
    ("nll_se_token", "  SE, tokens iid"), ("nll_se_document", "  SE, by document"),
    ("perplexity", "perplexity"), ("perplexity_ci95", "  95% CI (by document)"),
    ("bits_per_token", "bits/token"), ("bits_per_byte", "bits/byte"), ("word_perplexity", "word perplexity"),
    ("top1_accuracy", "top-1 accuracy"), ("top5_accuracy", "top-5 accuracy"),
    ("entropy_mean", "entropy (nats)"), ("ece", "ECE (15 bins)"), ("brier", "Brier"),
]


def print_summary(summary: dict, file=None) -> None:
    """One column per data file plus the pooled result (only the pooled one for a single file)."""
    from rich.console import Console
    from rich.table import Table

    console = Console(file=file or sys.stdout)
    columns = [("all", summary)]
    if summary.get("per_file"):
        import os

        names = list(summary["per_file"])
        short = [os.path.basename(n.rstrip("/")) for n in names]
        labels = short if len(set(short)) == len(short) else names
        columns = [(label, summary["per_file"][n]) for label, n in zip(labels, names)] + columns
    table = Table(title=f"xent eval: {summary['config'].get('model', '')}", title_justify="left")
    table.add_column("metric")
    for name, _ in columns:
        table.add_column(name, justify="right")
    for key, label in ROWS:
        cells = []
        for _, s in columns:
            v = s.get(key)
            cells.append("–" if v is None else ("[" + ", ".join(_fmt(x) for x in v) + "]")
                         if isinstance(v, list) else _fmt(v))
        table.add_row(label, *cells)
    console.print(table)
    notes = []
    if summary.get("skipped_empty"):
        notes.append(f"{summary['skipped_empty']} empty documents skipped")
    if summary.get("skipped_unscored"):
        notes.append(f"{summary['skipped_unscored']} documents too short to score skipped")
    if summary.get("bytes_omitted"):
        notes.append(summary["bytes_omitted"])
    if summary.get("invalid_utf8"):
        notes.append(f"{summary['invalid_utf8']} invalid UTF-8 sequences replaced by U+FFFD")
    if any(s.get("documents", 0) < 2 for _, s in columns):
        notes.append("the SE and CI by document need at least 2 documents (–): a .txt file is one document "
                     "unless --split lines or --split paragraphs")
    fit = summary.get("temperature_fit")
    if fit:
        notes.append(f"temperature scaling: T* = {fit['temperature']:.4f} ({fit['passes']} passes): NLL "
                     f"{_fmt(fit['nll_mean'])} (T = 1: {_fmt(summary['nll_mean'])}), ECE {_fmt(fit['ece'])} "
                     f"({_fmt(summary['ece'])}), entropy {_fmt(fit['entropy_mean'])} "
                     f"({_fmt(summary['entropy_mean'])}), Brier {_fmt(fit['brier'])} "
                     f"({_fmt(summary['brier'])})")
    for note in notes:
        console.print(f"note: {note}", soft_wrap=True)


class Progress:
    """A tqdm bar counting scored tokens on stderr (hidden when stderr is not a terminal); ``report``
    prints the throughput once the run is done."""

    def __init__(self, enabled: bool = True, desc: str = "scoring"):
        import time

        self.bar, self.enabled, self.start = None, enabled, time.perf_counter()
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(desc=desc, unit="tok", unit_scale=True, file=sys.stderr, disable=None,
                            dynamic_ncols=True)

    def __call__(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def report(self, tokens: int, command: str = "xent eval") -> None:
        """One line on stderr: the run's scored tokens (all ranks), its time and tokens/s."""
        import time

        seconds = time.perf_counter() - self.start
        if self.enabled:
            rate = tokens / seconds if seconds > 0 else float("inf")
            print(f"{command}: {tokens:,} tokens in {seconds:.1f} s ({rate:,.0f} tokens/s)", file=sys.stderr)
