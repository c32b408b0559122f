"""Training objectives by name: each is a :class:`xent.losses.TokenLoss` built for a given model."""

from __future__ import annotations

from .. import losses

# name -> (one-line description, default options). The defaults are the settings the demo compares.
OBJECTIVES = {
    "ce": ("cross-entropy (maximum likelihood)", {}),
    "ce_ls": ("cross-entropy with label smoothing ε = 0.1", {"label_smoothing": 0.1}),
    "ce_zloss": ("cross-entropy plus z-loss 1e-4·(logsumexp z)²", {"z_loss": 1e-4}),
    "emo": ("EMO-1: ½(CE + sg(CE/DEMD)·DEMD), cost from the initial head", {"mode": "emo1"}),
    "tailr": ("TaiLr: CE weighted by sg(clamp(q/(γ+(1−γ)q), b, 1)), γ = 0.1, b = 0.3",
              {"gamma": 0.1, "threshold": 0.3}),
    "gold": ("GOLD-δ: CE weighted by sg(max(q, b)), b = 0.1", {"threshold": 0.1}),
    "focal": ("focal: CE weighted by (1 − q)^γ, γ = 2", {"gamma": 2.0}),
    "poly": ("Poly-1: CE + ε(1 − q), ε = 1", {"epsilon": 1.0}),
    "dft": ("DFT: CE weighted by sg(q) (TRL's loss_type='dft')", {}),
    "eaft": ("EAFT: CE weighted by sg(top-20 entropy / 3)", {}),
    "entropy_reg": ("cross-entropy minus β·entropy, β = 0.01", {}),
    "rho1": ("Rho-1: CE on the 60 % of tokens whose loss exceeds a reference model's most (needs ref_model)",
             {}),
}

#: Objectives only the Python API trains, with what they need that a name cannot give.
PYTHON_ONLY = {
    "distillation (xent.losses.Distill, SparseDistill)": "a teacher's logits or top-k log-probs per token",
    "multi-token prediction (xent.linear_multi_token_loss)": "a model with K prediction streams",
}


_CLASSES = {"ce": losses.CrossEntropy, "ce_ls": losses.CrossEntropy, "ce_zloss": losses.CrossEntropy,
            "emo": losses.EMO, "tailr": losses.TaiLr, "gold": losses.GOLD, "focal": losses.Focal,
            "poly": losses.Poly, "dft": losses.DFT, "eaft": losses.EAFT,
            "entropy_reg": losses.EntropyRegularized, "rho1": losses.Rho1}


def objective_options(name: str) -> tuple[str, ...]:
    """The option names objective ``name`` accepts (the keyword arguments of its loss class)."""
    import inspect

    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}")
    return tuple(inspect.signature(_CLASSES[name]).parameters)


def make_objective(name: str, model=None, **options) -> losses.TokenLoss:
    """The loss object of objective ``name`` (a key of :data:`OBJECTIVES`); ``options`` override defaults.

    ``emo`` needs ``model``: its cost embedding is a frozen copy of the model's output embeddings taken
    now, before training (as the EMO paper does), unless ``cost_embedding`` is given. ``rho1`` selects
    the tokens to train on from a reference model's losses: :func:`xent.train` takes it as
    ``ref_model``.
    """
    accepted = objective_options(name)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"objective {name!r} takes no option {', '.join(map(repr, unknown))}; its options: "
                         f"{', '.join(accepted)}")
    opts = {**OBJECTIVES[name][1], **options}
    if name == "emo" and "cost_embedding" not in opts:
        if model is None:
            raise ValueError("objective 'emo' needs the model (or cost_embedding=) to build its cost")
        opts["cost_embedding"] = model.get_output_embeddings().weight.detach().clone().float()
    return _CLASSES[name](**opts)
