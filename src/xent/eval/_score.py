"""From windows to per-token statistics: padding, and the float32 statistics of a chunk of logits.

Padding never changes a number: padded inputs are masked (attention_mask 0), the position ids count
only real tokens (so left and right padding give every token the same position), and padded positions
carry no label.
"""

from __future__ import annotations

import torch

from .. import _engine
from ._windows import IGNORE, Window


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


def scored_index(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of the scored positions, in row-major order."""
    return (batch["labels"] != IGNORE).nonzero(as_tuple=True)


def context_lengths(batch: dict[str, torch.Tensor], rows, cols) -> torch.Tensor:
    """Tokens of context of each scored prediction: its input and every real input before it."""
    return batch["attention_mask"].cumsum(1)[rows, cols]


def token_stats(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """:func:`eval_stats` of logits [N, V] (any dtype; not changed) in float32."""
    return eval_stats(logits.float(), targets)


def batch_token_stats(head, batch: dict[str, torch.Tensor],
                      keep_hidden: bool = False) -> dict[str, torch.Tensor]:
    """eval_stats of every scored position of a batch (row-major), on the CPU, from the model's
    final logits a chunk of rows at a time (``head``: a _head.ModelHead), plus each token's ``row``,
    ``position`` (index in its document), ``context`` (tokens of context) and ``target``; with
    ``keep_hidden`` and the fused head, ``hidden``: the scored positions' last hidden states [N, D] (on the
    model's device) that the logits came from."""
    from ._head import chunk_rows

    rows, cols = scored_index(batch)
    targets = batch["labels"][rows, cols]
    size = chunk_rows(len(rows), head.vocab, head.device)
    parts = []
    head.decide(batch)
    hidden = head.hidden(batch, rows, cols) if keep_hidden and head.fused else None
    for s, z in head.chunks(batch, rows, cols, size, hidden=hidden):
        stats = eval_stats(z, targets[s : s + len(z)].to(z.device))
        parts.append({k: v.cpu() for k, v in stats.items()})
    if parts:
        out = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    else:  # no scored position in the batch
        out = {k: torch.zeros(0) for k in _engine.EVAL_STATS}
        out["rank"] = torch.zeros(0, dtype=torch.long)
    out.update(row=rows, position=batch["positions"][rows, cols], context=context_lengths(batch, rows, cols),
               target=targets, previous=previous_inputs(batch, rows, cols))
    if hidden is not None:
        out["hidden"] = hidden
    return out


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


@torch.no_grad()
def eval_stats(z: torch.Tensor, targets: torch.Tensor, backend: str = "auto") -> dict[str, torch.Tensor]:
    """Per-token evaluation statistics of final logits z [C, V] float32 (not changed) against targets [C]:
    loss −log q_y, entropy −Σ q log q, top-1 probability, Brier Σ_c (q_c − [c = y])² and the rank of
    the target by its logit (1 = most probable; ties in the target's favour; V + 1 where the loss is not
    finite), as :meth:`xent._engine.RowBackend.eval_rows` defines them, from the row backend's one pass
    over each row (the CPU kernel on the CPU where it builds, else torch ops)."""
    if z.stride(-1) != 1:
        z = z.contiguous()
    return _engine.eval_rows(z, targets, backend)


def row_blocks(z: torch.Tensor):
    """Row blocks of a chunk: on the CPU about 8 MiB of float32 logits each, so that the passes over a
    block run in cache; on an accelerator the whole chunk."""
    if z.device.type != "cpu":
        return [slice(0, z.shape[0])]
    return list(_engine.row_blocks(z.shape[0], z.shape[1]))
