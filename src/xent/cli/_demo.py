"""``xent demo``: a short example that exercises the API and prints its results.

The full demo (training tiny models with several objectives, plots, report) replaces this.
"""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the xent demo", description=__doc__)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=run)


def run(args) -> int:
    import torch
    import torch.nn.functional as F

    import xent

    torch.manual_seed(args.seed)
    print("xent", xent.__version__, "- worked numbers of shared/REFERENCE.md §2 and a micro-batch check\n")
    x = torch.tensor([[2.0, 1.0, 0.1], [0.5, 2.5, 0.3], [1.5, 0.5, 2.0]])
    y = torch.tensor([0, -100, 2])
    rows = [
        ("plain", {}),
        ("class weights [1,2,3]", {"weight": torch.tensor([1.0, 2.0, 3.0])}),
        ("label_smoothing 0.1", {"label_smoothing": 0.1}),
        ("z-loss 1e-4", {"z_loss": 1e-4}),
        ("softcap 30", {"softcap": 30.0}),
    ]
    print(f"{'call':<24} {'xent mean':>12} {'torch mean':>12}")
    for name, opts in rows:
        ours = xent.cross_entropy(x, y, **opts).item()
        torch_opts = {k: v for k, v in opts.items() if k in ("weight", "label_smoothing")}
        theirs = F.cross_entropy(x, y, **torch_opts).item() if len(torch_opts) == len(opts) else float("nan")
        print(f"{name:<24} {ours:>12.8f} {theirs:>12.8f}")
    all_ignored = torch.full((3,), -100)
    print(f"{'all labels ignored':<24} {xent.cross_entropy(x, all_ignored).item():>12.8f} "
          f"{F.cross_entropy(x, all_ignored).item():>12.8f}")

    # Gradient accumulation: the sum of micro-batch losses normalised by the global count equals the
    # full-batch mean, which averaging per-micro-batch means does not.
    B, T, V = 4, 33, 101
    logits = torch.randn(B, T, V)
    labels = torch.randint(0, V, (B, T))
    labels[0, 5:] = -100  # one short sequence: micro-batches hold different token counts
    full = xent.causal_lm_loss(logits, labels)
    n = xent.count_items(labels)
    summed = sum(xent.causal_lm_loss(logits[i : i + 1], labels[i : i + 1], num_items_in_batch=n)
                 for i in range(B))
    naive = sum(xent.causal_lm_loss(logits[i : i + 1], labels[i : i + 1]) for i in range(B)) / B
    print(f"\ncausal LM, {B} micro-batches of one sequence ({int(n)} targets):")
    print(f"  full-batch mean             {full.item():.8f}")
    print(f"  Σ micro losses / num_items  {summed.item():.8f}")
    print(f"  mean of micro-batch means   {naive.item():.8f}  (the late-2024 accumulation bug)")
    return 0
