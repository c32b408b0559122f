"""Natural-language text every Python installation has: the standard library's docstrings.

The text is read from the source files with :mod:`ast` (nothing is imported, so no module runs), from a
fixed, sorted list of modules, so the corpus depends only on the Python version. Each top-level
definition (the module docstring, a function, a class with its methods) is one document; whole modules
go to the held-out split, so no held-out document shares a module with a training document.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import inspect
from dataclasses import dataclass

# Pure-Python modules present from Python 3.10 to 3.13 (none of the 3.13 removals), sorted.
MODULES = (
    "abc", "argparse", "ast", "base64", "bdb", "bisect", "calendar", "cmd", "codecs", "colorsys",
    "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "difflib", "dis", "doctest",
    "enum", "fileinput", "fnmatch", "fractions", "ftplib", "functools", "getopt", "gettext", "glob",
    "gzip", "hashlib", "heapq", "hmac", "imaplib", "inspect", "ipaddress", "keyword", "linecache",
    "locale", "mailbox", "mimetypes", "netrc", "numbers", "operator", "optparse", "pathlib", "pdb",
    "pickle", "pickletools", "platform", "plistlib", "poplib", "pprint", "profile", "pstats", "pydoc",
    "queue", "quopri", "random", "reprlib", "sched", "secrets", "selectors", "shelve", "shlex", "shutil",
    "smtplib", "socket", "socketserver", "statistics", "string", "subprocess", "symtable", "tabnanny",
    "tarfile", "tempfile", "textwrap", "threading", "timeit", "token", "tokenize", "trace", "traceback",
    "tracemalloc", "types", "typing", "uuid", "warnings", "wave", "weakref", "webbrowser", "zipfile",
    "zipimport",
)

HELD_OUT_EVERY = 5  # every 5th module of the sorted list is held out (~20% of the modules)


@dataclass(frozen=True)
class Document:
    source: str  # e.g. "textwrap.dedent"
    text: str


def _docstring(node) -> str | None:
    doc = ast.get_docstring(node, clean=True)
    return inspect.cleandoc(doc) if doc and doc.strip() else None


def module_documents(name: str) -> list[Document]:
    """The docstrings of one module, one document per top-level definition, in source order."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return []
    with open(spec.origin, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    docs = []
    head = _docstring(tree)
    if head:
        docs.append(Document(name, head))
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            children = node.body if isinstance(node, ast.ClassDef) else []
            methods = [c for c in children if isinstance(c, (ast.FunctionDef, ast.AsyncFunctionDef))]
            parts = [d for d in map(_docstring, [node, *methods]) if d]
            if parts and not node.name.startswith("_"):
                docs.append(Document(f"{name}.{node.name}", "\n\n".join(parts)))
    return docs


@functools.lru_cache(maxsize=4)
def stdlib_documents(min_chars: int = 200) -> tuple[tuple[Document, ...], tuple[Document, ...]]:
    """(train, held_out) documents from the docstrings of :data:`MODULES`; documents shorter than
    ``min_chars`` are dropped (one-line docstrings say little and are mostly boilerplate). Cached:
    parsing the modules takes about a second."""
    train, held_out = [], []
    for i, name in enumerate(MODULES):
        docs = [d for d in module_documents(name) if len(d.text) >= min_chars]
        (held_out if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1 else train).extend(docs)
    return tuple(train), tuple(held_out)
