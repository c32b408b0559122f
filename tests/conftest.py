"""Fixtures shared by every test directory."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread, and far faster when the CPU is shared (no spinning)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
