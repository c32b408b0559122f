"""Reading corpora lazily: one document at a time, whatever the file size.

Formats: .txt (the whole file is one document; ``split="lines"`` or ``"paragraphs"`` to cut it), .jsonl
(one JSON object per line, text under ``text_field``), .parquet (column ``text_field``, read in record
batches), and a directory written by ``datasets.Dataset.save_to_disk`` (memory-mapped Arrow).
Invalid UTF-8 is replaced by U+FFFD and counted in ``Corpus.invalid_utf8``.

A document larger than ``max_document_bytes`` of UTF-8 (default 16 MiB) is refused with an EvalError
while it is read, before it reaches the tokenizer: a fast tokenizer holds ~100-200 bytes per byte of a
document (a 50 MB line took 9.4 GB), and the token ids of one text cannot in general be computed
from pieces of it (the pre-tokenizer's boundaries depend on the model). Whole ``.txt`` files are checked
by size when the Corpus is made; lines are read at most that many bytes at a time.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Iterator
from decimal import Decimal

from ._errors import EvalError
from ._files import first_line
from ._options import check_at_least

SPLITS = ("none", "lines", "paragraphs")


def _decode(raw: bytes, counter: list[int]) -> str:
    text = raw.decode("utf-8", errors="replace")
    # A genuine U+FFFD in the file is not an error: count only what decoding replaced.
    counter[0] += text.count("\ufffd") - raw.count(b"\xef\xbf\xbd")
    return text


MAX_DOCUMENT_BYTES = 16 << 20


def _too_large(where: str, nbytes: int | None, limit: int) -> EvalError:
    def size(n: int, digits: str) -> str:
        return f"{n / (1 << 20):{digits}} MiB" if n >= 1 << 20 else f"{n} bytes"

    of = f"of {size(nbytes, '.1f')} " if nbytes is not None else ""
    return EvalError(f"{where}: a document {of}is over the {size(limit, 'g')} limit (--max-document-mb): "
                     "cut it into smaller documents (.txt: --split lines or paragraphs)")


def _lines(f, path: str, limit: int) -> Iterator[tuple[int, bytes]]:
    """(line number, line) of a binary file, reading at most limit + 2 bytes at a time: EvalError for a
    longer line (its end of line excluded)."""
    for lineno in itertools.count(1):
        line = f.readline(limit + 3)
        if not line:
            return
        if len(line.rstrip(b"\r\n")) > limit:
            raise _too_large(f"{path}:{lineno}", None, limit)
        yield lineno, line


def _txt(path: str, split: str, counter: list[int], limit: int) -> Iterator[str]:
    if split == "none":
        with open(path, "rb") as f:
            raw = f.read(limit + 1)  # the size was checked by Corpus; the file may have grown since
            if len(raw) > limit:
                raise _too_large(path, None, limit)
            yield _decode(raw, counter)
        return
    with open(path, "rb") as f:
        if split == "lines":
            for _, line in _lines(f, path, limit):
                yield _decode(line.rstrip(b"\r\n"), counter)
            return
        block: list[bytes] = []  # paragraphs: runs of non-blank lines
        size, first = 0, 0
        for lineno, line in _lines(f, path, limit):
            if line.strip():
                first = first or lineno
                block.append(line)
                size += len(line)
                if size - (len(line) - len(line.rstrip(b"\r\n"))) > limit:  # the text joined, as yielded
                    raise _too_large(f"{path}:{first}", None, limit)
            elif block:
                yield _decode(b"".join(block).rstrip(b"\r\n"), counter)
                block, size, first = [], 0, 0
        if block:
            yield _decode(b"".join(block).rstrip(b"\r\n"), counter)


def _text_of(value, where: str, field: str, limit: int) -> str:
    if not isinstance(value, str):
        kind = "int" if isinstance(value, Decimal) else type(value).__name__
        raise EvalError(f"{where}: field {field!r} is {kind}, not a string")
    if len(value) > limit // 4:  # a character is at most 4 bytes: only then count the bytes
        nbytes = len(value.encode("utf-8", errors="surrogatepass"))
        if nbytes > limit:
            raise _too_large(where, nbytes, limit)
    return value


def _parse_int(digits: str):
    """JSON integers of any length: Python's int() refuses more than sys.get_int_max_str_digits() (4300)
    digits; such a number is never the text, so it is kept as a Decimal."""
    try:
        return int(digits)
    except ValueError:
        return Decimal(digits)


def _jsonl(path: str, field: str, counter: list[int], limit: int) -> Iterator[str]:
    # a line may be up to 6x its text (\uXXXX escapes): refuse lines beyond that, check the text after
    with open(path, "rb") as f:
        for lineno, line in _lines(f, path, 6 * limit + 1024):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(_decode(line, counter), parse_int=_parse_int)
            except json.JSONDecodeError as err:
                raise EvalError(f"{where}: not valid JSON ({err.msg})") from None
            except RecursionError:
                raise EvalError(f"{where}: JSON nested too deeply to read") from None
            except ValueError as err:
                raise EvalError(f"{where}: not valid JSON ({first_line(err)})") from None
            if not isinstance(obj, dict):
                raise EvalError(f"{where}: a JSON {type(obj).__name__}, not an object with a field {field!r}")
            if field not in obj:
                raise EvalError(f"{where}: no field {field!r} (fields: {_names(obj)}; use --text-field)")
            yield _text_of(obj[field], where, field, limit)


def _names(obj: dict, shown: int = 20) -> str:
    """The keys of a JSON object, for an error message (the first ``shown``)."""
    keys = [repr(k) for k in itertools.islice(obj, shown)]
    more = f" and {len(obj) - shown} more" if len(obj) > shown else ""
    return (", ".join(keys) + more) if keys else "none"


def _parquet(path: str, field: str, limit: int) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as err:
        raise EvalError(f"{path}: not a readable Parquet file ({first_line(err)})") from None
    if field not in pf.schema_arrow.names:
        raise EvalError(f"{path}: no column {field!r} (columns: {', '.join(pf.schema_arrow.names)})")
    for batch in pf.iter_batches(columns=[field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            yield _text_of(value, path, field, limit)


def _hf_dir(path: str, field: str, limit: int) -> Iterator[str]:
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except Exception as err:
        raise EvalError(f"{path}: not a saved Hugging Face dataset ({first_line(err)})") from None
    if isinstance(ds, datasets.DatasetDict):
        raise EvalError(f"{path} holds the splits {sorted(ds)}: pass {path}/<split>")
    if field not in ds.column_names:
        raise EvalError(f"{path}: no column {field!r} (columns: {', '.join(ds.column_names)})")
    for start in range(0, len(ds), 1024):
        for value in ds[start : start + 1024][field]:
            yield _text_of(value, path, field, limit)


def check_path(path: str) -> str:
    """The format of ``path`` ("txt", "jsonl", "parquet", "hf"), or EvalError naming the problem."""
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "dataset_info.json")) or os.path.exists(
            os.path.join(path, "dataset_dict.json")
        ):
            return "hf"
        raise EvalError(f"{path} is a directory but not a saved Hugging Face dataset")
    if not os.path.exists(path):
        raise EvalError(f"data file not found: {path}")
    ext = os.path.splitext(path)[1].lower()
    formats = {".txt": "txt", ".text": "txt", ".md": "txt", ".jsonl": "jsonl", ".parquet": "parquet"}
    if ext not in formats:
        raise EvalError(f"{path}: unsupported data format {ext or '(none)'!r} (.txt, .jsonl, .parquet or a "
                        "datasets directory)")
    return formats[ext]


class Corpus:
    """Documents of several paths, read lazily in order: iterate to get (file index, text).

    ``limit``: only the first ``limit`` documents (in path order, as split; empty ones count), as
    lm-evaluation-harness's ``--limit``; the files after are not opened. ``sha256`` still hashes whole
    files: record the limit beside it (the CLI puts it in the run's config)."""

    def __init__(self, paths: list[str], *, split: str = "none", text_field: str = "text",
                 max_document_bytes: int = MAX_DOCUMENT_BYTES, limit: int | None = None):
        if split not in SPLITS:
            raise EvalError(f"split must be one of {SPLITS}, got {split!r}")
        if limit is not None:
            check_at_least("limit", limit, 1)
        self.limit = limit
        if isinstance(max_document_bytes, bool) or not isinstance(max_document_bytes, int) or \
                max_document_bytes < 1:
            raise EvalError(f"max_document_bytes must be a positive integer, got {max_document_bytes!r}")
        self.paths = list(paths)
        self.formats = [check_path(p) for p in self.paths]
        self.split, self.text_field = split, text_field
        self.max_document_bytes = max_document_bytes
        self.invalid_utf8 = 0
        for path, fmt in zip(self.paths, self.formats):
            if fmt == "txt" and split == "none" and os.path.getsize(path) > max_document_bytes:
                raise _too_large(path, os.path.getsize(path), max_document_bytes)

    def __iter__(self) -> Iterator[tuple[int, str]]:
        counter = [0]
        left = self.limit
        try:
            for i, (path, fmt) in enumerate(zip(self.paths, self.formats)):
                if left == 0:
                    return
                limit = self.max_document_bytes
                if fmt == "txt":
                    docs = _txt(path, self.split, counter, limit)
                elif fmt == "jsonl":
                    docs = _jsonl(path, self.text_field, counter, limit)
                elif fmt == "parquet":
                    docs = _parquet(path, self.text_field, limit)
                else:
                    docs = _hf_dir(path, self.text_field, limit)
                for text in docs:
                    yield i, text
                    if left is not None:
                        left -= 1
                        if left == 0:
                            docs.close()  # the file is closed now, not when the generator is collected
                            break
        finally:
            self.invalid_utf8 = counter[0]

    def sha256(self) -> str:
        """SHA-256 over the bytes of every data file (a directory: its files in sorted order)."""
        h = hashlib.sha256()
        for path in self.paths:
            files = [path]
            if os.path.isdir(path):
                files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
            for name in files:
                h.update(os.path.relpath(name, path).encode() + b"\0")
                with open(name, "rb") as f:
                    for block in iter(lambda f=f: f.read(1 << 20), b""):
                        h.update(block)
        return h.hexdigest()


def count_words(text: str) -> int:
    """Words as whitespace-separated runs (str.split())."""
    return len(text.split())


def count_words_lm_eval(text: str) -> int:
    """Words as lm-evaluation-harness counts them: len(re.split(r"\\s+", text)) (an empty string at
    each end counts as a word)."""
    import re

    return len(re.split(r"\s+", text))


def token_text_sizes(text: str, offsets: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """(UTF-8 bytes, words) of the text each token stands for, from a fast tokenizer's character
    offsets: the text is cut at each boundary c_i = max(c_{i−1}, min(start_i, end_{i−1})) (c_0 = 0, the
    last token runs to the end), so the pieces tile the text. Whitespace trimmed from a token's offsets
    goes with the token after it, and a character split over several byte-level tokens goes to the token
    that completes it (as the text of tokens.parquet). A word (a run of non-whitespace, as str.split)
    belongs to the token holding its first character."""
    import bisect
    import re

    n = len(offsets)
    if n == 0:
        return [], []
    cuts = [0]
    for i in range(1, n):
        cuts.append(max(cuts[-1], min(offsets[i][0], offsets[i - 1][1], len(text))))
    cuts.append(len(text))
    nbytes = [len(text[cuts[i] : cuts[i + 1]].encode("utf-8")) for i in range(n)]
    words = [0] * n
    for m in re.finditer(r"\S+", text):  # \s is str.isspace, so these are str.split()'s words
        words[min(bisect.bisect_right(cuts, m.start()) - 1, n - 1)] += 1
    return nbytes, words
