"""Encoding ahead of the model in worker processes (`workers=N`, `python -m mrrm.score --workers N`).

Encoding a sample (chat template, tokenizer, image / video decoding and the processor) is Python and
PIL work that holds the GIL, so threads do not overlap it with the model; worker processes do. Each
worker gets a copy of the model's encoder once (pickled, about 2 MB for the default model) and
encodes parts of the chunks it is sent; tensors come back through shared memory
(torch.multiprocessing). At most `prefetch` chunks are in flight ahead of the one being scored, so
memory stays bounded. Order is kept (chunks and samples come back in the order sent) and a bad
sample is a per-sample error with the encoder's reason, as in-process.

A worker process that dies while encoding (a native crash: the tokenizer or a decoder aborting, the
memory limit) breaks the whole process pool, and every part in flight with it. Such parts are encoded
again one sample at a time in a separate single-worker process (checked alive first): the sample that
kills it again is a per-sample error naming how the worker died, the others are encoded as usual, and
the main pool is started afresh. One such sample costs itself, not the run.

When it pays: with the model on a GPU and spare CPU cores, encoding is most of a scoring run's time
and the workers take it off the model's critical path. On a machine whose cores the model's forward
already uses (a CPU-only run), the workers compete with it for the same cores: measured on the
project's 2-core machine it does not help there (bench_perf/test_latency_cpu.py, RESULTS.md).
"""
from __future__ import annotations

import collections
import itertools
import pickle
import signal
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Iterable, Iterator

from mrrm.common import check_int
from mrrm.data.encoding import BatchError, SampleError
from mrrm.errors import WorkerDied

_ENCODER = None  # the worker's encoder, set once by _init_worker


def _init_worker(blob: bytes) -> None:
    """The worker's encoder, with its text and media budgets (they travel with it: no module state)."""
    global _ENCODER
    import torch

    torch.set_num_threads(1)  # a worker is one core's worth of encoding
    _ENCODER = pickle.loads(blob)


def _alive() -> bool:
    return True


def _encode_part(samples: list, start: int, media_dir) -> list:
    """(EncodedSample or None, reason or None) per sample; indices continue from `start`."""

    out = []
    for i, sample in enumerate(samples):
        try:
            out.append((_ENCODER.encode(sample, start + i, media_dir=media_dir), None))
        except SampleError as e:
            out.append((None, e.reason))
    return out


@dataclass
class _Part:
    """A slice of samples sent to the pool, kept so that it can be encoded again if the pool breaks."""
    future: Future
    samples: list
    start: int
    media_dir: object
    pool: ProcessPoolExecutor


def _how_it_died(processes) -> str:
    codes = sorted({p.exitcode for p in processes if getattr(p, "exitcode", None) not in (None, 0)})
    if not codes:
        return "it exited abruptly"
    how = []
    for code in codes:
        if code < 0:
            try:
                how.append(f"killed by {signal.Signals(-code).name}")
            except ValueError:
                how.append(f"killed by signal {-code}")
        else:
            how.append(f"exit status {code}")
    return ", ".join(how)


class EncodePool:
    """`workers` processes encoding with a copy of `encoder`; a worker that dies on a sample costs that
    sample (see the module doc)."""

    def __init__(self, encoder, workers: int):
        check_int("workers", workers)
        self.workers = workers
        self._initargs = (pickle.dumps(encoder),)  # its budgets (text, media) as they are now
        self._pool = self._new_pool(workers)
        self._isolation: ProcessPoolExecutor | None = None
        self.deaths = 0  # samples that killed a worker

    def _new_pool(self, workers: int) -> ProcessPoolExecutor:
        import torch.multiprocessing as mp

        return ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                                   initargs=self._initargs)

    def submit(self, samples: list, media_dir=None) -> list[_Part]:
        """Encode `samples` split over the workers; `gather` the parts for the results in order."""
        size = max(1, -(-len(samples) // self.workers))
        return [_Part(self._pool.submit(_encode_part, samples[lo:lo + size], lo, media_dir), samples[lo:lo + size], lo,
                      media_dir, self._pool)
                for lo in range(0, len(samples), size)]

    def gather(self, parts: list[_Part]) -> list:
        out = []
        for part in parts:
            try:
                out += part.future.result()
            except BrokenProcessPool:
                out += self._recover(part)
        return out

    def _recover(self, part: _Part) -> list:
        """The part's results after its pool broke: the main pool replaced (once per break), the part's
        samples encoded one by one in the isolation worker."""
        if part.pool is self._pool:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = self._new_pool(self.workers)
        return [self._encode_alone(sample, part.start + i, part.media_dir) for i, sample in enumerate(part.samples)]

    def _isolation_pool(self) -> ProcessPoolExecutor:
        """A single-worker pool that has shown it can start (it ran a no-op), so that its death on the next
        task is that task's doing. WorkerDied when a fresh worker cannot even start."""
        if self._isolation is None:
            pool = self._new_pool(1)
            try:
                pool.submit(_alive).result()
            except BrokenProcessPool:
                processes = list(getattr(pool, "_processes", {}).values())
                pool.shutdown(wait=True)
                raise WorkerDied(f"a fresh encoding worker process died before taking any sample "
                                 f"({_how_it_died(processes)}): the workers cannot run here (memory limit? run "
                                 "without workers to see the error)") from None
            self._isolation = pool
        return self._isolation

    def _encode_alone(self, sample, index: int, media_dir) -> tuple:
        pool = self._isolation_pool()
        future = pool.submit(_encode_part, [sample], index, media_dir)
        processes = list(getattr(pool, "_processes", {}).values())  # the worker, for its exit status
        try:
            return future.result()[0]
        except BrokenProcessPool:
            pool.shutdown(wait=True)
            self._isolation = None
            self.deaths += 1
            return None, (f"the encoding worker process died on this sample ({_how_it_died(processes)}); it was "
                          "encoded alone in a fresh worker to be sure. A native crash of the tokenizer or a media "
                          "decoder, or the memory limit: lower the text or media budgets, or score it without "
                          "--workers to see the error")

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._isolation is not None:
            self._isolation.shutdown(wait=True)
            self._isolation = None


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


def _pool_for(encoder, workers) -> tuple[EncodePool, bool]:
    """(the pool to encode with, whether the caller started it and must close it): `workers` is a
    process count or a running EncodePool."""
    if isinstance(workers, EncodePool):
        return workers, False
    return EncodePool(encoder, workers), True


class ChunkScorer:
    """A model scoring chunks whose encoding runs ahead in worker processes: built over the whole
    stream of (key, sample) pairs to come, called once per chunk in the same order with that chunk's
    pairs; returns (scores or None, reason or None) per sample. Used by `python -m mrrm.score
    --workers`, `mrrm.eval`'s workers option and `RewardModel.score(..., workers=N)`.

    workers: a process count (a pool is started, and closed by `close`) or a running EncodePool."""

    def __init__(self, model, workers, pairs: Iterable[tuple], chunk_size: int, media_dir=None, *, mode=None,
                 max_batch_tokens=None, permutations: int = 1):

        check_int("chunk_size", chunk_size)
        self.model = model
        self.score_kw = dict(mode=mode, max_batch_tokens=max_batch_tokens, permutations=permutations)
        self.pool, self._own = _pool_for(model.encoder, workers)
        pairs = iter(pairs)
        chunks = iter(lambda: list(itertools.islice(pairs, chunk_size)), [])
        self.stream = encoded_ahead(self.pool, chunks, media_dir)

    def __call__(self, chunk: list[tuple]) -> list[tuple]:
        sent, results = next(self.stream)
        if [k for k, _ in sent] != [k for k, _ in chunk]:
            raise RuntimeError(f"the encoding workers returned {[k for k, _ in sent][:3]}... where "
                               f"{[k for k, _ in chunk][:3]}... were expected")
        scores = self.model.score_encoded([e for e, _ in results], **self.score_kw)
        return [(s, reason) for s, (_, reason) in zip(scores, results)]

    def close(self) -> None:
        if self._own:
            self.pool.close()


def score_with_workers(model, samples: list, workers, *, mode=None, max_batch_tokens=None, permutations: int = 1,
                       errors: str = "raise", media_dir=None, chunk_size: int = 64) -> list:
    """RewardModel.score with the encoding in worker processes. errors='skip': chunks of `chunk_size`
    samples are scored while the next ones encode (None in the bad samples' places); errors='raise':
    every sample is encoded first (in parallel) and one BatchError lists the bad ones before any
    compute, as in-process."""

    if errors not in ("raise", "skip"):
        raise ValueError(f"errors must be 'raise' or 'skip', got {errors!r}")
    pairs = list(enumerate(samples))
    if errors == "skip":
        scorer = ChunkScorer(model, workers, pairs, chunk_size, media_dir, mode=mode,
                             max_batch_tokens=max_batch_tokens, permutations=permutations)
        try:
            return [s for lo in range(0, len(pairs), chunk_size) for s, _ in scorer(pairs[lo:lo + chunk_size])]
        finally:
            scorer.close()
    pool, own = _pool_for(model.encoder, workers)
    try:
        results = pool.gather(pool.submit(samples, media_dir))
    finally:
        if own:
            pool.close()
    bad = [SampleError(i, reason, s.get("id") if isinstance(s, dict) else None)
           for i, (s, (_, reason)) in enumerate(zip(samples, results)) if reason is not None]
    if bad:
        raise BatchError(bad)
    return model.score_encoded([e for e, _ in results], mode=mode, max_batch_tokens=max_batch_tokens,
                               permutations=permutations)
