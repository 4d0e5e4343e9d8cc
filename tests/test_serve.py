"""mrrm.serve: the FastAPI reward server on a loopback port (uvicorn in a background thread).

* 200 concurrent requests from a bounded client loop: all answered, scores equal direct scoring,
  and the batcher merged them (fewer passes than requests);
* a full queue answers 429 and the server recovers; a request past --timeout answers 504;
* bad requests answer 4xx with a clear message, nothing outside the media root is opened, and the
  server keeps serving; OpenRLHF's /get_reward groups queries by prompt.
"""
from __future__ import annotations

import asyncio
import base64
import io
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn
from model_fixtures import build_family, rgb_image

import mrrm
from mrrm.grpo import canonical_order
from mrrm.serve import create_app

REPO = Path(__file__).resolve().parents[1]
TOL = dict(rel=1e-4, abs=1e-6)
TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def model():
    return build_family("qwen2_vl").model


@contextmanager
def running(app):
    """Serve `app` on a free loopback port in a background thread; yields the base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def batcher_of(app):
    return app.app.state.batcher  # create_app returns the Guard around the FastAPI app


def png_b64(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def make_samples(n):
    words = ["a red circle", "two dots", "a blue square", "the sky", "three", "nine dots", "green", "one"]
    return [{"prompt": f"Question {i % 10}: what is shown?",
             "responses": [words[(i + k) % len(words)] for k in range(2 + i % 3)], "id": i} for i in range(n)]


# --------------------------------------------------------------------------------------------------
# Throughput and batching
# --------------------------------------------------------------------------------------------------


def test_200_concurrent_requests_merged_and_exact(model):
    samples = make_samples(200)
    app = create_app(model, max_batch_tokens=4096, max_queue=256, timeout=120)
    with running(app) as url:
        async def client():
            limit = asyncio.Semaphore(48)  # a bounded client loop: at most 48 requests in flight

            async def one(c, s):
                async with limit:
                    r = await c.post(f"{url}/score", json={"samples": [s]})
                    return r.status_code, r.json()

            async with httpx.AsyncClient(timeout=120) as c:
                return await asyncio.gather(*(one(c, s) for s in samples))

        results = asyncio.run(client())
        health = httpx.get(f"{url}/health").json()
    assert [code for code, _ in results] == [200] * 200
    direct = mrrm.score(samples, model)
    for (_, body), want in zip(results, direct):
        assert body["scores"][0] == pytest.approx(want, **TOL)
    assert health["requests"] == 200 and health["samples"] == 200 and health["rejected"] == 0
    assert health["passes"] < 200 and health["rounds"] < 200, health  # requests were merged into shared passes
    assert health["passes"] >= health["rounds"] >= 1


def test_queue_full_429_then_recovers_and_timeout_504(model):
    app = create_app(model, max_queue=2, timeout=30)
    batcher = batcher_of(app)
    body = {"samples": [{"prompt": "What is shown?", "responses": ["a cat", "a dog"]}]}
    with running(app) as url:
        gate = threading.Event()
        batcher.executor.submit(gate.wait)  # hold the model thread: the worker cannot finish anything

        async def scenario():
            async with httpx.AsyncClient(timeout=60) as c:
                first = asyncio.ensure_future(c.post(f"{url}/score", json=body))
                for _ in range(500):  # until the worker has taken the first job off the queue
                    h = (await c.get(f"{url}/health")).json()
                    if h["requests"] == 1 and h["queue"] == 0:
                        break
                    await asyncio.sleep(0.01)
                queued = [asyncio.ensure_future(c.post(f"{url}/score", json=body)) for _ in range(2)]
                for _ in range(500):
                    if (await c.get(f"{url}/health")).json()["queue"] == 2:
                        break
                    await asyncio.sleep(0.01)
                over = [await c.post(f"{url}/score", json=body) for _ in range(3)]
                gate.set()
                done = [await f for f in [first] + queued]
                after = await c.post(f"{url}/score", json=body)
                return over, done, after

        over, done, after = asyncio.run(scenario())
        assert [r.status_code for r in over] == [429] * 3
        assert "queue is full" in over[0].json()["detail"] and over[0].headers["retry-after"] == "1"
        want = mrrm.score(body["samples"], model)[0]
        for r in done + [after]:
            assert r.status_code == 200
            assert r.json()["scores"][0] == pytest.approx(want, **TOL)
        assert batcher.counters["rejected"] == 3

    app = create_app(model, timeout=0.5)
    with running(app) as url:
        gate = threading.Event()
        batcher_of(app).executor.submit(gate.wait)
        r = httpx.post(f"{url}/score", json=body, timeout=30)
        assert r.status_code == 504 and "did not finish within 0.5 s" in r.json()["detail"]
        gate.set()
        r = httpx.post(f"{url}/score", json=body, timeout=30)
        assert r.status_code == 200


# --------------------------------------------------------------------------------------------------
# Media and bad requests
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def media_dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("serve")
    root, outside = base / "media", base / "outside"
    root.mkdir()
    outside.mkdir()
    rgb_image(5).save(root / "inside.png")
    rgb_image(6).save(outside / "secret.png")  # a valid image: a 200 would mean it was read
    os.symlink(outside / "secret.png", root / "link.png")
    os.symlink(outside, root / "linkdir")
    return root, outside


@pytest.fixture(scope="module")
def opened_files():
    """Every file path opened in this process while `active` (a Python audit hook)."""
    record = {"active": False, "paths": []}

    def hook(event, args):
        if record["active"] and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            record["paths"].append(os.fsdecode(args[0]))

    sys.addaudithook(hook)
    return record


def test_media_base64_and_paths_under_root(model, media_dirs):
    root, _ = media_dirs
    img = rgb_image(5)
    app = create_app(model, media_root=root, token=TOKEN)
    want = mrrm.score({"prompt": "What is shown?", "responses": ["noise", "a cat"], "image": img}, model)[0]
    with running(app) as url:
        for image in (png_b64(img), "data:image/png;base64," + png_b64(img), "inside.png", str(root / "inside.png")):
            r = httpx.post(f"{url}/score", headers=AUTH, json={"samples": [
                {"prompt": "What is shown?", "responses": ["noise", "a cat"], "image": image}]})
            assert r.status_code == 200, r.text
            assert r.json()["scores"][0] == pytest.approx(want, **TOL)


def test_bad_requests_4xx_nothing_read_outside_root(model, media_dirs, opened_files):
    root, outside = media_dirs
    app = create_app(model, media_root=root, token=TOKEN, max_body_bytes=20_000)
    ok = {"samples": [{"prompt": "What is shown?", "responses": ["a cat", "a dog"]}]}

    def with_image(value):
        return {"samples": [{"prompt": "What is shown?", "responses": ["a cat"], "image": value}]}

    bad_b64 = "iVBORw0KGgo" + "A" * 120  # base64 characters, but not an image
    cases = [
        ("malformed JSON", dict(content=b'{"samples": [', headers={**AUTH, "content-type": "application/json"}),
         400, "malformed JSON"),
        ("not an object", dict(json=[1, 2]), 422, "invalid request"),
        ("missing responses", dict(json={"samples": [{"prompt": "x"}]}), 422, "samples.0.responses: Field required"),
        ("missing samples", dict(json={}), 422, "samples: Field required"),
        ("unknown field", dict(json={"samples": [{"prompt": "x", "responses": ["y"], "imagee": "a"}]}), 422,
         "imagee"),
        ("empty response", dict(json={"samples": [{"prompt": "x", "responses": ["y", ""]}]}), 422,
         "response 1 is empty"),
        ("oversize body", dict(json={"samples": [{"prompt": "x" * 30_000, "responses": ["y"]}]}), 413,
         "larger than the limit"),
        ("bad base64", dict(json=with_image(bad_b64)), 400, "invalid base64 image"),
        ("dot-dot", dict(json=with_image("../outside/secret.png")), 403, "'..' is not allowed"),
        ("absolute outside", dict(json=with_image(str(outside / "secret.png"))), 403,
         "absolute path outside the media root"),
        ("symlink file", dict(json=with_image("link.png")), 403, "symlink"),
        ("symlink dir", dict(json=with_image("linkdir/secret.png")), 403, "symlink"),
        ("missing file", dict(json=with_image("nope.png")), 400, "file not found under the media root"),
        ("wrong token", dict(json=ok, headers={"Authorization": "Bearer nope"}), 401, "wrong bearer token"),
        ("no token", dict(json=ok, headers={}), 401, "missing bearer token"),
    ]
    with running(app) as url:
        with httpx.Client(timeout=30) as c:
            opened_files["paths"].clear()
            opened_files["active"] = True
            try:
                for name, kw, status, message in cases:
                    kw.setdefault("headers", AUTH)
                    r = c.post(f"{url}/score", **kw)
                    assert r.status_code == status, (name, r.status_code, r.text)
                    assert message in r.json()["detail"], (name, r.json())
                    assert c.post(f"{url}/score", headers=AUTH, json=ok).status_code == 200, name  # still serving
                assert not [p for p in opened_files["paths"] if str(outside) in os.path.realpath(p)]
                # the hook does see the server's file opens: a path under the root is recorded
                assert c.post(f"{url}/score", headers=AUTH, json=with_image("inside.png")).status_code == 200
                assert str(root / "inside.png") in [os.path.realpath(p) for p in opened_files["paths"]]
            finally:
                opened_files["active"] = False
            assert c.get(f"{url}/health").json()["status"] == "ok"  # /health needs no token
    no_root = create_app(model)
    with running(no_root) as url:
        r = httpx.post(f"{url}/score", json=with_image("inside.png"))
        assert r.status_code == 403 and "no --media-root" in r.json()["detail"]


# --------------------------------------------------------------------------------------------------
# OpenRLHF's /get_reward
# --------------------------------------------------------------------------------------------------


def test_get_reward_groups_queries_by_prompt(model):
    prompts = ["<|im_start|>user\nWhat is shown?<|im_end|>\n", "<|im_start|>user\nHow many dots?<|im_end|>\n"]
    responses = [["a cat", "a dog", "a cat"], ["three", "five"]]
    rows = [(p, r) for p, rs in zip(prompts, responses) for r in rs]
    order = [3, 0, 4, 1, 2]  # interleaved
    rows = [rows[i] for i in order] + [(prompts[1], "")]
    app = create_app(model)
    with running(app) as url:
        r = httpx.post(f"{url}/get_reward", json={"query": [p + s for p, s in rows], "prompts": [p for p, _ in rows],
                                                  "labels": [None] * len(rows), "stop_reason": ["stop"] * len(rows)})
        assert r.status_code == 200, r.text
        body = r.json()
        bad = httpx.post(f"{url}/get_reward", json={"query": ["abc"], "prompts": ["xyz"]})
        assert bad.status_code == 422 and "does not start with prompts[0]" in bad.json()["detail"]
        bad = httpx.post(f"{url}/get_reward", json={"query": ["abc"], "prompts": []})
        assert bad.status_code == 422 and "'prompts' has 0 entries" in bad.json()["detail"]
    want = {}
    for p, rs in zip(prompts, responses):
        distinct = canonical_order(rs)
        want[p] = dict(zip(distinct, mrrm.score({"prompt": p, "responses": distinct}, model)[0]))
    for (p, s), got in zip(rows[:-1], body["rewards"][:-1]):
        assert got == pytest.approx(want[p][s], **TOL)
    assert body["rewards"][-1] == pytest.approx(min(want[prompts[1]].values()), **TOL)  # empty response
    assert body["scores"] == body["rewards"]
    assert body["extra_logs"]["group_size"] == [3, 3, 3, 3, 3, 3]


def test_bad_server_arguments(model, tmp_path):
    with pytest.raises(ValueError, match="max_queue"):
        create_app(model, max_queue=0)
    for bad in (0, True, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="timeout"):
            create_app(model, timeout=bad)
    with pytest.raises(ValueError, match="max_batch_tokens"):
        create_app(model, max_batch_tokens=0)
    with pytest.raises(ValueError, match="mode"):
        create_app(model, mode="pairs")
    with pytest.raises(FileNotFoundError):
        create_app(model, media_root=tmp_path / "missing")


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_command_serves_default_model(tmp_path):
    """python -m mrrm.serve with the built-in model, token from the environment, on a free port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MRRM_SERVE_TOKEN": TOKEN}
    proc = subprocess.Popen([sys.executable, "-m", "mrrm.serve", "--host", "127.0.0.1", "--port", str(port),
                             "--media-root", str(tmp_path), "--max-queue", "8"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        sample = {"prompt": "What is shown?", "responses": ["a red circle", "a blue square"]}
        assert httpx.post(f"{url}/score", json={"samples": [sample]}).status_code == 401
        r = httpx.post(f"{url}/score", json={"samples": [sample]}, headers=AUTH, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["scores"][0] == pytest.approx(mrrm.score(sample)[0], **TOL)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
