"""A base model kept on disk for ``xent compare``: its final hidden states at the scored positions.

``xent eval --save-base DIR`` writes, beside its own results:
    manifest.json         what fixes the numbers: the tokenizer's hash, the texts' hash (SHA-256 over every
                          document read, in order), the data files' hash, the window and batch options, the
                          base model's hash, the states' dtype, the scored rows of every batch, the head's
                          final-logit transform (scale, soft-cap) and vocabulary size
    states.safetensors    "hidden" [N, D]: the decoder's last hidden states of the N scored positions, in
                          the model's dtype, in the order the batches are run
    head.safetensors      "weight" [V, D] (and "bias" [V]) of the output embeddings

``xent compare --base-cache DIR --model M`` forms the very batches the two-model compare forms, and
projects the cached states of each with the cached head a chunk at a time, exactly as the base model's
fused head would (the same matmul on the same states, the same float32 transform): the base's logits,
and with them every number, are those of the two-model compare, bit for bit, with only M loaded. The
states are the same only for the same batches, so the tokenizer, the texts, the windows (max length,
stride, BOS, preset) and the batches (batch size, padding side) must be those of the cache: a mismatch is
refused (the options and tokenizer before any work; the texts where a batch's scored rows differ, and at
the end by their hash). One process only (not under torch.distributed). The states are held in memory
until the end of ``eval`` (N × D × 2 bytes in bfloat16).
"""

from __future__ import annotations

import hashlib
import json
import os
from types import SimpleNamespace

import torch

from .. import _linear
from ._errors import EvalError
from ._head import ModelHead

FORMAT = 1
_WINDOWS = ("max_length", "stride", "bos", "bos_id", "preset", "extend_last", "words")
_BATCHES = ("batch_size", "padding_side", "checkpoint_every")


def tokenizer_sha256(tokenizer) -> str:
    """SHA-256 of what fixes a tokenizer's ids: its serialisation (a fast tokenizer) or its vocabulary,
    and its BOS/EOS/PAD ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    special = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    return hashlib.sha256((text + json.dumps(special)).encode()).hexdigest()


class TextHash:
    """Wraps a (file, text) stream and hashes every text read (length-prefixed UTF-8, in order)."""

    def __init__(self, stream):
        self.stream, self.h = stream, hashlib.sha256()

    def __iter__(self):
        for file, text in self.stream:
            data = text.encode("utf-8", "surrogatepass")
            self.h.update(f"{file}:{len(data)}:".encode())
            self.h.update(data)
            yield file, text

    def hexdigest(self) -> str:
        return self.h.hexdigest()


def check_can_save(directory: str) -> None:
    """EvalError unless ``directory`` can hold a new cache (missing, or an empty directory)."""
    if os.path.exists(directory) and (not os.path.isdir(directory) or os.listdir(directory)):
        raise EvalError(f"save-base: {directory!r} exists and is not an empty directory")


def save(directory: str, head: ModelHead, states: list[torch.Tensor], manifest: dict) -> None:
    """Write the cache (states [N_b, D] of each batch, in run order); the manifest is written last."""
    from safetensors.torch import save_file

    if not head.fused:
        raise EvalError(f"save-base needs the fused head (the decoder's hidden states); {head.reason}")
    os.makedirs(directory, exist_ok=True)
    d = head.weight.shape[1]
    hidden = torch.cat(states) if states else torch.zeros(0, d, dtype=head.out.weight.dtype)
    save_file({"hidden": hidden.contiguous()}, os.path.join(directory, "states.safetensors"))
    tensors = {"weight": head.out.weight.detach().cpu().contiguous()}
    if head.out.bias is not None:
        tensors["bias"] = head.out.bias.detach().cpu().contiguous()
    save_file(tensors, os.path.join(directory, "head.safetensors"))
    manifest = {"format": FORMAT, **manifest, "dtype": str(hidden.dtype).removeprefix("torch."),
                "rows": [len(s) for s in states], "vocab": head.vocab,
                # where the head's matmul operands start past a 64-byte boundary: a one-row chunk is a
                # matrix-vector product whose rounding on the CPU depends on it (see _placed)
                "offsets": {"weight": head.weight.data_ptr() % 64,
                            "bias": None if head.bias is None else head.bias.data_ptr() % 64},
                "transform": {"scale": head.out.hidden_scale, "softcap": head.out.softcap}}
    tmp = os.path.join(directory, "manifest.json.tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, os.path.join(directory, "manifest.json"))


def load_manifest(directory: str) -> dict:
    path = os.path.join(directory, "manifest.json")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as err:
        raise EvalError(f"base-cache: cannot read {path} ({type(err).__name__}): is {directory!r} a "
                        "directory written by xent eval --save-base?") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise EvalError(f"base-cache: {path} is not a format-{FORMAT} base cache")
    return manifest


def check_run(manifest: dict, *, tokenizer, opts) -> None:
    """EvalError naming the first difference between the cache and this run's tokenizer and options."""
    if manifest["tokenizer_sha256"] != tokenizer_sha256(tokenizer):
        raise EvalError("base-cache: the tokenizer differs from the base model's (the cache's token ids "
                        "would not be this run's)")
    config = opts.config()
    for keys, what in ((_WINDOWS, "windows"), (_BATCHES[:2], "batches (the hidden states are those of "
                                                               "the same batches only)")):
        for k in keys:
            if manifest["options"][k] != config[k]:
                raise EvalError(f"base-cache: {k} is {config[k]!r} here but {manifest['options'][k]!r} in "
                                f"the cache: the {what} must be the cache's")


def _placed(t: torch.Tensor, offset: int | None) -> torch.Tensor:
    """A contiguous copy of t (on the CPU) whose data starts ``offset`` bytes past a 64-byte boundary, as
    the base model's own weight did: a CPU matrix-vector product (a chunk of one row) is not packed, and
    its summation order, so its rounding, can follow the operand's alignment. Unchanged elsewhere."""
    size = t.element_size()
    if offset is None or t.device.type != "cpu" or offset % size:
        return t
    buf = torch.empty(t.numel() + 128 // size, dtype=t.dtype)
    shift = ((offset - buf.data_ptr() % 64) % 64) // size
    out = buf[shift : shift + t.numel()].view(t.shape)
    out.copy_(t)
    return out


class CachedHead(ModelHead):
    """The base model's fused head on cached states: ``chunks`` projects the next batch's states."""

    def __init__(self, directory: str, manifest: dict, device):
        from safetensors.torch import load_file

        head = load_file(os.path.join(directory, "head.safetensors"))
        self.hidden_all = load_file(os.path.join(directory, "states.safetensors"))["hidden"]
        rows = manifest["rows"]
        if self.hidden_all.shape[0] != sum(rows):
            raise EvalError(f"base-cache: states.safetensors holds {self.hidden_all.shape[0]} states, the "
                            f"manifest {sum(rows)}: the cache is damaged")
        self.model, self.name, self.temperature = None, "the cached base model", 1.0
        self.device = torch.device(device)
        self.mode, self.reason = "fused", None
        t = manifest["transform"]
        self.out = SimpleNamespace(weight=head["weight"], bias=head.get("bias"), hidden_scale=t["scale"],
                                   softcap=t["softcap"])
        self.vocab = int(manifest["vocab"])
        self.mm_dtype = _linear.matmul_dtype(head["weight"].dtype, self.device)
        offsets = manifest.get("offsets") or {}
        self.weight = _placed(head["weight"].to(self.device, self.mm_dtype), offsets.get("weight"))
        self.bias = None if head.get("bias") is None else _placed(head["bias"].to(self.device, self.mm_dtype),
                                                                  offsets.get("bias"))
        self.rows, self.batch, self.start = rows, 0, 0

    @property
    def kind(self) -> str:
        return "cached"

    def decide(self, batch) -> None:
        return None

    @torch.no_grad()
    def chunks(self, batch, rows, cols, size: int):
        b = self.batch
        if b >= len(self.rows) or self.rows[b] != len(rows):
            want = self.rows[b] if b < len(self.rows) else "none"
            raise EvalError(f"base-cache: batch {b} scores {len(rows)} positions here and {want} in the "
                            "cache: the texts are not the cache's")
        # a fresh copy, as the base's own head gathers a fresh [N, D] tensor: a CPU matmul's rounding can
        # depend on where its input starts in memory (a slice of the cache starts anywhere)
        h = self.hidden_all[self.start : self.start + len(rows)].to(self.device, copy=True)
        self.batch, self.start = b + 1, self.start + len(rows)
        for s in range(0, len(rows), size):
            yield s, self.project(h[s : s + size])

    def check_done(self) -> None:
        if self.batch != len(self.rows):
            raise EvalError(f"base-cache: the cache holds {len(self.rows)} batches and this run formed "
                            f"{self.batch}: the texts are not the cache's")
