"""Two gloo processes on the CPU (as under torchrun) give exactly the one-process result."""

from __future__ import annotations

import json
import os
import socket

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, commands: list[tuple[int, list[str]]], errors: str) -> None:
    # what torchrun sets; each xent command joins the group itself (init_from_env) and leaves it
    import torch

    torch.set_num_threads(1)
    from xent.cli import main

    for port, argv in commands:
        os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        code = main(argv)
        if code != 0:
            with open(f"{errors}.{rank}", "a") as f:
                f.write(f"{argv[0]}: {code}\n")


@pytest.mark.slow
def test_two_processes_equal_one(model_dir, other_model_dir, documents, tmp_path):
    import pyarrow.parquet as pq
    import torch.multiprocessing as mp

    from xent.cli import main

    data = tmp_path / "d.jsonl"
    docs = [f"{i}: {documents[i % len(documents)]}" for i in range(13)]
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    argv = ["eval", "--model", str(model_dir), "--data", str(data), "--max-length", "32", "--stride", "20",
            "--batch-size", "1", "--checkpoint-every", "4", "--per-token", "--json"]
    compare = ["compare", "--base", str(model_dir), "--model", str(other_model_dir), "--data", str(data),
               "--max-length", "32", "--batch-size", "1", "--json"]
    assert main(argv + ["--out", str(tmp_path / "one")]) == 0
    assert main(compare + ["--out", str(tmp_path / "one-compare")]) == 0
    commands = [(_free_port(), argv + ["--out", str(tmp_path / "two")]),
                (_free_port(), compare + ["--out", str(tmp_path / "two-compare")])]
    mp.spawn(_worker, args=(2, commands, str(tmp_path / "err")), nprocs=2, join=True)
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
    c1 = json.loads((tmp_path / "one-compare" / "summary.json").read_text())
    c2 = json.loads((tmp_path / "two-compare" / "summary.json").read_text())
    assert (c1["config"].pop("world_size"), c2["config"].pop("world_size")) == (1, 2)
    assert c2 == c1 and c1["kl_mean"] > 0  # percentiles too: every rank's values are gathered
