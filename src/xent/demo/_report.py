"""The demo's figures (matplotlib, Agg backend) and report.html, which only links files written here."""

from __future__ import annotations

import html
import math
import os

from ..eval._html import THIN_BIN_SHARE, draw_reliability

COLORS = {"ce": "#1f77b4", "ce_ls": "#ff7f0e", "ce_zloss": "#8c564b", "emo": "#2ca02c", "tailr": "#d62728",
          "gold": "#9467bd", "focal": "#e377c2", "poly": "#7f7f7f", "dft": "#bcbd22", "eaft": "#17becf",
          "entropy_reg": "#aec7e8", "rho1": "#98df8a", "pretrained": "#000000"}
_SWEEP = ["#ff9896", "#a0522d", "#800000", "#ffbb78"]  # the tailr@γ runs


def color(name: str, names=()) -> str | None:
    """The colour of a run: its objective's, or one of the TaiLr sweep's."""
    if name in COLORS:
        return COLORS[name]
    sweep = [n for n in names if n.startswith("tailr@")]
    return _SWEEP[sweep.index(name) % len(_SWEEP)] if name in sweep else None

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
    "pretrained": (
        "The phase-1 model: cross-entropy from scratch on the training modules' docstrings and the Markov "
        "text, not fine-tuned on the target domain. Every other row starts from its weights."
    ),
    "emo": (
        "EMO-1 (Ren et al., ICLR 2024): half cross-entropy, half the earth mover's distance Σ<sub>i</sub>"
        " q<sub>i</sub> C(i, y) rescaled to cross-entropy's size, with the cost C = 1 − cos between rows "
        "of a frozen copy of the LM head at the start of fine-tuning: the phase-1 model's head, as in the "
        "paper (a trained head puts tokens used alike near each other). Its value equals cross-entropy; its"
        " gradient also pushes mass away from tokens far from the target."
    ),
    "tailr": (
        "TaiLr (Ji et al., ICLR 2023): cross-entropy on each token weighted by sg(q/(γ + (1−γ)q)) clipped"
        " to [b, 1] (γ = 0.1, b = 0.3). Tokens the model finds unlikely get less weight: a "
        "total-variation-like objective that trades recall of rare continuations for precision. The "
        "authors choose γ per regime (≈ 0 from scratch, 0.1–0.8 for fine-tuning); the tailr@γ rows are "
        "the same objective at other γ (b = 0.3). At γ = 0 the weight is 1: cross-entropy, the ce row. "
        "The paper frames MLE's fault as over-estimating low-quality text (recall over precision); a "
        "precision-first, mode-seeking objective can raise the top-1 confidence, which the over-confidence "
        "row of the claims table measures."
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
    "dft": (
        "DFT, dynamic fine-tuning (Wu et al., 2025): cross-entropy weighted by the model's own "
        "sg(q<sub>y</sub>) (GOLD with b = 0; TRL's <code>loss_type=\"dft\"</code>): tokens the model finds "
        "unlikely barely move it."
    ),
    "eaft": (
        "EAFT (Diao et al., 2026): cross-entropy weighted by the entropy of the softmax over the 20 largest "
        "logits, divided by 3 (the authors' code): confident tokens whose label the model disagrees with get "
        "little gradient, so fine-tuning forgets less."
    ),
    "entropy_reg": (
        "Cross-entropy minus 0.01 × the predictive entropy (the confidence penalty of Pereyra et al., 2017): "
        "keeps the distribution from collapsing."
    ),
    "rho1": (
        "Rho-1 (Lin et al., 2024): cross-entropy on the 60 % of each batch's tokens whose loss exceeds the "
        "reference model's most; the reference here is the pre-trained model, so it trains on the tokens "
        "where the fine-tune gained least (or lost most) over its start."
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
        _generation(out, summary),
        _temperature(out, summary),
        _tailr_sweep(out, summary),
        _reliability(out, summary),
        _loss_vs_p(out, cfg, len(tokenizer)),
        _passage(out, summary, passage_losses),
    ]
    files = [f for f in files if f]
    files.append(_html(out, summary, files))
    return files


def _save(fig, out: str, name: str) -> str:
    fig.savefig(os.path.join(out, name), dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return name


def _runs(summary: dict) -> dict:
    """The pre-trained model (when there is one) and the fine-tuned runs, in the table's order."""
    pre = {"pretrained": summary["pretrained"]} if summary.get("pretrained") else {}
    return {**pre, **summary["objectives"]}


def _training_curves(out: str, summary: dict) -> str:
    """Phase 1 (steps ≤ 0) then phase 2 (steps > 0) on one axis."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    names = list(_runs(summary))
    for name, s in _runs(summary).items():
        c = color(name, names)
        offset = -len(s["history"]) if name == "pretrained" else 0
        steps = [h["step"] + offset for h in s["history"]]
        raw = [h["loss"] for h in s["history"]]
        axes[0].plot(steps, raw, color=c, lw=0.6, alpha=0.3)
        axes[0].plot(steps, _ema(raw), color=c, label=name, lw=1.5)
        ev = s["eval_history"]
        for ax, key in ((axes[1], "heldout"), (axes[2], "synthetic")):
            ax.plot([e["step"] + offset for e in ev], [e[key] for e in ev], "o-", color=c, label=name, ms=3)
            if ev:  # the table's value (xent.eval.evaluate on the same documents) at the last step
                ax.plot([ev[-1]["step"] + offset], [s[key]["nll_mean"]], "x", color=c, ms=8, mew=1.5)
    axes[0].set_title("training objective (each its own loss; smoothed)\nphase 1 at steps ≤ 0, phase 2 after")
    axes[1].set_title("held-out target documents: cross-entropy\n(×: the table's value)")
    axes[2].set_title("held-out Markov text: cross-entropy\n(×: the evaluator's value)")
    for ax in axes:
        ax.set_xlabel("step (phase 2; phase 1 at ≤ 0)")
        ax.axvline(0, color="grey", lw=0.8, ls=":")
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
    objs = _runs(summary)
    names = list(objs)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    ppl = [objs[n]["perplexity"] for n in names]
    lo = [objs[n]["perplexity"] - objs[n]["perplexity_ci95"][0] for n in names]
    hi = [objs[n]["perplexity_ci95"][1] - objs[n]["perplexity"] for n in names]
    axes[0].bar(names, ppl, yerr=[lo, hi], capsize=5, color=[color(n, names) for n in names])
    axes[0].set_title("held-out target documents: perplexity\n(95% CI, document-clustered)")
    axes[0].set_ylabel("perplexity")
    kl = [objs[n]["synthetic_kl_nats_per_word"] for n in names]
    err = [1.96 * (objs[n].get("synthetic_kl_nats_per_word_se") or 0.0) for n in names]
    axes[1].bar(names, kl, yerr=err, capsize=5, color=[color(n, names) for n in names])
    h = summary["data"]["entropy_rate_nats_per_word"]
    axes[1].set_title(f"Markov text: loss above the source's exact −log p, 95% CI\n"
                      f"(entropy rate {h:.3f} nats/word)")
    axes[1].set_ylabel("KL estimate, nats/word")
    for ax in axes:
        ax.grid(alpha=0.3, axis="y")
        ax.tick_params(axis="x", labelrotation=30)
    return _save(fig, out, "perplexity.png")


def _generation(out: str, summary: dict) -> str | None:
    """MAUVE of every model's samples with its interval over seeds; repetition and distinct-2 beside the
    true continuations'."""
    objs = {n: s for n, s in _runs(summary).items() if "generation" in s}
    if not objs:
        return None
    plt = _plt()
    names = list(objs)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    m = [objs[n]["generation"]["mauve"] for n in names]
    lo = [objs[n]["generation"]["mauve"] - objs[n]["generation"]["mauve_ci95"][0] for n in names]
    hi = [objs[n]["generation"]["mauve_ci95"][1] - objs[n]["generation"]["mauve"] for n in names]
    cols = [color(n, names) for n in names]
    axes[0].bar(names, m, yerr=[[max(0, v) for v in lo], [max(0, v) for v in hi]], capsize=5, color=cols)
    axes[0].set_ylim(0, 1)
    axes[0].set_title("MAUVE of samples vs the true continuations\n(mean of the seeds, 95% t interval)")
    ref = summary["generation"]["reference"]
    for ax, key, title in ((axes[1], "repetition_4", "seq-rep-4 (lower: fewer repeats)"),
                           (axes[2], "distinct_2", "distinct-2 (higher: more diverse)")):
        ax.bar(names, [objs[n]["generation"][key] for n in names], color=cols)
        ax.axhline(ref[key], color="k", ls="--", lw=1, label="true continuations")
        ax.set_title(title)
        ax.legend()
    for ax in axes:
        ax.grid(alpha=0.3, axis="y")
        ax.tick_params(axis="x", labelrotation=30)
    return _save(fig, out, "generation.png")


def _temperature(out: str, summary: dict) -> str | None:
    temp = summary["objectives"].get("ce", {}).get("temperature")
    if not temp:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    tau = [r["temperature"] for r in temp["scan"]]
    for ax, key, title in ((axes[0], "nll_mean", "held-out NLL (nats/token)"),
                           (axes[1], "entropy_mean", "mean predictive entropy (nats)"),
                           (axes[2], "ece", "ECE (15 bins)")):
        ax.plot(tau, [r[key] for r in temp["scan"]], "-", color=COLORS["ce"])
        ax.axvline(temp["t_star"], color="k", ls="--", lw=1, label=f"fitted T* = {temp['t_star']:.3f}")
        ax.axvline(1.0, color="grey", ls=":", lw=1)
        ax.plot([temp["t_star"]], [temp["at_t_star"][key]], "o", color="k")
        ax.set_title(title)
        ax.set_xlabel("temperature τ (logits / τ)")
        ax.legend()
    g = {1.0: summary["objectives"]["ce"]["generation"]}
    g.update({float(t): v for t, v in temp["samples"].items()})
    ts = sorted(g)
    m = [g[t]["mauve"] for t in ts]
    axes[3].errorbar(ts, m, yerr=[[max(0, g[t]["mauve"] - g[t]["mauve_ci95"][0]) for t in ts],
                                  [max(0, g[t]["mauve_ci95"][1] - g[t]["mauve"]) for t in ts]],
                     fmt="o-", capsize=5, color=COLORS["ce"])
    axes[3].axvline(temp["t_star"], color="k", ls="--", lw=1)
    axes[3].set_ylim(0, 1)
    axes[3].set_title("MAUVE of the ce model's samples at τ\n(95% t interval over seeds)")
    axes[3].set_xlabel("sampling temperature τ")
    for ax in axes:
        ax.grid(alpha=0.3)
    return _save(fig, out, "temperature.png")


def _tailr_sweep(out: str, summary: dict) -> str | None:
    """TaiLr's γ against perplexity, ECE and over-confidence (γ = 0 is the ce run)."""
    objs = summary["objectives"]
    points = [(0.0, "ce")] if "ce" in objs else []
    for name, run in summary.get("runs", {}).items():
        if run["objective"] == "tailr" and name in objs:
            points.append((run["options"].get("gamma", 0.1), name))
    if len(points) < 2:
        return None
    points.sort()
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    g = [p[0] for p in points]
    ppl = [objs[n]["perplexity"] for _, n in points]
    lo = [objs[n]["perplexity"] - objs[n]["perplexity_ci95"][0] for _, n in points]
    hi = [objs[n]["perplexity_ci95"][1] - objs[n]["perplexity"] for _, n in points]
    axes[0].errorbar(g, ppl, yerr=[lo, hi], fmt="o-", capsize=5, color=COLORS["tailr"])
    axes[0].set_title("held-out perplexity (95% CI, document-clustered)")
    axes[1].plot(g, [objs[n]["ece"] for _, n in points], "o-", color=COLORS["tailr"])
    axes[1].set_title("ECE (15 bins)")
    over = [objs[n]["heldout"].get("doc_overconfidence") for _, n in points]
    if all(o is not None for o in over):
        tokens = objs[points[0][1]]["heldout"]["doc_tokens"]
        mean = [sum(o) / sum(tokens) for o in over]
        err = [0.0 if n == "ce" else 1.96 * objs[n]["vs_baseline"]["heldout_overconfidence"]["se"]
               for _, n in points]
        axes[2].errorbar(g, mean, yerr=err, fmt="o-", capsize=5, color=COLORS["tailr"])
        axes[2].axhline(0, color="k", lw=0.8)
        axes[2].set_title("over-confidence: mean top-1 probability − accuracy\n"
                          "(bars: 1.96 × the paired SE of the difference from γ = 0)")
    for ax in axes:
        ax.set_xlabel("TaiLr γ (0 = cross-entropy)")
        ax.grid(alpha=0.3)
    return _save(fig, out, "tailr_sweep.png")


def _reliability(out: str, summary: dict) -> str:
    plt = _plt()
    objs = _runs(summary)
    names = list(objs)
    rows = math.ceil(len(names) / 4)
    cols = math.ceil(len(names) / rows)  # 5 objectives: 3 + 2, not 4 + 1
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.6 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        s = objs[name]
        draw_reliability(ax, s["heldout"]["calibration"], color=color(name, names) or "C0")
        ax.set_title(f"{name}: ECE {s['ece']:.3f}")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(f"Reliability on held-out target documents (15 bins; tokens per bin over each bar, bins "
                 f"with "
                 f"under {THIN_BIN_SHARE:.0%} of the tokens in grey)")
    fig.tight_layout()
    return _save(fig, out, "reliability.png")


def _loss_vs_p(out: str, cfg, vocab_size: int) -> str:
    """Each objective's loss and the gradient on the correct logit, as functions of p = q_y, for a
    distribution that spreads 1 − p evenly over the other tokens — computed with the loss objects."""
    import torch

    from ..training import make_objective
    from ._config import runs
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
    plan = runs(cfg)
    for name, (objective, options) in plan.items():
        if objective == "rho1":  # cross-entropy on the tokens it selects: the ce curve (see the caption)
            continue
        loss = make_objective(objective, init, **options)
        if getattr(loss, "unit_embedding", None) is not None:
            loss.unit_embedding = loss.unit_embedding.double()
        z = logits.clone().requires_grad_(True)
        value = loss(z, target)
        (grad,) = torch.autograd.grad(value.sum(), z)
        axes[0].plot(p, value.detach(), color=color(name, plan), label=name)
        axes[1].plot(p, -grad[:, 0], color=color(name, plan), label=name)
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


# what each plotted objective does to the pull on the correct logit, as p varies (loss_vs_p.png)
_PULLS = {
    "tailr": "TaiLr (tailr, tailr@γ) multiplies it by its weight q/(γ + (1−γ)q) clipped to [b, 1]: less "
             "pull on unlikely tokens, the more so the larger γ",
    "gold": "GOLD multiplies it by max(q, b): little pull below p = b",
    "dft": "DFT multiplies it by q: almost none on unlikely tokens",
    "emo": "EMO has cross-entropy's value but about half its pull on unlikely tokens (half its gradient "
           "is the transport cost's)",
    "focal": "focal pulls less on the tokens it already predicts well",
    "poly": "Poly-1 adds ε·p(1 − p) to it",
    "ce_ls": "label smoothing stops pulling before p = 1 (it keeps ε/V on every token)",
    "ce_zloss": "z-loss leaves it almost unchanged",
    "eaft": "EAFT multiplies it by the normalised top-k entropy (small where the model is confident)",
    "entropy_reg": "the entropy bonus adds −β·p·(log p + H) to it",
}


def loss_vs_p_caption(summary: dict) -> str:
    """The caption of loss_vs_p.png, naming the curves it plots: the demo's runs (rho1's per-token loss is
    cross-entropy's, so it has no curve of its own) and the dashed references."""
    plotted = [n for n, r in summary.get("runs", {}).items() if r["objective"] != "rho1"]
    objectives = {summary["runs"][n]["objective"] for n in plotted}
    pulls = [text for name, text in _PULLS.items() if name in objectives]
    return ("What each objective asks of one token, computed with the loss objects: left, its value; right, "
            "its pull −∂ℓ/∂z_y on the correct logit, as the probability p of the correct token varies (the "
            "rest of the mass spread evenly over the other tokens). Curves: "
            f"{', '.join(plotted)} (legend); dashed black, cross-entropy's −log p (left) and 1 − p (right). "
            "Cross-entropy's pull, 1 − p, is largest on the tokens it finds least likely"
            + ("; " + "; ".join(pulls) if pulls else "") + "."
            + (" rho1 is not drawn: its loss is cross-entropy on the tokens it selects." if any(
                r["objective"] == "rho1" for r in summary.get("runs", {}).values()) else ""))


def _passage(out: str, summary: dict, passage_losses: dict) -> str:
    plt = _plt()
    names = list(passage_losses)
    tokens = passage_losses[names[0]]["tokens"]  # cut at the end of a word (_run.word_cut)
    grid = [passage_losses[n]["nll"] for n in names]
    fig, ax = plt.subplots(figsize=(max(8, 0.22 * len(tokens)), 0.5 * len(names) + 1.8))
    im = ax.imshow(grid, aspect="auto", cmap="magma_r")
    ax.set_yticks(range(len(names)), names)
    labels = [t.replace("\n", "⏎").replace(" ", "·") for t in tokens]
    ax.set_xticks(range(len(tokens)), labels, rotation=90, fontsize=7, family="monospace")
    fig.colorbar(im, ax=ax, label="−log q(token) nats", pad=0.01)
    ax.set_title(f"per-token loss on the first {len(tokens)} tokens of a held-out passage "
                 f"({summary['passage']['source']})")
    return _save(fig, out, "passage.png")


def _fmt(x: float, nd: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


SIGNIFICANT = "*"  # marks a paired difference with |Δ| > 1.96 SE


WORSE = "worse"  # marks a fine-tune whose held-out loss is above the pre-trained model's


def table_header(summary: dict) -> list[str]:
    """The column names of :func:`table_rows` (the baseline named in the Δ column)."""
    pre = ["Δ NLL vs pretrained ± SE"] if summary.get("pretrained") else []
    return ["objective", "held-out ppl", "95% CI", *pre, f"Δ NLL vs {summary.get('baseline', 'ce')} ± SE",
            "bits/byte", "ECE", "Markov KL/word", "Markov gap bpb", "MAUVE", "train CPU s"]


def _delta(entry: dict, key: str, which: str = "vs_baseline", none: str = "(baseline)") -> str:
    if which not in entry:
        return none
    d = entry[which][key]
    mark = f" {SIGNIFICANT}" if d["significant"] else ""
    if which == "vs_pretrained" and d["diff"] > 0:
        mark += f" {WORSE}"
    return f"{d['diff']:+.4f} ± {_fmt(d['se'], 4)}{mark}"


def table_rows(summary: dict) -> list[list[str]]:
    """The summary table, shared by the terminal and the report."""
    rows = []
    for name, s in _runs(summary).items():
        lo, hi = s["perplexity_ci95"] or [math.nan, math.nan]
        mauve = _fmt(s["generation"]["mauve"]) if "generation" in s else "–"
        pre = [_delta(s, "heldout_nll_nats_per_token", "vs_pretrained", "(the start)")] \
            if summary.get("pretrained") else []
        rows.append([name, f"{s['perplexity']:.2f}", f"[{lo:.2f}, {hi:.2f}]", *pre,
                     _delta(s, "heldout_nll_nats_per_token"), _fmt(s["bits_per_byte"]), _fmt(s["ece"]),
                     _fmt(s["synthetic_kl_nats_per_word"], 4), _fmt(s["synthetic_gap_bits_per_byte"], 4),
                     mauve, f"{s['train_cpu_seconds']:.1f}"])
    return rows


GENERATION_HEADER = ["model", "MAUVE", "95% CI (seeds)", "Δ MAUVE vs ce [95% CI]", "rep-4", "distinct-1",
                     "distinct-2", "distinct-3"]


def generation_rows(summary: dict) -> list[list[str]]:
    """One row per model (and the true continuations): MAUVE with its interval over seeds, the paired
    difference from ce's, and the samples' repetition and distinct-n."""
    from ._claims import mauve_difference

    objs = _runs(summary)
    ce = summary["objectives"].get("ce", {}).get("generation")
    rows = []
    samples = [(n, s["generation"]) for n, s in objs.items() if "generation" in s]
    temp = summary["objectives"].get("ce", {}).get("temperature", {})
    samples += [(f"ce, τ = {t}", g) for t, g in temp.get("samples", {}).items()]
    for name, g in samples:
        if ce is None or g is ce:
            delta = "(baseline)" if g is ce else "–"
        else:
            d = mauve_difference(g, ce)
            delta = f"{d['diff']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]" + (
                f" {SIGNIFICANT}" if d["called"] else "")
        lo, hi = g["mauve_ci95"]
        rows.append([name, _fmt(g["mauve"]), f"[{lo:.3f}, {hi:.3f}]", delta, _fmt(g["repetition_4"]),
                     _fmt(g["distinct_1"]), _fmt(g["distinct_2"]), _fmt(g["distinct_3"])])
    ref = summary.get("generation", {}).get("reference")
    if ref:
        rows.append(["true continuations", "–", "–", "–", _fmt(ref["repetition_4"]), _fmt(ref["distinct_1"]),
                     _fmt(ref["distinct_2"]), _fmt(ref["distinct_3"])])
    return rows


CLAIMS_HEADER = ["paper", "claim", "run", "measured (vs ce fine-tune)", "95% interval", "noise", "verdict"]


def claims_rows(summary: dict) -> list[list[str]]:
    rows = []
    for c in summary.get("claims", []):
        unit = f" {c['unit']}" if c["unit"] else ""
        rows.append([c["paper"], c["claim"], c["run"], f"{c['measure']}: {c['diff']:+.4f}{unit}"
                     + (f" ± {c['se']:.4f}" if c["se"] is not None else ""),
                     f"[{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}]", c["noise"], c["verdict"]])
    return rows


# What each column of the table means (the report prints these under it).
DEFINITIONS = [
    ("held-out ppl", "perplexity e<sup>L̄</sup>, L̄ the mean loss −ln q(token) in nats over every token of "
     "the held-out docstring documents (each document scored from its start, in windows of the model's "
     "context); 95% CI: e<sup>L̄ ± 1.96·SE</sup> with the standard error clustered by document."),
    ("Δ NLL vs BASE ± SE", "the paired difference of the held-out mean loss from BASE's, on the same "
     "tokens: Σ<sub>d</sub> (S<sub>d</sub> − S<sub>d</sub><sup>BASE</sup>) / Σ<sub>d</sub> n<sub>d</sub> "
     "(S<sub>d</sub> a document's summed loss, n<sub>d</sub> its tokens), ± its standard error clustered by"
     " document, √(D/(D−1)·Σ<sub>d</sub> (e<sub>d</sub> − Δ·n<sub>d</sub>)²) / Σ<sub>d</sub> n<sub>d</sub>"
     " with e<sub>d</sub> the document's difference. Negative is better; * marks |Δ| > 1.96·SE "
     "(significant at 5 %). Pairing removes what the models share (the hard documents are hard for "
     "all), so it resolves far smaller differences than the two perplexity intervals."),
    ("Δ NLL vs pretrained ± SE", "the same paired difference against the pre-trained model, the one "
     "every fine-tune started from: negative means fine-tuning lowered the held-out loss; positive, "
     "marked <em>worse</em>, means the fine-tune made it worse (it overfit the fine-tuning documents)."),
    ("bits/byte", "the summed loss in bits divided by the UTF-8 bytes of the text, Σℓ / (B·ln 2): "
     "unlike perplexity, comparable across tokenizers."),
    ("ECE", "expected calibration error: the tokens are put in 15 equal-width bins of the model's top-1 "
     "probability, and ECE = Σ<sub>b</sub> (n<sub>b</sub>/N)·|accuracy<sub>b</sub> − "
     "confidence<sub>b</sub>|, the token-weighted gap between how often the most probable token is right"
     " and how probable the model said it was. 0 is perfectly calibrated. No standard error is computed "
     "for it here."),
    ("Markov KL/word", "on the held-out Markov documents: (the model's summed loss − the source's exact "
     "−ln p of the same text) / words. Its expectation is KL(source ‖ model) per word, 0 only for the "
     "source itself; at this size every model is far above 0. Phase 2 fine-tunes on docstrings alone, so "
     "for the fine-tuned rows it measures how much of the Markov source they forgot."),
    ("Markov gap bpb", "the same difference per byte, in bits: the model's bits/byte on the Markov text "
     "minus the source's exact bits/byte (the Markov gap)."),
    ("MAUVE", "the mean over the sampling seeds of MAUVE between the model's samples and the true "
     "continuations of the same held-out prefixes (see Generation)."),
    ("train CPU s", "CPU time of the process that trained the objective (its steps, the evaluations of "
     "the training curves, saving the checkpoint), from the process's CPU clock: unlike wall time it "
     "does not grow when the objectives share busy cores."),
]


def _fmt(x: float, nd: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def _show(n: str, d: dict, unit: str) -> str:
    return f"{n} ({d['diff']:+.4f} ± {d['se']:.4f} {unit}, z = {d['z']:+.1f})"


def _verdict(summary: dict, key: str, unit: str, better: str, none: str) -> str:
    """One sentence on ``key`` of every objective's vs_baseline: the objectives significantly better
    (Δ < 0) and worse than the baseline, or that none is significantly better. ``better`` and ``none``
    are the sentence's openings, with {base} for the baseline's name. On the held-out loss, an objective
    better than the baseline but worse than the pre-trained model is not named a winner."""
    from ._compare import worse_than_pretrained

    base = summary["baseline"]
    objs = summary["objectives"]
    rows = [(n, s["vs_baseline"][key]) for n, s in objs.items() if "vs_baseline" in s]
    rows.sort(key=lambda r: r[1]["diff"])

    wins = [(n, d) for n, d in rows if d["significant"] and d["diff"] < 0]
    hollow = []
    if key == "heldout_nll_nats_per_token":
        hollow = [(n, d) for n, d in wins if worse_than_pretrained(objs[n])]
        wins = [w for w in wins if w not in hollow]
    losses = [(n, d) for n, d in rows if d["significant"] and d["diff"] > 0]
    if wins:
        text = better.format(base=base) + ": " + "; ".join(_show(n, d, unit) for n, d in wins) + "."
        if key == "synthetic_nats_per_word" and all(worse_than_pretrained(objs[n], key) for n, _ in wins):
            text += (" Still, each of them has a higher loss on the Markov text than the pre-trained model: "
                     "fine-tuning on docstrings alone forgets part of it; these forget less.")
    else:
        text = none.format(base=base)
        text += f" (the best difference: {_show(*rows[0], unit)})." if not rows[0][1]["significant"] else "."
    if hollow:
        text += (f" Lower than {base} but worse than the pre-trained model, so no win: "
                 f"{'; '.join(_show(n, d, unit) for n, d in hollow)}.")
    if losses:
        text += f" Significantly worse than {base}: {'; '.join(_show(n, d, unit) for n, d in losses)}."
    return text


def pretrained_finding(summary: dict) -> str | None:
    """Whether fine-tuning helped: the fine-tunes whose held-out loss is above the pre-trained model's
    (from ``vs_pretrained``), or that every one is below it."""
    objs = summary["objectives"]
    rows = [(n, s["vs_pretrained"]["heldout_nll_nats_per_token"]) for n, s in objs.items()
            if "vs_pretrained" in s]
    if not rows:
        return None
    worse = [(n, d) for n, d in rows if d["diff"] > 0]
    unit = "nats/token"
    if not worse:
        best = min(rows, key=lambda r: r[1]["diff"])
        return ("Every fine-tune lowered the held-out loss of the pre-trained model it started from (the "
                f"largest drop: {_show(*best, unit)}).")
    tokens = summary.get("data", {}).get("finetune_tokens", 0)
    return ("Fine-tuning made the held-out loss WORSE than the pre-trained model's for "
            f"{'; '.join(_show(n, d, unit) for n, d in worse)}: {'they' if len(worse) > 1 else 'it'} "
            f"overfit the {tokens:,} fine-tuning tokens (use fewer --steps, or stop on held-out loss: "
            "xent.train's patience). Beating ce is no win for a model worse than the one it started from.")


def findings(summary: dict) -> list[str]:
    """The headline comparisons, computed from the paired per-document differences with the baseline
    (``vs_baseline``) and with the pre-trained model (``vs_pretrained``): a winner is named only where its
    difference is significant and it is better than the model it was fine-tuned from."""
    objs = summary["objectives"]
    if len(objs) < 2 or "baseline" not in summary:
        pre = pretrained_finding(summary)
        return [pre] if pre else []
    ece = sorted(objs, key=lambda n: objs[n]["ece"])
    pre = pretrained_finding(summary)
    return [
        *([pre] if pre else []),
        _verdict(summary, "heldout_nll_nats_per_token", "nats/token",
                 "Significantly lower held-out perplexity than {base}",
                 "No objective has a significantly lower held-out perplexity than {base}"),
        _verdict(summary, "synthetic_nats_per_word", "nats/word",
                 "Significantly closer to the Markov source than {base} (lower loss on its text)",
                 "No objective is significantly closer to the Markov source than {base}"),
        f"ECE ranges from {objs[ece[0]]['ece']:.3f} ({ece[0]}) to {objs[ece[-1]]['ece']:.3f} ({ece[-1]}); "
        "ECE has no standard error here, so no objective is named the best calibrated.",
    ]


def _html(out: str, summary: dict, figures: list[str]) -> str:
    e = html.escape
    d, c, env = summary["data"], summary["config"], summary["environment"]
    items = findings(summary)
    head = "".join(f"<th>{e(h)}</th>" for h in table_header(summary))
    body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>"
                   for row in table_rows(summary))
    base = e(summary.get("baseline", "ce"))
    defs = "".join(f"<dt>{e(term.replace('BASE', base))}</dt><dd>{text.replace('BASE', base)}</dd>"
                   for term, text in DEFINITIONS)
    expl = "".join(
        f"<dt>{e(n)}</dt><dd>{EXPLANATIONS.get(n, e(summary['objectives'][n]['description']))}</dd>"
        for n in summary["objectives"])
    captions = {
        "training_curves.png": (
            "Left: each objective's own training loss (not comparable across objectives, except EMO-1 whose "
            "value is the cross-entropy). Middle and right: cross-entropy of every model during training on "
            "every held-out document (the same tokens as the table), cut into sequences of "
            f"{c['seq_len']} tokens that start every {c['seq_len'] - 1} tokens and overlap by one, so each "
            "token is scored once from its own document; the table's evaluator uses windows of "
            f"{c['seq_len']} inputs that predict {c['seq_len']} tokens, so its contexts differ slightly and "
            "the last point of a curve (•) is close to, not equal to, the evaluator's value (×)."
        ),
        "perplexity.png": (
            "Left: held-out perplexity with a 95% interval from the document-clustered standard error. Right:"
            " on text from the Markov source, each model's loss minus the source's exact −log p of the same "
            "text, per word: an estimate of KL(source ‖ model), 0 for a perfect model."
        ),
        "reliability.png": (
            "Reliability diagrams: top-1 accuracy against top-1 probability, in 15 bins (dots: each bin's "
            "mean probability and accuracy); the number over a bar is its tokens. Bins with fewer than "
            f"{THIN_BIN_SHARE:.0%} of the tokens are drawn in grey "
            "(their accuracy rests on few tokens and is noisy). On the diagonal a model is calibrated; "
            "below it, over-confident; above, under-confident."
        ),
        "loss_vs_p.png": loss_vs_p_caption(summary),
        "passage.png": (
            f"Per-token loss of each model on the first {len(summary['passage']['tokens'])} tokens of one "
            "held-out passage (cut at the end of a word): darker is more surprised."
        ),
    }
    captions.update({
        "generation.png": (
            "Left: MAUVE between each model's samples and the true continuations of the same held-out "
            "prefixes: the mean over the sampling seeds with its 95% t interval. Middle and right: "
            "repetition "
            "within a sample (seq-rep-4) and diversity across samples (distinct-2); dashed: the true "
            "continuations' own values."
        ),
        "temperature.png": (
            "The ce fine-tune on the held-out target text with its logits divided by τ (every token scored "
            "once, in the curves' sequences): mean loss, mean entropy and ECE against τ, the fitted "
            "temperature T* = argmin_T Σ_t ℓ_t(z_t/T) marked (dashed, •), and the MAUVE of its samples at "
            f"τ ∈ {{{', '.join(f'{t:g}' for t in sorted([1.0, *c.get('sample_temperatures', [])]))}}}."
        ),
        "tailr_sweep.png": (
            "TaiLr's γ (γ = 0 is cross-entropy exactly: the ce run), all fine-tuned from the same weights on "
            "the same batches: held-out perplexity, ECE and the over-confidence (mean top-1 probability "
            "minus top-1 accuracy; above 0: over-confident) side by side."
        ),
    })
    figs = "".join(f'<figure><img src="{e(f)}" alt="{e(f)}"><figcaption>{e(captions.get(f, ""))}'
                   f"</figcaption></figure>" for f in figures)
    quick = " --quick" if summary["config"].get("preset") == "quick" else ""
    gen = summary.get("generation", {})
    ghead = "".join(f"<th>{e(h)}</th>" for h in GENERATION_HEADER)
    gbody = "".join("<tr>" + "".join(f"<td>{e(x)}</td>" for x in row) + "</tr>"
                    for row in generation_rows(summary))
    chead = "".join(f"<th>{e(h)}</th>" for h in CLAIMS_HEADER)
    cbody = "".join("<tr>" + "".join(f"<td>{e(x)}</td>" for x in row) + "</tr>"
                    for row in claims_rows(summary))
    sanity = ""
    if summary.get("sanity_checks"):
        holds = {"reproduces": "holds", "contradicted": "FAILS", "inconclusive": "inconclusive"}
        srows = [[r[1], r[2], r[3].replace(" (vs ce fine-tune)", ""), r[4], holds[v["verdict"]]]
                 for r, v in zip(claims_rows({"claims": summary["sanity_checks"]}), summary["sanity_checks"])]
        sanity = ("<p>Sanity check of the scan (an identity of softmax(z/τ), not a claim of the papers): "
                  "the entropy must fall as τ → 0 and rise for τ &gt; 1, against τ = 1, per document.</p>"
                  '<table class="claims"><thead><tr>'
                  + "".join(f"<th>{h}</th>" for h in ("check", "run", "measured (vs τ = 1)", "95% interval",
                                                      "verdict"))
                  + "</tr></thead><tbody>"
                  + "".join("<tr>" + "".join(f"<td>{e(x)}</td>" for x in r) + "</tr>" for r in srows)
                  + "</tbody></table>")
    pre = summary.get("pretrained", {})
    temp = summary["objectives"].get("ce", {}).get("temperature")
    temp_text = ""
    if temp:
        at = temp["at_t_star"]
        one = min(temp["scan"], key=lambda r: abs(r["temperature"] - 1.0))
        temp_text = (f"<p>For the ce fine-tune, the fitted temperature is T* = {temp['t_star']:.3f} (computed"
                     " "
                     f"here over the {temp['tokens']} held-out tokens by Newton's method on 1/T): NLL "
                     f"{one['nll_mean']:.4f} → {at['nll_mean']:.4f} nats/token, ECE {one['ece']:.4f} → "
                     f"{at['ece']:.4f}, entropy {one['entropy_mean']:.3f} → {at['entropy_mean']:.3f} nats "
                     "(τ = 1 → T*). T* &gt; 1 means the model is over-confident on this text, &lt; 1 "
                     "under-confident.</p>")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>xent demo: training objectives compared</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em;
       color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #ccc; padding: 4px 10px; text-align: right; }}
th {{ background: #f3f3f3; }} td:first-child {{ text-align: left; font-family: monospace; }}
table.claims td {{ text-align: left; font-family: inherit; }}
figure {{ margin: 2em 0; }} img {{ max-width: 100%; }} figcaption {{ color: #555; font-size: 0.92em; }}
dt {{ font-family: monospace; font-weight: bold; margin-top: 0.6em; }} code {{ background: #f3f3f3; }}
.note {{ color: #555; font-size: 0.92em; }} .defs dd {{ font-size: 0.95em; }}
</style></head>
<body>
<h1>xent demo: pre-train once, fine-tune with each objective, test the papers' claims</h1>
<p>Phase 1 trains one {c['n_layer']}-layer GPT-2 (d = {c['d_model']}) from scratch with cross-entropy
for {c.get('pretrain_steps', '?')} steps of {c.get('pretrain_batch_size', '?')} × {c['seq_len']} tokens on
{d['train_documents']} documents: docstrings of the Python standard library and text from a
{d['markov_words']}-word Markov chain whose true entropy is known exactly
({d['entropy_rate_nats_per_word']:.4f} nats/word). That is the <em>pre-trained</em> model (row
<code>pretrained</code>); its LM head is EMO's cost embedding. Phase 2 fine-tunes a copy of it with each
objective for {c['steps']} steps of {c['batch_size']} × {c['seq_len']} tokens on the target domain, the
docstrings of modules phase 1 never saw ({d.get('finetune_documents', '?')} documents,
{d.get('finetune_tokens', 0):,} tokens), from the same weights (SHA-256 {e(str(pre.get('sha256', ''))[:12])}…,
checked in every run) on the same batches (seed {summary['seed']}): only the objective differs. The losses
are computed from the hidden states by <code>xent.linear_loss</code>. Held-out: {d['heldout_documents']}
other documents of the target domain and {d['synthetic_documents']} Markov documents.</p>
<h2>The papers' claims at this scale</h2>
<p>Each claim, the difference measured here against the cross-entropy fine-tune (<code>ce</code>), on the
same documents: losses and over-confidence as paired per-document differences with the
document-clustered SE; MAUVE with its paired t interval over the sampling
seeds. A claim <em>reproduces</em> or is
<em>contradicted</em> only when the 95% interval excludes 0; otherwise it is <em>inconclusive</em>. A claim
that reproduces against ce is <em>not a win</em> when its run ends with a higher held-out loss than the
pre-trained model it started from (the table's Δ vs pretrained). A 2-layer
model fine-tuned for minutes on {d.get('finetune_tokens', 0):,} tokens is not the papers' regime: a claim
that does not reproduce here is not refuted in theirs.</p>
<table class="claims"><thead><tr>{chead}</tr></thead><tbody>{cbody}</tbody></table>
{"<h2>Findings</h2><ul>" + "".join(f"<li>{e(i)}</li>" for i in items) + "</ul>" if items else ""}
<h2>All models on the held-out documents</h2>
<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
<p class="note">{SIGNIFICANT} significant: the paired difference is more than 1.96 standard errors from 0;
{WORSE}: the fine-tune ends with a higher held-out loss than the pre-trained model it started from.
Held-out metrics are computed by <code>xent.eval.evaluate</code> (the same numbers as
<code>xent eval --model models/NAME --data data/heldout.jsonl</code>). train CPU s of
<code>pretrained</code> is phase 1's.</p>
<h2>What the columns mean</h2>
<dl class="defs">{defs}</dl>
<h2>The objectives</h2>
<dl>{expl}</dl>
<h2>Generation</h2>
<p>{gen.get('pairs', 0)} held-out prefixes of {gen.get('prefix_tokens', '?')} tokens (at most
{c.get('prefixes_per_doc', '?')} consecutive pieces from each of {gen.get('documents', 0)} held-out target
documents; a piece's first token is the document's start token when it opens the document). Every model
samples {gen.get('new_tokens', '?')} tokens after each (temperature 1, top-p 1, no stop token, seeds
{e(', '.join(map(str, gen.get('sampling_seeds', []))))}). MAUVE (Pillutla et al., 2021,
computed by the <code>mauve-text</code> package: PCA to 90% of the variance, k-means into
{summary['objectives'].get('ce', {}).get('generation', {}).get('mauve_num_buckets', '?')} clusters
(pairs/10), 5 restarts, scaling factor 5) compares the samples with the
true continuations; the features are {e(gen.get('features', '?'))}. Each model is sampled with
{len(gen.get('sampling_seeds', []))} seeds (seed k: k-means seed k too); MAUVE is the mean over the seeds,
with the 95% t interval of that mean; seed k gives every model the same random stream, so the Δ column is
the mean of per-seed differences with its own t interval (paired). The interval covers the sampling and the
quantisation, not the choice of held-out documents (they are fixed).
MAUVE with this few samples and a 2-layer feature model is coarse: compare models here, not with the
papers' numbers. rep-4: seq-rep-4, the share of a sample's 4-grams (tokens) that repeat an earlier one of
the same sample, averaged over samples; distinct-n: unique n-grams / all n-grams over all samples.</p>
<table><thead><tr>{ghead}</tr></thead><tbody>{gbody}</tbody></table>
<p class="note">{SIGNIFICANT}: the 95% paired interval excludes 0.</p>
<h2>Temperature</h2>
{temp_text}
{sanity}
<h2>Figures</h2>
{figs}
<p>Data, both phases, evaluation, sampling and MAUVE took {summary.get('total_seconds', math.nan):.0f} s wall
({summary.get('total_cpu_seconds', math.nan):.0f} CPU-seconds, this process and its workers) with
Python {e(env['python'])}, torch {e(env['torch'])}. Reproduce: <code>xent demo{quick} --seed
{summary['seed']}</code>. Files: <code>summary.json</code>, the checkpoints under <code>models/</code>
(<code>models/pretrained</code> is phase 1's), the text under <code>data/</code>.</p>
</body></html>
"""
    with open(os.path.join(out, "report.html"), "w", encoding="utf-8") as f:
        f.write(page)
    return "report.html"
