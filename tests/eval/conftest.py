"""Fixtures of the eval tests: a tiny GPT-2 and a byte-level BPE tokenizer trained here, saved once per
session as a Hugging Face directory (safetensors). Nothing is downloaded."""

from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from eval_builders import CORPUS, _model, _tokenizer  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """The test machine's cores are shared: one thread per process is faster than oversubscribing."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def model_dir(_one_torch_thread, tmp_path_factory):
    """A saved tiny GPT-2 (64 positions) with its tokenizer."""
    d = tmp_path_factory.mktemp("tiny-gpt2")
    tok = _tokenizer(d)
    _model(d, tok)
    return d


@pytest.fixture(scope="session")
def other_model_dir(tmp_path_factory, model_dir):
    """Another tiny GPT-2 (different weights) with the same tokenizer: for compare."""
    d = tmp_path_factory.mktemp("tiny-gpt2-b")
    tok = _tokenizer(d)
    _model(d, tok, seed=1, steps=20)
    return d


@pytest.fixture(scope="session")
def other_tokenizer_model_dir(tmp_path_factory, model_dir):
    """A tiny GPT-2 with a tokenizer of its own (fewer merges: other ids for most texts)."""
    d = tmp_path_factory.mktemp("tiny-gpt2-tok")
    tok = _tokenizer(d, vocab_size=280)
    _model(d, tok, seed=2, steps=20)
    return d


@pytest.fixture(scope="session")
def model_and_tokenizer(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def documents():
    """Documents of varied lengths: short, empty-free, longer than one window (64 positions)."""
    long = " ".join(CORPUS) * 2
    return [CORPUS[0], long, CORPUS[4], "Hi.", CORPUS[1] + " " + CORPUS[2], long[:300]]
