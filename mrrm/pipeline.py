"""Encoding ahead of the model in worker processes (`workers=N`, `python -m mrrm.score --workers N`).

Encoding a sample (chat template, tokenizer, image / video decoding and the processor) is Python and
PIL work that holds the GIL, so threads do not overlap it with the model; worker processes do. Each
worker gets a copy of the model's encoder once (pickled, about 2 MB for the default model) and
encodes parts of the chunks it is sent; tensors come back through shared memory
(torch.multiprocessing). At most `prefetch` chunks are in flight ahead of the one being scored, so
memory stays bounded. Order is kept (chunks and samples come back in the order sent) and a bad
sample is a per-sample error with the encoder's reason, as in-process.

When it pays: with the model on a GPU and spare CPU cores, encoding is most of a scoring run's time
and the workers take it off the model's critical path. On a machine whose cores the model's forward
already uses (a CPU-only run), the workers compete with it for the same cores: measured on the
project's 2-core machine it does not help there (bench_perf/test_latency_cpu.py, RESULTS.md).
"""
from __future__ import annotations

import collections
import itertools
import pickle
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Iterable, Iterator

_ENCODER = None  # the worker's encoder, set once by _init_worker


def _init_worker(blob: bytes, budgets: dict) -> None:
    global _ENCODER
    import torch

    from ._cli import apply_media_budgets

    torch.set_num_threads(1)  # a worker is one core's worth of encoding
    apply_media_budgets(budgets)  # mrrm.media's limits are module constants: the parent's, re-applied
    _ENCODER = pickle.loads(blob)


def _encode_part(samples: list, start: int, media_dir) -> list:
    """(EncodedSample or None, reason or None) per sample; indices continue from `start`."""
    from .encoding import SampleError

    out = []
    for i, sample in enumerate(samples):
        try:
            out.append((_ENCODER.encode(sample, start + i, media_dir=media_dir), None))
        except SampleError as e:
            out.append((None, e.reason))
    return out


class EncodePool:
    """`workers` processes encoding with a copy of `encoder`."""

    def __init__(self, encoder, workers: int):
        import torch.multiprocessing as mp

        from ._cli import current_media_budgets
        from .common import check_int

        check_int("workers", workers)
        self.workers = workers
        self._pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                                         initargs=(pickle.dumps(encoder), current_media_budgets()))

    def submit(self, samples: list, media_dir=None) -> list[Future]:
        """Encode `samples` split over the workers; `gather` the futures for the results in order."""
        size = max(1, -(-len(samples) // self.workers))
        return [self._pool.submit(_encode_part, samples[lo:lo + size], lo, media_dir)
                for lo in range(0, len(samples), size)]

    @staticmethod
    def gather(futures: list[Future]) -> list:
        return [item for f in futures for item in f.result()]

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def encoded_ahead(pool: EncodePool, chunks: Iterable[list], media_dir=None, prefetch: int = 2) -> Iterator[tuple]:
    """For chunks of (key, sample) pairs: (chunk, [(EncodedSample or None, reason or None), ...]) per
    chunk in order, the next `prefetch` chunks encoding meanwhile."""
    chunks = iter(chunks)
    pending = collections.deque()

    def submit(chunk):
        pending.append((chunk, pool.submit([s for _, s in chunk], media_dir)))

    for chunk in itertools.islice(chunks, prefetch + 1):
        submit(chunk)
    while pending:
        chunk, futures = pending.popleft()
        nxt = next(chunks, None)
        if nxt is not None:
            submit(nxt)
        yield chunk, pool.gather(futures)
