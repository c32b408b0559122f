"""Reading the code snippets of README.md and docs/*.md, and the tiny models their tests run them on.

A snippet is a fenced block (```python, or ```bash for commands); a test finds it by a line of its text
(the key) and executes the text unchanged, with the names the page's prose says the reader has."""

from __future__ import annotations

import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
V, T = 97, 24


def snippets(page: str, language: str = "python") -> list[str]:
    """The ```language blocks of ``page`` (a path relative to the repository root)."""
    text = (ROOT / page).read_text(encoding="utf-8")
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def snippet(page: str, key: str, language: str = "python") -> str:
    found = [s for s in snippets(page, language) if key in s]
    assert len(found) == 1, f"{page}: {len(found)} snippets contain {key!r}"
    return found[0]


def run_snippet(page: str, key: str, namespace: dict) -> dict:
    code = snippet(page, key)
    exec(compile(code, f"{page} snippet <{key}>", "exec"), namespace)
    return namespace


def check_runners(page: str, runners: dict[str, str], module) -> None:
    """Every python snippet of ``page`` is recognised by exactly one key, whose test exists."""
    for s in snippets(page):
        keys = [k for k in runners if k in s]
        assert len(keys) == 1, f"{page} snippet without exactly one runner:\n{s}"
    names = {name for name in dir(module) if name.startswith("test_")}
    assert set(runners.values()) <= names, set(runners.values()) - names


def tiny(arch: str = "gpt2", seed: int = 0, vocab_size: int = V, positions: int = T):
    import transformers

    torch.manual_seed(seed)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=1, n_head=2,
                                      n_positions=positions, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                      bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(cfg)
    cfg = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                   tie_word_embeddings=False, max_position_embeddings=positions,
                                   bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg)


def batch(rows: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (rows, T), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt
    labels[-1, 17:] = -100  # padding
    return ids, labels
