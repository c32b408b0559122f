"""Two gloo processes on the CPU (as under torchrun) give exactly the one-process result: every rank forms
the batches one process forms and runs its share of them, so each forward pass is the same, whatever the
batch size (with documents sharded instead, batches and their padding differ and the float32 logits
round differently: totals differed in the 13th digit)."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, commands: list[tuple[int, list[str], int]], errors: str) -> None:
    # what torchrun sets; each xent command joins the group itself (init_from_env) and leaves it
    import torch

    torch.set_num_threads(1)
    from xent.cli import main

    for port, argv, expected in commands:
        os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        code = main(argv)
        if code != expected:
            with open(f"{errors}.{rank}", "a") as f:
                f.write(f"{argv[0]}: {code}\n")


def _spawn(commands, errors, timeout=300.0):
    """Two ranks running the commands; fails (instead of hanging) when they do not finish."""
    import time

    import torch.multiprocessing as mp

    ctx = mp.spawn(_worker, args=(2, commands, errors), nprocs=2, join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.terminate()
            pytest.fail("the ranks did not finish: one waits for the other")


@pytest.mark.slow
def test_two_processes_equal_one(model_dir, other_model_dir, other_tokenizer_model_dir, documents, tmp_path):
    import pyarrow.parquet as pq
    from safetensors.torch import load_file, save_file

    from xent.cli import main

    data = tmp_path / "d.jsonl"
    docs = [f"{i}: {documents[i % len(documents)]}" for i in range(13)]
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    # the default batch size (8): batches of windows of several lengths, padded
    argv = ["eval", "--model", str(model_dir), "--data", str(data), "--max-length", "32", "--stride", "20",
            "--checkpoint-every", "6", "--per-token", "--json"]
    compare = ["compare", "--base", str(model_dir), "--model", str(other_model_dir), "--data", str(data),
               "--max-length", "32", "--batch-size", "3", "--json"]
    assert main(argv + ["--out", str(tmp_path / "one")]) == 0
    assert main(compare + ["--out", str(tmp_path / "one-compare")]) == 0
    # different tokenizers: bits per byte, from per-document sums gathered over the ranks
    by_bytes = ["compare", "--base", str(model_dir), "--model", str(other_tokenizer_model_dir), "--data",
                str(data), "--max-length", "32", "--batch-size", "3", "--json"]
    assert main(by_bytes + ["--out", str(tmp_path / "one-bytes")]) == 0
    # NaN logits past position 4, met only in rank 1's batch (the middle document): rank 1 stops, and so
    # does rank 0 instead of waiting for it at the chunk's exchange (exit 2 on both)
    nan_dir = tmp_path / "nan-model"
    nan_dir.mkdir()
    for f in model_dir.iterdir():
        shutil.copy(f, nan_dir / f.name)
    weights = load_file(nan_dir / "model.safetensors")
    weights["transformer.wpe.weight"][5] = math.nan
    save_file(weights, nan_dir / "model.safetensors", metadata={"format": "pt"})
    nan_data = tmp_path / "nan.jsonl"
    nan_data.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["Hi.", documents[0], "Hi."]))
    nan_argv = ["eval", "--model", str(nan_dir), "--data", str(nan_data), "--batch-size", "1"]
    commands = [(_free_port(), argv + ["--out", str(tmp_path / "two")], 0),
                (_free_port(), compare + ["--out", str(tmp_path / "two-compare")], 0),
                (_free_port(), nan_argv + ["--out", str(tmp_path / "two-nan")], 2),
                (_free_port(), by_bytes + ["--out", str(tmp_path / "two-bytes")], 0)]
    _spawn(commands, str(tmp_path / "err"))
    assert not list(tmp_path.glob("err.*"))
    one = json.loads((tmp_path / "one" / "summary.json").read_text())
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert one["documents"] == len(docs)
    assert (one["config"].pop("world_size"), two["config"].pop("world_size")) == (1, 2)
    assert two == one  # exact: integer totals, and the same windows through the same forward shapes
    t1 = pq.read_table(tmp_path / "one" / "tokens.parquet")
    t2 = pq.read_table(tmp_path / "two" / "tokens.parquet")
    assert t2.equals(t1)
    assert not list((tmp_path / "two").glob("checkpoint*"))
    assert not (tmp_path / "two-nan" / "summary.json").exists()
    c1 = json.loads((tmp_path / "one-compare" / "summary.json").read_text())
    c2 = json.loads((tmp_path / "two-compare" / "summary.json").read_text())
    assert (c1["config"].pop("world_size"), c2["config"].pop("world_size")) == (1, 2)
    assert c2 == c1 and c1["kl_mean"] > 0  # percentiles too: every rank's values are gathered
    b1 = json.loads((tmp_path / "one-bytes" / "summary.json").read_text())
    b2 = json.loads((tmp_path / "two-bytes" / "summary.json").read_text())
    assert (b1["config"].pop("world_size"), b2["config"].pop("world_size")) == (1, 2)
    assert b2 == b1 and b1["documents"] == len(docs) and b1["delta_bits_per_byte_se_document"] > 0
