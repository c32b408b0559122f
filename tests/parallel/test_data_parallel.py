"""Data parallelism with exact normalisation: DDP and FSDP2 on 2 CPU ranks with gradient accumulation
give the gradients of one process on the whole batch (xent.count_items(group=...) as num_items)."""

import pytest
from dist_launch import run_cases
from dist_training import CASES, training_worker

pytest.importorskip("transformers")
pytestmark = pytest.mark.slow  # ~25 s: two ranks import transformers and run three training steps


@pytest.fixture(scope="module")
def outcomes():
    return run_cases(2, training_worker, CASES)


@pytest.mark.parametrize("case", CASES)
def test_data_parallel(outcomes, case):
    err = outcomes[case]
    assert err is None, err
