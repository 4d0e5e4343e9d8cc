"""A reward server for GRPO: `python -m mrrm.serve --model PATH --host 127.0.0.1 --port 8000`.

Endpoints (FastAPI):
    POST /score       {"samples": [{"prompt", "responses", "image"?, "images"?, "video"?, "videos"?, "id"?}]}
                      -> {"scores": [[...], ...]}   (raw scores, one list per sample, input order)
    POST /get_reward  OpenRLHF's remote reward protocol: {"query": [...], "prompts": [...], "labels"?: [...]}
                      -> {"rewards": [...], "scores": [...], "extra_logs": {"group_size": [...]}}
                      query i = prompts[i] + response i; the queries that share a prompt are one
                      group, scored in one pass (grouping rules of mrrm.grpo).
    GET  /health      {"status": "ok", ...counters}  (never needs the token)

Dynamic batching: every request becomes a job on a bounded asyncio queue (--max-queue; a full
queue answers 429). One worker task drains the queue: it takes the jobs waiting at that moment
until their tokens reach --max-batch-tokens and scores them together in packed passes under that
budget (a request larger than the budget still runs, in passes of its own). All tokenizer and
model work runs on one dedicated thread, never on the event loop. A request that is not answered
within --timeout seconds gets 504 (its job is dropped if it has not started).

Safety: loopback by default; optional bearer token (--token or MRRM_SERVE_TOKEN); bodies over
--max-body-bytes get 413 before they are parsed. Media: a string is an image if it is a data URL
or a base64 string (64+ base64 characters) of an image; otherwise it is a path, which must lie
under --media-root after resolving symlinks (no "..", no absolute path outside the root, no
symlink escape). The check runs before any file is opened; without --media-root paths are refused.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import logging
import math
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from mrrm import media
from mrrm._cli import add_model_args, load_model
from mrrm.common import MODES, check_choice, check_int
from mrrm.encoding import BatchError, SampleError
from mrrm.grpo import fill_empty, group_sample, ungroup

log = logging.getLogger("mrrm.serve")

TOKEN_ENV = "MRRM_SERVE_TOKEN"
DEFAULT_MAX_QUEUE = 256
DEFAULT_TIMEOUT = 60.0
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
_BASE64 = re.compile(r"[A-Za-z0-9+/_\-]+={0,2}")
MIN_BASE64_CHARS = 64  # shorter strings are paths (no image encodes to fewer than 64 base64 characters)


# --------------------------------------------------------------------------------------------------
# Media: base64 or a path under the media root, checked before anything is opened
# --------------------------------------------------------------------------------------------------


class MediaRejected(Exception):
    """A media value the server refuses; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def safe_media_path(value: str, root: Path | None, where: str) -> Path:
    """The resolved path of `value` if it names a regular file under `root` (itself resolved).
    Refused: no root configured, '..' components, NUL bytes, absolute paths outside the root, and
    paths that leave the root through a symlink. Only the root's own tree is touched."""
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
    if not real.is_file():
        raise MediaRejected(f"{where}: not a regular file")
    return real


def load_image_field(value: str, root: Path | None, where: str):
    """A request's image string -> a decoded PIL image (data URL, base64, or a path under the root)."""
    if value[:5].lower() == "data:":
        try:
            return media.load_image(value)  # a data URL is never read as a path
        except media.MediaError as e:
            raise MediaRejected(f"{where}: {e}") from None
    compact = "".join(value.split())
    b64_error = None
    if len(compact) >= MIN_BASE64_CHARS and _BASE64.fullmatch(compact):
        try:  # through mrrm.media's data-URL decoder: strict base64, then PIL
            return media.load_image("data:image;base64," + compact)
        except media.MediaError as e:
            b64_error = str(e).replace("data URL", "base64 string")
    try:
        path = safe_media_path(value, root, where)
    except MediaRejected:
        if b64_error is not None:
            raise MediaRejected(f"{where}: invalid base64 image ({b64_error}), and not a file under the media root",
                                400) from None
        raise
    try:
        return media.load_image(path)  # a Path: never reinterpreted as base64
    except media.MediaError as e:
        raise MediaRejected(f"{where}: {e}") from None


def load_video_field(value, root: Path | None, where: str):
    """A request's video: a path under the root (checked, returned resolved) or a list of frame images."""
    if isinstance(value, list):
        if not value:
            raise MediaRejected(f"{where}: an empty frame list")
        return [load_image_field(f, root, f"{where} frame {k}") for k, f in enumerate(value)]
    return safe_media_path(value, root, where)


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


def prepare_sample(s: SampleIn, index: int, root: Path | None) -> dict:
    """A validated request sample -> an mrrm sample whose media are decoded images / checked paths."""
    if s.image is not None and s.images is not None:
        raise MediaRejected(f"sample {index}: give 'image' or 'images', not both")
    if s.video is not None and s.videos is not None:
        raise MediaRejected(f"sample {index}: give 'video' or 'videos', not both")
    out: dict[str, Any] = {"prompt": s.prompt, "responses": list(s.responses)}
    if s.id is not None:
        out["id"] = s.id
    images = [s.image] if s.image is not None else (s.images or [])
    if images:
        out["images"] = [load_image_field(v, root, f"sample {index} image {k}") for k, v in enumerate(images)]
    videos = [s.video] if s.video is not None else (s.videos or [])
    if videos:
        out["videos"] = [load_video_field(v, root, f"sample {index} video {k}") for k, v in enumerate(videos)]
    return out


# --------------------------------------------------------------------------------------------------
# Dynamic batching
# --------------------------------------------------------------------------------------------------


class QueueFull(Exception):
    pass


@dataclass
class _Job:
    samples: list[dict]
    future: asyncio.Future
    encoded: list = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(e.num_tokens for e in self.encoded)


class Batcher:
    """Bounded queue + one worker task; all model and tokenizer work on one thread.

    Counters (read by /health and the tests): requests (jobs accepted), rejected (429), rounds
    (worker drains), passes (model forward passes), samples (scored), timeouts."""

    def __init__(self, model, *, mode: str, max_batch_tokens: int, max_queue: int):
        self.model, self.mode, self.max_batch_tokens, self.max_queue = model, mode, max_batch_tokens, max_queue
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mrrm-model")
        self.counters = {"requests": 0, "rejected": 0, "rounds": 0, "passes": 0, "samples": 0, "timeouts": 0}
        self.queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self.queue = asyncio.Queue(maxsize=self.max_queue)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="mrrm-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.executor.shutdown(wait=False, cancel_futures=True)

    def submit(self, samples: list[dict]) -> asyncio.Future:
        """Queue a job; raises QueueFull when the queue holds max_queue jobs."""
        fut = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait(_Job(samples, fut))
        except asyncio.QueueFull:
            self.counters["rejected"] += 1
            raise QueueFull() from None
        self.counters["requests"] += 1
        return fut

    # -- the worker -------------------------------------------------------------------------------
    async def _encode(self, job: _Job) -> bool:
        """Encode a job's samples on the model thread; a bad job gets its error and is dropped."""
        if job.future.done():  # timed out while queued
            return False
        loop = asyncio.get_running_loop()
        try:
            job.encoded, _ = await loop.run_in_executor(self.executor, self.model.encoder.encode_all, job.samples)
        except Exception as e:  # BatchError (bad samples) or an unexpected failure
            if not job.future.done():
                job.future.set_exception(e)
            return False
        return True

    async def _run(self) -> None:
        carried: _Job | None = None
        while True:
            if carried is None:
                job = await self.queue.get()
                if not await self._encode(job):
                    continue
                carried = job
            batch, tokens, carried = [carried], carried.num_tokens, None
            while tokens < self.max_batch_tokens and not self.queue.empty():
                job = self.queue.get_nowait()
                if not await self._encode(job):
                    continue
                if tokens + job.num_tokens > self.max_batch_tokens:
                    carried = job  # starts the next round
                    break
                batch.append(job)
                tokens += job.num_tokens
            live = [j for j in batch if not j.future.done()]
            if not live:
                continue
            self.counters["rounds"] += 1
            encoded = [e for j in live for e in j.encoded]
            try:
                scores = await asyncio.get_running_loop().run_in_executor(self.executor, self._score, encoded)
            except Exception as e:
                log.exception("scoring failed")
                for j in live:
                    if not j.future.done():
                        j.future.set_exception(e)
                continue
            start = 0
            for j in live:
                part = scores[start:start + len(j.encoded)]
                start += len(j.encoded)
                if not j.future.done():
                    j.future.set_result(part)

    @torch.inference_mode()
    def _score(self, encoded: list) -> list[list[float]]:
        """Packed passes under the token budget over already encoded samples (model thread)."""
        def count(_inputs):
            self.counters["passes"] += 1

        scores = self.model.score_encoded(encoded, mode=self.mode, max_batch_tokens=self.max_batch_tokens,
                                          on_pass=count)
        self.counters["samples"] += len(encoded)
        return scores


# --------------------------------------------------------------------------------------------------
# Guard: token and body size, before the body is parsed
# --------------------------------------------------------------------------------------------------


class Guard:
    """ASGI middleware: bearer token (except on /health, where only GET is routed) and the request body size limit. The body
    is read here (at most max_body_bytes + one chunk) and replayed to the app."""

    def __init__(self, app, *, token: str | None, max_body_bytes: int):
        self.app, self.token, self.max_body_bytes = app, token, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {}
        for k, v in scope.get("headers", []):
            headers.setdefault(k.decode("latin-1").lower(), v)
        if self.token and scope.get("path") != "/health":
            auth = headers.get("authorization", b"")
            given = auth[7:].strip() if auth[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(given, self.token.encode("utf-8")):
                msg = "wrong bearer token" if given else "missing bearer token (Authorization: Bearer <token>)"
                return await JSONResponse({"detail": msg}, status_code=401,
                                          headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
        too_big = JSONResponse({"detail": f"request body larger than the limit of {self.max_body_bytes} bytes "
                                          "(server --max-body-bytes)"}, status_code=413)
        length = headers.get("content-length")
        if length is not None:
            try:
                if int(length) > self.max_body_bytes:
                    return await too_big(scope, receive, send)
            except ValueError:
                bad = JSONResponse({"detail": "bad Content-Length header"}, status_code=400)
                return await bad(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return await too_big(scope, receive, send)
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


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
    parts = []
    for e in errors:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
        parts.append(f"{loc}: {e.get('msg')}")
    return JSONResponse({"detail": "invalid request: " + "; ".join(parts)}, status_code=422)


def _validate_options(model, mode: str | None, *, max_queue: int, max_body_bytes: int, max_batch_tokens: int | None,
                      timeout: float) -> str:
    """Check create_app's arguments (ValueError on a bad one); returns the mode to serve in."""
    mode = mode or model.config.mode
    check_choice("mode", mode, MODES)
    check_int("max_queue", max_queue)
    check_int("max_body_bytes", max_body_bytes)
    check_int("max_batch_tokens", max_batch_tokens, allow_none=True)
    if isinstance(timeout, bool) or not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
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
    """What the routes share: the batcher (queue, worker, model thread), the mode, the limits and the media root."""

    def __init__(self, batcher: Batcher, *, mode: str, root: Path | None, max_queue: int, timeout: float):
        self.batcher, self.mode, self.root, self.max_queue, self.timeout = batcher, mode, root, max_queue, timeout

    async def prepare(self, samples: list[SampleIn]) -> list[dict]:
        """Request samples -> mrrm samples (media decoded / paths checked); a refused medium is an HTTP error."""
        try:  # file reads and image decoding off the event loop
            return await asyncio.to_thread(lambda: [prepare_sample(s, i, self.root) for i, s in enumerate(samples)])
        except MediaRejected as e:
            raise HTTPException(e.status, str(e)) from None

    async def run_job(self, samples: list[dict]) -> list[list[float]]:
        """Score samples through the batcher: 429 when the queue is full, 504 on timeout, 422 on bad samples."""
        try:
            fut = self.batcher.submit(samples)
        except QueueFull:
            raise HTTPException(429, f"the scoring queue is full ({self.max_queue} requests waiting); retry later",
                                headers={"Retry-After": "1"}) from None
        try:
            return await asyncio.wait_for(fut, self.timeout)
        except asyncio.TimeoutError:
            self.batcher.counters["timeouts"] += 1
            raise HTTPException(504, f"scoring did not finish within {self.timeout:g} s (server --timeout)") from None
        except (BatchError, SampleError) as e:
            raise HTTPException(422, str(e)) from None

    def health(self) -> dict:
        batcher = self.batcher
        return {"status": "ok", "mode": self.mode, "max_batch_tokens": batcher.max_batch_tokens,
                "queue": batcher.queue.qsize() if batcher.queue is not None else 0, "max_queue": self.max_queue,
                **batcher.counters}


def _group_queries(body: RewardRequest) -> list[dict]:
    """Check a /get_reward body and split each query into prompt + response; the queries that share a
    prompt form one group {"prompt", "responses", "rows" (their indices in the request)}, in first-seen order."""
    n = len(body.query)
    if len(body.prompts) != n:
        raise HTTPException(422, f"'prompts' has {len(body.prompts)} entries but 'query' has {n}")
    if body.labels is not None and len(body.labels) != n:
        raise HTTPException(422, f"'labels' has {len(body.labels)} entries but 'query' has {n}")
    groups: dict[str, dict] = {}
    for i, (q, p) in enumerate(zip(body.query, body.prompts)):
        if not p:
            raise HTTPException(422, f"prompts[{i}] is empty")
        if not q.startswith(p):
            raise HTTPException(422, f"query[{i}] does not start with prompts[{i}] (a query is prompt + response)")
        g = groups.setdefault(p, {"prompt": p, "responses": [], "rows": []})
        g["responses"].append(q[len(p):])
        g["rows"].append(i)
    return list(groups.values())


async def _get_reward(state: _ServerState, body: RewardRequest) -> dict:
    """OpenRLHF's remote reward protocol: one score per query, each group of queries scored in one pass."""
    n = len(body.query)
    plans = [(g, group_sample(g)) for g in _group_queries(body)]
    samples = [s for _, s in plans if s is not None]
    scores = iter(await state.run_job(samples) if samples else [])
    rewards, sizes = [0.0] * n, [0] * n
    for g, s in plans:
        values = fill_empty(ungroup(g["responses"], s, next(scores) if s is not None else None))
        for i, v in zip(g["rows"], values):
            rewards[i], sizes[i] = float(v), len(g["rows"])
    return {"rewards": rewards, "scores": list(rewards), "extra_logs": {"group_size": sizes}}


def _add_routes(app: FastAPI, state: _ServerState) -> None:
    @app.get("/health")
    async def health():
        return state.health()

    @app.post("/score")
    async def score(body: ScoreRequest):
        samples = await state.prepare(body.samples)
        return {"scores": await state.run_job(samples)}

    @app.post("/get_reward")
    async def get_reward(body: RewardRequest):
        return await _get_reward(state, body)


def _lifespan(batcher: Batcher):
    """The app's lifespan: the batcher's worker runs while the server does."""
    @contextlib.asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    return lifespan


def create_app(model, *, mode: str | None = None, media_root=None, token: str | None = None,
               max_batch_tokens: int | None = None, max_queue: int = DEFAULT_MAX_QUEUE,
               timeout: float = DEFAULT_TIMEOUT, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES):
    """The ASGI app (FastAPI under the Guard middleware) serving `model` (a RewardModel)."""
    mode = _validate_options(model, mode, max_queue=max_queue, max_body_bytes=max_body_bytes,
                             max_batch_tokens=max_batch_tokens, timeout=timeout)
    root = _resolve_media_root(media_root)
    batcher = Batcher(model, mode=mode, max_batch_tokens=max_batch_tokens or model.config.max_batch_tokens,
                      max_queue=max_queue)
    app = FastAPI(title="mrrm reward server", lifespan=_lifespan(batcher))
    app.state.batcher = batcher
    app.add_exception_handler(RequestValidationError, _validation_response)
    _add_routes(app, _ServerState(batcher, mode=mode, root=root, max_queue=max_queue, timeout=timeout))
    return Guard(app, token=token, max_body_bytes=max_body_bytes)


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mrrm.serve", description=__doc__.split("\n\n")[0])
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--media-root", default=None, help="directory media paths must lie under (default: paths refused)")
    p.add_argument("--token", default=os.environ.get(TOKEN_ENV),
                   help=f"bearer token required on /score and /get_reward (default: ${TOKEN_ENV})")
    p.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE, help="requests waiting before 429")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per request before 504")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES)
    return p


def main(argv=None) -> None:
    import uvicorn

    args = build_parser().parse_args(argv)
    if not (1 <= args.port <= 65535):
        raise SystemExit(f"--port must be in 1..65535, got {args.port}")
    if not _is_loopback(args.host) and not args.token:
        log.warning("serving on %s without a token: anyone who can reach it can use it (set --token)", args.host)
    logging.basicConfig(level=logging.INFO)
    t0 = time.perf_counter()
    try:
        model = load_model(args.model, device=args.device, dtype=args.dtype, mode=args.mode)
    except ValueError as e:
        raise SystemExit(f"python -m mrrm.serve: error: {e}") from None
    log.info("model loaded in %.1f s", time.perf_counter() - t0)
    app = create_app(model, mode=args.mode, media_root=args.media_root, token=args.token,
                     max_batch_tokens=args.max_batch_tokens, max_queue=args.max_queue, timeout=args.timeout,
                     max_body_bytes=args.max_body_bytes)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
