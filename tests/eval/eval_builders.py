"""Builders of the eval tests' tiny model and tokenizer (nothing is downloaded). A module of its own,
with a name no other test directory uses, so that test files can import it (not ``conftest``)."""

from __future__ import annotations

CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away.",
    "Cross-entropy measures how well a model predicts the next token of a text.",
    "Perplexity is the exponential of the mean negative log-likelihood per token.",
    "A sliding window scores every token exactly once, with as much context as it can.",
    "Café, naïve, über: UTF-8 text has more bytes than characters. 東京 and Ελληνικά too.",
    "Numbers like 3.14159 and 2.71828 appear in mathematics; 42 appears in fiction.",
]


def _tokenizer(directory, *, with_bos=True, vocab_size=300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer=trainer)
    special = {"eos_token": "<|endoftext|>", "pad_token": "<pad>"}
    if with_bos:
        special["bos_token"] = "<|endoftext|>"
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **special)
    fast.save_pretrained(directory)
    return fast


def _model(directory, tokenizer, *, seed=0, steps=30, n_positions=64):
    """A tiny GPT-2 trained for a few steps on CORPUS, so that it is confident and often right (the
    accuracy and calibration metrics then have something to measure)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tokenizer), n_positions=n_positions, n_embd=32, n_layer=2, n_head=2,
                     bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg)
    ids = torch.tensor(tokenizer(" ".join(CORPUS), add_special_tokens=False)["input_ids"])
    batch = ids[: (len(ids) // n_positions) * n_positions].view(-1, n_positions)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(directory, safe_serialization=True)
    return model
