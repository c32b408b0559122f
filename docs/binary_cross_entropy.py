"""Draws docs/binary_cross_entropy.png: xent.binary_cross_entropy_with_logits against the predicted
probability σ(x) for a label of 1 and a label of 0 (−log p and −log(1 − p)), from logits, as the
cross-entropy guide draws it.

    python docs/binary_cross_entropy.py
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import xent  # noqa: E402

p = torch.linspace(1e-3, 1 - 1e-3, 999, dtype=torch.float64)
logits = torch.log(p) - torch.log1p(-p)  # σ(logits) = p
fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
for label, colour in ((1.0, "tab:blue"), (0.0, "tab:orange")):
    loss = xent.binary_cross_entropy_with_logits(logits, torch.full_like(p, label), reduction="none")
    formula = "−log p" if label else "−log(1 − p)"
    ax.plot(p.numpy(), loss.numpy(), color=colour, lw=2, label=f"label y = {int(label)}: {formula}")
ax.set_xlabel("predicted probability p = σ(x) of the positive class")
ax.set_ylabel("binary cross-entropy (nats)")
ax.set_xlim(0, 1)
ax.set_ylim(0, 7)
ax.grid(alpha=0.3)
ax.legend(loc="upper center")
ax.set_title("binary_cross_entropy_with_logits(x, y): confident and wrong costs most", fontsize=10)
fig.tight_layout()
out = Path(__file__).with_suffix(".png")
fig.savefig(out)
print(out)
