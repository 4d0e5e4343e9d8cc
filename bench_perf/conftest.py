"""bench_perf: pytest-benchmark suite. Run `pytest bench_perf --benchmark-only`.

Benchmarks that compare implementations share a `group` so pytest-benchmark prints them side by
side; ratios are medians of one run. Sizes can be shrunk for smoke runs with MRRM_BENCH_SMALL=1.
"""
import os

import pytest
import torch

SMALL = os.environ.get("MRRM_BENCH_SMALL", "0") not in ("", "0")


@pytest.fixture(autouse=True)
def _threads():
    # Use every core the machine has (2 on the CI machine) and a fixed seed.
    torch.manual_seed(0)
    yield
