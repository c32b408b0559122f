"""``xent train``: train a Hugging Face causal LM with any xent objective, offline.

The loss is computed from the hidden states through the fused head (``xent.linear_loss``), so the
[batch, time, vocab] logits are never materialised. Documents are tokenized, each preceded by the
tokenizer's BOS (or EOS), concatenated and cut into sequences of --seq-len. The trained model and its
tokenizer are saved with save_pretrained in --out (safetensors), with xent_train.json (the config and
the loss history); ``xent eval --model OUT`` reads it.
"""

from __future__ import annotations

from ._threads import add_threads_argument, check_threads, cpu_threads

# objective-option flags -> (option name, type)
_OPTION_FLAGS = {"label_smoothing": float, "z_loss": float, "gamma": float, "threshold": float,
                 "epsilon": float, "ratio_cap": float}


def register(sub) -> None:
    from ..training._loop import TrainConfig
    from . import plain

    d = TrainConfig()  # one set of defaults: the CLI's are the API's
    p = sub.add_parser("train", help="train a causal language model with an xent objective",
                       description=plain(__doc__))
    p.add_argument("--model", required=True, metavar="DIR", help="local Hugging Face causal-LM directory")
    p.add_argument("--data", required=True, nargs="+", metavar="PATH",
                   help=".txt, .jsonl, .parquet files or saved datasets directories")
    p.add_argument("--out", required=True, metavar="DIR", help="where the trained model is saved")
    p.add_argument("--split", default="none", choices=("none", "lines", "paragraphs"),
                   help=".txt files: one document per file, line or blank-line paragraph (default: none)")
    p.add_argument("--text-field", default="text", help="field/column holding the text (default: text)")
    p.add_argument("--eval-data", nargs="+", metavar="PATH",
                   help="held-out documents: cross-entropy every --eval-every steps and at the end")
    p.add_argument("--objective", default=d.objective,
                   help=f"ce, ce_ls, ce_zloss, emo, tailr, gold, focal, poly (default: {d.objective})")
    for name, typ in _OPTION_FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), type=typ,
                       help="objective option (overrides the objective's default)")
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
    p.add_argument("--save-every", type=int, metavar="N", default=d.save_every,
                   help=f"also save OUT/step-N every N steps (default: {d.save_every}, never)")
    p.add_argument("--seed", type=int, default=d.seed, help=f"batch order and dropout (default: {d.seed})")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    add_threads_argument(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run, interrupted=interrupted)


def interrupted(args) -> str:
    """What Ctrl-C leaves behind."""
    if args.save_every:
        return (f"interrupted: the last checkpoint is the newest {args.out}/step-N "
                f"(every {args.save_every} steps)")
    return "interrupted: nothing was saved (--save-every N keeps a checkpoint every N steps)"


def _documents(paths, split, text_field):
    from ..eval import Corpus

    return [text for _, text in Corpus(paths, split=split, text_field=text_field) if text.strip()]


def run(args) -> int:
    from . import CommandError

    try:
        import transformers  # noqa: F401
    except ImportError:
        raise CommandError("xent train needs transformers: pip install 'xent[hf]'") from None
    from ..training import OBJECTIVES

    if args.objective not in OBJECTIVES:
        raise CommandError(f"unknown objective {args.objective!r}; choose from {', '.join(OBJECTIVES)}")
    check_threads(args.threads)
    with cpu_threads(args.threads):
        return _run(args)


def _run(args) -> int:
    import torch

    from ..eval import EvalError
    from ..eval._load import load_model
    from ..training import TrainConfig, train
    from ..training._loop import resolve_seq_len
    from . import CommandError

    try:
        model, tokenizer, _ = load_model(args.model, device=args.device)
        docs = _documents(args.data, args.split, args.text_field)
        eval_docs = _documents(args.eval_data, args.split, args.text_field) if args.eval_data else None
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
        progress=not args.no_progress,
    )
    sep = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    stream = _tokenize(tokenizer, docs, sep)
    eval_stream = _tokenize(tokenizer, eval_docs, sep) if eval_docs else None
    try:
        result = train(model.train(), stream, cfg, eval_data=eval_stream, tokenizer=tokenizer)
    except (ValueError, TypeError) as err:
        raise CommandError(str(err)) from None
    last = result.history[-1]
    msg = (f"{args.objective}: {cfg.steps} steps, {result.tokens:,} target tokens in {result.seconds:.1f}s; "
           f"last step loss {last['loss']:.4f}")
    if result.eval_history:
        msg += f", held-out cross-entropy {result.eval_history[-1]['eval_ce']:.4f} nats/token"
    print(msg)
    print(f"saved to {args.out}")
    return 0


def _tokenize(tokenizer, docs, sep):
    """One token stream: [sep, document tokens...] for each document."""
    import torch

    ids = tokenizer(docs, add_special_tokens=False)["input_ids"]
    head = [] if sep is None else [sep]
    return torch.tensor([t for doc in ids for t in (*head, *doc)], dtype=torch.long)
