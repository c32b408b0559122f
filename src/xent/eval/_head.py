"""The evaluation head: a model's final logits at the scored positions only, a chunk at a time.

The fused path runs the decoder (``model.base_model``), gathers the last hidden states of the scored
positions [N, D] and projects them with the output embeddings a chunk of rows at a time, applying what
the model's forward applies to its final logits (Cohere's ``logit_scale``, Granite's ``logits_scaling``,
Gemma 2/3's ``final_logit_softcapping``: :func:`xent.integrations.transformers.output_head` knows them)
in float32. Only one chunk of logits [C, V] exists at a time, never [B, T, V].

Whether the fused head reproduces the model's forward is checked once per model, on a few tokens of the
first batch, against ``model(...).logits``: a forward that does something else to its logits (an
architecture the integration does not know) is scored with the model's own forward instead, and a note
says so on stderr. ``head="forward"`` asks for the model's own forward outright.

Per-token statistics of a chunk (:func:`logit_stats`, :func:`pair_logit_stats`) come from one pass over
its float32 logits and one logsumexp, the row max m and S = Σ exp(z − m):
loss = (m − z_y) + log S, entropy = log S − Σ q (z − m), top-1 probability = 1/S, Brier = Σ q² − 2 q_y + 1.
"""

from __future__ import annotations

import math
import sys

import torch

from .. import _engine
from ._errors import EvalError

HEADS = ("auto", "fused", "forward")
_PROBE_TOKENS = 16  # tokens of the first window on which the fused head is checked against the forward


def _model_inputs(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device),
            "position_ids": batch["position_ids"].to(device), "use_cache": False}


class ModelHead:
    """How one model's final logits at the scored positions are produced (fused, or its own forward),
    divided by ``temperature``."""

    def __init__(self, model, *, head: str = "auto", temperature: float = 1.0, name: str = "model"):
        if head not in HEADS:
            raise EvalError(f"head must be one of {', '.join(HEADS)}, got {head!r}")
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise EvalError(f"temperature must be a finite number > 0, got {temperature!r}")
        self.model, self.name, self.temperature = model, name, float(temperature)
        self.device = next(model.parameters()).device
        self.mode = head  # "auto" until the first batch decides
        self.reason: str | None = None
        self.out = None
        if head != "forward":
            from ..integrations.transformers import output_head

            try:
                self.out = output_head(model)
            except TypeError as err:
                if head == "fused":
                    raise EvalError(f"head='fused': {err}") from None
                self._fall_back(str(err))
        get_head = getattr(model, "get_output_embeddings", None)
        table = get_head() if callable(get_head) else None
        weight = getattr(table, "weight", None)
        self.vocab = (int(weight.shape[0]) if isinstance(weight, torch.Tensor)
                      else int(model.config.vocab_size))
        if self.out is not None:
            self.mm_dtype = _engine.matmul_dtype(self.out.weight.dtype, self.device)
            self.weight = self.out.weight.to(self.mm_dtype)  # a copy only for float16 on the CPU
            self.bias = None if self.out.bias is None else self.out.bias.to(self.mm_dtype)

    @property
    def kind(self) -> str:
        """"fused" or "forward": the head used (or to be used: "auto" is decided at the first batch)."""
        return "forward" if self.mode == "forward" else "fused"

    @property
    def fused(self) -> bool:
        return self.mode != "forward"

    def _fall_back(self, reason: str) -> None:
        self.mode, self.reason = "forward", reason
        print(f"xent: note: {self.name} ({type(self.model).__name__}) is scored with its own forward, which "
              f"holds [batch, length, vocabulary] logits: {reason}", file=sys.stderr)

    # -- the fused path ------------------------------------------------------------------------------
    @torch.no_grad()
    def hidden(self, batch: dict[str, torch.Tensor], rows, cols) -> torch.Tensor:
        """Last hidden states [N, D] (model dtype) of the scored positions (rows, cols)."""
        out = self.out.decoder(**_model_inputs(batch, self.device))
        h = out[0]  # [B, T, D]
        return h[rows.to(h.device), cols.to(h.device)]

    @torch.no_grad()
    def project(self, h: torch.Tensor) -> torch.Tensor:
        """Final logits [C, V] float32 of hidden states h [C, D], divided by the temperature."""
        z = _engine.project(h.to(self.mm_dtype), self.weight, self.bias).float()
        return self.finish(z, scale=self.out.hidden_scale, softcap=self.out.softcap)

    def finish(self, z: torch.Tensor, *, scale: float = 1.0, softcap: float | None = None) -> torch.Tensor:
        """z (float32, owned: changed in place) → softcap(scale · z) / temperature."""
        if scale != 1.0:
            z.mul_(scale)
        if softcap is not None:  # Gemma 2: c · tanh(z / c), in float32
            z.div_(softcap).tanh_().mul_(softcap)
        if self.temperature != 1.0:
            z.div_(self.temperature)
        return z

    # -- the choice, on the first batch --------------------------------------------------------------
    @torch.no_grad()
    def decide(self, batch: dict[str, torch.Tensor]) -> None:
        """Under "auto", compare the fused head with the model's forward on the first tokens of the
        batch's first window; fall back to the forward (with a note) when they differ."""
        if self.mode != "auto":
            return
        n = min(_PROBE_TOKENS, int(batch["attention_mask"][0].sum()))
        row = batch["attention_mask"][0].nonzero().squeeze(1)[:n]
        probe = {k: batch[k][:1, row] for k in ("input_ids", "attention_mask", "position_ids")}
        inputs = _model_inputs(probe, self.device)
        want = self.model(**inputs).logits[0].float()  # [n, V]
        h = self.out.decoder(**inputs)[0][0]  # [n, D]
        got = _engine.project(h.to(self.mm_dtype), self.weight, self.bias).float()
        got = self.finish(got, scale=self.out.hidden_scale, softcap=self.out.softcap) * self.temperature
        if got.shape != want.shape:
            self._fall_back(f"the fused head gives {tuple(got.shape)} logits, the forward "
                            f"{tuple(want.shape)}")
            return
        # the same computation up to the rounding of the model's dtype (bfloat16: 2^-8 per logit)
        tol = 1e-4 if self.weight.dtype == torch.float32 else 3e-2
        # a broken model's NaN/inf logits are the same in both (and stopped later, by check_finite)
        finite = torch.isfinite(got) & torch.isfinite(want)
        same_nonfinite = bool(((got == want) | (got.isnan() & want.isnan()) | finite).all())
        diff = (got - want)[finite].abs()
        err = float(diff.max()) if diff.numel() else 0.0
        bound = tol * (1.0 + float(want[finite].abs().max())) if diff.numel() else 0.0
        if not same_nonfinite:
            err = math.inf
        if not err <= bound:
            self._fall_back(f"its forward does something to its logits that the fused head does not know "
                            f"(they differ by up to {err:.3g} on the first tokens)")
        else:
            self.mode = "fused"

    # -- both paths: chunks of final logits ----------------------------------------------------------
    @torch.no_grad()
    def chunks(self, batch: dict[str, torch.Tensor], rows, cols, size: int):
        """(start, float32 final logits [C, V]) for the scored positions in chunks of ``size`` rows."""
        self.decide(batch)
        if self.fused:
            h = self.hidden(batch, rows, cols)
            self.last_hidden = h  # [N, D]: the scored hidden states of the batch (temperature fitting)
            for s in range(0, len(rows), size):
                yield s, self.project(h[s : s + size])
            return
        logits = self.model(**_model_inputs(batch, self.device)).logits  # [B, T, V]
        r, c = rows.to(logits.device), cols.to(logits.device)
        for s in range(0, len(rows), size):
            yield s, self.finish(logits[r[s : s + size], c[s : s + size]].float())


def chunk_rows(num_tokens: int, num_classes: int, device, buffers: int = 2) -> int:
    """Scored rows per chunk: ``buffers`` float32 [C, V] buffers within the fused engine's budget
    (xent._engine.auto_chunk_size: 64 MiB on the CPU, 1 GiB on CUDA; XENT_CHUNK_MB overrides it)."""
    return _engine.auto_chunk_size(max(num_tokens, 1), num_classes, 4 * buffers, device)
