"""tokens.parquet: one row per scored token, written in parts so that it survives a resume.

Rows of a chunk of documents are kept in memory until the chunk ends, then written (atomically) to
``DIR/.tokens/part-<chunk end>-r<rank>.parquet``; the checkpoint saved right after covers them. A
resumed run recomputes the chunks after the checkpoint and overwrites their parts under the same
names. ``finish`` concatenates the parts in document order into ``DIR/tokens.parquet``.
"""

from __future__ import annotations

import os
import shutil

from ._errors import EvalError
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
        self._text: dict[tuple, str] = {}  # (previous ids..., id) -> text, bounded

    def _token_text(self, previous: list[int], token: int) -> str:
        """The text ``token`` adds after ``previous`` (the tokens before it, -1 for none). A character
        split over several byte-level tokens goes to the token that completes it, so a document's
        pieces concatenate to its text (as incremental detokenizers do)."""
        prev = [i for i in previous if i >= 0]
        key = (*prev, token)
        if key not in self._text:
            decode = self.tokenizer.decode
            # The token's text is what decoding it after `previous` adds past their common prefix (the
            # U+FFFD of an incomplete character may turn into that character); a U+FFFD left at the end
            # is itself incomplete and belongs to a later token.
            before = decode(prev, skip_special_tokens=True) if prev else ""
            after = decode([*prev, token], skip_special_tokens=True)
            c = len(os.path.commonprefix([before, after]))
            self._text[key] = after[c:].rstrip("\ufffd")
            if len(self._text) > 1 << 16:
                self._text.clear()
        return self._text[key]

    def add(self, stats: dict) -> None:
        """Per-token stats of one batch (xent.eval._score.batch_token_stats plus "doc")."""
        targets = stats["target"].tolist()
        self.rows["doc"] += stats["doc"].tolist()
        self.rows["position"] += stats["position"].tolist()
        self.rows["token_id"] += targets
        previous = stats["previous"].tolist()
        self.rows["token"] += [self._token_text(p, t) for p, t in zip(previous, targets)]
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

    def finish(self, expected_rows: int | None = None) -> str:
        """Merge the parts (rank 0, after every rank is done) into DIR/tokens.parquet. With
        ``expected_rows`` (the scored tokens of the summary), a part missing or left over is an EvalError
        and no tokens.parquet is written."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        names = sorted(os.listdir(self.parts))
        chunks: dict[str, list[str]] = {}
        for name in names:
            if name.endswith(".parquet"):
                chunks.setdefault(name.split("-r")[0], []).append(os.path.join(self.parts, name))
        path = os.path.join(self.out_dir, "tokens.parquet")

        def write(tmp):
            rows = 0
            writer = pq.ParquetWriter(tmp, _table({c: [] for c in COLUMNS}, pa).schema)
            for key in sorted(chunks):
                table = pa.concat_tables([pq.read_table(p) for p in chunks[key]])
                writer.write_table(table.sort_by([("doc", "ascending"), ("position", "ascending")]))
                rows += table.num_rows
            writer.close()
            if expected_rows is not None and rows != expected_rows:
                raise EvalError(f"{self.parts} holds {rows} per-token rows but {expected_rows} tokens were "
                                "scored (parts were removed or added by something else): tokens.parquet "
                                "not written; run again without --resume")

        atomic_write(path, write)
        shutil.rmtree(self.parts)
        return path


def _table(rows: dict, pa):
    types = {"doc": pa.int64(), "position": pa.int64(), "token_id": pa.int64(), "token": pa.string(),
             "loss": pa.float32(), "entropy": pa.float32(), "rank": pa.int64(), "top1_prob": pa.float32()}
    return pa.table({c: pa.array(rows[c], type=types[c]) for c in COLUMNS})
