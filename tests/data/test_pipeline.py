"""mrrm.data.pipeline: encoding in worker processes. A worker that dies on a sample costs that sample."""
from __future__ import annotations

import pytest


@pytest.mark.slow
def test_a_worker_that_dies_costs_its_sample_not_the_run():
    """One sample aborts its worker process (SIGABRT, as a native library failing an allocation does):
    the pool broke and every part in flight with it (BrokenProcessPool, the whole run). Now that sample is
    a per-sample error naming how the worker died, every other sample is encoded, in order, and the pool
    keeps working for the next chunk."""
    from faults import AbortingEncoder

    from mrrm.data.pipeline import EncodePool

    pool = EncodePool(AbortingEncoder(), 2)
    try:
        samples = [{"id": i, "abort": i == 3} for i in range(6)]
        results = pool.gather(pool.submit(samples))
        assert [encoded for encoded, _ in results] == [0, 1, 2, None, 4, 5]
        assert [reason is None for _, reason in results] == [True, True, True, False, True, True]
        assert "the encoding worker process died on this sample (killed by SIGABRT)" in results[3][1]
        assert pool.deaths == 1
        assert pool.gather(pool.submit([{"id": 7}, {"id": 8}])) == [(7, None), (8, None)]
    finally:
        pool.close()
