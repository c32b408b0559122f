"""The evaluation head: a model's final logits at the scored positions only, a chunk at a time.

The fused path runs the decoder (``model.base_model``), gathers the last hidden states of the scored
positions [N, D] and projects them with the output embeddings a chunk of rows at a time, applying what
the model's forward applies to its final logits (Cohere's ``logit_scale``, Granite's ``logits_scaling``,
Gemma 2/3's ``final_logit_softcapping``: :func:`xent.integrations.transformers.output_head` knows them)
in float32. Only one chunk of logits [C, V] exists at a time, never [B, T, V].

What a token's numbers are is fixed by the model's own forward on its window alone,
``model(input_ids=window[None]).logits``; batching, padding and the fused head may change the speed,
never the numbers. The first batch of a run checks that, once per model (:meth:`ModelHead.decide`), on a
probe: the batch's windows at the run's batch size and padding side (a window cut short when no row is
padded, so that padding is exercised whenever the run can pad):

1. positions and cache: the longest window alone, given an attention mask, position ids 0..n−1 and
   ``use_cache=False``, against its bare forward. A model that counts its positions otherwise (RoBERTa
   and its kin: from ``padding_idx + 1``) is given no position ids (it derives its own); one whose logits
   change without its key/value cache keeps it; one whose forward differs even then gets only its bare
   input ids, a window at a time.
2. the head (``head="auto"`` or ``"fused"``): the fused logits of that window, run alone as decided,
   against ``model(...).logits`` on the same inputs at every position. Both come from the same hidden
   states, so they differ only by the rounding of the logits the forward returns: per logit at most 2
   units in the last place of the forward's dtype at that logit (4 when the head applies a scale or
   soft-cap, which the forward rounds again), plus 64 float32 ε · max |logit| for the order of the
   float32 accumulation. A larger difference means the forward does something the head does not know:
   "auto" then scores with the model's own forward, "fused" refuses (EvalError).
3. padding and batching: two padded probes (the batch, and the longest window beside every other one
   cut by a token), each row against its window's bare forward: the fused head's logits of the batched
   hidden states (or, under the model's own forward, the batch's logits). Where a padded row differs
   (recurrent state running through pad tokens, a model that ignores the attention mask) or the forward
   fails on a padded batch, windows are batched only with windows of their own length, unpadded; where
   an unpadded row differs too (numbers that depend on the batch), each window runs alone. A config that
   sets a sparse-attention indexer (``index_topk``: its choice of keys may take pad tokens, depending on
   the data) is batched by length outright. These compare two computations of different shapes, so they
   allow their rounding: 2^10 float32 ε, 8 float16 ε or 4 bfloat16 ε times (1 + max |logit|), plus the
   head's units in the last place of step 2.

With the fused head the check never holds a batch's [B, T, V] logits: two windows' [n, V] forward logits
(the longest window's and the one compared) and a chunk of fused ones at a time; under the model's own
forward it holds what the run holds, a batch's logits.

A config field about the final logits that the head does not apply (a name with ``logit``, ``lm_head``,
``output`` or ``final`` and with ``scale``, ``scaling``, ``softcap``, ``soft_cap`` or ``multiplier``,
not about attention, a router or initialisation, set to something other than None/False/1: xLSTM's
``output_logit_soft_cap``, FalconH1's ``lm_head_multiplier``) makes "auto" use the model's own forward
without further ado. Every such choice prints a note on stderr and is kept in :attr:`ModelHead.notes`.

Per-token statistics of a chunk (``_score.eval_stats``: loss, entropy, top-1 probability, Brier, rank of
the target) are computed by the engine's row backend in its one pass over each row of float32 logits
(:meth:`xent._engine.RowBackend.eval_rows`, the one definition; the CPU kernel on the CPU), from the row
max m and S = Σ exp(z − m): loss = (m − z_y) + log S, entropy = log S − Σ q (z − m), top-1
probability = 1/S, Brier = Σ q² − 2 q_y + 1. A comparison of two models (``_compare.pair_logit_stats``)
reads both chunks in torch ops.
"""

from __future__ import annotations

import math
import re
import sys

import torch

from .. import _engine
from ._errors import EvalError

HEADS = ("auto", "fused", "forward")
# the config fields of the final logits that output_head applies
_APPLIED = ("logit_scale", "logits_scaling", "final_logit_softcapping")
_OF_LOGITS = re.compile(r"logit|lm_head|output|final")
_TRANSFORM = re.compile(r"scale|scaling|softcap|soft_cap|multiplier")
_ELSEWHERE = re.compile(r"attn|attention|router|routed|route|init")
_INDEXER = re.compile(r"index(er)?_(topk|budget)")
# rounding allowed between two computations of different shapes (batched vs alone), in ε of the dtype
_NOISE_EPS = {torch.float32: 2.0**10, torch.float64: 2.0**20, torch.float16: 8.0, torch.bfloat16: 4.0}


def _fields(config):
    """(name, short name, value) of a config's fields and of its nested ``text_config``'s."""
    for prefix, cfg in (("", config), ("text_config.", getattr(config, "text_config", None))):
        if cfg is not None and hasattr(cfg, "to_dict"):
            for name, value in cfg.to_dict().items():
                yield prefix + str(name), str(name), value


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def unapplied_logit_fields(config) -> list[str]:
    """``name=value`` of the config's fields about the final logits that the fused head does not apply
    (nested ``text_config`` too), with a value that changes the logits (not None/False, nor a scale or
    multiplier of 1)."""
    return [f"{full}={value!r}" for full, name, value in _fields(config)
            if name not in _APPLIED and _OF_LOGITS.search(name) and _TRANSFORM.search(name)
            and not _ELSEWHERE.search(name) and value is not None and value is not False
            and not (_is_number(value) and value == 1 and "cap" not in name)]


def sparse_indexer_fields(config) -> list[str]:
    """``name=value`` of the config's fields that set a sparse-attention indexer (``index_topk``,
    ``index_topk_blocks``, ``indexer_budget``, nested ``text_config`` too): which keys a query attends
    to is chosen from the scores of all keys, pad tokens included, so padding can change the logits."""
    return [f"{full}={value!r}" for full, name, value in _fields(config)
            if _INDEXER.match(name) and value is not None]


#: Elements per block when two [..., V] logits tensors are compared: the comparison's temporaries (masks,
#: differences, units in the last place) stay a few of these at a time instead of several [B, T, V] copies
#: (at V 128256, batch 4 × 512 that was ~10 GB of peak memory for the check).
_COMPARE_BLOCK = 1 << 22


def _blocks_of(a: torch.Tensor, b: torch.Tensor):
    """Row blocks (a_k, b_k) of two tensors of one shape, flattened to [rows, last dimension]."""
    width = a.shape[-1] if a.dim() else 1
    a2, b2 = a.reshape(-1, width), b.reshape(-1, width)
    step = max(1, _COMPARE_BLOCK // max(width, 1))
    for start in range(0, a2.shape[0], step):
        yield a2[start : start + step], b2[start : start + step]


def _block_stats(x: torch.Tensor, y: torch.Tensor) -> tuple[bool, float, float, bool]:
    """(NaN and ±inf sit at the same places in x and y, max |y| and max |x − y| over the places where both
    are finite, whether there is such a place) for one block. The common case, every value finite, costs
    a subtraction and two maxima; the masks are built only when a difference is not finite."""
    if x.numel() == 0:
        return True, 0.0, 0.0, False
    d = x - y
    lo, hi = (float(v) for v in torch.aminmax(d))  # one pass each for |x − y| and |y|, no |·| temporaries
    if math.isfinite(lo) and math.isfinite(hi):  # else NaN or ±inf on either side somewhere
        y_lo, y_hi = (float(v) for v in torch.aminmax(y))
        return True, max(-y_lo, y_hi), max(-lo, hi), True
    d.abs_()
    finite = torch.isfinite(x) & torch.isfinite(y)
    same = bool(((x == y) | (x.isnan() & y.isnan()) | finite).all())
    if not bool(finite.any()):
        return same, 0.0, 0.0, False
    return same, float(y[finite].abs().max()), float(d[finite].max()), True


def _pairs(got, want: torch.Tensor):
    """(got rows, want rows) pairs: ``got`` a tensor shaped like ``want``, or an iterable of (row slice of
    want, got rows) computed one chunk at a time."""
    if isinstance(got, torch.Tensor):
        yield got, want
        return
    for rows, part in got:
        yield part, want[rows]


def _agrees(a, b: torch.Tensor, dtype: torch.dtype, ulps: float = 0.0) -> bool:
    """a (None: no result; a tensor shaped like b, or chunks of its rows as in :func:`_pairs`) and b agree
    within the rounding of two computations of different shapes, plus ``ulps`` units in the last place of
    ``dtype`` (a head that rounds once more); NaN and ±inf must sit at the same places."""
    if a is None or (isinstance(a, torch.Tensor) and a.shape != b.shape):
        return False
    top, worst, any_finite = 0.0, 0.0, False  # over the whole comparison, a block of rows at a time
    for part, ref in _pairs(a, b):
        if part.shape != ref.shape:
            return False
        for x, y in _blocks_of(part, ref):
            same, t, w, f = _block_stats(x, y)
            if not same:
                return False
            top, worst, any_finite = max(top, t), max(worst, w), any_finite or f
    if not any_finite:
        return True
    eps = torch.finfo(dtype).eps
    return worst <= _NOISE_EPS.get(dtype, 4.0) * eps * (1.0 + top) + ulps * eps * top


def _finite_max_abs(t: torch.Tensor) -> float:
    """max |t| over its finite values (0 when none), a block of rows at a time."""
    top = 0.0
    for x, _ in _blocks_of(t, t):
        if x.numel() == 0:
            continue
        lo, hi = (float(v) for v in torch.aminmax(x))  # one pass, no |x| temporary
        if not (math.isfinite(lo) and math.isfinite(hi)):
            x = x[torch.isfinite(x)]
            if x.numel() == 0:
                continue
            lo, hi = (float(v) for v in torch.aminmax(x))
        top = max(top, -lo, hi)
    return top


def _rounding_close(got, want: torch.Tensor, dtype: torch.dtype, ulps: float) -> tuple[bool, float]:
    """(got agrees with want within ``ulps`` units in the last place of ``dtype`` at each of want's
    values, plus 64 float32 ε · max |want|, max |got − want|). ``got``: a tensor shaped like want, or
    chunks of its rows (:func:`_pairs`), each compared as it comes."""
    floor = 64 * torch.finfo(torch.float32).eps * _finite_max_abs(want)
    ok, worst = True, 0.0
    for part, ref in _pairs(got, want):
        if part.shape != ref.shape:
            return False, math.inf
        for x, y in _blocks_of(part, ref):
            same, _, w, any_finite = _block_stats(x, y)
            if not same:
                return False, math.inf
            worst = max(worst, w)
            if not any_finite or w <= floor or not ok:  # every difference within the floor alone
                continue
            finite = torch.isfinite(x) & torch.isfinite(y)
            g, v = x[finite], y[finite]
            _, exponent = torch.frexp(v)  # |v| in [2^(e−1), 2^e): one unit in the last place is ε · 2^(e−1)
            ulp = torch.ldexp(torch.full_like(v, torch.finfo(dtype).eps), exponent - 1)
            ok = bool(((g - v).abs() <= ulps * ulp + floor).all())
    return ok, worst


class ModelHead:
    """How one model's final logits at the scored positions are produced (fused, or its own forward),
    divided by ``temperature``. ``batch_size``, ``padding_side`` and ``pad_id`` are the run's (the check
    exercises padding when the run may pad). ``head`` (one of :data:`HEADS`) and ``temperature`` come
    checked from the public door (xent.eval._options.check_options)."""

    def __init__(self, model, *, head: str = "auto", temperature: float = 1.0, name: str = "model",
                 batch_size: int = 1, padding_side: str = "right", pad_id: int = 0):
        self.model, self.name, self.temperature = model, name, float(temperature)
        self.device = next(model.parameters()).device
        self.mode = head  # "auto" until the first batch decides
        self.forced = head == "fused"
        self.reason: str | None = None
        self.notes: list[str] = []
        self.batch_size, self.padding_side, self.pad_id = batch_size, padding_side, pad_id
        self.positions = True  # pass position ids 0..n−1 of the real tokens
        self._no_cache = {"use_cache": False}  # no key/value cache, unless that changes the logits
        self.grouping = "padded"  # "padded" | "length" (unpadded, by length) | "alone" (a window at a time)
        self.decided = False
        self._bare = True  # the reference is the forward on input ids alone
        self.out = None
        self._buffer = None  # the fused head's chunk of logits, reused (chunks)
        config = getattr(model, "config", None)
        values = {k: getattr(config, k, None) for k in _APPLIED}
        odd = [f"{k}={v!r}" for k, v in values.items() if v is not None and not _is_number(v)]
        if head != "forward":
            from ..integrations.transformers import output_head

            try:
                if odd:  # MPT's logit_scale="inv_sqrt_d_model": not a number the head can apply
                    raise TypeError(f"its config sets {', '.join(odd)}, which the fused head cannot apply")
                self.out = output_head(model)
            except (TypeError, ValueError) as err:
                if head == "fused":
                    raise EvalError(f"head='fused': {err}") from None
                self._fall_back(str(err))
        if self.mode == "auto":
            fields = unapplied_logit_fields(config)
            if fields:
                self._fall_back(f"its config sets {', '.join(fields)}, which the fused head does not apply")
        get_head = getattr(model, "get_output_embeddings", None)
        table = get_head() if callable(get_head) else None
        weight = getattr(table, "weight", None)
        self.vocab = (int(weight.shape[0]) if isinstance(weight, torch.Tensor)
                      else int(model.config.vocab_size))
        self.logits_dtype = weight.dtype if isinstance(weight, torch.Tensor) else torch.float32
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

    def _note(self, text: str) -> None:
        self.notes.append(text)
        print(f"xent: note: {self.name} ({type(self.model).__name__}) {text}", file=sys.stderr)

    def _fall_back(self, reason: str) -> None:
        self.mode, self.reason = "forward", reason
        self._note("is scored with its own forward, which holds [batch, length, vocabulary] logits: "
                   + reason)

    # -- running the model as decided ----------------------------------------------------------------
    def _inputs(self, batch: dict[str, torch.Tensor]) -> dict:
        out = {"input_ids": batch["input_ids"].to(self.device),
               "attention_mask": batch["attention_mask"].to(self.device), **self._no_cache}
        if self.positions:
            out["position_ids"] = batch["position_ids"].to(self.device)
        return out

    def _outputs(self, batch: dict[str, torch.Tensor], call) -> torch.Tensor:
        """call(model inputs) → [b, t, X] for the batch [B, T], run as decided: padded, or unpadded
        groups of windows of one length (bare input ids, as a window alone is run), or a window at a
        time; [B, T, X] with zeros at padded positions."""
        if self.grouping == "padded":
            return call(self._inputs(batch))
        mask = batch["attention_mask"].bool()
        lengths = mask.sum(1)
        keys = lengths if self.grouping == "length" else torch.arange(len(lengths))
        out = None
        for key in keys.unique().tolist():
            idx = (keys == key).nonzero().squeeze(1)  # rows of the group
            n = int(lengths[idx[0]])
            cols = mask[idx].nonzero()[:, 1].view(len(idx), n)  # [g, n] columns of the real tokens
            ids = batch["input_ids"][idx[:, None], cols]
            y = call({"input_ids": ids.to(self.device), **self._no_cache})  # [g, n, X]
            if out is None:
                out = y.new_zeros(mask.shape + y.shape[2:])
            out[idx[:, None].to(y.device), cols.to(y.device)] = y
        return out

    def _logits(self, batch) -> torch.Tensor:
        return self._outputs(batch, lambda inputs: self.model(**inputs).logits)

    def _hidden_states(self, batch) -> torch.Tensor:
        return self._outputs(batch, lambda inputs: self.out.decoder(**inputs)[0])

    # -- the fused path ------------------------------------------------------------------------------
    @torch.no_grad()
    def hidden(self, batch: dict[str, torch.Tensor], rows, cols) -> torch.Tensor:
        """Last hidden states [N, D] (model dtype) of the scored positions (rows, cols)."""
        h = self._hidden_states(batch)  # [B, T, D]
        return h[rows.to(h.device), cols.to(h.device)]

    @torch.no_grad()
    def project(self, h: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Final logits [C, V] float32 of hidden states h [C, D], divided by the temperature; into ``out``
        (a [C, V] buffer in the projection's dtype, reused chunk after chunk) when given."""
        z = _engine.project(h.to(self.mm_dtype), self.weight, self.bias, out=out).float()
        return self.finish(z, scale=self.out.hidden_scale, softcap=self.out.softcap)

    def finish(self, z: torch.Tensor, *, scale: float = 1.0, softcap: float | None = None,
               temperature: bool = True) -> torch.Tensor:
        """z (float32, owned: changed in place) → softcap(scale · z) / temperature (without the division
        when ``temperature`` is False: the model's own final logits)."""
        if scale != 1.0:
            z.mul_(scale)
        if softcap is not None:  # Gemma 2: c · tanh(z / c), in float32
            z.div_(softcap).tanh_().mul_(softcap)
        if temperature and self.temperature != 1.0:
            z.div_(self.temperature)
        return z

    def _final_chunks(self, h: torch.Tensor):
        """(row slice, the fused head's final logits [C, V] float32 of those rows, at temperature 1) of
        hidden states h [M, D], a chunk of rows at a time (the check's only [*, V] temporaries)."""
        size = chunk_rows(len(h), self.weight.shape[0], h.device)
        for s in range(0, len(h), size):
            z = _engine.project(h[s : s + size].to(self.mm_dtype), self.weight, self.bias).float()
            yield slice(s, s + len(z)), self.finish(z, scale=self.out.hidden_scale, softcap=self.out.softcap,
                                                    temperature=False)

    # -- the choice, on the first batch --------------------------------------------------------------
    def _probe(self, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The real input ids of each window of the batch; when the run may pad (batch size > 1) and no
        window of the batch is shorter than another, the last one cut to half (a copy of the first one
        cut to half when the batch has one window)."""
        mask = batch["attention_mask"].bool()
        rows = [batch["input_ids"][i][mask[i]] for i in range(len(mask))]
        if self.batch_size > 1 and len({len(r) for r in rows}) == 1 and len(rows[0]) > 1:
            half = rows[0][: len(rows[0]) // 2]
            if len(rows) == 1:
                rows.append(half)
            else:
                rows[-1] = rows[-1][: len(rows[-1]) // 2]
        return rows

    def _collate(self, rows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        T = max(len(r) for r in rows)
        out = {"input_ids": torch.full((len(rows), T), self.pad_id, dtype=torch.long),
               "attention_mask": torch.zeros((len(rows), T), dtype=torch.long),
               "position_ids": torch.zeros((len(rows), T), dtype=torch.long)}
        for i, r in enumerate(rows):
            cols = slice(0, len(r)) if self.padding_side == "right" else slice(T - len(r), T)
            out["input_ids"][i, cols] = r
            out["attention_mask"][i, cols] = 1
            out["position_ids"][i, cols] = torch.arange(len(r))
        return out

    def _alone(self, ids: torch.Tensor, **extra) -> torch.Tensor | None:
        """The model's logits [n, V] float32 for input ids [n] run alone; None when its forward fails with
        the ``extra`` arguments."""
        try:
            out = self.model(input_ids=ids[None].to(self.device), **extra)
        except torch.OutOfMemoryError:
            raise
        except Exception:
            if not extra:
                raise
            return None
        return out.logits[0].float()

    def _reference(self, ids: torch.Tensor) -> torch.Tensor:
        """The logits [n, V] that fix a window's numbers: its bare forward, or (a forward that needs them)
        with an attention mask and position ids."""
        if self._bare:
            return self._alone(ids)
        n = len(ids)
        return self._alone(ids, attention_mask=torch.ones(1, n, dtype=torch.long, device=self.device),
                           position_ids=torch.arange(n, device=self.device)[None], use_cache=False)

    @torch.no_grad()
    def decide(self, batch: dict[str, torch.Tensor]) -> None:
        """Once, at the first batch: how the model is run (positions, cache, padding) and, under "auto"
        and "fused", whether the fused head reproduces its forward (see the module's docstring)."""
        if self.decided:
            return
        self.decided = True
        rows = self._probe(batch)
        longest = max(range(len(rows)), key=lambda i: len(rows[i]))
        x = rows[longest]
        ref, as_run = self._check_inputs(x)
        known = {tuple(x.tolist()): ref}  # the longest window's reference logits
        if self.mode in ("auto", "fused"):
            detail = self._head_difference(x, as_run)
            if detail is None:
                self.mode = "fused"
            elif self.forced:
                raise EvalError(f"head='fused' for {self.name} ({type(self.model).__name__}): {detail}; "
                                "use head 'auto' or 'forward'")
            else:
                self._fall_back(detail)
        del as_run  # only x's reference is kept for step 3
        self._check_padding(rows, longest, known)

    def _check_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Step 1: the first way of running the window x alone that gives its bare forward's logits:
        with position ids, without them (a model that counts positions its own way); without a key/value
        cache, with one; else each window runs alone, from its input ids only. Returns x's reference
        logits [n, V] (:meth:`_reference`) and its logits run as decided (what :meth:`_logits` gives for x
        alone), both None when its bare forward fails."""
        try:
            ref = self._alone(x)
        except torch.OutOfMemoryError:
            raise
        except Exception as err:
            self._bare = False
            self._note(f"fails on its input ids alone ({type(err).__name__}): the check runs it with an "
                       "attention mask and position ids")
            return None, None
        ones = torch.ones(1, len(x), dtype=torch.long, device=self.device)
        arange = torch.arange(len(x), device=self.device)[None]
        for positions, no_cache in ((True, True), (False, True), (True, False), (False, False)):
            extra = {"attention_mask": ones, **({"position_ids": arange} if positions else {}),
                     **({"use_cache": False} if no_cache else {})}
            as_run = self._alone(x, **extra)
            if _agrees(as_run, ref, self.logits_dtype):
                break
        else:
            self.grouping, self.positions, self._no_cache = "alone", False, {}
            self._note("gives other logits when given an attention mask: each window is run alone, from "
                       "its input ids only")
            return ref, ref
        self.positions = positions
        self._no_cache = {"use_cache": False} if no_cache else {}
        if not positions:
            self._note("counts its positions otherwise than 0..n−1: it is given no position ids")
        if not no_cache:
            self._note("gives other logits without its key/value cache: it is run with one")
        return ref, as_run

    def _head_ulps(self) -> float:
        """Units in the last place of the forward's dtype by which the fused head's logits may differ from
        the forward's: 2, or 4 when the head applies a scale or soft-cap (in float32, which the forward
        rounds once more in its dtype)."""
        return 4.0 if self.out.hidden_scale != 1.0 or self.out.softcap is not None else 2.0

    def _head_difference(self, x: torch.Tensor, want: torch.Tensor | None) -> str | None:
        """Step 2: None when the fused logits of the window x, run alone as decided, equal the forward's on
        the same inputs at every position, within the rounding of the forward's dtype; else what
        differs. ``want``: x's logits run as decided when step 1 has them. Holds x's [n, V] forward logits
        and a chunk of fused ones."""
        single = self._collate([x])
        if want is None:
            want = self._logits(single).float()[0]  # [n, V]
        h = self._hidden_states(single)  # [1, n, D]
        if h.dim() != 3 or h.shape[:2] != (1, len(x)) or h.shape[-1] != self.weight.shape[1]:
            return (f"its decoder gives {tuple(h.shape)} hidden states for {(1, len(x))} inputs, its "
                    f"output embeddings take {self.weight.shape[1]} features")
        if want.shape != (len(x), self.weight.shape[0]):
            return (f"the fused head gives {(len(x), self.weight.shape[0])} logits, the forward "
                    f"{tuple(want.shape)}")
        ok, err = _rounding_close(self._final_chunks(h[0]), want.to(h.device), self.logits_dtype,
                                  self._head_ulps())
        if ok:
            return None
        return (f"its forward does something to its logits that the fused head does not know (they differ "
                f"by up to {err:.3g} on the first batch, beyond the rounding of {self.logits_dtype})")

    def _check_padding(self, rows: list[torch.Tensor], longest: int, known: dict) -> None:
        """Step 3: how windows are batched (see the module's docstring). With the fused head the batched
        numbers are its logits of the batched hidden states, compared a chunk at a time with each window's
        reference; with the model's forward, the batch's logits. ``known``: reference logits already
        computed, by the window's ids."""
        indexer = sparse_indexer_fields(getattr(self.model, "config", None))
        if indexer and self.grouping == "padded" and self.batch_size > 1:
            self.grouping = "length"
            self._note(f"has a sparse-attention indexer ({', '.join(indexer)}), which may choose pad tokens: "
                       "windows are batched only with windows of their own length, unpadded")
        if self.grouping != "padded" or len(rows) < 2:
            return
        # two padded probes: the batch (padding forced), and the longest window beside every other
        # window one token short (what a padded row sees can depend on the data)
        x = rows[longest]
        others = [r[:-1] if len(r) > 1 else r for i, r in enumerate(rows) if i != longest]
        bad = set()
        for probe_rows in (rows, [x, *others]):
            batch = self._collate(probe_rows)
            mask = batch["attention_mask"].bool()
            try:
                out = self._hidden_states(batch) if self.fused else self._logits(batch).float()  # [B, T, *]
            except torch.OutOfMemoryError:
                raise
            except (RuntimeError, ValueError) as err:  # a forward that cannot take this padding
                self.grouping = "length"
                first = str(err).splitlines()[0][:120] if str(err) else ""
                self._note(f"fails on a padded batch ({type(err).__name__}: {first}): windows are batched "
                           "only with windows of their own length, unpadded")
                return
            full = mask.sum(1) == mask.shape[1]
            for i, r in enumerate(probe_rows):
                ref = known.get(tuple(r.tolist()))
                ref = self._reference(r) if ref is None else ref
                mine = out[i][mask[i].to(out.device)]
                if self.fused:  # the fused head's logits, a chunk of rows at a time
                    same = _agrees(self._final_chunks(mine), ref.to(mine.device), self.logits_dtype,
                                   self._head_ulps())
                else:
                    same = _agrees(mine, ref, self.logits_dtype)
                if not same:
                    bad.add("unpadded" if full[i] else "padded")
                del ref
            del out
        if "unpadded" in bad:
            self.grouping = "alone"
            self._note("gives a window other logits in a batch than alone: each window is run alone")
        elif "padded" in bad:
            self.grouping = "length"
            self._note("gives other logits to a padded window (its logits depend on the padding): "
                       "windows are batched only with windows of their own length, unpadded")

    # -- both paths: chunks of final logits ----------------------------------------------------------
    @torch.no_grad()
    def chunks(self, batch: dict[str, torch.Tensor], rows, cols, size: int,
               hidden: torch.Tensor | None = None):
        """(start, float32 final logits [C, V]) for the scored positions in chunks of ``size`` rows; with
        the fused head, from ``hidden`` (:meth:`hidden` of the same positions) when given."""
        self.decide(batch)
        if self.fused:
            h = self.hidden(batch, rows, cols) if hidden is None else hidden
            # one buffer for the chunks of every batch: a fresh [C, V] one per chunk would be a new
            # mapping of the OS each time, its pages faulted in again (a chunk is consumed before the next)
            shape = (min(size, len(rows)), self.weight.shape[0])
            buf = self._buffer
            if buf is None or buf.shape[0] < shape[0] or buf.shape[1] != shape[1] or buf.device != h.device:
                buf = self._buffer = torch.empty(shape, dtype=self.mm_dtype, device=h.device)
            for s in range(0, len(rows), size):
                part = h[s : s + size]
                yield s, self.project(part, out=buf[: len(part)])
            return
        logits = self._logits(batch)  # [B, T, V]
        r, c = rows.to(logits.device), cols.to(logits.device)
        for s in range(0, len(rows), size):
            yield s, self.finish(logits[r[s : s + size], c[s : s + size]].float())


def chunk_rows(num_tokens: int, num_classes: int, device, buffers: int = 2) -> int:
    """Scored rows per chunk: ``buffers`` float32 [C, V] buffers within the fused engine's budget
    (xent._engine.auto_chunk_size: 64 MiB on the CPU, 1 GiB on CUDA; XENT_CHUNK_MB overrides it)."""
    return _engine.auto_chunk_size(max(num_tokens, 1), num_classes, 4 * buffers, device)
