"""``xent compare``: a model against a base model on the same tokens.

KL(base‖model) per token (mean, max, percentiles), how often the top token agrees, the change Δp of
the correct token's probability, and the paired difference of the losses: what is run to judge a
quantised or distilled model. Each mean has two standard errors, named where printed: tokens iid (as
llama.cpp prints) and clustered by document. The windows are those of ``xent eval`` (same options).
Models whose tokenizers give different ids are compared by bits per byte of whole documents instead
(each with its own tokens; the paired difference with its document-clustered SE): KL needs a shared
vocabulary. ``--base-cache DIR`` (written by ``xent eval --save-base DIR``) stands for ``--base``: only
``--model`` is loaded and the numbers are those of the two-model compare.
"""

from __future__ import annotations

import argparse

from . import plain
from ._eval import add_data_arguments, checked, device_for, open_corpus, window_options


def register(sub) -> None:
    p = sub.add_parser("compare", help="KL divergence and loss difference of two causal LMs",
                       description=plain(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--base", metavar="DIR", help="the reference model directory")
    which.add_argument("--base-cache", metavar="DIR",
                       help="the reference model as kept by xent eval --save-base DIR: only --model is "
                            "loaded and the numbers are those of the two-model compare (same data, "
                            "tokenizer, windows and batch size, else refused)")
    p.add_argument("--model", required=True, metavar="DIR", help="the model compared with it")
    add_data_arguments(p)
    p.set_defaults(run=run)


def run(args) -> int:
    return checked(_run, args, window_options(args))


def _run(args, options: dict) -> int:
    import json
    import os

    from xent.eval import _distributed as dist
    from xent.eval import _files
    from xent.eval._compare import compare, print_compare
    from xent.eval._load import load_model
    from xent.eval._report import Progress

    corpus = open_corpus(args)
    rank, _ = dist.rank_and_world()
    kw = dict(dtype=args.dtype, device=device_for(args), trust_remote_code=args.trust_remote_code,
              allow_pickle=args.allow_pickle, allow_missing_weights=args.allow_missing_weights)
    if args.base_cache is not None:
        from xent.eval._base_cache import load_manifest

        base_sha = load_manifest(args.base_cache)["base_model_sha256"]  # a bad cache: refused before loading
        base = None
        model, model_tokenizer, model_sha = load_model(args.model, **kw)
        tokenizer = model_tokenizer
    else:
        base, tokenizer, base_sha = load_model(args.base, **kw)
        model, model_tokenizer, model_sha = load_model(args.model, **kw)
    progress = Progress(enabled=rank == 0, desc="comparing")
    try:
        result = compare(
            base, model, tokenizer, corpus, model_tokenizer=model_tokenizer, **options, progress=progress,
            model_sha256={"base": base_sha, "model": model_sha}, base_cache=args.base_cache,
            extra_config={"base": args.base, "model": args.model, "data": list(args.data),
                          "split": args.split, "text_field": args.text_field, "limit": args.limit,
                          "dtype": args.dtype,
                          "device": args.device},
        )
    finally:
        progress.close()
    summary = result.to_dict()
    if rank == 0:
        if args.out:
            _files.write_json(os.path.join(args.out, "summary.json"), summary)
            _files.remove_stale_temporaries(args.out, ["summary.json"])
        if args.json:
            print(json.dumps(_files.json_safe(summary), indent=2, allow_nan=False))
        else:
            print_compare(summary)
    # after the outputs; with different tokenizers each model scored its own tokens
    tokens = summary["tokens"] if "tokens" in summary else summary["tokens_base"] + summary["tokens_model"]
    progress.report(tokens, "xent compare")
    return 0
