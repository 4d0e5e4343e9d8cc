"""A reward server for GRPO: `python -m mrrm.serve --model PATH --host 127.0.0.1 --port 8000`.

Endpoints (FastAPI):
    POST /score       {"samples": [{"prompt", "responses", "image"?, "images"?, "video"?, "videos"?, "id"?}]}
                      -> {"scores": [[...], ...]}   (raw scores, one list per sample, input order)
    POST /get_reward  OpenRLHF's remote reward protocol: {"query": [...], "prompts": [...], "labels"?: [...]}
                      -> {"rewards": [...], "scores": [...], "extra_logs": {"group_size": [...]}}
                      query i = prompts[i] + response i; the queries that share a prompt are one
                      group, scored in one pass (grouping rules of mrrm.grpo); with --group-size N the
                      rollouts of a prompt are gathered across requests (OpenRLHF sends one per request)
                      by mrrm.grpo.GroupAssembler: a short group is a 504, an extra rollout a 409 (from
                      then on), a bad rollout a 422 for its request alone, never a wrong reward.
    GET  /health      {"status": "ok", ...counters}  (never needs the token)

--replicas K: K model copies behind this one server (replica 0 in this process, the others in processes
of their own); requests and groups go to the least loaded one, groups are assembled once, here. Give
OpenRLHF's several --reward.remote_url this one server rather than several servers.

Dynamic batching: every request becomes a job on a bounded asyncio queue (--max-queue; a full
queue answers 429). One worker task goes round-robin over the active jobs: each round, every job
either encodes its next 256 samples or contributes about --max-batch-tokens / (active jobs) tokens
to one packed scoring call, so a huge request shares the model with later ones instead of holding
it. A job's samples are all validated before any of them is scored. Model work runs on one
dedicated thread and encoding (tokenizer, media preprocessing) on another, overlapping it; neither on
the event loop. A request that is not answered within
--timeout seconds gets 504, and its job stops being worked on. /get_reward groups (--group-size)
wait for room in the queue instead of getting 429. Bodies over SMALL_BODY_BYTES are parsed on a thread.

Safety: loopback by default; optional bearer token (--token or MRRM_SERVE_TOKEN); bodies over
--max-body-bytes get 413 before they are parsed. Media: a string is an image if it is a data URL
or a base64 string (64+ base64 characters) of an image; otherwise it is a path, which must lie
under --media-root after resolving symlinks (no "..", no absolute path outside the root, no
symlink escape). The check runs before any file is opened; the file is then opened once, the opened
file checked again, and decoded through that descriptor (race-free against a swapped name); a video
path may name a folder of frame images under the root (opened once; each frame read is opened through
that folder's descriptor and checked under the root); without --media-root paths are refused.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import hmac
import json
import logging
import os
import re
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mrrm._args import add_model_args, add_text_budget_args, positive_int, text_budget_overrides
from mrrm.common import MODES, check_choice, check_int, check_positive
from mrrm.data import media
from mrrm.data.budgets import add_media_budget_args, media_budgets_from_args
from mrrm.data.encoding import BatchError, SampleError
from mrrm.errors import MediaRejected, QueueFull
from mrrm.model.api import load_model, resolve_device
from mrrm.rl.grpo import (
    DEFAULT_GROUP_TIMEOUT,
    PARTIAL_GROUPS,
    GroupAssembler,
    GroupError,
    PendingFull,
    PendingPool,
    fill_empty,
    group_sample,
    ungroup,
)
from mrrm.rl.queries import DEFAULT_STOP_TEXTS, PROMPT_FORMATS, QueryError, response_of, template_frame, user_turn

log = logging.getLogger("mrrm.serve")

TOKEN_ENV = "MRRM_SERVE_TOKEN"
DEFAULT_MAX_QUEUE = 256
DEFAULT_TIMEOUT = 60.0
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_PENDING = 65536    # responses held for their groups at most (then 429)
DEFAULT_MAX_CLIENT_GROUPS = 8192  # groups one client may hold open at once (then 429 for that client)
MAX_CLIENTS = 1024             # client namespaces held at once (idle ones are dropped first)
DEFAULT_MAX_REQUEST_PIXELS = 256_000_000  # decoded image / frame pixels one /score request may hold (~770 MB RGB)
DEFAULT_MAX_INFLIGHT_PIXELS = 1_024_000_000  # ... all requests together, until scored (~3 GB RGB; then 503)
DEFAULT_MAX_SAMPLES = 10_000   # samples (or /get_reward queries) in one request
SMALL_BODY_BYTES = 64 * 1024   # bodies up to this size are parsed on the event loop, larger ones on a thread
_BASE64 = re.compile(r"[A-Za-z0-9+/_\-]+={0,2}")
MIN_BASE64_CHARS = 64  # shorter strings are paths (no image encodes to fewer than 64 base64 characters)


# --------------------------------------------------------------------------------------------------
# Media: base64 or a path under the media root, checked before anything is opened
# --------------------------------------------------------------------------------------------------


def _media_http_error(e: MediaRejected) -> HTTPException:
    """The HTTP error of a refused medium; 503 (the in-flight pool is full) says when to retry."""
    return HTTPException(e.status, str(e), headers={"Retry-After": "1"} if e.status == 503 else None)


class ConfinedFile(os.PathLike):
    """A media file opened ONCE after the confinement checks, and read through its descriptor
    (`/proc/self/fd/N`): swapping the name for a symlink to a file outside the root after the check
    changes nothing, for images decoded now and videos decoded later on the model thread alike.
    The descriptor is closed when the object is collected (or by close())."""

    def __init__(self, fd: int, name: str):
        self.fd, self.name = fd, name
        self.media_label = name  # how mrrm.data.media names it in messages

    def __fspath__(self) -> str:
        return f"/proc/self/fd/{self.fd}"

    def __repr__(self) -> str:
        return f"ConfinedFile({self.name!r})"

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()


def open_confined(value: str, root: Path | None, where: str) -> ConfinedFile:
    """`value` checked (safe_media_path), opened once, and the OPENED file verified: a regular file
    whose real path lies under the root. What is read later is what was checked."""
    path = safe_media_path(value, root, where)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise MediaRejected(f"{where}: cannot open ({type(e).__name__})") from None
    opened = ConfinedFile(fd, value)
    try:
        real = Path(os.readlink(f"/proc/self/fd/{fd}"))
        if not real.is_relative_to(root):
            raise MediaRejected(f"{where}: resolves (through a symlink) to a file outside the media root", 403)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise MediaRejected(f"{where}: not a regular file")
    except BaseException:
        opened.close()
        raise
    return opened


class ConfinedFolder(ConfinedFile):
    """A video given as a folder of frame images under the media root, opened ONCE (its descriptor, like
    a ConfinedFile's) after the confinement checks. mrrm.data.media lists the frames through the descriptor
    and opens each frame it keeps through `open_frame`: relative to that descriptor, and refused when
    the opened file is not a regular file under the root (a frame symlinked outside it)."""

    def __init__(self, fd: int, name: str, root: Path):
        super().__init__(fd, name)
        self.root = root

    def __repr__(self) -> str:
        return f"ConfinedFolder({self.name!r})"

    def open_frame(self, frame: str) -> ConfinedFile:
        where = f"frame folder {self.name!r}: frame {frame!r}"
        if not frame or "/" in frame or frame in (".", ".."):
            raise media.MediaError(f"{where}: not a file name in the folder")
        try:
            fd = os.open(frame, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0), dir_fd=self.fd)
        except OSError as e:
            raise media.MediaError(f"{where}: cannot open ({type(e).__name__})") from None
        opened = ConfinedFile(fd, f"{self.name}/{frame}")
        try:
            if not Path(os.readlink(f"/proc/self/fd/{fd}")).is_relative_to(self.root):
                raise media.MediaError(f"{where}: resolves (through a symlink) to a file outside the media root")
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise media.MediaError(f"{where}: not a regular file")
        except BaseException:
            opened.close()
            raise
        return opened


def open_confined_folder(value: str, root: Path | None, where: str) -> ConfinedFolder:
    """A frame folder `value` checked (safe_media_path), opened once as a directory, and the OPENED
    folder verified to lie under the root."""
    safe_media_path(value, root, where, folder_ok=True)
    try:
        fd = os.open(root / value if not Path(value).is_absolute() else value,
                     os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise MediaRejected(f"{where}: cannot open ({type(e).__name__})") from None
    opened = ConfinedFolder(fd, value, root)
    try:
        if not Path(os.readlink(f"/proc/self/fd/{fd}")).is_relative_to(root):
            raise MediaRejected(f"{where}: resolves (through a symlink) to a folder outside the media root", 403)
    except BaseException:
        opened.close()
        raise
    return opened


def safe_media_path(value: str, root: Path | None, where: str, *, folder_ok: bool = False) -> Path:
    """The resolved path of `value` if it names a regular file (or, with folder_ok, a folder: a video
    given as frame images) under `root` (itself resolved).
    Refused: no root configured, '..' components, NUL bytes, absolute paths outside the root, and
    paths that leave the root through a symlink. Only the root's own tree is touched. The name may
    change after this check: read media through open_confined."""
    if root is None:
        raise MediaRejected(f"{where}: file paths are refused (the server has no --media-root); send base64", 403)
    if "\x00" in value or not value:
        raise MediaRejected(f"{where}: not a usable path")
    path = Path(value)
    if ".." in path.parts:
        raise MediaRejected(f"{where}: '..' is not allowed in media paths", 403)
    if path.is_absolute() and not path.is_relative_to(root):  # lexical check first: nothing outside is touched
        raise MediaRejected(f"{where}: absolute path outside the media root", 403)
    candidate = path if path.is_absolute() else root / path
    try:
        real = candidate.resolve(strict=True)
    except FileNotFoundError:
        raise MediaRejected(f"{where}: file not found under the media root") from None
    except (OSError, RuntimeError) as e:  # symlink loops, permission, name too long
        raise MediaRejected(f"{where}: not a usable path ({type(e).__name__})") from None
    if not real.is_relative_to(root):
        raise MediaRejected(f"{where}: resolves (through a symlink) to a file outside the media root", 403)
    if not (real.is_file() or (folder_ok and real.is_dir())):
        raise MediaRejected(f"{where}: not a regular file" + (" or a folder of frames" if folder_ok else ""))
    return real


def load_image_field(value: str, root: Path | None, where: str,
                     budgets: media.MediaBudgets = media.DEFAULT_MEDIA_BUDGETS):
    """A request's image string -> a decoded PIL image (data URL, base64, or a path under the root), under
    `budgets` (the model encoder's MediaBudgets: an image over its image_pixels is refused), charged (from
    its header, before decoding) to the active mrrm.data.media.PixelBudget: over the request's budget ->
    413, over the server's in-flight pool -> 503 (retry later)."""
    try:
        return _load_image_field(value, root, where, budgets)
    except media.OverBudget as e:
        raise MediaRejected(f"{where}: {str(e).split(': ', 1)[-1]}", 503 if e.temporary else 413) from None


def _load_image_field(value: str, root: Path | None, where: str, budgets: media.MediaBudgets):
    if value[:5].lower() == "data:":
        try:
            return media.load_image(value, budgets=budgets)  # a data URL is never read as a path
        except media.OverBudget:
            raise
        except media.MediaError as e:
            raise MediaRejected(f"{where}: {e}") from None
    compact = "".join(value.split())
    b64_error = None
    if len(compact) >= MIN_BASE64_CHARS and _BASE64.fullmatch(compact):
        try:  # through mrrm.data.media's data-URL decoder: strict base64, then PIL
            return media.load_image("data:image;base64," + compact, budgets=budgets)
        except media.OverBudget:
            raise
        except media.MediaError as e:
            b64_error = str(e).replace("data URL", "base64 string")
    try:
        path = open_confined(value, root, where)
    except MediaRejected:
        if b64_error is not None:
            raise MediaRejected(f"{where}: invalid base64 image ({b64_error}), and not a file under the media root",
                                400) from None
        raise
    try:
        return media.load_image(path, budgets=budgets)  # a path: never reinterpreted as base64
    except media.OverBudget:
        raise
    except media.MediaError as e:
        raise MediaRejected(f"{where}: {str(e).replace(os.fspath(path), value)}") from None
    finally:
        path.close()


def load_video_field(value, root: Path | None, where: str, max_frames: int = 64,
                     budgets: media.MediaBudgets = media.DEFAULT_MEDIA_BUDGETS):
    """A request's video: a file under the root (checked and opened: a ConfinedFile, decoded later on
    the model thread through its descriptor), a folder of frame images under the root (a
    ConfinedFolder: mrrm.data.media thins it before decoding and opens only the kept frames, each checked
    under the root), or a list of frame images, of which only the frames the model would keep
    (mrrm.data.media's evenly spaced thinning to `max_frames`) are decoded: a list of 2,000 large frames
    costs 64 decodes, not 2,000. `budgets`: the model encoder's MediaBudgets (each frame of a list is an
    image under its image_pixels; files and folders are checked against them when the encoder decodes them)."""
    if isinstance(value, list):
        if not value:
            raise MediaRejected(f"{where}: an empty frame list")
        keep = sorted(set(media.thin_frame_list(len(value), max_frames)))
        return [load_image_field(value[k], root, f"{where} frame {k}", budgets) for k in keep]
    if safe_media_path(value, root, where, folder_ok=True).is_dir():
        return open_confined_folder(value, root, where)
    return open_confined(value, root, where)


# --------------------------------------------------------------------------------------------------
# Request bodies
# --------------------------------------------------------------------------------------------------


class SampleIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str
    responses: list[str] = Field(min_length=1)
    image: Optional[str] = None
    images: Optional[list[str]] = None
    video: Optional[Union[str, list[str]]] = None
    videos: Optional[list[Union[str, list[str]]]] = None
    id: Optional[Union[str, int]] = None


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    samples: list[SampleIn] = Field(min_length=1)


class RewardRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenRLHF may send more fields (templates, stop_reason, ...)
    query: list[str] = Field(min_length=1)
    prompts: list[str]
    labels: Optional[list[Any]] = None


def prepare_sample(s: SampleIn, index: int, root: Path | None, max_frames: int = 64,
                   budgets: media.MediaBudgets = media.DEFAULT_MEDIA_BUDGETS) -> dict:
    """A validated request sample -> an mrrm sample whose media are decoded images / checked paths, within
    `budgets` (the model encoder's MediaBudgets: the per-sample limits)."""
    if s.image is not None and s.images is not None:
        raise MediaRejected(f"sample {index}: give 'image' or 'images', not both")
    if s.video is not None and s.videos is not None:
        raise MediaRejected(f"sample {index}: give 'video' or 'videos', not both")
    out: dict[str, Any] = {"prompt": s.prompt, "responses": list(s.responses)}
    if s.id is not None:
        out["id"] = s.id
    images = [s.image] if s.image is not None else (s.images or [])
    videos = [s.video] if s.video is not None else (s.videos or [])
    too_many = media.check_media_counts(len(images), len(videos), budgets=budgets)
    if too_many is not None:  # before anything is decoded
        raise MediaRejected(f"sample {index}: {too_many}", 422)
    if images:
        out["images"] = [load_image_field(v, root, f"sample {index} image {k}", budgets)
                         for k, v in enumerate(images)]
    if videos:
        out["videos"] = [load_video_field(v, root, f"sample {index} video {k}", max_frames, budgets)
                         for k, v in enumerate(videos)]
    return out


# --------------------------------------------------------------------------------------------------
# Dynamic batching
# --------------------------------------------------------------------------------------------------


@dataclass
class _Job:
    samples: list[dict]
    future: asyncio.Future
    encoded: list = field(default_factory=list)    # filled ENCODE_CHUNK samples at a time
    errors: list = field(default_factory=list)     # SampleErrors, global sample indices
    scores: list = field(default_factory=list)     # results of the samples scored so far, in order

    @property
    def fully_encoded(self) -> bool:
        return len(self.encoded) == len(self.samples)


ENCODE_CHUNK = 256  # samples encoded per unit of work: a huge request never holds the model thread long

_REPLICA_MODEL = None  # a replica process's model, loaded once by _replica_init


def _replica_init(checkpoint, device, dtype, mode) -> None:
    global _REPLICA_MODEL
    _REPLICA_MODEL = load_model(checkpoint, device=device, dtype=dtype, mode=mode)


def _replica_ready() -> str:
    return str(_REPLICA_MODEL.device)


@torch.inference_mode()
def _replica_score(encoded: list, mode: str, max_batch_tokens: int) -> tuple[list, int]:
    passes = []
    scores = _REPLICA_MODEL.score_encoded(encoded, mode=mode, max_batch_tokens=max_batch_tokens,
                                          on_pass=lambda _inputs: passes.append(1))
    return scores, len(passes)


class ReplicaProcess:
    """A model replica in a process of its own (spawned; the checkpoint loaded once on its device): it
    scores samples the front server has encoded. The front keeps the queue, the batching and the group
    assembly for every replica (`python -m mrrm.serve --replicas K`)."""

    def __init__(self, checkpoint, device: str, dtype, mode: str):
        from concurrent.futures import ProcessPoolExecutor

        import torch.multiprocessing as mp

        self.device = device
        self.pool = ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"), initializer=_replica_init,
                                        initargs=(checkpoint, device, dtype, mode))
        self.ready = self.pool.submit(_replica_ready)  # starts loading now, beside the front's own model

    def score(self, encoded: list, mode: str, max_batch_tokens: int) -> tuple[list, int]:
        return self.pool.submit(_replica_score, encoded, mode, max_batch_tokens).result()

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class Batcher:
    """Bounded queue + one worker task; model work on one thread, encoding (tokenizer, media
    preprocessing) on another, overlapping it.

    Counters (read by /health and the tests): requests (jobs accepted), rejected (429), rounds
    (worker drains), passes (model forward passes), samples (scored), timeouts."""

    def __init__(self, model, *, mode: str, max_batch_tokens: int, max_queue: int, replica: ReplicaProcess | None = None):
        """replica: score in that process (the front's `model` still encodes); None: with `model` here."""
        self.model, self.mode, self.max_batch_tokens, self.max_queue = model, mode, max_batch_tokens, max_queue
        self.replica = replica
        self.load = 0  # samples submitted and not answered yet (the front sends new work to the least loaded)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mrrm-model")
        # tokenizing and media preprocessing run here, beside the model thread, never on it
        self.encode_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mrrm-encode")
        self.counters = {"requests": 0, "rejected": 0, "rounds": 0, "passes": 0, "samples": 0, "timeouts": 0}
        self.queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self.queue = asyncio.Queue(maxsize=self.max_queue)
        if self.replica is not None:  # serve only once the replica's model is loaded
            await asyncio.wrap_future(self.replica.ready)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="mrrm-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.encode_executor.shutdown(wait=False, cancel_futures=True)
        if self.replica is not None:
            self.replica.close()

    def _track(self, fut: asyncio.Future, samples: list) -> None:
        self.load += len(samples)
        fut.add_done_callback(lambda _f: setattr(self, "load", self.load - len(samples)))

    def submit(self, samples: list[dict]) -> asyncio.Future:
        """Queue a job; raises QueueFull when the queue holds max_queue jobs."""
        fut = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait(_Job(samples, fut))
        except asyncio.QueueFull:
            self.counters["rejected"] += 1
            raise QueueFull() from None
        self.counters["requests"] += 1
        self._track(fut, samples)
        return fut

    async def submit_wait(self, samples: list[dict]) -> list[list[float]]:
        """Queue a job, waiting for room instead of refusing (the group assembler's groups: waiting for
        a group is not overload), and return its scores."""
        fut = asyncio.get_running_loop().create_future()
        self._track(fut, samples)
        await self.queue.put(_Job(samples, fut))
        self.counters["requests"] += 1
        return await fut

    # -- the worker -------------------------------------------------------------------------------
    async def _encode_chunk(self, job: _Job) -> bool:
        """Encode the job's next ENCODE_CHUNK samples on the model thread. False when the job is over:
        a bad sample (BatchError listing every bad one, once all are encoded, before any compute) or
        an unexpected failure."""
        lo = len(job.encoded)
        hi = min(len(job.samples), lo + ENCODE_CHUNK)

        def encode():
            out, errors = [], []
            for i in range(lo, hi):
                try:
                    out.append(self.model.encoder.encode(job.samples[i], i))
                except SampleError as e:
                    errors.append(e)
                    out.append(None)
            return out, errors

        try:
            out, errors = await asyncio.get_running_loop().run_in_executor(self.encode_executor, encode)
        except Exception as e:  # noqa: BLE001 - an unexpected failure ends this job only
            if not job.future.done():
                job.future.set_exception(e)
            return False
        job.encoded += out
        job.errors += errors
        if job.fully_encoded and job.errors:
            if not job.future.done():
                job.future.set_exception(BatchError(job.errors))
            return False
        return True

    async def _run(self) -> None:
        """Round-robin over the active jobs: each round, every job either encodes its next chunk or
        contributes a slice of about max_batch_tokens / (active jobs) tokens to one packed scoring
        call; a job is answered once all its samples are scored. A huge request therefore shares
        the model thread with the requests that arrive after it instead of holding it, and a job
        whose request gave up (timeout) stops being worked on."""
        active: list[_Job] = []
        while True:
            if not active:
                active.append(await self.queue.get())
            while not self.queue.empty():
                active.append(self.queue.get_nowait())
            active = [j for j in active if not j.future.done()]
            if not active:
                continue
            share = max(1, self.max_batch_tokens // len(active))
            parts = []
            for job in active:
                if not job.fully_encoded:
                    continue
                lo = hi = len(job.scores)
                tokens = 0
                while hi < len(job.encoded) and (hi == lo or tokens + job.encoded[hi].num_tokens <= share):
                    tokens += job.encoded[hi].num_tokens
                    hi += 1
                parts.append((job, lo, hi))
            # encoding (its own thread) overlaps the scoring round (the model thread)
            work = [self._encode_chunk(j) for j in active if not j.fully_encoded]
            if parts:
                work.append(self._score_round(parts))
            await asyncio.gather(*work)
            active = [j for j in active if not j.future.done()]

    async def _score_round(self, parts: list) -> None:
        """Score the slices (job, lo, hi) of one round in packed passes; finished jobs get their scores."""
        self.counters["rounds"] += 1
        encoded = [e for job, lo, hi in parts for e in job.encoded[lo:hi]]
        try:
            scores = await asyncio.get_running_loop().run_in_executor(self.executor, self._score, encoded)
        except Exception as e:  # noqa: BLE001 - every job of the round gets the error
            log.exception("scoring failed")
            for job, _, _ in parts:
                if not job.future.done():
                    job.future.set_exception(e)
            return
        start = 0
        for job, lo, hi in parts:
            job.scores += scores[start:start + hi - lo]
            start += hi - lo
            if len(job.scores) == len(job.samples) and not job.future.done():
                job.future.set_result(job.scores)

    @torch.inference_mode()
    def _score(self, encoded: list) -> list[list[float]]:
        """Packed passes under the token budget over already encoded samples (model thread; with a
        replica, this thread waits for the replica's process)."""
        def count(_inputs):
            self.counters["passes"] += 1

        if self.replica is not None:
            scores, passes = self.replica.score(encoded, self.mode, self.max_batch_tokens)
            self.counters["passes"] += passes
        else:
            scores = self.model.score_encoded(encoded, mode=self.mode, max_batch_tokens=self.max_batch_tokens,
                                              on_pass=count)
        self.counters["samples"] += len(encoded)
        return scores


# --------------------------------------------------------------------------------------------------
# Guard: token and body size, before the body is parsed
# --------------------------------------------------------------------------------------------------


if hasattr(asyncio, "timeout"):  # Python >= 3.11: one timer, no task per await
    deadline = asyncio.timeout
else:
    @contextlib.asynccontextmanager
    async def deadline(seconds: float):
        """`async with deadline(s):` raises asyncio.TimeoutError when its body runs longer than `s` seconds
        (asyncio.timeout before Python 3.11)."""
        task, fired = asyncio.current_task(), []

        def fire():
            fired.append(True)
            task.cancel()

        handle = asyncio.get_running_loop().call_later(seconds, fire)
        try:
            yield
        except asyncio.CancelledError:
            if fired:
                raise asyncio.TimeoutError() from None
            raise
        finally:
            handle.cancel()


def _strip_path_token(scope):
    """A request to /t/<token>/rest -> (the scope with path /rest, the token bytes); else (scope, None)."""
    path = scope.get("path", "")
    if not path.startswith("/t/"):
        return scope, None
    token, _, rest = path[3:].partition("/")
    scope = dict(scope, path="/" + rest, raw_path=("/" + rest).encode("latin-1"))
    return scope, token.encode("utf-8")


def _header_token(auth: bytes) -> bytes:
    """The token of an Authorization header: Bearer <token>, or Basic base64(user:<token>)."""
    kind, _, value = auth.partition(b" ")
    if kind.lower() == b"bearer":
        return value.strip()
    if kind.lower() == b"basic":
        import base64
        import binascii

        try:
            return base64.b64decode(value.strip(), validate=True).partition(b":")[2]
        except (binascii.Error, ValueError):
            return b""
    return b""


class Guard:
    """ASGI middleware: the token (except on /health, where only GET is routed) and the request body
    size limit. The token is accepted as `Authorization: Bearer <token>`, as the password of HTTP Basic
    auth (`http://user:<token>@host/...`), or as a path prefix `/t/<token>/...` (for clients that can
    only be given a URL, e.g. OpenRLHF's `--reward.remote_url`), always compared in constant time. The
    body is read here (at most max_body_bytes + one chunk) and replayed to the app."""

    def __init__(self, app, *, token: str | None, max_body_bytes: int, body_timeout: float = 30.0,
                 direct: dict | None = None, public=None):
        """direct: {path: async handler(body bytes, client address) -> JSON bytes} served here for POST,
        without the app's routing (HTTPException -> {"detail"} with its status; `public(detail)` is what a
        client may see of a message)."""
        self.app, self.token, self.max_body_bytes, self.body_timeout = app, token, max_body_bytes, body_timeout
        self.direct, self.public = direct or {}, public or (lambda detail: detail)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {}
        for k, v in scope.get("headers", []):
            headers.setdefault(k.decode("latin-1").lower(), v)
        scope, path_token = _strip_path_token(scope)
        if self.token and scope.get("path") != "/health":
            given = path_token if path_token is not None else _header_token(headers.get("authorization", b""))
            if not hmac.compare_digest(given, self.token.encode("utf-8")):
                msg = ("wrong token in the URL" if path_token is not None else "wrong bearer token" if given
                       else "missing bearer token (Authorization: Bearer <token>, or the URL prefix /t/<token>/)")
                return await JSONResponse({"detail": msg}, status_code=401,
                                          headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
        def too_big():
            return JSONResponse({"detail": f"request body larger than the limit of {self.max_body_bytes} bytes "
                                           "(server --max-body-bytes)"}, status_code=413)

        length = headers.get("content-length")
        if length is not None:
            try:
                if int(length) > self.max_body_bytes:
                    return await too_big()(scope, receive, send)
            except ValueError:
                bad = JSONResponse({"detail": "bad Content-Length header"}, status_code=400)
                return await bad(scope, receive, send)
        chunks, size, more = [], 0, True
        try:  # a client dribbling its body, or sending less than its Content-Length, is cut off
            async with deadline(self.body_timeout):
                while more:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > self.max_body_bytes:
                        return await too_big()(scope, receive, send)
                    chunks.append(chunk)
                    more = message.get("more_body", False)
        except asyncio.TimeoutError:
            slow = JSONResponse({"detail": f"request body not received within {self.body_timeout:g} s"},
                                status_code=408, headers={"Connection": "close"})
            return await slow(scope, receive, send)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        handler = self.direct.get(scope.get("path")) if scope.get("method") == "POST" else None
        if handler is not None:
            return await self._serve_direct(handler, body, scope, send)
        return await self.app(scope, replay, send)

    async def _serve_direct(self, handler, body: bytes, scope, send) -> None:
        headers = {}
        try:
            status, payload = 200, await handler(body, (scope.get("client") or ("",))[0])
        except HTTPException as e:
            detail = _short(self.public(e.detail)) if isinstance(e.detail, str) else e.detail
            status, payload, headers = e.status_code, _dumps({"detail": detail}), e.headers or {}
        except MemoryError:
            status, payload = 503, _dumps({"detail": "the server ran out of memory handling this request; retry later"})
            headers = {"Retry-After": "1"}
        except Exception:  # noqa: BLE001 - a bug: logged, answered 500, the server keeps serving
            log.exception("%s failed", redact(scope.get("path", "")))
            status, payload = 500, _dumps({"detail": "internal error (logged by the server)"})
        raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        raw_headers += [(k.lower().encode("latin-1"), str(v).encode("latin-1")) for k, v in headers.items()]
        await send({"type": "http.response.start", "status": status, "headers": raw_headers})
        await send({"type": "http.response.body", "body": payload})


# --------------------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------------------


def _validation_response(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    for e in errors:
        if e.get("type") == "json_invalid":
            ctx = e.get("ctx") or {}
            return JSONResponse({"detail": f"malformed JSON body: {ctx.get('error', e.get('msg'))} "
                                           f"(at character {e.get('loc', ['', '?'])[-1]})"}, status_code=400)
    return JSONResponse({"detail": _describe_validation(errors)}, status_code=422)


def _validate_options(model, mode: str | None, *, max_queue: int, max_body_bytes: int, max_batch_tokens: int | None,
                      timeout: float) -> str:
    """Check create_app's arguments (ValueError on a bad one); returns the mode to serve in."""
    mode = mode or model.config.mode
    check_choice("mode", mode, MODES)
    check_int("max_queue", max_queue)
    check_int("max_body_bytes", max_body_bytes)
    check_int("max_batch_tokens", max_batch_tokens, allow_none=True)
    check_positive("timeout", timeout, unit="seconds")
    return mode


def _resolve_media_root(media_root) -> Path | None:
    """The media root, resolved (FileNotFoundError when missing), or None: media paths are refused."""
    if media_root is None:
        return None
    root = Path(media_root).resolve(strict=True)
    if not root.is_dir():
        raise ValueError(f"media_root {str(media_root)!r} is not a directory")
    return root


class _ServerState:
    """What the routes share: the batchers (one per model replica: queue, worker, model thread), the
    group assembler, the mode, the limits and the media root."""

    def __init__(self, batchers: list[Batcher], *, mode: str, root: Path | None, max_queue: int, timeout: float,
                 group_size: int, group_timeout: float, max_pending: int, partial_groups: str = "error",
                 stop_texts=DEFAULT_STOP_TEXTS, frame=None, prompt_format: str = "auto",
                 max_client_groups: int = DEFAULT_MAX_CLIENT_GROUPS):
        self.batchers, self.mode, self.root, self.max_queue, self.timeout = batchers, mode, root, max_queue, timeout
        self.batcher = batchers[0]  # the front's own model (it encodes for every replica)
        self.stop_texts, self.frame, self.prompt_format = tuple(stop_texts), frame, prompt_format
        # /get_reward's groups across requests: OpenRLHF posts one rollout per request (the same
        # mrrm.grpo.GroupAssembler gathers veRL's per-row calls). One assembler per client address, so that
        # another client's prompts never join (or poison) a trainer's groups; one pool of held responses.
        self.pending_pool = PendingPool(max_pending)
        self.group_size, self.partial_groups = group_size, partial_groups
        self._assembler_options = dict(group_size=group_size, group_timeout=group_timeout, partial=partial_groups,
                                       size_hint="the server's --group-size (unset: the queries of one request)",
                                       pool=self.pending_pool, max_groups=max_client_groups)
        self.assemblers: dict[str, GroupAssembler] = {}
        self.assembler_for("")  # checks the options now (max_pending below the group size is refused at start)
        self.assemblers.clear()
        encoder = getattr(self.batcher.model, "encoder", None)
        self.max_frames = getattr(encoder, "video_max_frames", 64)
        self.encoder = encoder  # its text budgets refuse a rollout before it is held or tokenized
        self.max_request_pixels = DEFAULT_MAX_REQUEST_PIXELS
        self.pool = media.PixelBudget(DEFAULT_MAX_INFLIGHT_PIXELS, "the server's in-flight media "
                                      "(--max-inflight-megapixels)", shared=True)
        self.max_samples = DEFAULT_MAX_SAMPLES
        # how long a /get_reward request may wait for the rest of its group before scoring starts
        self.group_wait = group_timeout
        self.counters = {"rejected": 0, "timeouts": 0}  # the front's own refusals (429 / 504), beside the batchers'

    @property
    def media_budgets(self) -> media.MediaBudgets:
        """The per-sample media limits (--max-image-megapixels ...): the model encoder's MediaBudgets, inside
        the request's budget inside the in-flight pool."""
        return getattr(self.encoder, "media_budgets", media.DEFAULT_MEDIA_BUDGETS)

    def request_group_size(self, queries: int) -> int:
        """The size of a group a request's `queries` (of one prompt) belong to: --group-size, or without it
        (1) the request's own queries (OpenRLHF's batch mode: a request carries whole groups)."""
        return self.group_size if self.group_size > 1 else queries

    def assembler_for(self, client: str) -> GroupAssembler:
        """The group assembler of one client (its address): groups are never shared between clients. At
        MAX_CLIENTS, idle clients' assemblers are dropped first (a misconfigured one is kept, so it stays
        refused); a new client beyond that gets 429."""
        a = self.assemblers.get(client)
        if a is None:
            if len(self.assemblers) >= MAX_CLIENTS:
                for name in [n for n, x in self.assemblers.items() if x.idle() and x.misconfigured is None]:
                    del self.assemblers[name]
                if len(self.assemblers) >= MAX_CLIENTS:
                    raise PendingFull(f"{MAX_CLIENTS} clients hold groups at once; retry later")
            a = self.assemblers[client] = GroupAssembler(self.score_group, **self._assembler_options)
        return a

    def pick(self) -> Batcher:
        """The batcher (model replica) with the least work in hand."""
        return min(self.batchers, key=lambda b: b.load)

    def request_budget(self) -> media.PixelBudget:
        """The decoded pixels one request (or /get_reward group) may hold, drawn from the server's
        in-flight pool; released when its scores are out. Video FILES are decoded later, one sample
        at a time on the encoding thread, under --max-sample-megapixels."""
        return media.PixelBudget(self.max_request_pixels, "the request's media (--max-request-megapixels)",
                                 parent=self.pool)

    def load_media(self, base: dict, budget: media.PixelBudget) -> dict:
        """A group's sample base with its label media decoded / checked under the media root (thread)."""
        out, budgets = dict(base), self.media_budgets
        with budget:
            if base.get("images"):
                out["images"] = [load_image_field(v, self.root, f"label image {k}", budgets)
                                 for k, v in enumerate(base["images"])]
            if base.get("videos"):
                out["videos"] = [load_video_field(v, self.root, f"label video {k}", self.max_frames, budgets)
                                 for k, v in enumerate(base["videos"])]
        return out

    async def score_group(self, group: dict) -> list[float]:
        """A closed /get_reward group -> a reward per response: its label media decoded (a worker
        thread), its distinct responses scored as one sample through a batcher, which it waits to
        enter (a group is never refused for a full queue)."""
        budget = self.request_budget()
        try:
            if group.get("images") or group.get("videos"):
                group = await asyncio.to_thread(self.load_media, group, budget)
            sample = group_sample(group)
            scores = (await self.pick().submit_wait([sample]))[0] if sample is not None else None
            return fill_empty(ungroup(group["responses"], sample, scores))
        finally:
            budget.release()

    async def prepare(self, samples: list[SampleIn], budget: media.PixelBudget) -> list[dict]:
        """Request samples -> mrrm samples (media decoded, charged to `budget` / paths checked); a
        refused medium is an HTTP error (503 with Retry-After when the in-flight pool is full)."""
        def work():
            budgets = self.media_budgets
            with budget:
                return [prepare_sample(s, i, self.root, self.max_frames, budgets) for i, s in enumerate(samples)]
        try:  # file reads and image decoding off the event loop
            return await asyncio.to_thread(work)
        except MediaRejected as e:
            raise _media_http_error(e) from None
        except MemoryError:
            raise HTTPException(503, "out of memory decoding the request's media; retry later",
                                headers={"Retry-After": "1"}) from None

    async def run_job(self, samples: list[dict]) -> list[list[float]]:
        """Score samples through the least loaded batcher: 429 when its queue is full, 504 on timeout,
        422 on bad samples."""
        batcher = self.pick()
        try:
            fut = batcher.submit(samples)
        except QueueFull:
            raise HTTPException(429, f"the scoring queue is full ({self.max_queue} requests waiting); retry later",
                                headers={"Retry-After": "1"}) from None
        try:
            return await asyncio.wait_for(fut, self.timeout)
        except asyncio.TimeoutError:
            self.counters["timeouts"] += 1
            raise HTTPException(504, f"scoring did not finish within {self.timeout:g} s (server --timeout)") from None
        except (BatchError, SampleError) as e:
            raise HTTPException(422, str(e)) from None

    def health(self) -> dict:
        totals = {k: sum(b.counters[k] for b in self.batchers) for k in self.batcher.counters}
        for k, v in self.counters.items():
            totals[k] += v
        return {"status": "ok", "mode": self.mode, "max_batch_tokens": self.batcher.max_batch_tokens,
                "replicas": len(self.batchers),
                "queue": sum(b.queue.qsize() for b in self.batchers if b.queue is not None), "max_queue": self.max_queue,
                **totals, "group_size": self.group_size, "pending": self.pending_pool.used,
                "partial_groups": self.partial_groups, "clients": len(self.assemblers),
                "misconfigured": {c: a.misconfigured for c, a in self.assemblers.items() if a.misconfigured} or None,
                "media_megapixels_held": round(self.pool.used / 1e6, 3),
                **{k: sum(a.counters[k] for a in self.assemblers.values()) for k in GroupAssembler.COUNTERS}}


# --------------------------------------------------------------------------------------------------
# Request bodies: parsed off the event loop when large
# --------------------------------------------------------------------------------------------------


MAX_ERRORS_SHOWN = 10       # validation errors listed in one answer (then "and N more")
MAX_DETAIL_CHARS = 2000     # characters of an error answer's detail (an answer never echoes a whole body)
MAX_JSON_DEPTH = 16         # nesting of a request body (the schemas need 4)
MAX_OBJECT_KEYS = 256       # keys of one JSON object (the schemas need under 10; OpenRLHF may add a few)


def _short(text: str, limit: int = MAX_DETAIL_CHARS) -> str:
    return text if len(text) <= limit else text[:limit] + f"... ({len(text) - limit} more characters)"


def _describe_validation(errors: list[dict]) -> str:
    parts = []
    for e in errors[:MAX_ERRORS_SHOWN]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
        parts.append(f"{_short(loc, 200)}: {_short(str(e.get('msg')), 200)}")
    more = f"; and {len(errors) - MAX_ERRORS_SHOWN} more" if len(errors) > MAX_ERRORS_SHOWN else ""
    return "invalid request: " + "; ".join(parts) + more


def _loads(raw: bytes):
    """JSON text -> Python objects: orjson (several times faster) when installed, the standard library for a
    body with a lone UTF-16 surrogate escape, which orjson refuses and json keeps as it is (so that the bad
    string is refused where it is used: one rollout, one sample, not the whole body)."""
    try:
        import orjson  # optional speed-up (the serve extra installs it), imported where used on purpose
    except ImportError:
        return json.loads(raw)
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as e:  # a json.JSONDecodeError (msg, pos)
        if "surrogate" not in str(e):
            raise
    return json.loads(raw)


def check_shape(obj, *, max_depth: int = MAX_JSON_DEPTH, max_keys: int = MAX_OBJECT_KEYS) -> None:
    """Refuse (422) a parsed body nested deeper than `max_depth` or with an object of more than `max_keys`
    keys, before the schema is checked: validating a million unknown keys, or listing each as an error,
    would hold the server for seconds and answer tens of megabytes."""
    stack = [(obj, 0)]
    while stack:
        x, depth = stack.pop()
        if isinstance(x, dict):
            if len(x) > max_keys:
                raise HTTPException(422, f"invalid request: an object with {len(x)} keys (at most {max_keys})")
            items = x.values()
        elif isinstance(x, list):
            items = x
        else:
            continue
        if depth >= max_depth:
            raise HTTPException(422, f"invalid request: nested deeper than {max_depth} levels")
        stack.extend((v, depth + 1) for v in items if isinstance(v, (dict, list)))


def parse_body(model_cls, raw: bytes):
    """A request body -> `model_cls` (pydantic), or the HTTP error: 400 for bytes that are not JSON, 422 for
    JSON of the wrong shape (bounded nesting and keys first; at most MAX_ERRORS_SHOWN errors listed)."""
    try:
        obj = _loads(raw)
    except UnicodeDecodeError:
        raise HTTPException(400, "malformed JSON body: not UTF-8 text") from None
    except RecursionError:
        raise HTTPException(422, f"invalid request: nested deeper than {MAX_JSON_DEPTH} levels") from None
    except json.JSONDecodeError as e:
        raise HTTPException(400, f"malformed JSON body: {_short(e.msg, 200)} (at character {e.pos})") from None
    check_shape(obj)
    try:
        return model_cls.model_validate(obj)
    except ValidationError as e:
        raise HTTPException(422, _describe_validation(e.errors())) from None


async def _read(request: Request, work, *args):
    """work(raw body, *args) on the event loop for a small body, on a thread for a large one: parsing and
    checking a 10 MB body never holds up other requests."""
    raw = await request.body()
    if len(raw) <= SMALL_BODY_BYTES:
        return work(raw, *args)
    return await asyncio.to_thread(work, raw, *args)


# --------------------------------------------------------------------------------------------------
# /get_reward: OpenRLHF's queries -> rollouts of groups
# --------------------------------------------------------------------------------------------------


def _label_fields(label, i: int, budgets: media.MediaBudgets = media.DEFAULT_MEDIA_BUDGETS
                  ) -> tuple[dict, int | None, str | None]:
    """(media references, group size, uid) a query's label carries: a dict (or its JSON text) with image /
    images / video / videos, an optional group_size (e.g. 1 for a validation set generated with n=1) and an
    optional uid (the dataset row's id: its rollouts are grouped by it rather than by the prompt's text),
    as a dataset field passed through OpenRLHF's --data.label_key. Anything else (a ground-truth string,
    None) carries none of them."""
    if isinstance(label, str) and label[:1] == "{":
        try:
            label = json.loads(label)
        except ValueError:
            return {}, None, None
    if not isinstance(label, dict):
        return {}, None, None
    out = {}
    for one, many in (("image", "images"), ("video", "videos")):
        if label.get(one) is not None and label.get(many) is not None:
            raise HTTPException(422, f"labels[{i}]: give '{one}' or '{many}', not both")
        refs = [label[one]] if label.get(one) is not None else label.get(many) or []
        if not isinstance(refs, list) or not all(isinstance(r, (str, list)) for r in refs):
            raise HTTPException(422, f"labels[{i}]: '{many}' must be a list of paths / base64 strings")
        if refs:
            out[many] = refs
    too_many = media.check_media_counts(len(out.get("images", [])), len(out.get("videos", [])), budgets=budgets)
    if too_many is not None:
        raise HTTPException(422, f"labels[{i}]: {too_many}")
    size = label.get("group_size")
    if size is not None:
        try:
            check_int(f"labels[{i}]['group_size']", size)
        except ValueError as e:
            raise HTTPException(422, str(e)) from None
    uid = label.get("uid")
    if uid is not None and (isinstance(uid, bool) or not isinstance(uid, (str, int))):
        raise HTTPException(422, f"labels[{i}]['uid'] must be a string or an integer")
    return out, size, None if uid is None else str(uid)


def _unicode_error(text: str) -> str | None:
    """Why `text` cannot be encoded (a lone UTF-16 surrogate from a JSON escape), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"is not valid Unicode text (a lone surrogate at character {e.start})"
    return None


@dataclass
class _Query:
    key: str          # the group (within the client's assembler): the label's uid, else the prompt text as sent
                      # and the label's media
    base: dict        # the sample without responses: the user's message under mrrm's own template, media refs
    group_size: int | None  # the label's group size, if it gives one
    response: str | None    # the response text, or None for a rollout refused on its own
    refused: str = ""       # why it was refused (then `raw` is its query text)
    raw: str = ""
    signature: str | None = None  # with a uid key: the content every rollout of that uid must share


def _parse_query(state: "_ServerState", i: int, query: str, prompt: str, label) -> _Query:
    """One query -> its group and response. A prompt (or label) that cannot be taken apart is an HTTP error
    for the request (there is no group to count it in); a query whose own text is bad is a refused rollout
    of its group (`_Query.refused`), so that the rest of the group is still scored."""
    if not prompt:
        raise HTTPException(422, f"prompts[{i}] is empty")
    bad = _unicode_error(prompt)
    if bad:
        raise HTTPException(422, f"prompts[{i}] {bad}")
    try:
        turn = user_turn(prompt, state.frame, prompt_format=state.prompt_format)
    except QueryError as e:
        raise HTTPException(422, f"prompts[{i}]: {e}") from None
    if not turn.text:
        raise HTTPException(422, f"prompts[{i}]: the user's message is empty")
    media_refs, group_size, uid = _label_fields(label, i, state.media_budgets)
    given = (len(media_refs.get("images", [])), len(media_refs.get("videos", [])))
    if (turn.images or turn.videos) and given != (turn.images, turn.videos):
        raise HTTPException(422, f"prompts[{i}] holds {turn.images} image and {turn.videos} video placeholder(s) "
                                 f"but labels[{i}] gives {given[0]} image(s) and {given[1]} video(s); send the "
                                 "media as the label {\"images\": [...], \"videos\": [...]} (paths under "
                                 "--media-root, or base64 images)")
    content = prompt + "\x00" + json.dumps(media_refs, sort_keys=True)
    key, signature = (content, None) if uid is None else ("uid\x00" + uid, content)
    out = _Query(key, {"prompt": turn.text, **media_refs}, group_size, None, raw=query, signature=signature)
    bad = _unicode_error(query)
    if bad:
        out.refused = f"query[{i}] {bad}"
        return out
    try:
        out.response = response_of(query, prompt, state.stop_texts)
    except QueryError as e:
        out.refused = f"query[{i}]: {e}"
        return out
    budgets = getattr(state.encoder, "text_budgets", None)
    over = budgets.check(turn.text, [out.response]) if budgets is not None else None
    if over is not None:
        out.refused, out.response = f"query[{i}]: {over}", None
    return out


def _parse_reward_request(raw: bytes, state: "_ServerState") -> list[_Query]:
    body = parse_body(RewardRequest, raw)
    n = len(body.query)
    if n > state.max_samples:
        raise HTTPException(413, f"{n} queries in one request, over the limit of {state.max_samples} "
                                 "(server --max-samples-per-request); split the request")
    if len(body.prompts) != n:
        raise HTTPException(422, f"'prompts' has {len(body.prompts)} entries but 'query' has {n}")
    if body.labels is not None and len(body.labels) != n:
        raise HTTPException(422, f"'labels' has {len(body.labels)} entries but 'query' has {n}")
    labels = body.labels if body.labels is not None else [None] * n
    return [_parse_query(state, i, q, p, lab) for i, (q, p, lab) in enumerate(zip(body.query, body.prompts, labels))]


def _group_http_error(e: GroupError) -> HTTPException:
    return HTTPException(e.status, str(e), headers={"Retry-After": "1"} if isinstance(e, PendingFull) else None)


async def get_reward(state: "_ServerState", raw: bytes, client: str) -> bytes:
    """OpenRLHF's remote reward protocol: the body of a /get_reward request from `client` (its address) ->
    the JSON answer, one reward per query (HTTPException on an error). The queries of a prompt are scored
    together as one group: those of this request and, with --group-size N, those of other requests too
    (GroupAssembler), as OpenRLHF sends one rollout per request. A query whose own text is bad is refused
    (422) and counts as one of its group's rollouts; the rest of the group is scored. Guard serves it
    straight from the body it read (the framework's routing is most of a one-rollout request's cost)."""
    if len(raw) <= SMALL_BODY_BYTES:
        queries = _parse_reward_request(raw, state)
    else:
        queries = await asyncio.to_thread(_parse_reward_request, raw, state)
    by_key: dict[str, tuple[_Query, list[int]]] = {}
    refused = []
    try:
        assembler = state.assembler_for(client)
        for i, q in enumerate(queries):
            if q.response is None:
                same = sum(r.key == q.key for r in queries)
                refused.append(assembler.reject(q.key, q.base, q.raw, q.refused, signature=q.signature,
                                                group_size=q.group_size or state.request_group_size(same)))
            else:
                by_key.setdefault(q.key, (q, []))[1].append(i)
    except GroupError as e:
        raise _group_http_error(e) from None
    adds = [assembler.add(key, q.base, [queries[i].response for i in rows], signature=q.signature,
                          group_size=q.group_size or state.request_group_size(len(rows)))
            for key, (q, rows) in by_key.items()]
    if refused:  # this request is answered now; its good rollouts still join (and complete) their groups
        for coro in adds:
            asyncio.ensure_future(coro).add_done_callback(lambda f: f.cancelled() or f.exception())
        raise HTTPException(422, "; ".join(str(e) for e in refused))
    try:
        async with deadline(state.group_wait + state.timeout):
            parts = [await adds[0]] if len(adds) == 1 else await asyncio.gather(*adds)
    except GroupError as e:
        if isinstance(e, PendingFull):
            state.counters["rejected"] += 1
        raise _group_http_error(e) from None
    except asyncio.TimeoutError:
        state.counters["timeouts"] += 1
        raise HTTPException(504, f"the group was not scored within {state.group_wait + state.timeout:g} s") from None
    except MediaRejected as e:
        raise _media_http_error(e) from None
    except (BatchError, SampleError) as e:
        raise HTTPException(422, str(e)) from None
    rewards, sizes = [0.0] * len(queries), [0] * len(queries)
    for (_, rows), (values, size) in zip(by_key.values(), parts):
        for i, v in zip(rows, values):
            rewards[i], sizes[i] = float(v), size
    return _dumps({"rewards": rewards, "scores": list(rewards), "extra_logs": {"group_size": sizes}})


def _dumps(content) -> bytes:
    """JSON bytes, serialised once without FastAPI's generic encoder (per-request cost matters for
    one-rollout requests); a NaN is an error, never sent."""
    return json.dumps(content, allow_nan=False, separators=(",", ":")).encode()


def _json(content) -> Response:
    return Response(_dumps(content), media_type="application/json")


def _parse_score_request(raw: bytes, state: "_ServerState") -> ScoreRequest:
    body = parse_body(ScoreRequest, raw)
    if len(body.samples) > state.max_samples:
        raise HTTPException(413, f"{len(body.samples)} samples in one request, over the limit of {state.max_samples} "
                                 "(server --max-samples-per-request); split the request")
    return body


def _add_routes(app: FastAPI, state: _ServerState) -> None:
    @app.get("/health")
    async def health():
        return state.health()

    @app.post("/score")
    async def score(request: Request):
        body = await _read(request, _parse_score_request, state)
        budget = state.request_budget()
        try:
            samples = await state.prepare(body.samples, budget)
            return _json({"scores": await state.run_job(samples)})
        finally:
            budget.release()

    @app.post("/get_reward")
    async def get_reward_route(request: Request):  # the same as Guard's direct path (when the app is served bare)
        body = await get_reward(state, await request.body(), request.client.host if request.client else "")
        return Response(body, media_type="application/json")


def _lifespan(batchers: list[Batcher]):
    """The app's lifespan: the batchers' workers run while the server does (replicas loaded first)."""
    @contextlib.asynccontextmanager
    async def lifespan(app):
        for b in batchers:
            await b.start()
        try:
            yield
        finally:
            for b in batchers:
                await b.stop()

    return lifespan


def replica_devices(device: str | None, replicas: int) -> list[str]:
    """The device of each of `replicas` model replicas: "cuda" (or the default on a GPU machine) -> cuda:0
    ... cuda:K-1 (that many GPUs needed), "cpu" -> cpu for each, an indexed device -> only with one replica."""
    check_int("replicas", replicas)
    device = resolve_device(device)
    if replicas == 1:
        return [device]
    if device == "cpu":
        return ["cpu"] * replicas
    if device != "cuda":
        raise ValueError(f"--replicas {replicas} puts replica i on cuda:i; give --device cuda (or cpu), not {device!r}")
    have = torch.cuda.device_count()
    if have < replicas:
        raise ValueError(f"--replicas {replicas} needs {replicas} GPUs (one per replica), this machine has {have}")
    return [f"cuda:{i}" for i in range(replicas)]


def create_app(model, *, mode: str | None = None, media_root=None, token: str | None = None,
               max_batch_tokens: int | None = None, max_queue: int = DEFAULT_MAX_QUEUE,
               timeout: float = DEFAULT_TIMEOUT, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               group_size: int = 1, group_timeout: float = DEFAULT_GROUP_TIMEOUT, partial_groups: str = "error",
               max_pending: int = DEFAULT_MAX_PENDING, max_client_groups: int = DEFAULT_MAX_CLIENT_GROUPS,
               policy_tokenizer=None, prompt_format: str = "auto",
               body_timeout: float = 30.0,
               max_request_megapixels: float = DEFAULT_MAX_REQUEST_PIXELS / 1e6,
               max_samples_per_request: int = DEFAULT_MAX_SAMPLES,
               max_inflight_megapixels: float = DEFAULT_MAX_INFLIGHT_PIXELS / 1e6,
               replicas: int = 1, checkpoint=None, replica_devices_: list[str] | None = None, dtype=None):
    """The ASGI app (FastAPI under the Guard middleware) serving `model` (a RewardModel).

    group_size: the trainer's samples per prompt; /get_reward holds a prompt's responses across requests until
    that many arrived, then scores them in one pass (1, the default: a group is what one request carries). A
    group short after group_timeout seconds is an error for its requests (504 with the reason), or scored as
    it is with partial_groups="score"; more rollouts of a prompt than group_size is an error (409) from then
    on (see mrrm.grpo.GroupAssembler). A label {"group_size": 1} makes that prompt's group one rollout (a
    validation set generated with n=1), a label {"uid": ...} groups rollouts by that id instead of the
    prompt's text. Groups are kept per client address (another client's prompts never join a trainer's
    groups). max_pending: responses held at most (all clients) before a NEW group gets 429; max_client_groups:
    groups one client may hold open (then 429 for that client). policy_tokenizer: the policy's tokenizer (or a
    path), whose chat template and stop tokens are stripped from OpenRLHF's prompts and queries (the common
    templates are known without it; a templated prompt in no known format is a 422 naming it);
    prompt_format="plain": prompts are the user's message as they are. body_timeout: seconds a request's body
    may take to arrive (408 after). max_request_megapixels: decoded image / frame pixels one request may hold
    (413 after). max_inflight_megapixels: ... all requests together until their scores are out (503 + Retry-
    After after). max_samples_per_request: samples of a /score request or queries of a /get_reward one (413
    after).
    replicas: K > 1 model copies: `model` is replica 0 (it also encodes for all); replicas 1..K-1 are
    processes that load `checkpoint` (None: the built-in default) with `dtype` on `replica_devices_[i]`
    (default: replica_devices(model's device, K)). Requests and groups go to the least loaded replica;
    groups are assembled once, here, whichever replica scores them."""
    mode = _validate_options(model, mode, max_queue=max_queue, max_body_bytes=max_body_bytes,
                             max_batch_tokens=max_batch_tokens, timeout=timeout)
    check_int("group_size", group_size)
    check_int("max_pending", max_pending)
    check_int("max_client_groups", max_client_groups)
    check_choice("partial_groups", partial_groups, PARTIAL_GROUPS)
    check_choice("prompt_format", prompt_format, PROMPT_FORMATS)
    check_positive("body_timeout", body_timeout, unit="seconds")
    check_positive("max_request_megapixels", max_request_megapixels)
    check_positive("max_inflight_megapixels", max_inflight_megapixels)
    check_positive("group_timeout", group_timeout, unit="seconds")
    check_int("replicas", replicas)
    devices = replica_devices_ or replica_devices(str(model.device) if model.device.type == "cpu" else "cuda", replicas)
    if len(devices) != replicas:
        raise ValueError(f"replica_devices_ gives {len(devices)} devices for {replicas} replicas")
    root = _resolve_media_root(media_root)
    budget = max_batch_tokens or model.config.max_batch_tokens
    batchers = [Batcher(model, mode=mode, max_batch_tokens=budget, max_queue=max_queue)]
    batchers += [Batcher(model, mode=mode, max_batch_tokens=budget, max_queue=max_queue,
                         replica=ReplicaProcess(checkpoint, devices[i], dtype, mode)) for i in range(1, replicas)]
    stop_texts, frame = _policy_conventions(policy_tokenizer)
    state = _ServerState(batchers, mode=mode, root=root, max_queue=max_queue, timeout=timeout, group_size=group_size,
                         group_timeout=float(group_timeout), max_pending=max_pending, partial_groups=partial_groups,
                         stop_texts=stop_texts, frame=frame, prompt_format=prompt_format,
                         max_client_groups=max_client_groups)
    state.max_request_pixels = int(max_request_megapixels * 1e6)
    state.pool.limit = int(max_inflight_megapixels * 1e6)
    state.max_samples = check_int("max_samples_per_request", max_samples_per_request)
    app = FastAPI(title="mrrm reward server", lifespan=_lifespan(batchers))
    app.state.batcher, app.state.batchers, app.state.assemblers = batchers[0], batchers, state.assemblers
    app.state.server = state
    app.add_exception_handler(RequestValidationError, _validation_response)
    app.add_exception_handler(HTTPException, _http_error_handler(root))
    app.add_exception_handler(MemoryError, _out_of_memory)
    _add_routes(app, state)
    return Guard(app, token=token, max_body_bytes=max_body_bytes, body_timeout=body_timeout,
                 direct={"/get_reward": lambda body, client: get_reward(state, body, client)},
                 public=lambda detail: public_detail(detail, root))


_ABS_PATH = re.compile(r"(?<![\w.])/(?:[\w.@+-]+/)+[\w.@+-]*")


def public_detail(detail: str, root: Path | None) -> str:
    """An error message as clients may see it: paths under the media root made relative to it, any
    other absolute path (server directories, decoder sources) hidden."""
    if root is not None:
        detail = detail.replace(str(root) + os.sep, "")
    return _ABS_PATH.sub("<server path>", detail)


async def _out_of_memory(request, exc: MemoryError):
    """Memory ran out while this request was handled (past the media budgets: a machine already
    short of memory): 503 and a retry hint, never a 500; the server keeps serving."""
    return JSONResponse({"detail": "the server ran out of memory handling this request; retry later"},
                        status_code=503, headers={"Retry-After": "1"})


def _http_error_handler(root: Path | None):
    async def handler(request, exc: HTTPException):
        detail = _short(public_detail(exc.detail, root)) if isinstance(exc.detail, str) else exc.detail
        return JSONResponse({"detail": detail}, status_code=exc.status_code, headers=getattr(exc, "headers", None))
    return handler


def _policy_conventions(policy_tokenizer):
    """(stop texts, template frame) from the policy's tokenizer (an object or a path), or the defaults."""
    if policy_tokenizer is None:
        return DEFAULT_STOP_TEXTS, None
    if isinstance(policy_tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        policy_tokenizer = AutoTokenizer.from_pretrained(os.fspath(policy_tokenizer))
    own = [t for t in (policy_tokenizer.eos_token, policy_tokenizer.pad_token) if isinstance(t, str) and t]
    return tuple(own) + DEFAULT_STOP_TEXTS, template_frame(policy_tokenizer)


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def header_timeout_protocol(seconds: float, http: str = "auto"):
    """uvicorn's HTTP protocol class with a deadline for each request's headers: a connection that sends
    nothing, or dribbles its request line and headers, is closed after `seconds` (uvicorn itself times out
    only idle keep-alive connections, after a response). Pass as uvicorn's `http=`. http="auto": the C
    parser (httptools, in the serve extra) when it is installed, else h11; "h11" / "httptools" force one."""
    check_choice("http", http, ("auto", "h11", "httptools"))
    if http == "auto":
        try:
            import httptools  # noqa: F401 - optional speed-up (about 2x less server CPU per request)
            http = "httptools"
        except ImportError:
            http = "h11"
    if http == "httptools":
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    else:
        from uvicorn.protocols.http.h11_impl import H11Protocol as Base

    class HeaderDeadline(Base):
        _header_timer = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def _arm(self):
            self._disarm()
            self._header_timer = self.loop.call_later(seconds, self._headers_too_slow)

        def _disarm(self):
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self):
            self._header_timer = None
            if self.cycle is None or self.cycle.response_complete:  # no request has got its headers in
                if not self.transport.is_closing():
                    self.transport.close()

        def data_received(self, data):
            super().data_received(data)
            if self.cycle is not None and not self.cycle.response_complete:  # the request's headers are in
                self._disarm()

        def on_response_complete(self):
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc):
            self._disarm()
            super().connection_lost(exc)

    HeaderDeadline.__name__ = f"HeaderDeadline{Base.__name__}"
    return HeaderDeadline


_URL_TOKEN = re.compile(r"/t/[^/\s\"?#]+")


def redact(text: str) -> str:
    """`text` with the token of every `/t/<token>` URL path prefix replaced by ***."""
    return _URL_TOKEN.sub("/t/***", text)


class RedactTokens(logging.Filter):
    """A logging filter that takes the URL token out of every record (uvicorn's access log writes each
    request's path, `/t/<token>/get_reward` for the documented OpenRLHF setup)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: redact(v) if isinstance(v, str) else v for k, v in record.args.items()}
        return True


def log_config() -> dict:
    """uvicorn's logging configuration with RedactTokens on every handler."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config.setdefault("filters", {})["redact_tokens"] = {"()": RedactTokens}
    for handler in config["handlers"].values():
        handler.setdefault("filters", []).append("redact_tokens")
    return config


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mrrm serve", description=__doc__.split("\n\n")[0])
    add_model_args(p)
    add_media_budget_args(p)
    add_text_budget_args(p, line_reader=False)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--media-root", default=None, help="directory media paths must lie under (default: paths refused)")
    p.add_argument("--token", default=os.environ.get(TOKEN_ENV),
                   help=f"bearer token required on /score and /get_reward (default: ${TOKEN_ENV})")
    p.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                   help=f"requests waiting before 429 (default {DEFAULT_MAX_QUEUE})")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                   help=f"seconds per request before 504 (default {DEFAULT_TIMEOUT:g})")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                   help=f"request body size over which 413 is answered before parsing (default {DEFAULT_MAX_BODY_BYTES})")
    p.add_argument("--group-size", type=positive_int, default=1,
                   help="samples per prompt of the trainer: /get_reward holds a prompt's responses across requests "
                        "until this many arrived, then scores them in one pass (default 1: per request)")
    p.add_argument("--group-timeout", type=float, default=DEFAULT_GROUP_TIMEOUT,
                   help=f"seconds a group waits for its remaining responses (default {DEFAULT_GROUP_TIMEOUT:g}; keep it "
                        "above the spread of a prompt's generation times and below OpenRLHF's 180 s client timeout)")
    p.add_argument("--partial-groups", choices=PARTIAL_GROUPS, default="error",
                   help="a group still short after --group-timeout: 'error' (default: 504 with the reason for each "
                        "of its requests) or 'score' (scored as it is)")
    p.add_argument("--max-pending", type=positive_int, default=DEFAULT_MAX_PENDING,
                   help="responses held for their groups at most: a NEW group over it gets 429 (default %(default)s)")
    p.add_argument("--max-client-groups", type=positive_int, default=DEFAULT_MAX_CLIENT_GROUPS,
                   help="groups one client (address) may hold open at once: a NEW group over it gets 429 "
                        "(default %(default)s; a flood from one client cannot hold up another)")
    p.add_argument("--replicas", type=positive_int, default=1,
                   help="model copies behind this one server (default 1): replica i on cuda:i with --device cuda, "
                        "all on the CPU with --device cpu; groups are assembled once, here, for all of them")
    p.add_argument("--max-request-megapixels", type=float, default=DEFAULT_MAX_REQUEST_PIXELS / 1e6,
                   help="decoded image / frame pixels one request may hold, in megapixels (413 after; default "
                        f"{DEFAULT_MAX_REQUEST_PIXELS / 1e6:g})")
    p.add_argument("--max-inflight-megapixels", type=float, default=DEFAULT_MAX_INFLIGHT_PIXELS / 1e6,
                   help="decoded image / frame pixels all requests together may hold until scored, in "
                        f"megapixels (503 + Retry-After after; default {DEFAULT_MAX_INFLIGHT_PIXELS / 1e6:g})")
    p.add_argument("--max-samples-per-request", type=positive_int, default=DEFAULT_MAX_SAMPLES,
                   help=f"samples of a /score request (queries of a /get_reward one) at most (413 after; default "
                        f"{DEFAULT_MAX_SAMPLES})")
    p.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a connection may take to send a request's headers before it is closed (default 10)")
    p.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds a request body may take to arrive before 408 (slow or lying clients; default 30)")
    p.add_argument("--policy-tokenizer", default=None,
                   help="the policy's tokenizer (path): its chat template and stop tokens are stripped from "
                        "OpenRLHF's prompts and queries (default: none; the formats of mrrm.rl.queries.TEMPLATES are "
                        "known without it, and a templated prompt in another format is refused with 422)")
    p.add_argument("--prompt-format", choices=PROMPT_FORMATS, default="auto",
                   help="'auto' (default): prompts are chat-templated (known formats or --policy-tokenizer's) or "
                        "plain text without template markup; 'plain': every prompt is the user's message as it is")
    p.add_argument("--access-log", action="store_true",
                   help="log one line per request (off by default: a GRPO run sends one request per rollout, and the "
                        "line costs ~20%% of a one-rollout request's server time; URL tokens are written as /t/***)")
    p.add_argument("--http", choices=("auto", "h11", "httptools"), default="auto",
                   help="HTTP parser (default auto: httptools when installed, else h11)")
    return p


def main(argv=None) -> None:
    import uvicorn

    args = build_parser().parse_args(argv)
    try:
        media_budgets = media_budgets_from_args(args)
    except ValueError as e:
        raise SystemExit(f"python -m mrrm.serve: error: {e}") from None
    if not (1 <= args.port <= 65535):
        raise SystemExit(f"--port must be in 1..65535, got {args.port}")
    if not _is_loopback(args.host) and not args.token:
        log.warning("serving on %s without a token: anyone who can reach it can use it (set --token)", args.host)
    logging.basicConfig(level=logging.INFO)
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactTokens())
    t0 = time.perf_counter()
    try:
        devices = replica_devices(args.device, args.replicas)
        model = load_model(args.model, device=devices[0], dtype=args.dtype, mode=args.mode, verify=args.verify)
        log.info("model loaded in %.1f s", time.perf_counter() - t0)
        # this process's own model: its budgets set for good (per-sample media limits included)
        model.encoder.set_text_budgets(**text_budget_overrides(args))
        model.encoder.set_media_budgets(media_budgets)
        app = create_app(model, mode=args.mode, media_root=args.media_root, token=args.token,
                         max_batch_tokens=args.max_batch_tokens, max_queue=args.max_queue, timeout=args.timeout,
                         max_body_bytes=args.max_body_bytes, group_size=args.group_size,
                         group_timeout=args.group_timeout, partial_groups=args.partial_groups,
                         max_pending=args.max_pending, max_client_groups=args.max_client_groups,
                         policy_tokenizer=args.policy_tokenizer,
                         prompt_format=args.prompt_format, body_timeout=args.body_timeout,
                         max_request_megapixels=args.max_request_megapixels,
                         max_inflight_megapixels=args.max_inflight_megapixels,
                         max_samples_per_request=args.max_samples_per_request,
                         replicas=args.replicas, checkpoint=args.model, replica_devices_=devices, dtype=args.dtype)
    except ValueError as e:
        raise SystemExit(f"python -m mrrm.serve: error: {e}") from None
    try:
        check_positive("--header-timeout", args.header_timeout, unit="seconds")
    except ValueError as e:
        raise SystemExit(f"python -m mrrm.serve: error: {e}") from None
    # everything loaded so far (libraries, the model) lives as long as the server: the collector need not walk it
    # again on every collection (measured: a third of the server's CPU per one-rollout request went there)
    gc.collect()
    gc.freeze()
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", log_config=log_config(), access_log=args.access_log,
                http=header_timeout_protocol(args.header_timeout, args.http))


if __name__ == "__main__":
    main()
