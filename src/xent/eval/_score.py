"""From windows to per-token statistics: padding, the forward pass, and the float32 softmax.

Padding never changes a number: padded inputs are masked (attention_mask 0), the position ids count
only real tokens (so left and right padding give every token the same position), and padded positions
carry no label.
"""

from __future__ import annotations

import torch

import xent

from ._windows import IGNORE, Window

# Rows of float32 [rows, V] temporaries processed at a time: about 2^26 floats (256 MB).
_CHUNK_ELEMENTS = 1 << 26


def collate(windows: list[Window], *, pad_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad windows to one [B, T] batch: input_ids, attention_mask, position_ids, labels, positions."""
    T = max(len(w.input_ids) for w in windows)
    B = len(windows)
    out = {
        "input_ids": torch.full((B, T), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros((B, T), dtype=torch.long),
        "position_ids": torch.zeros((B, T), dtype=torch.long),
        "labels": torch.full((B, T), IGNORE, dtype=torch.long),
        "positions": torch.full((B, T), -1, dtype=torch.long),
    }
    for i, w in enumerate(windows):
        n = len(w.input_ids)
        cols = slice(0, n) if padding_side == "right" else slice(T - n, T)
        out["input_ids"][i, cols] = torch.tensor(w.input_ids)
        out["attention_mask"][i, cols] = 1
        out["position_ids"][i, cols] = torch.arange(n)
        out["labels"][i, cols] = torch.tensor(w.labels)
        out["positions"][i, cols] = torch.tensor(w.positions)
    return out


@torch.no_grad()
def forward_logits(model, batch: dict[str, torch.Tensor], device) -> torch.Tensor:
    """Logits [B, T, V] in the model's dtype."""
    out = model(
        input_ids=batch["input_ids"].to(device),
        attention_mask=batch["attention_mask"].to(device),
        position_ids=batch["position_ids"].to(device),
        use_cache=False,
    )
    return out.logits


def scored_index(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of the scored positions, in row-major order."""
    return (batch["labels"] != IGNORE).nonzero(as_tuple=True)


def context_lengths(batch: dict[str, torch.Tensor], rows, cols) -> torch.Tensor:
    """Tokens of context of each scored prediction: its input and every real input before it."""
    return batch["attention_mask"].cumsum(1)[rows, cols]


@torch.no_grad()
def token_stats(logits: torch.Tensor, targets: torch.Tensor, *, exact_rank: bool = True
                ) -> dict[str, torch.Tensor]:
    """Per-token statistics of logits [N, V] (any dtype) against targets [N], in float32:
    loss −log q_y (xent.cross_entropy), entropy −Σ q log q, top-1 probability, rank of the target by
    its logit (1 = most probable; ties count in the target's favour; V + 1 where the loss is not finite),
    multi-class Brier Σ_c (q_c − [c = y])². Without ``exact_rank`` ranks past 5 are reported as 6 (a
    top-5 instead of a pass over the vocabulary: enough for the top-1/top-5 accuracies)."""
    z = logits.float()
    loss = xent.cross_entropy(z, targets, reduction="none")
    logq = torch.log_softmax(z, dim=-1)
    q = logq.exp()
    z_y = z.gather(-1, targets[:, None])  # [N, 1]
    q_y = q.gather(-1, targets[:, None]).squeeze(-1)
    entropy = -torch.linalg.vecdot(q, logq)
    bad = entropy.isnan()  # a −inf logit: q = 0 times log q = −inf; entr(0) = 0 handles it
    if bad.any():
        entropy[bad] = torch.special.entr(q[bad]).sum(-1)
    if exact_rank:
        rank = (z > z_y).sum(-1) + 1
    else:
        rank = (torch.topk(z, min(5, z.shape[-1]), dim=-1).values > z_y).sum(-1) + 1
    # NaN compares false, so a row of NaN logits would rank its target first: a row whose loss is not
    # finite gets rank V + 1 (below every class), never a top-1 or top-5 hit
    rank = torch.where(torch.isfinite(loss), rank, torch.full_like(rank, z.shape[-1] + 1))
    return {
        "loss": loss,
        "entropy": entropy,
        "top1_prob": q.amax(-1),
        "rank": rank,
        "brier": torch.linalg.vecdot(q, q) - 2 * q_y + 1,
    }


def batch_token_stats(logits: torch.Tensor, batch: dict[str, torch.Tensor], *, exact_rank: bool = True
                      ) -> dict[str, torch.Tensor]:
    """token_stats of every scored position of a batch (row-major), on the CPU, plus its ``row``,
    ``position`` (index in its document), ``context`` (tokens of context) and ``target``."""
    rows, cols = scored_index(batch)
    targets = batch["labels"][rows, cols]
    out = by_row_chunks(lambda z, y: token_stats(z, y, exact_rank=exact_rank), (logits,), rows, cols, targets)
    out.update(row=rows, position=batch["positions"][rows, cols], context=context_lengths(batch, rows, cols),
               target=targets, previous=previous_inputs(batch, rows, cols))
    return out


def by_row_chunks(fn, logits: tuple[torch.Tensor, ...], rows, cols, targets) -> dict[str, torch.Tensor]:
    """fn(*[N', V] logits at the scored positions, targets [N']) over chunks of rows, so that the float32
    [N', V] temporaries stay near 2^26 elements; the per-token results concatenated on the CPU."""
    dev = logits[0].device
    chunk = max(1, _CHUNK_ELEMENTS // logits[0].shape[-1])
    parts = []
    for s in range(0, len(rows), chunk):
        r, c = rows[s : s + chunk], cols[s : s + chunk]
        picked = [z[r.to(z.device), c.to(z.device)].to(dev) for z in logits]  # [N', V] each
        stats = fn(*picked, targets[s : s + chunk].to(dev))
        parts.append({k: v.cpu() for k, v in stats.items()})
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else {}


def previous_inputs(batch: dict[str, torch.Tensor], rows, cols, k: int = 3) -> torch.Tensor:
    """[N, k]: the k inputs up to each scored prediction (the last one is the token before the target),
    -1 where the window has none: enough to decode a token's text as it continues the document."""
    T = batch["input_ids"].shape[1]
    idx = cols[:, None] + torch.arange(-k + 1, 1)[None, :]  # [N, k]
    inside = idx >= 0
    idx = idx.clamp(0, T - 1)
    r = rows[:, None].expand_as(idx)
    real = inside & (batch["attention_mask"][r, idx] == 1)
    return torch.where(real, batch["input_ids"][r, idx], torch.full_like(idx, -1))
