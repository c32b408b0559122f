"""Two models with different tokenizers: the paired difference of bits per byte, per document.

Tokens of different tokenizers cannot be paired (and KL needs one vocabulary), but the documents can:
each model scores every document with its own tokenizer and windows, giving the document's summed loss
S_d (nats, fixed point, exact) over all its tokens, and both divide by the same UTF-8 bytes B_d. With
e_d = (S_d^model − S_d^base)/ln 2 the difference of bits per byte is Δ = Σ_d e_d / Σ_d B_d and its
document-clustered SE √(D/(D−1) · Σ_d (e_d − Δ·B_d)²) / Σ_d B_d (REFERENCE.md §4 with bytes for tokens:
the tokens of one document are correlated, the documents are the independent units). Every token must
be scored, so that S_d is the loss of the whole document: windowings that leave tokens unscored (bos
"none", the llama.cpp and transformers presets) are refused.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from fractions import Fraction

from . import _distributed as dist
from ._data import Corpus
from ._errors import EvalError
from ._evaluate import document_stream
from ._files import state_dict_sha256
from ._options import Options
from ._runner import Doc, Runner, eval_mode
from ._sums import SCALE, clustered_se

KL_NOTE = ("KL, JSD, same top and Δp need a shared vocabulary: the tokenizers give different ids, so "
           "the models are compared by bits per byte of whole documents")


@dataclass
class ByteCompareResult:
    """``compare`` of models with different tokenizers. bits_per_byte_* = Σ_d S_d / (ln 2 · Σ_d B_d);
    delta_bits_per_byte = model − base, paired by document; every SE is clustered by document."""

    documents: int
    bytes: int
    tokens_base: int
    tokens_model: int
    bits_per_byte_base: float
    bits_per_byte_base_se_document: float
    bits_per_byte_model: float
    bits_per_byte_model_se_document: float
    delta_bits_per_byte: float
    delta_bits_per_byte_se_document: float
    note: str = KL_NOTE
    skipped_empty: int = 0
    skipped_unscored: int = 0
    config: dict = field(default_factory=dict)
    model_sha256: dict = field(default_factory=dict)
    data_sha256: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class _PerDocument(Runner):
    """A Runner that also keeps each finished document's (Σ loss fixed point, tokens, UTF-8 bytes)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.per_doc: dict[int, tuple[int, int, int]] = {}

    def _finish(self, d: Doc) -> None:
        super()._finish(d)
        if d.n:
            if d.size is None:  # cannot happen when every token is scored (the size is the text's)
                raise EvalError(f"document {d.index}: its bytes cannot be counted")
            self.per_doc[d.index] = (d.nll, d.n, d.size[0])


def check_whole_documents(opts: Options, which: str) -> None:
    """EvalError unless the windowing scores every token of a document (the loss is the document's)."""
    if opts.preset in ("llama.cpp", "transformers") or opts.bos == "none":
        what = f"--preset {opts.preset}" if opts.preset in ("llama.cpp", "transformers") else "--bos none"
        raise EvalError(f"the tokenizers differ, so the models are compared by bits per byte of whole "
                        f"documents, which needs every token scored; {what} leaves some of {which}'s "
                        "tokens unscored (use the default windows or --preset lm-eval)")


def compare_bytes(base, model, tokenizer, model_tokenizer, documents, *, options: tuple[Options, Options],
                  head: str = "auto", progress=None, model_sha256: dict | None = None,
                  data_sha256: str | None = None, extra_config: dict | None = None) -> ByteCompareResult:
    """Each model on every document with its own tokenizer and windows (``options``: base's, model's);
    ``documents``: a list of strings or a Corpus (read once per model)."""
    corpus = documents if isinstance(documents, Corpus) else None
    n_files = len(corpus.paths) if corpus is not None else 1
    rank, world = dist.rank_and_world()
    runs = []
    for m, tok, opts, which in ((base, tokenizer, options[0], "the base model"),
                                (model, model_tokenizer, options[1], "the model")):
        check_whole_documents(opts, which)
        runner = _PerDocument(m, tok, opts, n_files, rank=rank, world=world, head=head)
        with eval_mode(m):
            runner.run(document_stream(documents, opts.preset), progress=progress)
        per_doc: dict[int, tuple[int, int, int]] = {}
        for part in dist.all_gather(runner.per_doc):
            per_doc.update(part)
        skipped = {k: sum(getattr(t, k) for t in runner.totals)
                   for k in ("skipped_empty", "skipped_unscored")}
        runs.append((runner, per_doc, dist.all_gather(skipped)))
    (rb, A, skip_a), (rm, M, _) = runs
    if set(A) != set(M):
        only = sorted(set(A) ^ set(M))[0]
        raise EvalError(f"document {only} is scored by only one of the models (a document without tokens "
                        "under one tokenizer): the documents cannot be paired")
    D = len(A)
    if D == 0:
        raise EvalError("no tokens to score: no document with text")
    keys = sorted(A)
    if any(A[k][2] != M[k][2] for k in keys):  # the same text: the same bytes (a defect otherwise)
        raise EvalError("the two runs count different bytes for the same document")
    B = [A[k][2] for k in keys]
    total_b, b_sq = sum(B), sum(b * b for b in B)
    if total_b == 0:
        raise EvalError("the documents have no bytes: bits per byte is undefined")
    ln2 = math.log(2)

    def per_byte(S: list[int]) -> tuple[float, float]:
        """(Σ S_d / (ln 2 · Σ B_d), its document-clustered SE) from fixed-point sums S_d."""
        total = sum(S)
        se = clustered_se(total, sum(s * s for s in S), sum(s * b for s, b in zip(S, B)), b_sq, total_b, D)
        # rounded as evaluate rounds its bits per byte (_sums.Totals), so the two agree to the bit
        return float(Fraction(total, SCALE)) / (total_b * ln2), se / ln2

    bpb_b = per_byte([A[k][0] for k in keys])
    bpb_m = per_byte([M[k][0] for k in keys])
    delta = per_byte([M[k][0] - A[k][0] for k in keys])
    skipped = {k: sum(s[k] for s in skip_a) for k in ("skipped_empty", "skipped_unscored")}
    if model_sha256 is None:
        model_sha256 = {"base": state_dict_sha256(base), "model": state_dict_sha256(model)}
    if data_sha256 is None and corpus is not None:
        data_sha256 = corpus.sha256()
    return ByteCompareResult(
        documents=D, bytes=total_b, tokens_base=sum(A[k][1] for k in keys),
        tokens_model=sum(M[k][1] for k in keys),
        bits_per_byte_base=bpb_b[0], bits_per_byte_base_se_document=bpb_b[1],
        bits_per_byte_model=bpb_m[0], bits_per_byte_model_se_document=bpb_m[1],
        delta_bits_per_byte=delta[0], delta_bits_per_byte_se_document=delta[1], **skipped,
        config={"base": options[0].config(), "model": options[1].config(), "world_size": world,
                "compared_by": "bits_per_byte", **(extra_config or {}),
                "head": {"base": rb.head.kind, "model": rm.head.kind}},
        model_sha256=model_sha256, data_sha256=data_sha256,
    )


def same_serialisation(tokenizer, model_tokenizer) -> bool:
    """Whether the tokenizers are one, or serialise identically (vocabulary, merges, normalisation)."""
    if model_tokenizer is None or model_tokenizer is tokenizer:
        return True
    if tokenizer.get_vocab() != model_tokenizer.get_vocab():
        return False
    a, b = (getattr(getattr(t, "backend_tokenizer", None), "to_str", None)
            for t in (tokenizer, model_tokenizer))
    return a is not None and b is not None and a() == b()


def ids_differ(tokenizer, model_tokenizer, documents, preset) -> bool:
    """Whether the tokenizers give different ids on some document (each encoded by both until one
    differs); ``documents`` a list or a Corpus."""
    for _, text in document_stream(documents, preset):
        enc = [t(text, add_special_tokens=False, verbose=False)["input_ids"]
               for t in (tokenizer, model_tokenizer)]
        if enc[0] != enc[1]:
            return True
    return False


def print_byte_compare(summary: dict, file=None) -> None:
    import sys

    out = file or sys.stdout
    s = summary

    def pm(key: str) -> str:
        return f"{s[key]:10.6f} ± {s[key + '_se_document']:10.6f} (SE, by document)"

    lines = [
        f"documents: {s['documents']}, {s['bytes']} bytes; tokens: {s['tokens_base']} (base), "
        f"{s['tokens_model']} (model): the tokenizers differ",
        "",
        "====== Bits per byte (whole documents) ======",
        f"bits/byte(base)               : {pm('bits_per_byte_base')}",
        f"bits/byte(Q)                  : {pm('bits_per_byte_model')}",
        f"bits/byte(Q) − bits/byte(base): {pm('delta_bits_per_byte')}",
        "",
        f"note: {s['note']}",
    ]
    print("\n".join(lines), file=out)
