"""``xent demo``: train a tiny language model once per objective, offline, and compare them.

Builds the data (standard-library docstrings and a Markov source of known entropy), a byte-level BPE
tokenizer and a small GPT-2; trains one model per objective with the same seed, data and budget;
evaluates each with xent's evaluator; writes summary.json, PNG figures, report.html and the
checkpoints into --out, and prints a summary table.
"""

from __future__ import annotations

import os

from ._output import OutputDir, describe


def register(sub) -> None:
    from . import plain

    p = sub.add_parser("demo", help="train tiny models with several objectives and compare them",
                       description=plain(__doc__))
    p.add_argument("--out", default="xent-demo", help="output directory (default: ./xent-demo)")
    p.add_argument("--quick", action="store_true", help="a smaller run (about a minute) for tests")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--objectives", help="comma-separated objectives (default: the demo's set); "
                   "from: ce, ce_ls, ce_zloss, emo, tailr, gold, focal, poly")
    p.add_argument("--steps", type=int, help="training steps per objective (overrides the preset)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: no thread-count dependence in the numbers, and "
                        "fast on a busy machine)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="objectives trained at once, one process each (default: 2 or the CPU count if "
                        "smaller); the numbers do not depend on it")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=run)


def run(args) -> int:
    import functools
    import time

    from ..training import OBJECTIVES
    from . import CommandError

    if args.threads < 1 or args.jobs < 1:
        raise CommandError(f"--threads and --jobs must be at least 1, got {args.threads} and {args.jobs}")
    overrides = {"seed": args.seed, "threads": args.threads, "jobs": args.jobs}
    if args.objectives:
        names = tuple(n.strip() for n in args.objectives.split(",") if n.strip())
        unknown = [n for n in names if n not in OBJECTIVES]
        if unknown or not names:
            raise CommandError(f"unknown objective(s) {', '.join(unknown) or '(none)'}; "
                               f"choose from {', '.join(OBJECTIVES)}")
        overrides["objectives"] = names
    if args.steps is not None:
        if args.steps < 1:
            raise CommandError(f"--steps must be at least 1, got {args.steps}")
        overrides["steps"] = args.steps
    start = time.perf_counter()
    log = functools.partial(print, flush=True)  # each line as it happens, also into a pipe or a log file
    log("xent demo: loading transformers and matplotlib (the first run after an install can take a minute)")
    try:
        import matplotlib  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as err:
        raise CommandError(f"the demo needs {err.name}: pip install 'xent[hf,viz]'") from None

    from ..demo import DemoConfig, run_demo
    from ..demo._report import SIGNIFICANT, findings, table_header, table_rows

    cfg = DemoConfig.quick(**overrides) if args.quick else DemoConfig(**overrides)
    try:
        with OutputDir(args.out):  # checked (and locked) before the work
            summary = run_demo(args.out, cfg, progress=not args.no_progress, log=log)
    except OSError as err:
        raise CommandError(describe(err)) from None
    _print_table(summary, table_header(summary), table_rows(summary))
    print(f"{SIGNIFICANT} significant: the paired per-document difference is more than 1.96 standard errors "
          "from 0 (definitions in report.html)")
    for item in findings(summary):
        print(f"- {item}")
    print(f"\nwrote {args.out}/report.html, summary.json, {len(summary['files']) - 1} figures and "
          f"{len(summary['objectives'])} checkpoints in {time.perf_counter() - start:.0f}s")
    print(f"open the report in a browser: {os.path.abspath(os.path.join(args.out, 'report.html'))}")
    return 0


def _print_table(summary, header, rows) -> None:
    h = summary["data"]["entropy_rate_nats_per_word"]
    title = f"xent demo (seed {summary['seed']}): Markov source entropy {h:.4f} nats/word"
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        print("  ".join(header))
        for row in rows:
            print("  ".join(row))
        return
    table = Table(title=title)
    for i, col in enumerate(header):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    Console(width=max(140, Console().width)).print(table)
