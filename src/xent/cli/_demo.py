"""``xent demo``: pre-train a tiny language model with cross-entropy, fine-tune a copy of it with each
objective on another domain, offline, and test the papers' claims.

Builds the data (standard-library docstrings and a Markov source of known entropy), a byte-level BPE
tokenizer and a small GPT-2; phase 1 trains it with cross-entropy; phase 2 fine-tunes a copy with each
objective (and TaiLr at several γ) on docstrings of modules phase 1 never saw, from the same weights on
the same batches; evaluates each model with xent's evaluator, samples continuations of held-out prefixes
and scores them with MAUVE (features from the phase-1 model); scans the temperature of the
cross-entropy model; writes summary.json, PNG figures, report.html (opening with the claims table) and
the checkpoints into --out, and prints the tables.
"""

from __future__ import annotations

import os

from ._output import OutputDir, describe


def register(sub) -> None:
    from ..training._objectives import OBJECTIVES
    from . import plain

    p = sub.add_parser("demo", help="train tiny models with several objectives and compare them",
                       description=plain(__doc__))
    p.add_argument("--out", default="xent-demo", help="output directory (default: ./xent-demo)")
    p.add_argument("--quick", action="store_true", help="a smaller run (under a minute) for tests")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--objectives", help="comma-separated objectives fine-tuned in phase 2 (default: "
                   f"ce,emo,tailr); from: {', '.join(OBJECTIVES)} (rho1's reference: the phase-1 model)")
    p.add_argument("--tailr-gammas", help="comma-separated γ of the extra TaiLr runs (default: 0.5,0.8; "
                   "--quick: 0.8; '' for none); the tailr objective itself is γ = 0.1, γ = 0 is ce")
    p.add_argument("--steps", type=int, help="fine-tuning steps per objective (overrides the preset)")
    p.add_argument("--pretrain-steps", type=int, help="phase-1 steps (overrides the preset)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: no thread-count dependence in the numbers, and "
                        "fast on a busy machine)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="models fine-tuned and scored at once, one process each (default: 2 or the CPU "
                        "count if smaller); the numbers do not depend on it")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (or lines every ~10 s when not on a terminal)")
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
    for flag, key in (("--steps", "steps"), ("--pretrain-steps", "pretrain_steps")):
        value = getattr(args, key)
        if value is not None:
            if value < 1:
                raise CommandError(f"{flag} must be at least 1, got {value}")
            overrides[key] = value
    if args.tailr_gammas is not None:
        try:
            gammas = tuple(float(g) for g in args.tailr_gammas.split(",") if g.strip())
        except ValueError:
            raise CommandError(f"--tailr-gammas must be comma-separated numbers, got {args.tailr_gammas!r}"
                               ) from None
        bad = [g for g in gammas if not 0 < g <= 1]
        if bad:
            raise CommandError(f"--tailr-gammas must lie in (0, 1], got {bad[0]:g}")
        overrides["tailr_gammas"] = gammas
    start = time.perf_counter()
    log = functools.partial(print, flush=True)  # each line as it happens, also into a pipe or a log file
    log("xent demo: loading transformers and matplotlib (the first run after an install can take a minute)")
    try:
        import matplotlib  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as err:
        raise CommandError(f"the demo needs {err.name}: pip install 'xent[hf,viz]'") from None

    from ..demo import DemoConfig, run_demo
    from ..demo._report import (
        CLAIMS_HEADER,
        GENERATION_HEADER,
        SIGNIFICANT,
        claims_rows,
        findings,
        generation_rows,
        table_header,
        table_rows,
    )

    cfg = DemoConfig.quick(**overrides) if args.quick else DemoConfig(**overrides)
    try:
        with OutputDir(args.out):  # checked (and locked) before the work
            summary = run_demo(args.out, cfg, progress=not args.no_progress, log=log)
    except OSError as err:
        raise CommandError(describe(err)) from None
    h = summary["data"]["entropy_rate_nats_per_word"]
    _print_table(f"xent demo (seed {summary['seed']}): held-out target documents; Markov source entropy "
                 f"{h:.4f} nats/word", table_header(summary), table_rows(summary))
    print(f"{SIGNIFICANT} significant: the paired per-document difference is more than 1.96 standard errors "
          "from 0 (definitions in report.html)")
    for item in findings(summary):
        print(f"- {item}")
    _print_table("generation: MAUVE vs the true continuations (features: the phase-1 model)",
                 GENERATION_HEADER, generation_rows(summary))
    _print_table("the papers' claims, against the cross-entropy fine-tune", CLAIMS_HEADER,
                 claims_rows(summary))
    print(f"\nwrote {args.out}/report.html, summary.json, {len(summary['files']) - 1} figures and "
          f"{len(summary['objectives']) + 1} checkpoints in {time.perf_counter() - start:.0f}s "
          f"({summary['total_cpu_seconds']:.0f} CPU-s)")
    print(f"open the report in a browser: {os.path.abspath(os.path.join(args.out, 'report.html'))}")
    return 0


def _print_table(title, header, rows) -> None:
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
