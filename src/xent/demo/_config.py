"""The demo's sizes (:class:`DemoConfig`) and the names of its runs."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_OBJECTIVES = ("ce", "emo", "tailr")
QUICK_OBJECTIVES = ("ce", "emo", "tailr")
PRETRAINED = "pretrained"  # the phase-1 model's name in the summary and under models/


@dataclass
class DemoConfig:
    """The demo's sizes. Phase 1 (``pretrain_*``) trains the 2-layer model with cross-entropy on ~820k
    tokens (400 steps of 32×64: the training modules' docstrings and the Markov text); phase 2 fine-tunes
    a copy with each objective for ``steps`` steps of ``batch_size``×64 tokens on the target domain.
    ``tailr_gammas`` adds TaiLr runs at those γ (the ``tailr`` objective itself is γ = 0.1; γ = 0 is
    cross-entropy exactly, the ``ce`` run). Generation: for each held-out prefix of ``prefix_tokens``
    tokens, every model samples ``new_tokens`` tokens (temperature 1, top-p 1), ``mauve_seeds`` times with
    different seeds; MAUVE against the true continuations for each, their mean and a t interval.
    :meth:`quick` is for tests. ``jobs`` changes only the speed; ``threads`` > 1 can change the last digits.
    """

    preset: str = "default"  # or "quick"
    objectives: tuple[str, ...] = DEFAULT_OBJECTIVES
    tailr_gammas: tuple[float, ...] = (0.5, 0.8)
    seed: int = 0
    vocab_size: int = 1024
    seq_len: int = 64
    d_model: int = 96
    n_layer: int = 2
    n_head: int = 4
    # phase 1: cross-entropy from scratch
    pretrain_steps: int = 400
    pretrain_batch_size: int = 32
    pretrain_lr: float = 1e-2
    pretrain_warmup_steps: int = 20
    # phase 2: fine-tuning from the phase-1 weights
    steps: int = 150
    batch_size: int = 16
    lr: float = 2e-3
    warmup_steps: int = 10
    eval_every: int = 25
    markov_words: int = 64
    words_per_doc: int = 64
    synthetic_train_docs: int = 1000  # about 30% of phase 1's tokens
    synthetic_eval_docs: int = 100
    heldout_docs: int | None = None  # None: every held-out document of the target domain
    # generation
    prefix_tokens: int = 24
    new_tokens: int = 40
    prefixes_per_doc: int = 4
    mauve_seeds: int = 5
    sample_temperatures: tuple[float, ...] = (0.7, 1.3)  # the ce model's extra samples (τ = 1 is its own)
    threads: int = 1  # torch threads: no dependence on the thread count, and robust on a busy machine
    jobs: int = 1  # models fine-tuned at once, in worker processes (the numbers do not change)

    @classmethod
    def quick(cls, **overrides) -> DemoConfig:
        base = dict(preset="quick", objectives=QUICK_OBJECTIVES, tailr_gammas=(0.8,), d_model=64, n_head=2,
                    pretrain_steps=100, pretrain_batch_size=16, pretrain_warmup_steps=5, steps=40,
                    batch_size=16, warmup_steps=4, eval_every=20, synthetic_eval_docs=40, heldout_docs=30,
                    prefixes_per_doc=3, mauve_seeds=3)
        return cls(**{**base, **overrides})


def runs(cfg: DemoConfig) -> dict[str, tuple[str, dict]]:
    """Phase 2's runs: name -> (objective, options); the TaiLr sweep's runs are named tailr@γ."""
    out = {name: (name, {}) for name in cfg.objectives}
    for g in cfg.tailr_gammas:
        out[f"tailr@{g:g}"] = ("tailr", {"gamma": float(g)})
    return out
