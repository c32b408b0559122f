"""``xent eval``: a causal LM's cross-entropy, perplexity and calibration on a corpus.

Every token is scored exactly once (sliding windows), losses are computed in float32 and summed
exactly, error bars are given both for independent tokens and clustered by document. See
``xent.eval.evaluate`` for the semantics and docs/REFERENCE.md §4 for the formulas.
"""

from __future__ import annotations

import argparse
import re

from . import plain
from ._output import OutputDir, check_device, describe
from ._threads import add_threads_argument, check_threads, cpu_threads


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    """--data and the windowing options, shared by eval and compare."""
    p.add_argument("--data", nargs="+", required=True, metavar="PATH",
                   help=".txt, .jsonl, .parquet files or saved datasets directories; several give a "
                        "breakdown per file plus the pooled result")
    p.add_argument("--split", choices=["none", "lines", "paragraphs"], default="none",
                   help=".txt files: one document per file (none), per line, or per blank-line paragraph")
    p.add_argument("--text-field", default="text", help="field/column holding the text (default: text)")
    p.add_argument("--limit", type=int, metavar="N",
                   help="score only the first N documents (in file order, after --split), as lm-eval's "
                        "--limit: a quick check before a full run")
    p.add_argument("--max-document-mb", type=float, default=16, metavar="MB",
                   help="refuse a document larger than this many MiB of UTF-8 (default 16): the tokenizer "
                        "needs ~100-200 bytes of memory per byte of a document; use --split to cut files")
    p.add_argument("--max-length", type=int, help="inputs per window (default: the model's context)")
    p.add_argument("--stride", type=int, help="window step (default: max-length, disjoint windows)")
    p.add_argument("--bos", choices=["first", "every", "none"],
                   help="prepend BOS to each document (first, default if the tokenizer has one), to each "
                        "window (every), or not (none: a document's first token is not scored)")
    p.add_argument("--preset", choices=["lm-eval", "llama.cpp", "transformers"],
                   help="reproduce lm-evaluation-harness rolling perplexity, llama.cpp llama-perplexity or "
                        "the loop of transformers' 'perplexity of fixed-length models' page")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="model weights dtype; the softmax is float32 regardless")
    p.add_argument("--device", default="cpu", help="cpu or cuda (under torchrun: cuda:LOCAL_RANK)")
    p.add_argument("--head", choices=["auto", "fused", "forward"], default="auto",
                   help="auto (default): the fused head (no [batch, length, vocabulary] logits) when a check "
                        "on the first batch shows that it gives the model's own logits, else the model's "
                        "forward, with a note; fused: the fused head, refused when the check shows a "
                        "difference; forward: always the model's own logits")
    add_threads_argument(p)
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow the model directory's own Python code (off: it is never run)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept pickle weights (.bin), read with weights_only=True (default: "
                        "safetensors only)")
    p.add_argument("--allow-missing-weights", action="store_true",
                   help="evaluate even if the checkpoint lacks weights of the model (initialised at random) "
                        "or holds unknown ones (default: refused, naming them)")
    p.add_argument("--out", metavar="DIR", help="write summary.json (and checkpoints) to DIR")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout, no table")


def register(sub) -> None:
    p = sub.add_parser("eval", help="cross-entropy and perplexity of a causal LM on a corpus",
                       description=plain(__doc__), epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, metavar="DIR", help="local Hugging Face causal-LM directory")
    p.add_argument("--tokenizer", metavar="DIR",
                   help="read the tokenizer from DIR instead of the model directory (a Hugging Face "
                        "tokenizer folder; its ids must fit the model's embedding)")
    add_data_arguments(p)
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from DIR's checkpoint")
    p.add_argument("--checkpoint-every", type=int, default=100, metavar="K",
                   help="documents between checkpoints (default 100; must match when resuming)")
    p.add_argument("--stop-after", type=int, help=argparse.SUPPRESS)  # tests: simulate an interruption
    p.add_argument("--per-token", action="store_true",
                   help="also write DIR/tokens.parquet (doc, position, token, loss, entropy, rank, top-1 p)")
    p.add_argument("--html", action="store_true", help="also write DIR/report.html with plots")
    p.add_argument("--temperature", type=float, default=1.0, metavar="T",
                   help="score softmax(logits / T) (default 1)")
    p.add_argument("--fit-temperature", action="store_true",
                   help="also find the T* that minimises the corpus NLL (temperature scaling) and report "
                        "NLL, ECE and entropy at T* beside T = 1 (keeps tokens × hidden-size states in "
                        "memory)")
    p.add_argument("--save-base", metavar="DIR",
                   help="also keep this model as a base for xent compare --base-cache DIR: its final hidden "
                        "states at the scored positions (model dtype), head and manifest (a new or empty "
                        "directory; tokens × hidden-size states are held in memory until the end)")
    p.set_defaults(run=run, interrupted=interrupted)


EXAMPLES = """\
examples:
  xent eval --model ./my-model --data valid.txt --split lines
      one document per line; perplexity, bits per byte and calibration with error bars
  xent eval --model ./my-model --data valid.jsonl --text-field content --limit 100
      the first 100 documents of a .jsonl file whose text is under "content" (a quick check)
  xent eval --model ./my-model --tokenizer ./my-tokenizer --data valid.parquet --max-length 1024 \\
            --stride 512 --out results --per-token --html
      a tokenizer from another folder; overlapping windows; summary.json, tokens.parquet, report.html
  xent eval --model ./my-model --data wiki.test.txt --preset llama.cpp --max-length 512
      the number llama-perplexity -c 512 prints (also: --preset lm-eval, --preset transformers)
  xent eval --model ./base --data valid.txt --split lines --save-base ./base-cache
      then: xent compare --base-cache ./base-cache --model ./tuned --data valid.txt --split lines

models are read from a local directory, never downloaded: get a hub model with
  hf download gpt2 --local-dir ./gpt2   (huggingface_hub's CLI; huggingface-cli download in older versions)
or model.save_pretrained("./gpt2") and tokenizer.save_pretrained("./gpt2") in Python.
"""

# what a Hugging Face hub id looks like: "gpt2", "meta-llama/Llama-3.2-1B" (a name, or owner/name)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def check_local_dir(path: str | None, what: str) -> None:
    """CommandError unless ``path`` (a --model, --base or --tokenizer) is None or an existing directory;
    a missing path that looks like a hub id gets a line on how to get a local copy."""
    import os

    from . import CommandError

    if path is None or os.path.isdir(path):
        return
    hint = ""
    if not os.path.exists(path) and _HUB_ID.fullmatch(path) and ".." not in path:
        hint = (f" ({what}s are read from a local directory, never downloaded: get one with hf download "
                f"{path} --local-dir DIR (huggingface-cli download with an older huggingface_hub), or "
                "save_pretrained(DIR) in Python)")
    raise CommandError(f"{what} directory not found: {path}{hint}")


def interrupted(args) -> str:
    """What Ctrl-C leaves behind: the checkpoint in --out, and the flag that continues from it."""
    if not args.out:
        return "interrupted (nothing saved; with --out DIR, an interrupted run continues with --resume)"
    return (f"interrupted; the same command with --resume continues from the last checkpoint in {args.out} "
            f"(every {args.checkpoint_every} documents)")


def check_arguments(args) -> None:
    """The checks of what only the command line has, done before anything is loaded: the directories
    that must be local, --threads, --max-document-mb (in MiB here), --device. The options of evaluate,
    compare and Corpus are theirs to check (see checked)."""
    from . import CommandError

    check_local_dir(args.model, "model")
    check_local_dir(getattr(args, "base", None), "model")
    check_local_dir(getattr(args, "tokenizer", None), "tokenizer")
    check_threads(args.threads)
    if not args.max_document_mb > 0:  # NaN too
        raise CommandError(f"--max-document-mb must be positive, got {args.max_document_mb:g}")
    check_device(args.device)


def window_options(args) -> dict:
    """The keywords of xent.eval.evaluate and compare that --data's windowing flags give."""
    return {"max_length": args.max_length, "stride": args.stride, "bos": args.bos, "preset": args.preset,
            "batch_size": args.batch_size, "head": args.head}


def evaluate_options(args) -> dict:
    """The keywords of xent.eval.evaluate that xent eval's flags give (--out is its checkpoint_dir)."""
    return {**window_options(args), "checkpoint_every": args.checkpoint_every, "checkpoint_dir": args.out,
            "resume": args.resume, "per_token": args.per_token, "html": args.html,
            "stop_after": args.stop_after, "temperature": args.temperature,
            "fit_temperature": args.fit_temperature, "save_base": args.save_base}


# The flag that gives each keyword of evaluate and compare, where it is not --keyword-with-dashes.
FLAGS = {"checkpoint_dir": "--out DIR"}


def flagged(err: Exception) -> str:
    """An xent.eval error as the command line says it: a bad option named by its flag."""
    from xent.eval._options import OptionError

    if not isinstance(err, OptionError):
        return str(err)
    return err.spelled({name: FLAGS.get(name, "--" + name.replace("_", "-")) for name in err.options})


def open_corpus(args):
    from xent.eval import Corpus

    return Corpus(args.data, split=args.split, text_field=args.text_field,
                  max_document_bytes=int(args.max_document_mb * (1 << 20)), limit=args.limit)


def device_for(args) -> str:
    import os

    if args.device == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{os.environ['LOCAL_RANK']}"
    return args.device


def checked(body, args, options: dict) -> int:
    """Check the arguments and the library's ``options`` (xent.eval's check_options: no model needed),
    join the torchrun process group if there is one, and run body(args, options) with --out checked and
    locked (see _output.OutputDir) and --save-base locked; xent.eval's input errors and OSErrors (a full
    disk...) become one-line CLI errors."""
    from xent.eval import EvalError
    from xent.eval import _distributed as dist
    from xent.eval._options import check_options

    from . import CommandError

    joined = False
    try:
        check_arguments(args)
        check_options(**options)
        joined = dist.init_from_env(args.device)
        rank, _ = dist.rank_and_world()
        with OutputDir(args.out, rank=rank), save_base_lock(args), cpu_threads(args.threads):
            return body(args, options)
    except EvalError as err:
        raise CommandError(flagged(err)) from None
    except OSError as err:  # its notes say what is kept (xent.eval.evaluate: the checkpoint)
        raise CommandError("; ".join([describe(err), *getattr(err, "__notes__", ())])) from None
    finally:
        if joined:
            dist.shutdown()


def save_base_lock(args):
    """The --save-base directory's lock for the run (see xent.eval._base_cache.lock), or no lock."""
    import contextlib

    save_base = getattr(args, "save_base", None)
    if save_base is None:
        return contextlib.nullcontext()
    from xent.eval import _base_cache

    return _base_cache.lock(save_base)


def run(args) -> int:
    return checked(_run, args, evaluate_options(args))


def _run(args, options: dict) -> int:
    import json
    import sys

    from xent.eval import _distributed as dist
    from xent.eval import evaluate
    from xent.eval._evaluate import too_short_note
    from xent.eval._files import json_safe
    from xent.eval._load import load_model
    from xent.eval._report import Progress, print_summary

    corpus = open_corpus(args)  # checks the paths before the model is loaded
    rank, _ = dist.rank_and_world()
    model, tokenizer, model_sha = load_model(args.model, dtype=args.dtype, device=device_for(args),
                                             trust_remote_code=args.trust_remote_code,
                                             allow_pickle=args.allow_pickle,
                                             allow_missing_weights=args.allow_missing_weights,
                                             tokenizer_dir=args.tokenizer)
    progress = Progress(enabled=rank == 0)
    try:
        result = evaluate(model, tokenizer, corpus, **options, progress=progress, model_sha256=model_sha,
                          extra_config={"model": args.model, "tokenizer": args.tokenizer,
                                        "data": list(args.data), "split": args.split,
                                        "text_field": args.text_field, "limit": args.limit,
                                        "dtype": args.dtype, "device": args.device})
    finally:
        progress.close()
    if args.stop_after is not None:
        return 3  # interrupted on purpose (tests): the checkpoint is in --out
    summary = result.to_dict()
    if rank == 0:
        short = too_short_note(summary)
        if short:
            print(f"xent eval: warning: {summary['skipped_unscored']} documents not scored{short}",
                  file=sys.stderr)
        if args.json:
            print(json.dumps(json_safe(summary), indent=2, allow_nan=False))
        else:
            print_summary(summary)
    progress.report(summary["tokens"])  # after the outputs: a run that fails says nothing of its speed
    return 0
