"""Scale-out on torch.distributed: the loss with the vocabulary sharded over ranks (tensor parallelism).

- :func:`vocab_parallel_cross_entropy`: each rank holds a slice ``[..., V_r]`` of the logits;
- :func:`vocab_parallel_linear_cross_entropy`: each rank holds a slice ``[V_r, D]`` of the LM head,
  fused and chunked (no logits held).

Data parallelism needs nothing here: :func:`xent.count_items` with ``group=`` gives the global count of
targets to pass as ``num_items`` (the recipe is in docs/distributed.md).
Runs on any torch.distributed backend (NCCL on GPUs, gloo on CPUs).
"""

from ._vocab import vocab_parallel_cross_entropy
from ._vocab_linear import vocab_parallel_linear_cross_entropy

__all__ = ["vocab_parallel_cross_entropy", "vocab_parallel_linear_cross_entropy"]
