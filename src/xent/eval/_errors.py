"""The error type of xent.eval for bad input (a model, tokenizer, corpus or option)."""


class EvalError(ValueError):
    """Bad input to xent.eval: the message is one line naming the problem; the CLI prints it as is."""
