"""Evaluation options: defaults from the model and tokenizer, validation, and the presets.

Presets reproduce other tools' numbers on the same tokens:

- ``"lm-eval"``: lm-evaluation-harness 0.4.13 ``loglikelihood_rolling`` (wikitext-style perplexity
  tasks): the document is prefixed with BOS (EOS when the tokenizer has no BOS), cut into disjoint
  windows of max_length predictions (each later window's first input is the previous window's last
  target: one token of carried context), the last window moved back to hold max_length inputs; words
  counted as ``len(re.split(r"\\s+", text))`` and bytes as UTF-8 bytes of the document, as the harness
  does. Whitespace-only documents are scored; an empty one has no window but counts its one word and 0
  bytes. (lm-eval ≥ 0.4.9.2 lets the tokenizer add BOS: with one that does, lm-eval matches only with
  its model argument ``add_bos_token=False``.)
- ``"llama.cpp"``: ``llama-perplexity`` (default mode): chunks of max_length tokens (``-c``) of the
  BOS-prefixed text, the remainder dropped, each chunk's first token replaced by BOS, only the
  predictions of the second half scored (L/2 ... L − 2 → tokens L/2 + 1 ... L − 1); a text of fewer
  than 2·max_length tokens is refused (not scored). llama.cpp tokenizes a file as one text: use it with
  whole-file documents (the default for .txt), which lose one trailing newline as ``-f`` reads them. Its
  BOS follows the model's add_bos metadata: ``bos="none"`` reproduces models without it (GPT-2 style).
- ``"transformers"``: the loop of transformers' page "Perplexity of fixed-length models" exactly
  (see _windows.transformers_windows): BOS none unless ``bos="first"``, the stride as given; the
  tokens are counted from the labels (the page's own count is off by one per later window).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from functools import partial

from ._errors import EvalError

PRESETS = ("lm-eval", "llama.cpp", "transformers")
BOS_MODES = ("first", "every", "none")
HEADS = ("auto", "fused", "forward")


class OptionError(EvalError):
    """A bad option, in one line that names it by its keyword (``str(err)``). ``spelled(names)`` is
    the same line with each option named as ``names`` maps it (the CLI maps keywords to its flags)."""

    def __init__(self, template: str, *options: str, **values):
        # template: str.format text with {0}, {1}... for the options and {name} for the values
        self.template, self.options, self.values = template, options, values
        super().__init__(self.spelled({}))

    def spelled(self, names: Mapping[str, str]) -> str:
        return self.template.format(*(names.get(o, o) for o in self.options), **self.values)

    def __reduce__(self):  # picklable although __init__ takes more than the message
        return partial(OptionError, self.template, *self.options, **self.values), ()


@dataclass(frozen=True)
class Options:
    """How the corpus is cut into windows and batched: what fixes the numbers (``config()`` is recorded
    in the summary and the checkpoint's fingerprint)."""

    max_length: int
    stride: int
    bos: str  # first | every | none
    bos_id: int | None
    preset: str | None
    extend_last: bool
    words: str  # "whitespace" | "lm-eval"
    batch_size: int
    padding_side: str
    checkpoint_every: int

    def config(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class RunOptions:
    """How an evaluate run goes beside its windows: its directory and outputs, the head and the
    temperature, the base cache, a stop for tests (see xent.eval.evaluate). Built by
    :func:`check_options`; the defaults are evaluate's."""

    checkpoint_dir: str | None = None
    resume: bool = False
    per_token: bool = False
    html: bool = False
    head: str = "auto"
    temperature: float = 1.0
    fit_temperature: bool = False
    save_base: str | None = None
    stop_after: int | None = None


def model_context(model) -> int | None:
    cfg = model.config
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_at_least(name: str, value, minimum: int) -> None:
    """OptionError unless the option ``name`` is an integer (not a bool) ≥ minimum."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise OptionError("{0} must be an integer, got {value!r}", name, value=value)
    if value < minimum:
        raise OptionError("{0} must be " + ("positive" if minimum == 1 and name == "stride" else
                                            f"at least {minimum}") + ", got {value!r}", name, value=value)


@dataclass(frozen=True)
class WindowOptions:
    """The windowing options as given (None: the model's or the preset's default; resolve_options
    makes the resolved :class:`Options` of them). The defaults are evaluate's."""

    max_length: int | None = None
    stride: int | None = None
    bos: str | None = None
    preset: str | None = None
    batch_size: int = 8
    padding_side: str = "right"
    checkpoint_every: int = 100

    def check(self) -> None:
        """The checks that need no model: each option alone, a preset against the options it fixes,
        and the stride against an explicit max_length. OptionError names the first bad one."""
        max_length, stride, bos, preset = self.max_length, self.stride, self.bos, self.preset
        if max_length is not None:
            check_at_least("max_length", max_length, 3)
        check_at_least("batch_size", self.batch_size, 1)
        if self.padding_side not in ("left", "right"):
            raise OptionError("{0} must be 'left' or 'right', got {value!r}", "padding_side",
                              value=self.padding_side)
        check_at_least("checkpoint_every", self.checkpoint_every, 1)
        if preset is not None:
            if preset not in PRESETS:
                raise OptionError("unknown {0} {value!r} (choose from {choices})", "preset", value=preset,
                                  choices=", ".join(PRESETS))
            if preset == "lm-eval" and (stride is not None or bos is not None):
                raise OptionError("{0} lm-eval fixes the stride and BOS: do not pass {1} or {2}",
                                  "preset", "stride", "bos")
            if stride is not None and preset != "transformers":
                raise OptionError("{0} {value} fixes the stride: do not pass {1}", "preset", "stride",
                                  value=preset)
            if bos == "every":
                raise OptionError("{0} {value} takes {1} first or none, not every", "preset", "bos",
                                  value=preset)
        if bos is not None and bos not in BOS_MODES:
            raise OptionError("{0} must be one of {choices}, got {value!r}", "bos", value=bos,
                              choices=", ".join(BOS_MODES))
        if stride is not None:
            check_at_least("stride", stride, 1)
            if max_length is not None:
                _check_stride(stride, max_length, "")


def _check_stride(stride: int, max_length: int, note: str) -> None:
    if stride > max_length:
        raise OptionError("{0} {stride} is larger than {1} {max_length}{note}: tokens between windows would "
                          "never be scored", "stride", "max_length", stride=stride, max_length=max_length,
                          note=note)


def check_options(**options) -> RunOptions:
    """Every check of evaluate's options that needs no model, before any work: ``options`` are
    keywords of xent.eval.evaluate (the fields of :class:`WindowOptions` and :class:`RunOptions`,
    TypeError for another). OptionError names the first bad one. The run's options
    as one frozen object."""
    WindowOptions(**{k: options.pop(k) for k in _WINDOW_FIELDS if k in options}).check()
    run = RunOptions(**options)
    for name in ("resume", "per_token", "html"):
        if getattr(run, name) and run.checkpoint_dir is None:
            raise OptionError("{0} needs {1}", name, "checkpoint_dir")
    if run.head not in HEADS:
        raise OptionError("{0} must be one of {choices}, got {value!r}", "head", value=run.head,
                          choices=", ".join(HEADS))
    t = run.temperature
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not (math.isfinite(t) and t > 0):
        raise OptionError("{0} must be a finite number > 0, got {value!r}", "temperature", value=t)
    if run.fit_temperature and t != 1.0:
        raise OptionError("{0} reports T* beside T = 1: do not pass {1} ({value!r})", "fit_temperature",
                          "temperature", value=t)
    if run.fit_temperature and run.resume:
        raise OptionError("{0} needs every token of one run: do not pass {1}", "fit_temperature", "resume")
    if run.save_base is not None:
        if run.resume:
            raise OptionError("{0} needs one uninterrupted run: do not pass {1}", "save_base", "resume")
        if os.path.exists(run.save_base) and (not os.path.isdir(run.save_base) or os.listdir(run.save_base)):
            raise OptionError("{0} {value!r} exists and is not an empty directory", "save_base",
                              value=run.save_base)
    if run.stop_after is not None:
        check_at_least("stop_after", run.stop_after, 1)
    return run


_WINDOW_FIELDS = tuple(f.name for f in fields(WindowOptions))


def resolve_options(model, tokenizer, **window) -> Options:
    """The windowing options (``window``: the fields of :class:`WindowOptions`) checked, first without
    then with the model and tokenizer, and their defaults filled in; OptionError names the first bad
    one."""
    from ._load import check_tokenizer

    given = WindowOptions(**window)
    given.check()
    check_tokenizer(model, tokenizer)
    max_length, stride, bos, preset = given.max_length, given.stride, given.bos, given.preset
    context = model_context(model)
    if max_length is None:
        if context is None:
            raise OptionError("the model config gives no context length: pass {0}", "max_length")
        max_length = context
    if context is not None and max_length > context:
        raise OptionError("{0} {value} is beyond the model's {context} positions", "max_length",
                          value=max_length, context=context)
    bos_id = tokenizer.bos_token_id
    extend_last, words = False, "whitespace"
    if preset == "lm-eval":
        bos_id = bos_id if bos_id is not None else tokenizer.eos_token_id
        if bos_id is None:
            raise OptionError("{0} lm-eval needs a BOS or EOS token and the tokenizer has neither", "preset")
        bos, stride, extend_last, words = "first", max_length, True, "lm-eval"
    elif preset == "llama.cpp":
        bos = bos or ("first" if bos_id is not None else "none")
        stride = max_length
    elif preset == "transformers":
        bos = bos or "none"
    if bos is None:
        bos = "first" if bos_id is not None else "none"
    if bos != "none" and bos_id is None:
        raise OptionError("{0} {value}: the tokenizer has no BOS token (use {0} none)", "bos", value=bos)
    if bos == "none":
        bos_id = None
    if stride is None:
        stride = max_length
    _check_stride(stride, max_length, "" if given.max_length is not None else " (the model's context)")
    return Options(max_length, stride, bos, bos_id, preset, extend_last, words, given.batch_size,
                   given.padding_side, given.checkpoint_every)
