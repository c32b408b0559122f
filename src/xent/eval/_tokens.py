"""tokens.parquet: one row per scored token, written in parts so that it survives a resume.

Rows of a chunk of documents are kept in memory until the chunk ends, then written (atomically) to
``DIR/.tokens/part-<chunk end>-r<rank>.parquet``; the checkpoint saved right after covers them. A
resumed run recomputes the chunks after the checkpoint and overwrites their parts under the same
names. ``finish`` concatenates the parts in document order into ``DIR/tokens.parquet``.
"""

from __future__ import annotations

import os
import shutil

from ._files import atomic_write

COLUMNS = ("doc", "position", "token_id", "token", "loss", "entropy", "rank", "top1_prob")


class TokenWriter:
    def __init__(self, out_dir: str, tokenizer, *, resume: bool = False, rank: int = 0):
        self.out_dir, self.tokenizer, self.rank = out_dir, tokenizer, rank
        self.parts = os.path.join(out_dir, ".tokens")
        if not resume and rank == 0 and os.path.isdir(self.parts):
            shutil.rmtree(self.parts)
        os.makedirs(self.parts, exist_ok=True)
        self.rows: dict[str, list] = {c: [] for c in COLUMNS}
        self._text: dict[int, str] = {}

    def _token_text(self, i: int) -> str:
        if i not in self._text:
            self._text[i] = self.tokenizer.decode([i])
        return self._text[i]

    def add(self, stats: dict) -> None:
        """Per-token stats of one batch (xent.eval._score.batch_token_stats plus "doc")."""
        targets = stats["target"].tolist()
        self.rows["doc"] += stats["doc"].tolist()
        self.rows["position"] += stats["position"].tolist()
        self.rows["token_id"] += targets
        self.rows["token"] += [self._token_text(t) for t in targets]
        for name in ("loss", "entropy", "rank", "top1_prob"):
            self.rows[name] += stats[name].tolist()

    def flush(self, next_doc: int) -> None:
        """End of the chunk of documents before next_doc: its rows go to their part file."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = _table(self.rows, pa)
        path = os.path.join(self.parts, f"part-{next_doc:012d}-r{self.rank:04d}.parquet")
        atomic_write(path, lambda tmp: pq.write_table(table, tmp))
        self.rows = {c: [] for c in COLUMNS}

    def finish(self) -> str:
        """Merge the parts (rank 0, after every rank is done) into DIR/tokens.parquet."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        names = sorted(os.listdir(self.parts))
        chunks: dict[str, list[str]] = {}
        for name in names:
            if name.endswith(".parquet"):
                chunks.setdefault(name.split("-r")[0], []).append(os.path.join(self.parts, name))
        path = os.path.join(self.out_dir, "tokens.parquet")

        def write(tmp):
            writer = pq.ParquetWriter(tmp, _table({c: [] for c in COLUMNS}, pa).schema)
            for key in sorted(chunks):
                table = pa.concat_tables([pq.read_table(p) for p in chunks[key]])
                writer.write_table(table.sort_by([("doc", "ascending"), ("position", "ascending")]))
            writer.close()

        atomic_write(path, write)
        shutil.rmtree(self.parts)
        return path


def _table(rows: dict, pa):
    types = {"doc": pa.int64(), "position": pa.int64(), "token_id": pa.int64(), "token": pa.string(),
             "loss": pa.float32(), "entropy": pa.float32(), "rank": pa.int64(), "top1_prob": pa.float32()}
    return pa.table({c: pa.array(rows[c], type=types[c]) for c in COLUMNS})
