"""``xent train``: train a Hugging Face causal LM with any xent objective, offline.

The loss is computed from the hidden states through the fused head (``xent.linear_loss``), so the
[batch, time, vocab] logits are never materialised. Documents are tokenized, each preceded by the
tokenizer's BOS (or EOS), concatenated and cut into sequences of --seq-len. The trained model and its
tokenizer are saved with save_pretrained in --out (safetensors), with xent_train.json (the config and
the loss history); ``xent eval --model OUT`` reads it.

With --eval-data the held-out cross-entropy is measured before the first step, every --eval-every steps
and at the end, and the weights with the lowest value are the ones saved (--no-restore-best: the last
step's); --patience K stops after K evaluations without improvement. Objectives that need more than a
name are Python-only: distillation (a teacher's logits) and multi-token prediction (K prediction
streams); rho1 takes its reference model with --ref-model DIR.

examples:
  xent train --model gpt2-local --data train.jsonl --eval-data val.jsonl --eval-every 50 --patience 3 --out ft
  xent train --model DIR --data train.txt --split lines --objective tailr --gamma 0.5 --out ft-tailr
  xent train --model DIR --data train.jsonl --objective rho1 --ref-model REF_DIR --out ft-rho1
"""

from __future__ import annotations

import argparse
import os

from ._output import OutputDir, check_device, describe
from ._threads import add_threads_argument, check_threads, cpu_threads

# objective option -> (its flag, type)
_OPTION_FLAGS = {"label_smoothing": ("--label-smoothing", float), "z_loss": ("--z-loss", float),
                 "gamma": ("--gamma", float), "threshold": ("--threshold", float),
                 "epsilon": ("--epsilon", float), "ratio_cap": ("--ratio-cap", float),
                 "k": ("--top-k", int), "alpha": ("--alpha", float), "beta": ("--beta", float),
                 "ratio": ("--ratio", float)}


def register(sub) -> None:
    from ..training._loop import TrainConfig
    from ..training._objectives import OBJECTIVES, PYTHON_ONLY, objective_options
    from . import plain

    d = TrainConfig()  # one set of defaults: the CLI's are the API's
    p = sub.add_parser("train", help="train a causal language model with an xent objective",
                       description=plain(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, metavar="DIR", help="local Hugging Face causal-LM directory")
    p.add_argument("--data", required=True, nargs="+", metavar="PATH",
                   help=".txt, .jsonl, .parquet files or saved datasets directories")
    p.add_argument("--out", required=True, metavar="DIR", help="where the trained model is saved")
    p.add_argument("--split", default="none", choices=("none", "lines", "paragraphs"),
                   help=".txt files: one document per file, line or blank-line paragraph (default: none)")
    p.add_argument("--text-field", default="text", help="field/column holding the text (default: text)")
    p.add_argument("--max-document-mb", type=float, default=16, metavar="MB",
                   help="refuse a document larger than this many MiB (default 16; see xent eval --help)")
    p.add_argument("--eval-data", nargs="+", metavar="PATH",
                   help="held-out documents: cross-entropy every --eval-every steps and at the end")
    p.add_argument("--objective", default=d.objective,
                   help=f"{', '.join(OBJECTIVES)} (default: {d.objective}); Python-only: "
                        f"{'; '.join(f'{k}: needs {v}' for k, v in PYTHON_ONLY.items())}")
    for name, (flag, typ) in _OPTION_FLAGS.items():
        users = [o for o in OBJECTIVES if name in objective_options(o)]
        p.add_argument(flag, dest=name, type=typ,
                       help=f"option {name} of {', '.join(users)} (overrides the objective's default)")
    p.add_argument("--ref-model", metavar="DIR",
                   help="rho1's reference model (a local causal-LM directory with the same vocabulary)")
    p.add_argument("--from-scratch", action="store_true", help="re-initialise the weights from the config")
    p.add_argument("--steps", type=int, metavar="N", default=d.steps,
                   help=f"optimizer steps (default: {d.steps})")
    p.add_argument("--batch-size", type=int, metavar="N", default=d.batch_size,
                   help=f"sequences per optimizer step (default: {d.batch_size})")
    p.add_argument("--micro-batch-size", type=int, metavar="N",
                   help="sequences per forward/backward, gradients accumulated (default: the batch size)")
    p.add_argument("--seq-len", type=int, metavar="T",
                   help="tokens per sequence (default: the model's context, at most 512)")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate of AdamW (default: {d.lr:g})")
    p.add_argument("--min-lr", type=float, help="end of the cosine decay (default: lr/10)")
    p.add_argument("--warmup-steps", type=int, metavar="N", default=d.warmup_steps,
                   help=f"linear warm-up from 0 (default: {d.warmup_steps})")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help=f"on matrices, not on biases and norms (default: {d.weight_decay:g})")
    p.add_argument("--grad-clip", type=float, default=d.grad_clip,
                   help=f"max gradient norm, 0: none (default: {d.grad_clip:g})")
    p.add_argument("--eval-every", type=int, metavar="N", default=d.eval_every,
                   help="held-out cross-entropy every K steps with --eval-data (default: 0, at the end only)")
    p.add_argument("--patience", type=int, metavar="K", default=d.patience,
                   help="with --eval-data: stop after K evaluations without a lower held-out "
                        "cross-entropy (default: 0, never)")
    p.add_argument("--no-restore-best", action="store_true",
                   help="with --eval-data: save the last step's weights, not those of the lowest "
                        "held-out cross-entropy")
    p.add_argument("--save-every", type=int, metavar="N", default=d.save_every,
                   help=f"also save OUT/step-N every N steps (default: {d.save_every}, never)")
    p.add_argument("--seed", type=int, default=d.seed, help=f"batch order and dropout (default: {d.seed})")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    add_threads_argument(p)
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (or, when not on a terminal, no progress line every ~10 s)")
    p.set_defaults(run=run, interrupted=interrupted)


def interrupted(args) -> str:
    """What Ctrl-C leaves behind."""
    if args.save_every:
        return (f"interrupted: the last checkpoint is the newest {args.out}/step-N "
                f"(every {args.save_every} steps)")
    return "interrupted: nothing was saved (--save-every N keeps a checkpoint every N steps)"


def _corpus(paths, args):
    from ..eval import Corpus

    return Corpus(paths, split=args.split, text_field=args.text_field,
                  max_document_bytes=int(args.max_document_mb * (1 << 20)))


def _documents(corpus) -> list[str]:
    return [text for _, text in corpus if text.strip()]


def check_arguments(args) -> None:
    """The options, checked before anything is loaded: CommandError names the first bad one."""
    import math

    from ..training._objectives import OBJECTIVES, objective_options
    from . import CommandError

    if args.objective not in OBJECTIVES:
        raise CommandError(f"unknown objective {args.objective!r}; choose from {', '.join(OBJECTIVES)}")
    accepted = objective_options(args.objective)
    for name, (flag, _) in _OPTION_FLAGS.items():
        if getattr(args, name) is not None and name not in accepted:
            flags = [f for n, (f, _) in _OPTION_FLAGS.items() if n in accepted]
            raise CommandError(f"{flag} does not apply to objective {args.objective!r} (its options: "
                               f"{', '.join(flags) or 'none'})")
    if (args.objective == "rho1") != (args.ref_model is not None):
        raise CommandError("objective 'rho1' needs --ref-model DIR (the reference model whose per-token "
                           "loss it compares with)" if args.ref_model is None else
                           f"--ref-model is for objective 'rho1' only, not {args.objective!r}")
    for name, low in (("steps", 1), ("batch_size", 1), ("micro_batch_size", 1), ("seq_len", 2),
                      ("warmup_steps", 0), ("eval_every", 0), ("save_every", 0), ("patience", 0)):
        value = getattr(args, name)
        if value is not None and value < low:
            raise CommandError(f"{_flag(name)} must be at least {low}, got {value}")
    if args.micro_batch_size is not None and args.batch_size % args.micro_batch_size:
        raise CommandError(f"--micro-batch-size {args.micro_batch_size} does not divide --batch-size "
                           f"{args.batch_size}")
    for name, positive in (("lr", True), ("min_lr", False), ("weight_decay", False), ("grad_clip", False)):
        value = getattr(args, name)
        if value is not None and (not math.isfinite(value) or value < 0 or (positive and value == 0)):
            need = "a positive" if positive else "a non-negative"
            raise CommandError(f"{_flag(name)} must be {need} finite number, got {value}")
    if args.patience and not (args.eval_data and args.eval_every):
        raise CommandError(f"--patience {args.patience} needs --eval-data and --eval-every N > 0 (the "
                           "held-out cross-entropy it watches)")
    for name, (flag, _) in _OPTION_FLAGS.items():  # their ranges are the losses' to check
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):
            raise CommandError(f"{flag} must be a finite number, got {value}")
    if not args.max_document_mb > 0:
        raise CommandError(f"--max-document-mb must be positive, got {args.max_document_mb:g}")
    check_device(args.device)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def run(args) -> int:
    from . import CommandError

    try:
        import transformers  # noqa: F401
    except ImportError:
        raise CommandError("xent train needs transformers: pip install 'xent[hf]'") from None
    check_arguments(args)
    check_threads(args.threads)
    try:
        with OutputDir(args.out) as out, cpu_threads(args.threads):
            return _run(args, out)
    except OSError as err:
        raise CommandError(describe(err)) from None


def _run(args, out) -> int:
    import torch

    from ..eval import EvalError
    from ..eval._load import load_model
    from ..training import TrainConfig, train
    from ..training._loop import SaveError, resolve_seq_len
    from . import CommandError

    try:
        corpus = _corpus(args.data, args)  # the paths (and whole-file sizes) before the model
        eval_corpus = _corpus(args.eval_data, args) if args.eval_data else None
        # --from-scratch re-initialises every weight: a checkpoint lacking some is no matter then
        model, tokenizer, _ = load_model(args.model, device=args.device,
                                         allow_missing_weights=args.from_scratch)
        ref_model = load_model(args.ref_model, device=args.device)[0] if args.ref_model else None
        docs = _documents(corpus)
        eval_docs = _documents(eval_corpus) if eval_corpus else None
    except EvalError as err:
        raise CommandError(str(err)) from None
    if not docs:
        raise CommandError("no documents in --data")
    if args.from_scratch:
        torch.manual_seed(args.seed)
        model = type(model)(model.config).to(args.device)
    try:
        seq_len = resolve_seq_len(model, args.seq_len)  # checked before tokenizing
    except ValueError as err:
        raise CommandError(f"--seq-len: {err}") from None
    options = {k: getattr(args, k) for k in _OPTION_FLAGS if getattr(args, k) is not None}
    cfg = TrainConfig(
        objective=args.objective, objective_options=options, steps=args.steps, batch_size=args.batch_size,
        micro_batch_size=args.micro_batch_size, seq_len=seq_len, lr=args.lr, min_lr=args.min_lr,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, grad_clip=args.grad_clip or None,
        seed=args.seed, eval_every=args.eval_every, save_dir=args.out, save_every=args.save_every,
        patience=args.patience, restore_best=not args.no_restore_best, threads=torch.get_num_threads(),
        progress=not args.no_progress,
    )
    sep = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    stream = _tokenize(tokenizer, docs, sep)
    eval_stream = _tokenize(tokenizer, eval_docs, sep) if eval_docs else None
    try:
        result = train(model.train(), stream, cfg, eval_data=eval_stream, tokenizer=tokenizer,
                       ref_model=ref_model)
    except SaveError as err:
        raise CommandError(_save_elsewhere(model, tokenizer, err)) from None
    except (ValueError, TypeError, FloatingPointError) as err:
        raise CommandError(str(err)) from None
    last = result.history[-1]
    steps = f"{len(result.history)} of {cfg.steps} steps (patience)" if result.stopped_at else \
        f"{cfg.steps} steps"
    print(f"{args.objective}: {steps}, {result.tokens:,} target tokens in {result.seconds:.1f}s; "
          f"last step loss {last['loss']:.4f}")
    if result.eval_history:
        start, end = result.eval_at_start["eval_ce"], result.eval_at_end["eval_ce"]
        which = (f"the weights of step {result.best_step}, the lowest" if result.restored
                 else "the last step's weights")
        print(f"held-out cross-entropy {start:.4f} nats/token at the start, {end:.4f} saved ({which})"
              + ("" if end < start else ": no better than the model it started from"))
    else:
        print("no --eval-data: no held-out loss was measured (a long run can overfit: give --eval-data "
              "and --patience)")
    print(f"saved to {args.out}")
    _remove_stale_saves(args.out)
    return 0


def _remove_stale_saves(directory: str) -> None:
    """The temporary directories of saves interrupted by a kill (this run's own are gone)."""
    import glob
    import shutil

    for tmp in glob.glob(os.path.join(glob.escape(directory), ".xent-save-*")):
        shutil.rmtree(tmp, ignore_errors=True)


def _save_elsewhere(model, tokenizer, err) -> str:
    """After a failed save (a full disk, ...): save the model (trained in place, intact in memory) and its
    log to a new directory under the system's temporary directory; the one-line error says where."""
    import tempfile

    from ..training._loop import save_model

    what = f"{err} (the model after step {err.step})"
    try:
        fallback = tempfile.mkdtemp(prefix="xent-train-")
        save_model(model, tokenizer, fallback, err.log)
    except OSError as again:
        return f"{what}; saving it to {tempfile.gettempdir()} failed too ({describe(again)}): it is lost"
    return f"{what}; it was saved to {fallback} instead"


def _tokenize(tokenizer, docs, sep):
    """One token stream: [sep, document tokens...] for each document."""
    import torch

    ids = tokenizer(docs, add_special_tokens=False)["input_ids"]
    head = [] if sep is None else [sep]
    return torch.tensor([t for doc in ids for t in (*head, *doc)], dtype=torch.long)
