"""The demo's figures (matplotlib, Agg backend) and report.html, which only links files written here."""

from __future__ import annotations

import html
import math
import os

COLORS = {"ce": "#1f77b4", "ce_ls": "#ff7f0e", "ce_zloss": "#8c564b", "emo": "#2ca02c", "tailr": "#d62728",
          "gold": "#9467bd", "focal": "#e377c2", "poly": "#7f7f7f"}

EXPLANATIONS = {
    "ce": (
        "Cross-entropy, −log q<sub>y</sub>: maximum likelihood, a proper scoring rule. Its expected value"
        " is minimised exactly by the true distribution, so it is the only objective here whose optimum "
        "is the source itself."
    ),
    "ce_ls": (
        "Label smoothing (ε = 0.1): cross-entropy against (1−ε)·one-hot + ε/V. The optimum puts at least "
        "ε/V on every token: a floor under every probability that pulls against over-confidence (see the "
        "reliability diagrams) and costs likelihood where the truth is sharp (see the KL to the Markov "
        "source, whose transitions give most words probability zero)."
    ),
    "ce_zloss": (
        "Cross-entropy plus 10<sup>−4</sup>·(logsumexp z)², which keeps the softmax normaliser near 1 for"
        " numerical stability in large-scale training (PaLM, OLMo); almost no effect on the "
        "probabilities."
    ),
    "emo": (
        "EMO-1 (Ren et al., ICLR 2024): half cross-entropy, half the earth mover's distance Σ<sub>i</sub>"
        " q<sub>i</sub> C(i, y) rescaled to cross-entropy's size, with the cost C = 1 − cos between rows "
        "of a frozen copy of the initial LM head. Its value equals cross-entropy; its gradient also "
        "pushes mass away from tokens far from the target. Trained from scratch, the initial head is "
        "random, so all costs are near 1 and EMO behaves like cross-entropy plus a Poly-like term."
    ),
    "tailr": (
        "TaiLr (Ji et al., ICLR 2023): cross-entropy on each token weighted by sg(q/(γ + (1−γ)q)) clipped"
        " to [b, 1] (γ = 0.1, b = 0.3). Tokens the model finds unlikely get less weight: a "
        "total-variation-like objective that trades recall of rare continuations for precision."
    ),
    "gold": (
        "GOLD-δ (Pang &amp; He, ICLR 2021): cross-entropy weighted by the model's own "
        "sg(max(q<sub>y</sub>, b)), b = 0.1 — off-policy policy gradient with reward 1. Strongly "
        "mode-seeking: it mostly learns what it already predicts."
    ),
    "focal": (
        "Focal loss (Lin et al., 2017), γ = 2: −(1−q<sub>y</sub>)<sup>γ</sup> log q<sub>y</sub>. "
        "Down-weights tokens that are already predicted well, which counters over-confidence "
        "(Mukhoti et al., NeurIPS 2020)."
    ),
    "poly": (
        "Poly-1 (Leng et al., ICLR 2022), ε = 1: cross-entropy + ε(1 − q<sub>y</sub>), an extra push on "
        "the probability of the correct token."
    ),
}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_all(out: str, summary: dict, passage_losses: dict, tokenizer, data, cfg) -> list[str]:
    """Writes every PNG and report.html into ``out``; returns their file names."""
    files = [
        _training_curves(out, summary),
        _perplexity(out, summary),
        _reliability(out, summary),
        _loss_vs_p(out, cfg, len(tokenizer)),
        _passage(out, summary, passage_losses),
    ]
    files.append(_html(out, summary, files))
    return files


def _save(fig, out: str, name: str) -> str:
    fig.savefig(os.path.join(out, name), dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return name


def _training_curves(out: str, summary: dict) -> str:
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, s in summary["objectives"].items():
        c = COLORS.get(name)
        steps = [h["step"] for h in s["history"]]
        raw = [h["loss"] for h in s["history"]]
        axes[0].plot(steps, raw, color=c, lw=0.6, alpha=0.3)
        axes[0].plot(steps, _ema(raw), color=c, label=name, lw=1.5)
        ev = s["eval_history"]
        for ax, key in ((axes[1], "heldout"), (axes[2], "synthetic")):
            ax.plot([e["step"] for e in ev], [e[key] for e in ev], "o-", color=c, label=name, ms=3)
    axes[0].set_title("training objective (each its own loss; smoothed)")
    axes[1].set_title("held-out docstrings: cross-entropy")
    axes[2].set_title("held-out Markov text: cross-entropy")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("loss (nats/token)")
    axes[1].set_ylabel("nats/token")
    axes[0].legend()
    return _save(fig, out, "training_curves.png")


def _ema(values: list[float], decay: float = 0.9) -> list[float]:
    """Exponential moving average, started at the first value."""
    out, acc = [], None
    for v in values:
        acc = v if acc is None else decay * acc + (1 - decay) * v
        out.append(acc)
    return out


def _perplexity(out: str, summary: dict) -> str:
    plt = _plt()
    names = list(summary["objectives"])
    objs = summary["objectives"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    ppl = [objs[n]["perplexity"] for n in names]
    lo = [objs[n]["perplexity"] - objs[n]["perplexity_ci95"][0] for n in names]
    hi = [objs[n]["perplexity_ci95"][1] - objs[n]["perplexity"] for n in names]
    axes[0].bar(names, ppl, yerr=[lo, hi], capsize=5, color=[COLORS.get(n) for n in names])
    axes[0].set_title("held-out docstrings: perplexity\n(95% CI, document-clustered)")
    axes[0].set_ylabel("perplexity")
    kl = [objs[n]["synthetic_kl_nats_per_word"] for n in names]
    err = [1.96 * (objs[n].get("synthetic_kl_nats_per_word_se") or 0.0) for n in names]
    axes[1].bar(names, kl, yerr=err, capsize=5, color=[COLORS.get(n) for n in names])
    h = summary["data"]["entropy_rate_nats_per_word"]
    axes[1].set_title(f"Markov text: loss above the source's exact −log p, 95% CI\n"
                      f"(entropy rate {h:.3f} nats/word)")
    axes[1].set_ylabel("KL estimate, nats/word")
    for ax in axes:
        ax.grid(alpha=0.3, axis="y")
    return _save(fig, out, "perplexity.png")


def _reliability(out: str, summary: dict) -> str:
    plt = _plt()
    names = list(summary["objectives"])
    rows = math.ceil(len(names) / 4)
    cols = math.ceil(len(names) / rows)  # 5 objectives: 3 + 2, not 4 + 1
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.6 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        s = summary["objectives"][name]
        bins = [b for b in s["heldout"]["calibration"] if b["tokens"]]
        centers = [(b["bin"][0] + b["bin"][1]) / 2 for b in bins]
        ax.bar(centers, [b["accuracy"] for b in bins], width=1 / 15, edgecolor="black", lw=0.5,
               color=COLORS.get(name), alpha=0.8, label="accuracy")
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "k.", ms=4,
                label="(confidence, accuracy)")
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(f"{name}: ECE {s['ece']:.3f}")
        ax.set_xlabel("top-1 probability")
        ax.set_ylabel("top-1 accuracy")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle("Reliability on held-out docstrings (15 bins)")
    fig.tight_layout()
    return _save(fig, out, "reliability.png")


def _loss_vs_p(out: str, cfg, vocab_size: int) -> str:
    """Each objective's loss and the gradient on the correct logit, as functions of p = q_y, for a
    distribution that spreads 1 − p evenly over the other tokens — computed with the loss objects."""
    import torch

    from ..training import make_objective
    from ._model import build_model

    plt = _plt()
    p = torch.logspace(-3, math.log10(0.999), 200, dtype=torch.float64)
    V = vocab_size
    logits = torch.log((1 - p) / (V - 1)).unsqueeze(1).repeat(1, V)
    logits[:, 0] = p.log()
    target = torch.zeros(len(p), dtype=torch.long)
    init = build_model(V, seq_len=cfg.seq_len, d_model=cfg.d_model, n_layer=1, n_head=cfg.n_head,
                       seed=cfg.seed)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    axes[0].plot(p, -p.log(), "k--", lw=2, label="−log p")
    for name in cfg.objectives:
        loss = make_objective(name, init)
        if getattr(loss, "unit_embedding", None) is not None:
            loss.unit_embedding = loss.unit_embedding.double()
        z = logits.clone().requires_grad_(True)
        value = loss(z, target)
        (grad,) = torch.autograd.grad(value.sum(), z)
        axes[0].plot(p, value.detach(), color=COLORS.get(name), label=name)
        axes[1].plot(p, -grad[:, 0], color=COLORS.get(name), label=name)
    axes[1].plot(p, 1 - p, "k--", lw=1, label="1 − p (cross-entropy)")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("p = predicted probability of the correct token")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("per-token loss (nats)")
    axes[0].set_title("loss as a function of p")
    axes[1].set_ylabel("−∂ℓ/∂z_y")
    axes[1].set_title("pull on the correct logit")
    axes[0].legend()
    return _save(fig, out, "loss_vs_p.png")


def _passage(out: str, summary: dict, passage_losses: dict) -> str:
    plt = _plt()
    names = list(passage_losses)
    tokens = passage_losses[names[0]]["tokens"][:64]
    grid = [passage_losses[n]["nll"][: len(tokens)] for n in names]
    fig, ax = plt.subplots(figsize=(max(8, 0.22 * len(tokens)), 0.5 * len(names) + 1.8))
    im = ax.imshow(grid, aspect="auto", cmap="magma_r")
    ax.set_yticks(range(len(names)), names)
    labels = [t.replace("\n", "⏎").replace(" ", "·") for t in tokens]
    ax.set_xticks(range(len(tokens)), labels, rotation=90, fontsize=7, family="monospace")
    fig.colorbar(im, ax=ax, label="−log q(token) nats", pad=0.01)
    ax.set_title(f"per-token loss on a held-out passage ({summary['passage']['source']})")
    return _save(fig, out, "passage.png")


def _fmt(x: float, nd: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def table_rows(summary: dict) -> list[list[str]]:
    """The summary table, shared by the terminal and the report."""
    rows = []
    for name, s in summary["objectives"].items():
        lo, hi = s["perplexity_ci95"] or [math.nan, math.nan]
        rows.append([name, f"{s['perplexity']:.2f}", f"[{lo:.2f}, {hi:.2f}]", _fmt(s["bits_per_byte"]),
                     _fmt(s["ece"]), _fmt(s["synthetic_kl_nats_per_word"], 4),
                     _fmt(s["synthetic_gap_bits_per_byte"], 4), f"{s['train_seconds']:.1f}"])
    return rows


TABLE_HEADER = ["objective", "held-out ppl", "95% CI", "bits/byte", "ECE", "Markov KL/word",
                "Markov gap bpb", "train s"]


def _findings(summary: dict) -> str:
    """One sentence per headline metric, naming the best objective (computed, not written by hand)."""
    objs = summary["objectives"]
    if len(objs) < 2:
        return ""

    def best(key):
        return min(objs, key=lambda n: objs[n][key])

    p, e, k = best("perplexity"), best("ece"), best("synthetic_kl_nats_per_word")
    items = [
        f"Lowest held-out perplexity: <code>{p}</code> ({objs[p]['perplexity']:.2f}).",
        f"Best calibrated (lowest ECE): <code>{e}</code> ({objs[e]['ece']:.3f}).",
        f"Closest to the Markov source (smallest KL): <code>{k}</code> "
        f"({objs[k]['synthetic_kl_nats_per_word']:.4f} nats/word).",
    ]
    return "<ul>" + "".join(f"<li>{i}</li>" for i in items) + "</ul>"


def _html(out: str, summary: dict, figures: list[str]) -> str:
    e = html.escape
    d, c, env = summary["data"], summary["config"], summary["environment"]
    head = "".join(f"<th>{e(h)}</th>" for h in TABLE_HEADER)
    body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>"
                   for row in table_rows(summary))
    expl = "".join(
        f"<dt>{e(n)}</dt><dd>{EXPLANATIONS.get(n, e(summary['objectives'][n]['description']))}</dd>"
        for n in summary["objectives"])
    captions = {
        "training_curves.png": (
            "Left: each objective's own training loss (not comparable across objectives, except EMO-1 whose "
            "value is the cross-entropy). Middle and right: cross-entropy of every model on the same held-out"
            " sequences during training."
        ),
        "perplexity.png": (
            "Left: held-out perplexity with a 95% interval from the document-clustered standard error. Right:"
            " on text from the Markov source, each model's loss minus the source's exact −log p of the same "
            "text, per word: an estimate of KL(source ‖ model), 0 for a perfect model."
        ),
        "reliability.png": (
            "Reliability diagrams: top-1 accuracy against top-1 probability. On the diagonal a model is "
            "calibrated; below it, over-confident; above, under-confident."
        ),
        "loss_vs_p.png": (
            "What each objective asks of one token, computed with the loss objects: its value and its pull on"
            " the correct logit as the probability p of the correct token varies (the rest of the mass spread"
            " evenly). Cross-entropy's pull, 1 − p, is largest on the tokens it finds least likely; TaiLr, "
            "GOLD and EMO pull less there, focal pulls less on the tokens it already predicts well."
        ),
        "passage.png": (
            "Per-token loss of each model on one held-out passage: darker is more surprised."
        ),
    }
    figs = "".join(f'<figure><img src="{e(f)}" alt="{e(f)}"><figcaption>{e(captions.get(f, ""))}'
                   f"</figcaption></figure>" for f in figures)
    quick = " --quick" if summary["config"].get("preset") == "quick" else ""
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>xent demo: training objectives compared</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em;
       color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #ccc; padding: 4px 10px; text-align: right; }}
th {{ background: #f3f3f3; }} td:first-child {{ text-align: left; font-family: monospace; }}
figure {{ margin: 2em 0; }} img {{ max-width: 100%; }} figcaption {{ color: #555; font-size: 0.92em; }}
dt {{ font-family: monospace; font-weight: bold; margin-top: 0.6em; }} code {{ background: #f3f3f3; }}
</style></head>
<body>
<h1>xent demo: the same tiny model, trained with different objectives</h1>
<p>Every model is a {c['n_layer']}-layer GPT-2 with d = {c['d_model']}, trained for {c['steps']} steps
of {c['batch_size']} × {c['seq_len']} tokens from the same initial weights on the same batches
(seed {summary['seed']}); only the objective differs. The loss is computed from the hidden states by
<code>xent.linear_loss</code>, so the logits are never materialised. The data is built offline:
{d['train_documents']} training documents (docstrings of the Python standard library and text from a
{d['markov_words']}-word Markov chain), {d['heldout_documents']} held-out docstring documents from other
modules, and {d['synthetic_documents']} held-out Markov documents, whose true entropy is known exactly
({d['entropy_rate_nats_per_word']:.4f} nats/word).</p>
<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
{_findings(summary)}
<p>Held-out metrics are computed by <code>xent.eval.evaluate</code> (the same numbers as
<code>xent eval --model models/NAME --data data/heldout.jsonl</code>).
</p>
<h2>The objectives</h2>
<dl>{expl}</dl>
<h2>Figures</h2>
{figs}
<p>Data, training and evaluation took {summary.get('total_seconds', math.nan):.0f} s
({summary.get('total_cpu_seconds', math.nan):.0f} CPU-seconds) with Python {e(env['python'])},
torch {e(env['torch'])}. Reproduce: <code>xent demo{quick} --seed {summary['seed']}</code>.
Files: <code>summary.json</code>, the checkpoints under <code>models/</code>, the held-out text under
<code>data/</code>.</p>
</body></html>
"""
    with open(os.path.join(out, "report.html"), "w", encoding="utf-8") as f:
        f.write(page)
    return "report.html"
