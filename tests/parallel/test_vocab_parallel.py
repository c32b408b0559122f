"""Vocabulary-parallel cross-entropy (plain and fused) on 2 and 3 CPU ranks with uneven slices against a
single-process float64 reference: values, gradients of every slice, every option and reduction."""

import pytest
import torch
from dist_cases import CASES, vocab_worker
from dist_launch import run_cases

from xent.parallel import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy

# world size -> slice sizes (uneven; a one-id slice on 3 ranks)
SIZES = {2: [7, 4], 3: [5, 1, 6]}


@pytest.fixture(scope="module", params=sorted(SIZES), ids=lambda w: f"{w}ranks")
def outcomes(request):
    world = request.param
    return run_cases(world, vocab_worker, CASES, SIZES[world])


@pytest.mark.parametrize("case", CASES)
def test_vocab_parallel(outcomes, case):
    err = outcomes[case]
    assert err is None, err


def test_needs_a_process_group():
    x, y = torch.randn(3, 5), torch.tensor([0, 1, 2])
    with pytest.raises(RuntimeError, match="initialised torch.distributed process group"):
        vocab_parallel_cross_entropy(x, y)
    with pytest.raises(RuntimeError, match="initialised torch.distributed process group"):
        vocab_parallel_linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), y)
