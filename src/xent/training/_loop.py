"""The training loop: readable top to bottom, in the spirit of nanoGPT's train.py.

Each step draws ``batch_size`` sequences, splits them into micro-batches, and for each one runs the
decoder (``model.base_model``) and the fused head + loss (:func:`xent.linear_loss`): the [B, T, V] logits
are never materialised. The micro-batch losses are Σℓ / num_items with num_items the count of targets
over the whole step (:func:`xent.count_items`), so the accumulated gradient is the full-batch gradient.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace

import torch

from .._causal import count_items
from .._linear import linear_loss
from .._reduce import top_fraction_count
from .._selective import linear_rho1_loss
from ..eval._files import follow_umask, json_safe
from ..eval._options import model_context
from ..integrations.transformers import fit_loss, output_head
from ..losses import TokenLoss
from ._objectives import make_objective


@dataclass
class TrainConfig:
    """Everything that defines a run. Same config + same data + same initial model = same result."""

    objective: str | TokenLoss = "ce"  # a name of xent.training.OBJECTIVES, or a loss object
    objective_options: dict = field(default_factory=dict)  # overrides, e.g. {"label_smoothing": 0.2}
    steps: int = 200
    batch_size: int = 16  # sequences per optimizer step
    micro_batch_size: int | None = None  # sequences per forward/backward; None: the whole batch
    seq_len: int | None = None  # cuts a 1-D token stream into sequences; None: the model's context, ≤ 512
    lr: float = 3e-3
    min_lr: float | None = None  # the cosine decays from lr to min_lr at the last step; None: lr / 10
    warmup_steps: int = 20  # linear warm-up from 0
    weight_decay: float = 0.1  # on matrices only (not on biases and norms)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float | None = 1.0  # max global gradient norm
    seed: int = 0  # batch order and dropout
    chunk_size: int | str = "auto"  # tokens per chunk of the fused head
    eval_every: int = 0  # held-out cross-entropy every k steps and at the end (0: at the end only)
    save_dir: str | None = None  # save_pretrained here at the end (and every save_every steps)
    save_every: int = 0
    patience: int = 0  # stop after this many evaluations without a lower held-out cross-entropy (0: off)
    restore_best: bool = True  # with eval_data: end with the weights of the lowest held-out cross-entropy
    threads: int | None = None  # torch CPU threads during the run; None: the free cores (as the CLI)
    progress: bool = True  # a bar on a terminal, else a line every ~10 s on stderr; False: silent


@dataclass
class TrainResult:
    """What a run did. With ``eval_data``: ``eval_history`` starts at step 0 (the model as given),
    ``eval_at_start`` and ``eval_at_end`` are the held-out cross-entropies (nats/token, by eval set) of
    the model as given and as returned, ``best_step`` the step of the lowest cross-entropy on the first
    eval set (0: the model as given), ``restored`` whether the returned weights are that step's rather
    than the last step's, and ``stopped_at`` the step where ``patience`` stopped the run (None: it ran
    every step)."""

    history: list[dict]  # one row per step: step, loss, lr, grad_norm, tokens, seconds
    eval_history: list[dict]  # step and the cross-entropy (nats/token) of each eval set, by name
    seconds: float
    tokens: int  # target tokens trained on
    objective: str  # repr of the loss object
    eval_at_start: dict | None = None
    eval_at_end: dict | None = None
    best_step: int | None = None
    restored: bool = False
    stopped_at: int | None = None

    @property
    def final_loss(self) -> float:
        return self.history[-1]["loss"] if self.history else math.nan

    def to_dict(self) -> dict:
        return asdict(self)


def as_sequences(data, seq_len: int) -> torch.Tensor:
    """Training data as a [S, T] int64 tensor of sequences.

    Accepts a [S, T] tensor (used as is; −100 marks padding: not a target, masked from attention
    and fed as token 0), or a 1-D token stream (tensor or list) or a list of token lists
    (concatenated, then cut into sequences of ``seq_len``; the remainder is dropped).
    """
    if isinstance(data, torch.Tensor) and data.dim() == 2:
        seqs = data
    else:
        if isinstance(data, torch.Tensor):
            stream = data.reshape(-1)
        elif data and isinstance(data[0], int):
            stream = torch.tensor(data, dtype=torch.long)
        else:
            stream = torch.tensor([t for doc in data for t in doc], dtype=torch.long)
        n = stream.numel() // seq_len
        if n == 0:
            raise ValueError(
                f"data has {stream.numel()} tokens, fewer than one sequence of seq_len={seq_len}")
        seqs = stream[: n * seq_len].reshape(n, seq_len)
    if seqs.is_floating_point():
        raise TypeError(f"data must hold integer token ids, got dtype {seqs.dtype}")
    return seqs.long()


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr over warmup_steps, then cosine decay to cfg.min_lr (None: lr / 10)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    min_lr = cfg.lr / 10 if cfg.min_lr is None else cfg.min_lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def resolve_seq_len(model, seq_len: int | None) -> int:
    """``seq_len``, or the model's context (at most 512) when None; ValueError beyond the model's
    positions (GPT-2 would fail inside its position embedding: an IndexError, a device-side assert on
    CUDA)."""
    context = model_context(model)
    if seq_len is None:
        return min(context or 512, 512)
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an int >= 2, got {seq_len!r}")
    if context and seq_len > context:
        raise ValueError(f"seq_len={seq_len} is beyond the model's {context} positions")
    return seq_len


def _optimizer(model, cfg: TrainConfig) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]  # tied weights appear once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


def _batches(num_seqs: int, batch_size: int, generator: torch.Generator):
    """Endless batches of sequence indices: a fresh permutation every epoch, seeded."""
    order, pos = torch.randperm(num_seqs, generator=generator), 0
    while True:
        if pos + batch_size > num_seqs:
            order, pos = torch.randperm(num_seqs, generator=generator), 0
        yield order[pos : pos + batch_size]
        pos += batch_size


def _hidden(model, seqs: torch.Tensor):
    """(the model's output head, its last hidden states [b, T, D]) for sequences [b, T] (−100: padding)."""
    head = output_head(model)
    inputs = torch.where(seqs == -100, torch.zeros_like(seqs), seqs)
    attention_mask = (seqs != -100).long()
    kwargs = {"use_cache": False} if _takes_use_cache(head.decoder) else {}  # no KV cache in training
    hidden = head.decoder(input_ids=inputs, attention_mask=attention_mask, **kwargs)[0]  # [b, T, D]
    if head.hidden_scale != 1.0:
        hidden = hidden * head.hidden_scale
    return head, hidden


def micro_batch_loss(model, loss: TokenLoss, seqs: torch.Tensor, num_items,
                     chunk_size="auto", ref_model=None) -> torch.Tensor:
    """Σℓ / num_items over one micro-batch of sequences [b, T] (targets: the next tokens).

    A loss that selects its tokens (Rho-1) scores them against ``ref_model``'s head, without gradient."""
    head, hidden = _hidden(model, seqs)
    loss = fit_loss(loss, head)
    if getattr(loss, "selects_tokens", False):
        with torch.no_grad():
            ref_head, ref_hidden = _hidden(ref_model, seqs)
        return linear_rho1_loss(hidden, head.weight, seqs, ref_hidden=ref_hidden, ref_weight=ref_head.weight,
                                ref_bias=ref_head.bias, ratio=loss.ratio, softcap=loss.softcap,
                                linear_bias=head.bias, shift=True, num_items=num_items, chunk_size=chunk_size)
    return linear_loss(hidden, head.weight, seqs, loss=loss, linear_bias=head.bias, shift=True,
                       num_items=num_items, chunk_size=chunk_size)


def accumulate_gradients(model, loss: TokenLoss, batch: torch.Tensor, micro_batch_size: int,
                         chunk_size="auto", ref_model=None) -> tuple[float, int]:
    """Forward and backward over ``batch`` [B, T] in micro-batches; returns (step loss, num_items).

    Each micro-batch's loss is Σℓ / num_items with num_items the target count of the whole batch, so
    the gradients that add up in ``.grad`` are exactly those of the full batch's mean loss. Rho-1 selects
    within each micro-batch, so its num_items is the sum of the micro-batches' selected counts.
    """
    micro_batches = batch.split(micro_batch_size)
    counts = [int(count_items(mb)) for mb in micro_batches]
    if getattr(loss, "selects_tokens", False):
        counts = [top_fraction_count(n, loss.ratio) for n in counts]
    num_items = sum(counts)  # targets in the whole step
    step_loss = 0.0
    for mb in micro_batches:
        value = micro_batch_loss(model, loss, mb, num_items, chunk_size, ref_model)
        value.backward()
        step_loss += value.item()
    return step_loss, int(num_items)


def _takes_use_cache(module) -> bool:
    import inspect

    params = inspect.signature(module.forward).parameters
    return "use_cache" in params


@torch.no_grad()
def evaluate_ce(model, seqs: torch.Tensor, batch_size: int = 16, chunk_size="auto") -> float:
    """Mean next-token cross-entropy (nats) over sequences [S, T]: Σℓ over all of them / their count."""
    was_training = model.training
    model.eval()
    total = count_items(seqs)
    ce = make_objective("ce")
    value = sum(micro_batch_loss(model, ce, seqs[i : i + batch_size], total, chunk_size).item()
                for i in range(0, len(seqs), batch_size))
    model.train(was_training)
    return value


def check_config(cfg: TrainConfig) -> None:
    """ValueError naming the first option of ``cfg`` that is out of range (TypeError: not a number)."""

    import numbers

    def number(name, *, integer=False, low=None, above=None, none_ok=False):
        value = getattr(cfg, name)
        if value is None and none_ok:
            return
        kind = numbers.Integral if integer else numbers.Real  # numpy scalars too
        if isinstance(value, bool) or not isinstance(value, kind):
            raise TypeError(f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value!r}")
        if low is not None and value < low:
            raise ValueError(f"{name} must be at least {low}, got {value!r}")
        if above is not None and value <= above:
            raise ValueError(f"{name} must be positive, got {value!r}")

    for name in ("steps", "batch_size"):
        number(name, integer=True, low=1)
    number("micro_batch_size", integer=True, low=1, none_ok=True)
    number("seq_len", integer=True, low=2, none_ok=True)  # input + target at least; None: the model's
    for name in ("warmup_steps", "eval_every", "save_every", "patience"):
        number(name, integer=True, low=0)
    number("threads", integer=True, low=1, none_ok=True)
    for name in ("restore_best", "progress"):
        if not isinstance(getattr(cfg, name), bool):
            raise TypeError(f"{name} must be True or False, got {getattr(cfg, name)!r}")
    number("seed", integer=True)
    number("lr", above=0)
    number("min_lr", low=0, none_ok=True)  # None: lr/10
    number("weight_decay", low=0)
    number("grad_clip", above=0, none_ok=True)
    if cfg.micro_batch_size is not None and cfg.batch_size % cfg.micro_batch_size:
        raise ValueError(f"micro_batch_size ({cfg.micro_batch_size}) must divide batch_size "
                         f"({cfg.batch_size})")


class SaveError(OSError):
    """Saving the model failed. The model, trained in place, is intact in memory; ``log`` is what
    xent_train.json would have held (config, result so far) and ``step`` the steps done."""

    def __init__(self, message: str, *, directory: str, step: int, log: dict):
        super().__init__(message)
        self.directory, self.step, self.log = directory, step, log

    def __reduce__(self):  # picklable: the demo trains in worker processes
        return _save_error, (str(self), self.directory, self.step, self.log)


def _save_error(message, directory, step, log) -> SaveError:
    return SaveError(message, directory=directory, step=step, log=log)


def train(model, data, config: TrainConfig | None = None, *, eval_data=None, tokenizer=None,
          ref_model=None, **overrides) -> TrainResult:
    """Train a transformers causal LM in place with any xent objective; returns the loss history.

    Args:
        model: a ``*ForCausalLM`` (anything with ``base_model`` and ``get_output_embeddings()``).
        data: training sequences: a [S, T] id tensor, a 1-D token stream or a list of token lists
            (see :func:`as_sequences`).
        config: a :class:`TrainConfig`; keyword ``overrides`` replace its fields, e.g.
            ``train(model, ids, objective="tailr", steps=100)``.
        eval_data: optional held-out sequences (or a dict name -> sequences), scored with
            cross-entropy every ``eval_every`` steps; ``eval_history`` rows hold one value per name
            ("eval_ce" when a single set is given).
        tokenizer: saved with the model when ``save_dir`` is set (pass it: ``xent eval`` needs it).
        ref_model: the reference model of objective ``rho1`` (a causal LM with the same vocabulary, on
            the model's device; put in eval mode and never trained): Rho-1 trains on the tokens whose
            loss exceeds the reference's most. Only for ``rho1``.

    ``seq_len`` (None: the model's context, at most 512) and sequences given as [S, T] must fit the
    model's positions; ``min_lr`` None is ``lr / 10``.

    Held-out loss: with ``eval_data`` the cross-entropy is measured before the first step (step 0, the
    model as given), every ``eval_every`` steps and at the end (``eval_every=0``: at step 0 and the end
    only). ``restore_best`` (default True) keeps a CPU copy of the weights with the lowest value on the
    first eval set and loads them back at the end, so a run that overfits returns its best model
    (the model as given when no step beat it); ``patience=k`` stops the run after k evaluations in a
    row without a lower value. The result's ``eval_at_start``, ``eval_at_end`` and ``best_step`` say
    what happened.

    Threads: ``threads`` CPU threads for torch during the run (restored after); None picks the free
    cores, as the ``xent`` commands do (``xent.cli._threads.default_threads``: torch's default spins
    on a shared machine). ``progress``: a bar on a terminal, else a line every ~10 s (step, loss,
    tokens/s, time left) on stderr; ``progress=False`` prints nothing.

    Raises FloatingPointError at the first step whose loss or gradient norm is not finite, before
    that step's update (the model keeps the previous steps' weights; the end of the run is not saved),
    and SaveError (an OSError carrying the run's log) when ``save_dir`` cannot be written.

    The objective's value is what ``history`` records (for ``tailr``, ``gold``, ``focal`` and ``poly`` it
    is not the cross-entropy; ``emo`` in mode emo1 has the cross-entropy's value); ``eval_history``
    holds the cross-entropy of every objective on the same held-out sequences.
    """
    cfg = config if config is not None else TrainConfig()
    if overrides:
        unknown = sorted(set(overrides) - set(TrainConfig.__dataclass_fields__))
        if unknown:
            raise TypeError(f"unknown training option(s) {unknown}; see xent.training.TrainConfig")
        cfg = TrainConfig(**{**asdict(cfg), **overrides})
    check_config(cfg)
    micro = cfg.batch_size if cfg.micro_batch_size is None else cfg.micro_batch_size

    cfg = replace(cfg, seq_len=resolve_seq_len(model, cfg.seq_len),
                  min_lr=cfg.lr / 10 if cfg.min_lr is None else cfg.min_lr)
    seqs = as_sequences(data, cfg.seq_len)
    if eval_data is not None and not isinstance(eval_data, dict):
        eval_data = {"eval_ce": eval_data}
    eval_sets = {k: as_sequences(v, cfg.seq_len) for k, v in (eval_data or {}).items()}
    context = model_context(model)
    for name, s in {"data": seqs, **{f"eval_data[{k!r}]": v for k, v in eval_sets.items()}}.items():
        if context and s.shape[1] > context:  # given as [S, T]: T is not seq_len
            raise ValueError(f"{name} has sequences of {s.shape[1]} tokens, beyond the model's {context} "
                             "positions")
    if len(seqs) < cfg.batch_size:
        raise ValueError(f"data has {len(seqs)} sequences, fewer than batch_size={cfg.batch_size}")
    device = next(model.parameters()).device
    if isinstance(cfg.objective, TokenLoss):
        if cfg.objective_options:
            raise ValueError("objective_options apply to an objective given by name, not to a loss object "
                             f"({type(cfg.objective).__name__}): set the options on the object")
        loss_fn = cfg.objective
    else:
        loss_fn = make_objective(cfg.objective, model, **cfg.objective_options)
    if getattr(loss_fn, "selects_tokens", False) != (ref_model is not None):
        name = cfg.objective if isinstance(cfg.objective, str) else type(cfg.objective).__name__
        raise ValueError(f"objective {name!r} needs ref_model= (the reference model it compares with)"
                         if ref_model is None else f"ref_model is for objective 'rho1' only, not {name!r}")
    if ref_model is not None:
        ref_model.eval()
    cost = getattr(loss_fn, "unit_embedding", None)  # EMO's frozen cost embedding follows the model
    if cost is not None and cost.device != device:
        loss_fn.unit_embedding = cost.to(device)

    if cfg.patience and not (eval_sets and cfg.eval_every):
        raise ValueError(f"patience={cfg.patience} needs eval_data and eval_every > 0 (the held-out "
                         "cross-entropy it watches)")
    from ..cli._threads import cpu_threads

    with cpu_threads(cfg.threads):
        cfg = replace(cfg, threads=torch.get_num_threads())  # the count used, for xent_train.json
        return _train(model, cfg, seqs, eval_sets, loss_fn, micro, device, tokenizer, ref_model)


def _train(model, cfg: TrainConfig, seqs, eval_sets: dict, loss_fn, micro: int, device, tokenizer,
           ref_model):
    torch.manual_seed(cfg.seed)  # dropout, if the model has any
    generator = torch.Generator().manual_seed(cfg.seed)
    batches = _batches(len(seqs), cfg.batch_size, generator)
    optimizer = _optimizer(model, cfg)
    model.train()

    history, eval_history, tokens, start = [], [], 0, time.perf_counter()
    bar = _Progress(cfg, loss_fn) if cfg.progress else None
    watch = _BestWeights(model, cfg, eval_sets, device, bar, eval_history)
    if bar is not None:
        bar.start = time.perf_counter()  # tokens/s and time left from the training steps, not step 0's eval
    stopped_at = None
    for step in range(cfg.steps):
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = seqs[next(batches)].to(device)  # [batch_size, T]
        step_loss, num_items = accumulate_gradients(model, loss_fn, batch, micro, cfg.chunk_size, ref_model)
        # the norm is computed without clipping too (max_norm inf scales by exactly 1): a non-finite
        # gradient must stop the run before the update writes it into the weights
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf).item()
        grad_norm = norm if cfg.grad_clip else math.nan  # recorded when clipping, as before
        if not (math.isfinite(step_loss) and math.isfinite(norm)):
            if bar is not None:
                bar.close()
            what = f"the loss is {step_loss}" if not math.isfinite(step_loss) else \
                f"the gradient norm is {norm}"
            saved = " and the model was not saved" if cfg.save_dir else ""
            raise FloatingPointError(
                f"step {step + 1} of {cfg.steps}: {what}: training stopped before this step's update"
                f"{saved} (the model in memory is the one after step {step}); lower lr or check the data")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += num_items
        history.append({"step": step + 1, "loss": step_loss, "lr": lr, "grad_norm": grad_norm,
                        "tokens": tokens, "seconds": time.perf_counter() - start})
        last = step + 1 == cfg.steps
        if bar is not None:
            bar.step(step + 1, step_loss, tokens)
        if eval_sets and (last or (cfg.eval_every and (step + 1) % cfg.eval_every == 0)):
            if watch.evaluate(step + 1) and not last:
                stopped_at = step + 1
        if cfg.save_dir and cfg.save_every and (step + 1) % cfg.save_every == 0 and not last:
            seconds = time.perf_counter() - start
            _save_or_raise(model, tokenizer, os.path.join(cfg.save_dir, f"step-{step + 1}"), None, step + 1,
                           lambda s=seconds, n=tokens: _log(cfg, TrainResult(history, eval_history, s, n,
                                                                             repr(loss_fn))))
        if stopped_at is not None:
            break
    if bar is not None:
        bar.close()
    result = TrainResult(history, eval_history, time.perf_counter() - start, tokens, repr(loss_fn),
                         stopped_at=stopped_at)
    if eval_sets:
        result.eval_at_start = {k: v for k, v in eval_history[0].items() if k != "step"}
        result.best_step, result.eval_at_end, result.restored = watch.finish()
        if bar is not None:
            bar.summary(result)
    if cfg.save_dir:
        log = _log(cfg, result)
        _save_or_raise(model, tokenizer, cfg.save_dir, log, len(history), lambda: log)
    return result


class _BestWeights:
    """The held-out evaluations: step 0 first, then the lowest cross-entropy on the first eval set and a
    CPU copy of its weights (with ``restore_best``), and ``patience``'s count of evaluations since."""

    def __init__(self, model, cfg: TrainConfig, eval_sets: dict, device, bar, eval_history: list):
        self.model, self.cfg, self.eval_sets, self.device, self.bar = model, cfg, eval_sets, device, bar
        self.history = eval_history
        self.best = self.best_step = self.best_state = self.last = None
        self.since = 0
        if eval_sets:
            self.evaluate(0)

    def evaluate(self, step: int) -> bool:
        """Scores the model at ``step`` into the eval history; True when patience runs out."""
        scores = {name: evaluate_ce(self.model, s.to(self.device), chunk_size=self.cfg.chunk_size)
                  for name, s in self.eval_sets.items()}
        self.last = {"step": step, **scores}
        self.history.append(self.last)
        value = next(iter(scores.values()))
        if not math.isfinite(value):
            return False  # never the best; training stops on its own when the loss is not finite
        if self.best is None or value < self.best["value"]:
            self.best = {"value": value, **self.last}
            self.best_step, self.since = step, 0
            if self.cfg.restore_best:
                self.best_state = {k: v.detach().to("cpu", copy=True)
                                   for k, v in self.model.state_dict().items()}
        else:
            self.since += 1
        if self.bar is not None:
            self.bar.evaluation(step, value, self.best_step, self.best["value"])
        return bool(self.cfg.patience) and self.since >= self.cfg.patience

    def finish(self) -> tuple[int, dict, bool]:
        """(best step, the scores of the model returned, whether the best weights were loaded back)."""
        if self.best is None:  # no finite held-out value at all
            return None, {k: v for k, v in self.last.items() if k != "step"}, False
        restore = self.cfg.restore_best and self.best_step != self.last["step"]
        if restore:
            self.model.load_state_dict(self.best_state)
        self.best_state = None
        end = self.best if restore else self.last
        return self.best_step, {k: v for k, v in end.items() if k not in ("step", "value")}, restore


class _Progress:
    """A tqdm bar when stderr is a terminal; otherwise (a log, a notebook, a worker process) one line
    (step, loss, tokens/s, time left) when the first step ends, then every ``EVERY`` seconds, and at
    the last step."""

    EVERY = 10.0

    def __init__(self, cfg: TrainConfig, loss_fn):
        import sys

        name = cfg.objective if isinstance(cfg.objective, str) else type(cfg.objective).__name__
        if isinstance(cfg.objective, str) and cfg.objective_options:
            name += "(" + ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v!r}"
                                    for k, v in sorted(cfg.objective_options.items())) + ")"
        self.name, self.total, self.out = name, cfg.steps, sys.stderr
        self.start = self.last_line = time.perf_counter()
        self.lines, self.held_out, self.bar = 0, "", None
        import multiprocessing

        # a bar only for the main process on a terminal: the bars of worker processes would overwrite
        # each other's line
        if getattr(self.out, "isatty", lambda: False)() and multiprocessing.parent_process() is None:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                pass
            else:
                self.bar = tqdm(total=cfg.steps, desc=f"train {name}", unit="step", leave=False)

    def _line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.out)
        else:
            print(text, file=self.out, flush=True)

    def step(self, step: int, loss: float, tokens: int) -> None:
        now = time.perf_counter()
        elapsed = now - self.start
        rate = tokens / elapsed if elapsed > 0 else math.nan
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.4f}, {rate:,.0f} tok/s{self.held_out}", refresh=False)
            self.bar.update(1)
            return
        if step == 1 or step == self.total or now - self.last_line >= self.EVERY:
            left = elapsed / step * (self.total - step)
            self._line(f"train {self.name}: step {step}/{self.total}, loss {loss:.4f}, {rate:,.0f} tokens/s,"
                       f" {_duration(elapsed)} elapsed, ~{_duration(left)} left{self.held_out}")
            self.last_line = now

    def evaluation(self, step: int, value: float, best_step: int | None, best: float) -> None:
        self.held_out = f", held-out {value:.4f} (best {best:.4f} at step {best_step})"
        if self.bar is None and step == 0:
            self._line(f"train {self.name}: held-out cross-entropy at step 0 (the model as given): "
                       f"{value:.4f} nats/token")

    def summary(self, result: TrainResult) -> None:
        first = next(iter(result.eval_at_start.values()))
        end = next(iter(result.eval_at_end.values()))
        stopped = f"stopped at step {result.stopped_at} (patience); " if result.stopped_at else ""
        kept = (f"kept the weights of step {result.best_step}" if result.restored
                else f"the last step's weights (best step {result.best_step})")
        worse = "" if end < first else " — no better than the model as given"
        self._line(f"train {self.name}: {stopped}{kept}: held-out cross-entropy {first:.4f} -> {end:.4f} "
                   f"nats/token{worse}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min"


def _log(cfg: TrainConfig, result: TrainResult) -> dict:
    """xent_train.json: the config and the result."""
    return {"config": _jsonable(asdict(cfg)), **result.to_dict()}


def _save_or_raise(model, tokenizer, directory: str, log: dict | None, step: int, run_log) -> None:
    """save_model, or SaveError carrying ``run_log()`` (the run so far), so the caller can save elsewhere."""
    try:
        save_model(model, tokenizer, directory, log)
    except OSError as err:
        reason = err.strerror or str(err) or type(err).__name__
        raise SaveError(f"cannot save the model after step {step} to {directory}: {reason}",
                        directory=directory, step=step, log=run_log()) from err


def _jsonable(d: dict) -> dict:
    return {k: (v if isinstance(v, (int, float, str, bool, list, tuple, dict, type(None))) else repr(v))
            for k, v in d.items()}


def save_model(model, tokenizer, directory: str, log: dict | None) -> None:
    """save_pretrained (safetensors), the tokenizer and xent_train.json into ``directory``. Written into
    a temporary directory inside it first, then moved in file by file: a failure (a full disk) leaves
    no half-written weights file where a loader would read it."""
    import shutil
    import tempfile

    os.makedirs(directory, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".xent-save-", dir=directory)
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if log is not None:
            with open(os.path.join(tmp, "xent_train.json"), "w") as f:
                json.dump(json_safe(log), f, indent=1, allow_nan=False)
                f.flush()
                os.fsync(f.fileno())
        for root, dirs, files in os.walk(tmp):  # safetensors writes 0600: a teammate could not read it
            for name in dirs + files:
                follow_umask(os.path.join(root, name))
        for name in sorted(os.listdir(tmp)):
            target = os.path.join(directory, name)
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target)
            os.replace(os.path.join(tmp, name), target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
