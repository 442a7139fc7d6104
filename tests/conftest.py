"""Test set-up. Triton must run in interpreter mode on CPU-only machines, and that has to be
decided before any ``@triton.jit`` function is executed, so it is set here, first."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# The suite is many small matmuls: one intra-op thread avoids oversubscribing the 2 cores
# (DDP tests run two processes) and makes timings predictable.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
