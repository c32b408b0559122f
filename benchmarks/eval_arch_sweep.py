"""Sweep: every causal LM of the installed transformers, tiny, through ``xent.eval.evaluate`` (issue 20).

For each entry of transformers' ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` a tiny float32 model is built from
its config class's defaults (sizes shrunk, the final-logit fields switched on: tests/eval/eval_arch.py),
the documents are cut into windows of 16 tokens and evaluated at batch size 2 with left padding; each
token's loss is compared with the float64 log-softmax of ``model(input_ids=window).logits`` of its
window alone. A row is "exact" (fused head, |Δ| ≤ 1e-4), "forward" (the model's own forward, with its
note), "notes" (fused, with a note on how the model is run) or "WRONG" (a difference: a bug); "skipped"
says why the model was not built. Writes benchmarks/results/eval_arch_sweep.{csv,md}.

``--dtype bfloat16`` (or float16) converts each model and takes its own forward in that dtype as the
reference: batch size 1 is judged as above (|Δ| ≤ 0.02: the rounding of half-precision logits), and the
largest difference at batch size 2 with left
padding is reported beside it (a padded batch is a computation of another shape, whose half-precision
rounding differs: eval_arch_sweep_bfloat16.md).

    python benchmarks/eval_arch_sweep.py            # about 30 s on 2 cores
    python benchmarks/eval_arch_sweep.py --only roberta rwkv
    python benchmarks/eval_arch_sweep.py --dtype bfloat16
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "eval"))

TOLERANCE = 1e-4
# in half precision the fused head rounds its logits to the model's dtype, as a plain lm_head does; a
# forward that computes them otherwise (Ergo: float32 output; Gemma 2: the soft-cap in bfloat16) differs
# by that rounding: about ulp(max logit) / 2, 0.016 nats here, where the logits reach ~8
HALF_TOLERANCE = 0.02


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="model types to run (default: all)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="the models' dtype (the reference is the model's own forward in it)")
    parser.add_argument("--tolerance", type=float, default=None,
                        help=f"largest |Δ loss| that counts as equal (default {TOLERANCE:g}; "
                             f"{HALF_TOLERANCE:g} in half precision)")
    parser.add_argument("--out", default=None, help="default benchmarks/results/eval_arch_sweep[_DTYPE]")
    args = parser.parse_args()
    tolerance = args.tolerance or (TOLERANCE if args.dtype == "float32" else HALF_TOLERANCE)
    args.out = args.out or os.path.join(HERE, "results", "eval_arch_sweep"
                                        + ("" if args.dtype == "float32" else "_" + args.dtype))
    import torch
    import transformers
    from eval_arch import Unbuildable, causal_lm_types, check, tiny_model
    from eval_builders import _tokenizer

    torch.set_num_threads(1)
    transformers.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    tok = _tokenizer(tempfile.mkdtemp())
    rows = []
    for model_type, name in causal_lm_types():
        if args.only and model_type not in args.only:
            continue
        t0 = time.perf_counter()
        row = {"model_type": model_type, "class": name, "result": "", "max_abs_diff": "", "tokens": "",
               "notes": "", "seconds": ""}
        if args.dtype != "float32":
            row["batch2_left_max_abs_diff"] = ""
        try:
            model = tiny_model(model_type, name, len(tok))
            dtype = None if args.dtype == "float32" else getattr(torch, args.dtype)
            r = check(model, tok, dtype=dtype)
            if dtype is not None:  # half precision: batch size 1 is judged, batch size 2 measured
                batched = r["max_abs_diff"]
                r = check(model, tok, dtype=dtype, batch_size=1)
                r["batched"] = batched
        except Unbuildable as err:
            row.update(result="skipped", notes=str(err))
        except Exception as err:  # an evaluation that fails is reported, never hidden
            row.update(result="ERROR", notes=f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")
        else:
            ok = r["tokens"] == r["reference_tokens"] and r["max_abs_diff"] <= tolerance
            result = ("WRONG" if not ok else "forward" if r["head"] == "forward"
                      else "notes" if r["notes"] else "exact")
            row.update(result=result, max_abs_diff=f"{r['max_abs_diff']:.3g}", tokens=r["tokens"],
                       notes=" | ".join(r["notes"]))
            if "batched" in r:
                row["batch2_left_max_abs_diff"] = f"{r['batched']:.3g}"
        row["seconds"] = f"{time.perf_counter() - t0:.2f}"
        rows.append(row)
        print(f"{model_type:32s} {row['result']:8s} {row['max_abs_diff']:>9s} {row['seconds']:>6s}s "
              f"{row['notes'][:100]}", flush=True)
    with open(args.out + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    counts = {}
    for row in rows:
        counts[row["result"]] = counts.get(row["result"], 0) + 1
    with open(args.out + ".md", "w") as f:
        f.write(f"# eval_arch_sweep --dtype {args.dtype} (transformers {transformers.__version__}, torch "
                f"{torch.__version__}; equal: |Δ loss| ≤ {tolerance:g})\n\n")
        f.write(", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) + f" of {len(rows)}\n\n")
        f.write("| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]) + "\n")
        for row in rows:
            f.write("| " + " | ".join(str(v).replace("|", "/") for v in row.values()) + " |\n")
    print(counts)
    return 1 if counts.get("WRONG") or counts.get("ERROR") else 0


if __name__ == "__main__":
    sys.exit(main())
