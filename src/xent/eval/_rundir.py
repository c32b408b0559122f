"""The directory of an ``evaluate`` run (its ``checkpoint_dir``): what is written there and when.

A run enters it as a context: the directory is made if missing and locked (_files.OutputLock: one run
per directory; the lock the CLI holds on --out is shared). Then, for each rank
r (its checkpoint: ``checkpoint.json``, ``checkpoint.rank{r}.json`` for r > 0):

- start: with resume, the checkpoint is read and must carry the run's fingerprint (a missing one: the run
  starts from the first document). Per-token parts of earlier chunks are kept only when a checkpoint
  continues them; rank 0 clears the others before any rank writes.
- after each chunk: its per-token rows go to their part file (_tokens.TokenWriter), then the checkpoint,
  which covers them, is saved.
- finish (every document scored): rank 0 merges the parts into tokens.parquet, writes report.html, then
  summary.json; then every rank removes its checkpoint. A failure before that keeps the checkpoint, and
  a resume from it goes straight to the finish.
- bad input (an EvalError leaving the context): what the run wrote is removed, unless it resumed (the
  checkpoint it continued stays, with the parts it covers).
- any other exception leaving the context (Ctrl-C, a full disk, a crash of the model): the checkpoint
  stays, and the exception carries a note (``__notes__``) naming it.

On leaving, the lock is released and the directory removed if the run made it and left it empty.
"""

from __future__ import annotations

import os
import shutil

from . import _distributed as dist
from . import _files
from ._errors import EvalError
from ._tokens import TokenWriter

OUTPUTS = ["summary.json", "tokens.parquet", "report.html", "reliability.png", "loss_by_position.png"]


class RunDir:
    """One rank's view of the run directory; ``tokenizer`` decodes the per-token rows' text."""

    def __init__(self, directory: str, fingerprint: dict, *, rank: int, resume: bool, per_token: bool,
                 html: bool, tokenizer):
        self.directory, self.fingerprint, self.rank = directory, fingerprint, rank
        self.resume, self.html, self.tokenizer = resume, html, tokenizer
        self.rows = per_token or html  # the report is built from tokens.parquet
        self.checkpoint = _files.checkpoint_path(directory, rank)
        self.sink: TokenWriter | None = None
        self.place = _files.LockedDirectory(directory, rank, flag="checkpoint_dir", join=True)

    def __enter__(self) -> RunDir:
        self.place.open()
        return self

    def __exit__(self, kind, err, tb) -> None:
        try:
            if isinstance(err, EvalError):
                self.discard()
            elif err is not None:
                self.note_kept(err)
        finally:
            self.place.close()

    def start(self) -> dict | None:
        """The checkpoint's state when resuming from one (its contents are the caller's to check)."""
        state = _files.load_checkpoint(self.directory, self.fingerprint, self.rank) if self.resume else None
        if self.rows:
            self.sink = TokenWriter(self.directory, self.tokenizer, resume=state is not None, rank=self.rank)
            dist.barrier()  # rank 0 clears old parts before any rank writes new ones
        return state

    def add_tokens(self, stats: dict) -> None:
        if self.sink is not None:
            self.sink.add(stats)

    def save(self, next_doc: int, state: dict) -> None:
        """End of the chunk before next_doc: its rows, then the checkpoint that covers them."""
        if self.sink is not None:
            self.sink.flush(next_doc)
        _files.save_checkpoint(self.directory, self.fingerprint, {"next_document": next_doc, **state},
                               self.rank)

    def finish(self, summary: dict) -> None:
        """The run is complete: the outputs (rank 0), then no checkpoint."""
        if self.rank == 0:
            if self.sink is not None:
                self.sink.finish(expected_rows=summary["tokens"])
            if self.html:
                from ._html import write_report

                write_report(self.directory, summary)
            _files.write_json(os.path.join(self.directory, "summary.json"), summary)
        dist.barrier()
        _files.remove_checkpoint(self.directory, self.rank)
        if self.rank == 0:
            _files.remove_stale_temporaries(self.directory, OUTPUTS)

    def discard(self) -> None:
        """After bad input: remove what this run wrote (a resumed run keeps its checkpoint and parts)."""
        if self.resume:
            return
        _files.remove_checkpoint(self.directory, self.rank)
        shutil.rmtree(os.path.join(self.directory, ".tokens"), ignore_errors=True)

    def note_kept(self, err: BaseException) -> None:
        """Add a note to ``err`` naming the checkpoint if one is left to resume from."""
        if os.path.lexists(self.checkpoint):
            # PEP 678 notes (err.add_note from Python 3.11; the list itself works on 3.10 too)
            err.__notes__ = [*getattr(err, "__notes__", ()),
                             f"{self.checkpoint} is kept: rerun with --resume once this is fixed"]
