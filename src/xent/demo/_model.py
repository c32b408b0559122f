"""The demo's tokenizer (byte-level BPE trained here, with ``tokenizers``) and its tiny GPT-2.

Both are ordinary transformers objects: ``save_pretrained`` writes them in the format
``AutoTokenizer``/``AutoModelForCausalLM.from_pretrained`` (and so ``xent eval``) reads.
"""

from __future__ import annotations

from collections.abc import Iterable

EOT = "<|endoftext|>"  # GPT-2's convention: one special token is bos, eos and pad


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024):
    """A byte-level BPE tokenizer trained on ``texts``, as a ``PreTrainedTokenizerFast``.

    ``<|endoftext|>`` (id 0) is bos, eos and pad. No text is ever out of vocabulary: the 256 byte
    symbols are the initial alphabet.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOT, eos_token=EOT, pad_token=EOT,
        model_max_length=1 << 30,  # documents are tokenized whole, then windowed by the caller
    )


def build_model(vocab_size: int, *, seq_len: int = 128, d_model: int = 128, n_layer: int = 2,
                n_head: int = 4, eot_id: int = 0, tie: bool = False, seed: int = 0):
    """A small GPT-2 without dropout, initialised from ``seed``.

    The head is untied by default: a separate output matrix learns next-token statistics (the
    direct path embedding → head) much faster than a tied one, whose direct path is symmetric.
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab_size, n_positions=seq_len, n_embd=d_model, n_layer=n_layer,
        n_head=n_head, activation_function="gelu",  # exact GELU: one fused op, not tanh's five
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=eot_id, eos_token_id=eot_id, pad_token_id=eot_id, tie_word_embeddings=tie,
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config)


def tokenize_documents(tokenizer, texts: Iterable[str]) -> list[list[int]]:
    """Each document as ``[eot, tokens...]``: the first token of a document is predicted from eot."""
    eot = tokenizer.convert_tokens_to_ids(EOT)
    return [[eot, *tokenizer(t, add_special_tokens=False)["input_ids"]] for t in texts]
