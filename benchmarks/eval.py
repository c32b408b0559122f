"""Benchmark: ``xent eval`` against the bare forward, a logits-materialising evaluation, lm-eval (issue 12).

Configurations, each in a fresh process (``--child``), on the same model and the same windows:
    forward      the bare ``model(input_ids).logits`` over every window, batch by batch (logits dropped)
    xent         xent.eval.evaluate(model, tokenizer, documents, max_length=L, batch_size=B): every
                 metric (loss, entropy, rank, top-1 probability, Brier, calibration, per-document sums)
    xent_steady  the same, with the first batch's check of the fused head against the model's forward
                 (ModelHead.decide, paid once per run) made in the warm-up and its decision reused: the
                 cost per batch of a long evaluation
    materialise  what a plain evaluation does: logits = model(x).logits, log_softmax in float32, gather
                 the targets' log-probabilities, sum ([B, T, V] logits and their log-softmax held)
    decoder      model.base_model(x) alone: the part of both that is not the LM head (why a ratio is
                 what it is)
    stats        xent's per-token statistics (_score.eval_stats) on the N × V float32 logits of the run,
                 given the logits: the cost xent adds to a loss-only evaluation
    lm_eval      lm-evaluation-harness HFLM.loglikelihood_rolling on the same documents (only when
                 ``lm_eval`` is importable: pip install lm-eval; a bench extra, never a test dependency)

The model is a Llama built from a config (random weights, seed 0, nothing downloaded), float32; each
document is L − 1 random token ids, so with BOS it is exactly one window of L inputs. The tokenizer is a
stub that reads the ids from the text (decimal numbers), so no time goes to tokenization and V can be
128256. In each process: the model and windows are built, freed heap is returned to the OS, the peak-RSS
counter is reset (/proc/self/clear_refs "5") and the RSS read (the baseline after model load and one
untimed warm-up pass: lazy imports and first-call allocations are not measured); one pass is timed
(wall and process CPU time) and the extra peak memory is VmHWM after it − the baseline (ru_maxrss −
baseline where clear_refs is unavailable). ``--repeats R`` runs R fresh processes per
configuration and reports medians. One torch thread per process (the machine is shared).

    python benchmarks/eval.py                 # --small: about 2-3 minutes on 2 cores
    python benchmarks/eval.py --shape large   # V = 128256, context 2048, batch 8 (needs ~25 GB for
                                              # the materialising baseline; refused when it does not fit)
    python benchmarks/eval.py --shape qwen --configs forward xent_steady materialise
                                              # Qwen2.5-0.5B's shape (llama: Llama-3.2-1B's)
    git archive OLD src | tar -x -C /tmp/old && python benchmarks/eval.py --baseline /tmp/old/src
                                              # before/after: each xent configuration with both

The tables go to results/eval.md (small) or results/eval_<shape>.md, with the CSV beside them.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

from linear_cross_entropy import _cpu_model, _mem_available_mb  # this folder (run as a script)

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPES = {
    # name: (vocab V, context L, batch B, windows, hidden D, layers)
    "small": (128256, 512, 4, 8, 256, 2),  # head-dominated: the LM head is ~92 % of the forward
    "large": (128256, 2048, 8, 8, 256, 2),
    "qwen": (151936, 512, 4, 8, 896, 24),  # shaped like Qwen2.5-0.5B (a Qwen2 config, random weights)
    "llama": (128256, 512, 4, 8, 2048, 16),  # shaped like Llama-3.2-1B
}
# the rest of each shape's config: (architecture, attention heads, key/value heads, MLP width)
ARCH = {"qwen": ("qwen2", 14, 2, 4864), "llama": ("llama", 32, 8, 8192)}
CONFIGS = ("forward", "xent", "xent_steady", "materialise", "decoder", "stats", "lm_eval")
VARIANTS = ("xent", "xent_steady", "stats")  # the configurations that run xent (twice with --baseline)


class IdTokenizer:
    """Reads token ids written as decimal numbers (anything else is id 1); BOS = EOS = PAD = 0."""

    is_fast = False
    bos_token_id = eos_token_id = pad_token_id = 0

    def __init__(self, vocab: int):
        self.vocab_size = vocab

    def __len__(self) -> int:
        return self.vocab_size

    def __call__(self, texts, add_special_tokens=False, verbose=False, **_):
        def ids(text):
            return [int(t) if t.isdigit() else 1 for t in text.split()]

        return {"input_ids": ids(texts) if isinstance(texts, str) else [ids(t) for t in texts]}


def _model(V, L, D, layers, arch=("llama", 4, 4, None)):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    kind, heads, kv_heads, width = arch
    config, model = (Qwen2Config, Qwen2ForCausalLM) if kind == "qwen2" else (LlamaConfig, LlamaForCausalLM)
    cfg = config(vocab_size=V, hidden_size=D, intermediate_size=width or 4 * D, num_hidden_layers=layers,
                 num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=L,
                 bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=True)
    return model(cfg).eval()


def _documents(V, L, n):
    import torch

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, V, (n, L - 1), generator=g)
    return [" ".join(map(str, row.tolist())) for row in ids], ids


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _baseline() -> tuple[int, bool]:
    """(RSS in kB after returning freed heap to the OS, whether the peak counter was reset to it)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := current RSS (Linux >= 4.0)
        reset = True
    except OSError:
        reset = False
    return _status_kb("VmRSS") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, reset


def child(spec: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    V, L, B, n, D, layers = spec["shape"]
    config = spec["config"]
    model = _model(V, L, D, layers, *([tuple(spec["arch"])] if spec.get("arch") else []))
    texts, ids = _documents(V, L, n)
    windows = torch.cat([torch.zeros(n, 1, dtype=torch.long), ids], 1)  # [BOS] + ids: [n, L]
    tok = IdTokenizer(V)
    run, extra = None, {}
    # run(k): the configuration on the first k windows (the warm-up takes one batch, the timed pass all n)
    if config == "forward":
        def run(k):
            with torch.no_grad():
                for s in range(0, k, B):
                    model(input_ids=windows[s : min(s + B, k)]).logits  # noqa: B018 (the forward is the point)
    elif config == "decoder":
        def run(k):
            with torch.no_grad():
                for s in range(0, k, B):
                    model.model(input_ids=windows[s : min(s + B, k)])
    elif config == "materialise":
        def run(k):
            total = 0.0
            with torch.no_grad():
                for s in range(0, k, B):
                    x = windows[s : min(s + B, k)]
                    logp = model(input_ids=x).logits.float().log_softmax(-1)  # [B, L, V]
                    total += float(-logp[:, :-1].gather(-1, x[:, 1:, None]).sum())
            extra["nll_mean"] = total / (k * (L - 1))
    elif config == "xent":
        import xent.eval

        def run(k):
            r = xent.eval.evaluate(model, tok, texts[:k], max_length=L, batch_size=B, model_sha256="-")
            extra["nll_mean"], extra["head"] = r.nll_mean, r.config["head"]
    elif config == "xent_steady":
        import xent.eval
        from xent.eval import _head

        # the first batch's check of the fused head against the model's forward (ModelHead.decide: several
        # forwards and [B, T, V] logits) made once, in the warm-up, and its decision reused: the steady
        # cost per batch of a long evaluation, where that check is paid once per run
        decided, check = {}, _head.ModelHead.decide
        kept = ("mode", "reason", "positions", "_no_cache", "grouping", "decided", "_bare")

        def decide(self, batch):
            if not decided:
                check(self, batch)
                decided.update({k: getattr(self, k) for k in kept})
            elif not self.decided:
                self.__dict__.update(decided)

        _head.ModelHead.decide = decide

        def run(k):
            r = xent.eval.evaluate(model, tok, texts[:k], max_length=L, batch_size=B, model_sha256="-")
            extra["nll_mean"], extra["head"] = r.nll_mean, r.config["head"]
    elif config == "stats":
        from xent.eval._head import chunk_rows

        try:
            from xent.eval._score import eval_stats
        except ImportError:  # a baseline (--baseline) from before the statistics had that name
            from xent.eval._score import logit_stats as eval_stats

        with torch.no_grad():  # the logits of the windows' scored positions, made before the baseline
            h = model.model(input_ids=windows[:B])[0][:, :-1].reshape(-1, D)
        W = model.lm_head.weight.detach()
        targets = windows[:B, 1:].reshape(-1)
        size = chunk_rows(len(targets), V, torch.device("cpu"))

        def run(k):  # k / B times the statistics of one batch's logits, a chunk at a time as xent does
            with torch.no_grad():
                for _ in range(0, k, B):
                    for s in range(0, len(targets), size):
                        eval_stats(h[s : s + size] @ W.T, targets[s : s + size])

        extra["note"] = "includes the chunks' projection h @ W.T"
    elif config == "lm_eval":
        run = _lm_eval_run(model, texts, L, B, extra)
    if spec.get("warmup", True):
        run(min(B, n))  # one batch untimed: lazy imports, first-call allocations and caches are not measured
    base_kb, reset = _baseline()
    t0, c0 = time.perf_counter(), time.process_time()
    run(n)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak_kb = _status_kb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"config": config, "wall_s": wall, "cpu_s": cpu, "peak_mb": (peak_kb - base_kb) / 1024,
            "baseline_mb": base_kb / 1024, "tokens": n * (L - 1), **extra}


def _lm_eval_run(model, texts, L, B, extra):
    """lm-evaluation-harness's loglikelihood_rolling on the same documents (the model object passed in).
    It needs a Hugging Face tokenizer: a word-level one over the decimal ids, so the ids are the same."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    V = model.config.vocab_size
    # the special tokens get a name of their own ("<s>" → id 0, as BOS = EOS = PAD = 0 above): a special
    # token "0" would be matched inside the words "10", "128000"... and split them
    wl = Tokenizer(models.WordLevel({**{str(i): i for i in range(V)}, "<s>": 0}, unk_token="1"))
    wl.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=wl, bos_token="<s>", eos_token="<s>", pad_token="<s>")
    lm = HFLM(pretrained=model, tokenizer=hf_tok, batch_size=B, max_length=L, add_bos_token=False)
    requests = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(t,), idx=i)
                for i, t in enumerate(texts)]

    def run(k):
        out = lm.loglikelihood_rolling(requests[:k], disable_tqdm=True)
        extra["nll_mean"] = -sum(out) / sum(len(t.split()) for t in texts[:k])

    return run


def _run_child(spec: dict, timeout: float, src: str | None = None) -> dict:
    """One configuration in a fresh process; ``src``: the folder xent is imported from (None: as here)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)]
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"config": spec["config"], "error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr.strip().splitlines() or [f"exit code {p.returncode}"])[-1]
        return {"config": spec["config"], "error": f"exit {p.returncode}: {tail[:300]}"}
    return json.loads(lines[-1])


def _fmt(x, spec=".2f"):
    return "—" if x is None or x != x else format(x, spec)


def _check(x, bound, better="low"):
    if x is None or x != x:
        return "n/a"
    ok = x <= bound if better == "low" else x >= bound
    return f"{'✅' if ok else '❌'} {x:.2f}×"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--shape", choices=sorted(SHAPES), default="small")
    p.add_argument("--small", action="store_const", const="small", dest="shape", help="the default shape")
    p.add_argument("--windows", type=int, help="windows of the run (default: the shape's)")
    p.add_argument("--repeats", type=int, default=1, help="fresh processes per configuration (medians)")
    p.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    p.add_argument("--baseline", metavar="SRC",
                   help="also run each configuration with xent imported from SRC (e.g. another commit's "
                        "src/, from git archive), interleaved with this one: a before/after in one run")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per process")
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    import importlib.util

    V, L, B, n, D, layers = SHAPES[args.shape]
    n = args.windows or n
    shape = (V, L, B, n, D, layers)
    arch = ARCH.get(args.shape)
    notes = []
    configs = list(args.configs)
    if "lm_eval" in configs and importlib.util.find_spec("lm_eval") is None:
        configs.remove("lm_eval")
        notes.append("lm_eval: not run, lm-evaluation-harness is not installed (pip install lm-eval); the "
                     "targets ≥ 2× throughput and ≤ 0.5× peak memory against it are unmeasured")
    need_mb = 3 * B * L * V * 4 / 2**20  # materialise: logits, their float32 log-softmax, a temporary
    if "materialise" in configs and need_mb > 0.8 * _mem_available_mb():
        configs.remove("materialise")
        notes.append(f"materialise: not run, it needs about {need_mb:.0f} MB ([{B}, {L}, {V}] float32 logits "
                     f"and their log-softmax) and {_mem_available_mb():.0f} MB are available")
    # the xent variants: this checkout ("", or "@new" beside a baseline) and the baseline ("@base")
    variants = [("", None)] if not args.baseline else [("@new", None), ("@base", args.baseline)]
    rows = []
    for r in range(args.repeats):
        for config in configs:
            for suffix, src in variants if config in VARIANTS else variants[:1]:
                load = os.getloadavg()[0]
                spec = {"config": config, "shape": shape, "arch": arch}
                res = _run_child(spec, args.timeout, src)
                res.update(config=config + (suffix if config in VARIANTS else ""), repeat=r,
                           load=load, load_after=os.getloadavg()[0])
                rows.append(res)
                print(json.dumps(res), file=sys.stderr)
    for res in rows:
        if "error" in res:
            notes.append(f"{res['config']}: {res['error']}")

    def med(config, key):
        xs = [x[key] for x in rows if x["config"] == config and key in x]
        return statistics.median(xs) if xs else float("nan")

    tokens = n * (L - 1)
    names = [c + s for c in CONFIGS for s in ([x for x, _ in variants] if c in VARIANTS else [""])]
    table = []
    for config in names:
        if not any(x["config"] == config and "error" not in x for x in rows):
            continue
        wall = med(config, "wall_s")
        table.append({"config": config, "wall_s": wall, "cpu_s": med(config, "cpu_s"),
                      "tokens_per_s": tokens / wall, "peak_mb": med(config, "peak_mb"),
                      "nll_mean": med(config, "nll_mean"), "load": med(config, "load"),
                      "load_after": med(config, "load_after")})
    by = {t["config"]: t for t in table}

    def ratio(a, b, key):
        return by[a][key] / by[b][key] if a in by and b in by else float("nan")

    target = 1.25 if D <= 256 else 1.03  # issue 21: the head-dominated shape, the realistic ones
    checks = []
    for what, name in (("xent eval", "xent"), ("xent eval, steady (check reused)", "xent_steady")):
        for suffix, _ in variants:
            x = name + suffix
            if x not in by:
                continue
            label = {"": "", "@new": " (this checkout)", "@base": " (baseline)"}[suffix]
            checks += [
                f"| {what}{label} ÷ bare forward, wall time | ≤ {target}× | "
                f"{_check(ratio(x, 'forward', 'wall_s'), target)} "
                f"(CPU time {_fmt(ratio(x, 'forward', 'cpu_s'))}×) |",
                f"| {what}{label} ÷ materialising evaluation, extra peak memory | ≤ 0.3× | "
                f"{_check(ratio(x, 'materialise', 'peak_mb'), 0.3)} |",
            ]
    if args.baseline:
        for name in VARIANTS:
            if f"{name}@new" in by and f"{name}@base" in by:
                checks.append(f"| {name}: this checkout ÷ baseline, wall time | < 1× | "
                              f"{_fmt(ratio(name + '@new', name + '@base', 'wall_s'))}× |")
    x = "xent" + variants[0][0]
    checks += [f"| xent throughput ÷ lm-eval loglikelihood_rolling | ≥ 2× | "
               f"{_check(ratio('lm_eval', x, 'wall_s'), 2.0, 'high')} |",
               f"| xent ÷ lm-eval, extra peak memory | ≤ 0.5× | "
               f"{_check(ratio(x, 'lm_eval', 'peak_mb'), 0.5)} |"]
    os.makedirs(args.out, exist_ok=True)
    stem = "eval" if args.shape == "small" else f"eval_{args.shape}"
    with open(os.path.join(args.out, stem + ".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, ["shape", "config", "repeat", "wall_s", "cpu_s", "peak_mb", "baseline_mb",
                               "tokens", "nll_mean", "head", "load", "load_after", "error"],
                           extrasaction="ignore")
        w.writeheader()
        for res in rows:
            w.writerow({"shape": f"V={V} L={L} B={B} windows={n} D={D} layers={layers}", **res})
    model = f"{arch[0]} D = {D}, {layers} layers, {arch[1]}/{arch[2]} heads, MLP {arch[3]}" if arch else \
        f"Llama D = {D}, {layers} layers"
    lines = [
        f"# xent eval benchmark ({args.shape}: V = {V}, context {L}, batch {B}, {n} windows, {model}, "
        "random weights, float32, 1 thread)",
        "",
        f"CPU: {_cpu_model()} ({os.cpu_count()} logical CPUs, shared with other work: the load average is "
        f"given beside each measurement); Python {platform.python_version()}; {args.repeats} fresh "
        "process(es) per configuration, medians"
        + (f"; each xent configuration run with this checkout (@new) and with {args.baseline} (@base), "
           "one after the other" if args.baseline else "") + ".",
        "",
        "| configuration | wall s | CPU s | tokens/s | extra peak MB | NLL | load (1 min) before → after |",
        "|---|---|---|---|---|---|---|",
        *(f"| {t['config']} | {t['wall_s']:.2f} | {t['cpu_s']:.2f} | {t['tokens_per_s']:.0f} | "
          f"{t['peak_mb']:.0f} | {_fmt(t['nll_mean'], '.4f')} | {t['load']:.2f} → {t['load_after']:.2f} |"
          for t in table),
        "",
        "| ratio | target | measured |",
        "|---|---|---|",
        *checks,
        "",
    ]
    x = ("xent_steady" if "xent_steady" + variants[0][0] in by else "xent") + variants[0][0]
    st = "stats" + variants[0][0]
    if all(k in by for k in ("decoder", st, "forward", x)):
        d, s_, fw, xw = (by[k]["wall_s"] for k in ("decoder", st, "forward", x))
        lines += [f"Where the time goes: the decoder alone {d:.2f} s, the LM head of the forward "
                  f"{fw - d:.2f} s (forward − decoder); xent's head (projection of the scored positions and "
                  f"every per-token statistic, measured alone) {s_:.2f} s; decoder + that = {d + s_:.2f} s "
                  f"against {x}'s {xw:.2f} s (the rest: tokenisation, windows, the gather of the scored "
                  "hidden states, sums; and in xent, not xent_steady, the first batch's check of the fused "
                  "head against the model's forward).", ""]
    lines += [f"- {note}" for note in notes]
    md = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, stem + ".md"), "w") as f:
        f.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
