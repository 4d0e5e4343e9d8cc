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
import contextlib
import io
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from model_fixtures import build_family, rgb_image
from PIL import Image
from serving import running

import mrrm
from mrrm.model import tiny
from mrrm.rl.grpo import canonical_order
from mrrm.rl.serve import create_app

REPO = Path(__file__).resolve().parents[2]
TOL = dict(rel=1e-4, abs=1e-6)
TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def model():
    return build_family("qwen2_vl").model


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
        assert bad.status_code == 422 and "query[0]: the query neither starts with its prompt" in bad.json()["detail"]
        bad = httpx.post(f"{url}/get_reward", json={"query": ["abc"], "prompts": []})
        assert bad.status_code == 422 and "'prompts' has 0 entries" in bad.json()["detail"]
    want = {}
    for p, rs in zip(prompts, responses):  # the user's message, not the policy's template, is scored
        distinct = canonical_order(rs)
        user = p.split("user\n")[1].split("<|im_end|>")[0]
        want[p] = dict(zip(distinct, mrrm.score({"prompt": user, "responses": distinct}, model)[0]))
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


@contextlib.contextmanager
def server_process(*args, env=None, preexec_fn=None):
    """`python -m mrrm.serve` with the built-in model on a free port, as a child process: yields
    (url, process) once /health answers; terminated on exit."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "mrrm.serve", "--host", "127.0.0.1", "--port", str(port), *args],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=preexec_fn)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                if httpx.get(f"{url}/health", timeout=1, headers=AUTH).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.slow
def test_command_serves_default_model(tmp_path):
    """python -m mrrm.serve with the built-in model, token from the environment, on a free port."""
    env = {**os.environ, "MRRM_SERVE_TOKEN": TOKEN}
    with server_process("--media-root", str(tmp_path), "--max-queue", "8", env=env) as (url, _):
        sample = {"prompt": "What is shown?", "responses": ["a red circle", "a blue square"]}
        assert httpx.post(f"{url}/score", json={"samples": [sample]}).status_code == 401
        r = httpx.post(f"{url}/score", json={"samples": [sample]}, headers=AUTH, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["scores"][0] == pytest.approx(mrrm.score(sample)[0], **TOL)


INFLIGHT_FLAGS: tuple = ()  # the server's defaults (set to ("--max-inflight-megapixels", "100000") to see it fail)


@pytest.mark.slow
def test_small_requests_cannot_exhaust_the_server_s_memory(tmp_path):
    """The requests that took a server past 5.5 GB, sent to `python -m mrrm.serve` held to a 12 GB
    address space (its idle size is ~4 GB): an 81-megapixel PNG of 79 KB four times, one sample with
    two 64-frame 2048x2048 mp4s (1.2 MB each), a 2,000-frame list of 1024x1024 PNGs, and 12 concurrent
    requests of ten 25-megapixel PNGs (84 KB each; 250 MP per request, 3,000 MP = 9 GB of RGB in all).
    Every answer is a 200, a 4xx naming the limit, or a 503 from the in-flight pool, never a 500, a
    MemoryError passed off as a corrupt image, or a dead server; nothing stays held after. Without the
    pool (--max-inflight-megapixels 100000) the flood runs out of memory (503s that do not name the pool)."""
    import resource
    from concurrent.futures import ThreadPoolExecutor

    av = pytest.importorskip("av")
    Image.new("L", (9000, 9000)).save(tmp_path / "huge.png", optimize=True)
    Image.new("RGB", (5000, 5000), (30, 60, 90)).save(tmp_path / "big.png", optimize=True)
    Image.new("RGB", (1024, 1024), (30, 60, 90)).save(tmp_path / "frame.png", optimize=True)
    with av.open(str(tmp_path / "v.mp4"), "w") as container:  # 32 s at 2 fps: 64 frames sampled
        stream = container.add_stream("libx264", rate=2)
        stream.width = stream.height = 2048
        stream.pix_fmt, stream.options = "yuv420p", {"preset": "ultrafast"}
        for i in range(64):
            frame = np.full((2048, 2048, 3), i * 3, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (12 << 30, 12 << 30))

    def sample(**media_fields):
        return {"prompt": "What is shown?", "responses": ["a", "b"], **media_fields}

    with server_process("--media-root", str(tmp_path), *INFLIGHT_FLAGS, preexec_fn=limit) as (url, proc):
        def post(samples):
            return httpx.post(f"{url}/score", json={"samples": samples}, timeout=600)

        huge = post([sample(images=["huge.png"] * 4)])
        assert huge.status_code == 400 and "81.0 megapixels, over the limit of 50" in huge.text
        assert post([sample(videos=["v.mp4", "v.mp4"])]).status_code == 200
        assert post([sample(video=["frame.png"] * 2000)]).status_code == 200
        with ThreadPoolExecutor(12) as pool:
            flood = list(pool.map(lambda _: post([sample(images=["big.png"] * 5)] * 2), range(12)))
        codes = sorted(r.status_code for r in flood)
        assert set(codes) <= {200, 503} and 200 in codes, [r.text[:200] for r in flood]
        assert all("--max-inflight-megapixels" in r.text for r in flood if r.status_code == 503)
        health = httpx.get(f"{url}/health").json()
        assert health["media_megapixels_held"] == 0 and proc.poll() is None


# --------------------------------------------------------------------------------------------------
# Group assembly across requests, query parsing, the token in the URL
# --------------------------------------------------------------------------------------------------
QWEN_PROMPT = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"


def _one_query_requests(url, rows, headers=None):
    """One request per (templated prompt, response + EOS), all in flight at once (OpenRLHF's shape)."""
    import asyncio

    async def go():
        async with httpx.AsyncClient(timeout=120) as c:
            return await asyncio.gather(*(c.post(url, headers=headers or {}, json={
                "query": [p + r + "<|im_end|>"], "prompts": [p], "labels": [lab]}) for p, r, lab in rows))
    return asyncio.run(go())


def test_group_assembly_scores_a_prompts_requests_together(model):
    """--group-size 4: four one-query requests per prompt (interleaved, concurrent) get the rewards of
    joint scoring of the four together, whatever their arrival order; one pass per group."""
    questions = ["What is shown?", "How many dots?"]
    answers = [["a cat", "a dog", "a red car", "a cat"], ["three", "five", "", "nine dots"]]
    rows = [(QWEN_PROMPT.format(q), a, None) for q, rs in zip(questions, answers) for a in rs]
    want = {}
    for q, rs in zip(questions, answers):
        distinct = canonical_order([r for r in rs if r])
        scores = dict(zip(distinct, mrrm.score({"prompt": q, "responses": distinct}, model)[0]))
        want[q] = {r: scores.get(r, min(scores.values())) for r in rs}  # the empty response: the group's lowest
    for order in ([0, 4, 1, 5, 2, 6, 3, 7], [7, 6, 5, 4, 3, 2, 1, 0]):
        app = create_app(model, group_size=4, group_timeout=30)
        with running(app) as url:
            got = _one_query_requests(f"{url}/get_reward", [rows[i] for i in order])
            for i, r in zip(order, got):
                assert r.status_code == 200, r.text
                body = r.json()
                q = questions[i // 4]
                assert body["rewards"] == [pytest.approx(want[q][answers[i // 4][i % 4]], **TOL)]
                assert body["extra_logs"]["group_size"] == [4]
            again = _one_query_requests(f"{url}/get_reward", [rows[order[0]]])[0]  # a client's retry: the same reward
            assert again.json() == got[0].json()
        health = app.app.state.server.health()
        assert counts(health) == {"groups": 2, "groups_timed_out": 0, "groups_failed": 0}
        assert health["pending"] == 0 and not any(a.open for a in app.app.state.assemblers.values())


def counts(health: dict, keys=("groups", "groups_timed_out", "groups_failed")):
    return {k: health[k] for k in keys}


def test_incomplete_group_is_an_error_unless_partial_groups_score(model):
    """A group still short after --group-timeout: by default every request of it gets 504 with the reason
    (never a reward from a partial group); with partial_groups="score" the group is scored as it is."""
    p = QWEN_PROMPT.format("What is shown?")
    app = create_app(model, group_size=8, group_timeout=0.5)
    with running(app) as url:
        got = _one_query_requests(f"{url}/get_reward", [(p, "a cat", None), (p, "a dog", None)])
        retry = _one_query_requests(f"{url}/get_reward", [(p, "a cat", None)])[0]  # answered at once, the same way
        health = httpx.get(f"{url}/health").json()
    assert [r.status_code for r in got + [retry]] == [504, 504, 504]
    assert "only 2 of the 8 rollouts of this prompt arrived within 0.5 s" in got[0].json()["detail"]
    assert health["groups_timed_out"] == 1 and health["groups_failed"] == 1 and health["pending"] == 0

    app = create_app(model, group_size=8, group_timeout=0.5, partial_groups="score")
    with running(app) as url:
        t0 = time.monotonic()
        got = _one_query_requests(f"{url}/get_reward", [(p, "a cat", None), (p, "a dog", None)])
        assert time.monotonic() - t0 >= 0.5
    want = mrrm.score({"prompt": "What is shown?", "responses": canonical_order(["a cat", "a dog"])}, model)[0]
    by = dict(zip(canonical_order(["a cat", "a dog"]), want))
    assert [r.json()["rewards"][0] for r in got] == [pytest.approx(by["a cat"], **TOL), pytest.approx(by["a dog"], **TOL)]
    assert app.app.state.server.health()["groups_timed_out"] == 1


def test_truncated_prompt_and_stop_tokens(model):
    """A query holding only the end of its prompt (OpenRLHF's left truncation) and EOS / pad text
    after the response is scored as the whole prompt with the bare response."""
    q = "Describe the picture in detail, please. " * 3
    p = QWEN_PROMPT.format(q)
    app = create_app(model)
    with running(app) as url:
        whole = httpx.post(f"{url}/get_reward", json={"query": [p + "a cat<|im_end|><|endoftext|>"], "prompts": [p]})
        cut = httpx.post(f"{url}/get_reward", json={"query": [p[60:] + "a cat<|im_end|>"], "prompts": [p]})
        p2 = QWEN_PROMPT.format("Another question.")
        lost = httpx.post(f"{url}/get_reward", json={"query": ["a cat<|im_end|>"], "prompts": [p2]})
    want = mrrm.score({"prompt": q.strip(), "responses": ["a cat"]}, model)[0][0]
    assert whole.json()["rewards"] == [pytest.approx(want, **TOL)]
    assert cut.json()["rewards"] == [pytest.approx(want, **TOL)]
    assert lost.status_code == 422 and "neither starts with its prompt nor with the end of it" in lost.json()["detail"]


def test_image_prompt_with_media_in_the_label(model, tmp_path):
    """A Qwen-VL prompt's expanded image pads are recognised; its image comes from the label (a path
    under --media-root); without one the request is refused with what to send."""
    img = rgb_image(7)
    img.save(tmp_path / "cat.png")
    p = QWEN_PROMPT.format("<|vision_start|><|image_pad|><|vision_end|>What is shown?")
    query = p.replace("<|image_pad|>", "<|image_pad|>" * 16) + "a cat<|im_end|>"
    app = create_app(model, media_root=tmp_path)
    with running(app) as url:
        ok = httpx.post(f"{url}/get_reward", json={"query": [query], "prompts": [p], "labels": [{"images": ["cat.png"]}]})
        as_text = httpx.post(f"{url}/get_reward", json={"query": [query], "prompts": [p],
                                                        "labels": ['{"image": "cat.png"}']})
        missing = httpx.post(f"{url}/get_reward", json={"query": [query], "prompts": [p], "labels": ["4"]})
        outside = httpx.post(f"{url}/get_reward", json={"query": [query], "prompts": [p], "labels": [{"image": "../x.png"}]})
    want = mrrm.score({"prompt": "What is shown?", "image": img, "responses": ["a cat"]}, model)[0][0]
    assert ok.status_code == 200, ok.text
    assert ok.json()["rewards"] == [pytest.approx(want, **TOL)] == as_text.json()["rewards"]
    assert missing.status_code == 422 and "holds 1 image and 0 video placeholder(s)" in missing.json()["detail"]
    assert outside.status_code == 403 and "not allowed in media paths" in outside.text


def test_token_in_the_url_and_basic_auth(model):
    app = create_app(model, token=TOKEN)
    p = "What is shown?"
    body = {"query": [p + "a cat"], "prompts": [p]}
    with running(app) as url:
        host = url.split("//")[1]
        assert httpx.post(f"{url}/t/{TOKEN}/get_reward", json=body).status_code == 200
        assert httpx.post(f"http://rl:{TOKEN}@{host}/get_reward", json=body).status_code == 200
        assert httpx.post(f"{url}/get_reward", json=body, headers=AUTH).status_code == 200
        wrong = httpx.post(f"{url}/t/nope/get_reward", json=body)
        assert wrong.status_code == 401 and wrong.json()["detail"] == "wrong token in the URL"
        assert httpx.post(f"http://rl:nope@{host}/get_reward", json=body).status_code == 401
        assert httpx.post(f"{url}/get_reward", json=body).status_code == 401


def test_lone_surrogate_is_a_4xx(model):
    app = create_app(model)
    with running(app) as url:
        for body, path in ((b'{"query": ["Hi\\ud800 a cat"], "prompts": ["Hi\\ud800"]}', "get_reward"),
                           (b'{"samples": [{"prompt": "Hi", "responses": ["a \\ud800"]}]}', "score")):
            r = httpx.post(f"{url}/{path}", content=body, headers={"Content-Type": "application/json"})
            assert r.status_code == 422, (path, r.status_code, r.text)
            assert "not valid Unicode" in r.text
        assert httpx.get(f"{url}/health").status_code == 200


@pytest.mark.slow
def test_load_2048_one_query_requests_group_size_8(model):
    """A rollout of 256 prompts x 8 samples, every request in flight at once (OpenRLHF's shape): all
    answered 200, none refused (waiting for a group is not overload), every reward present and equal
    to its group's joint score."""
    import asyncio

    prompts = [QWEN_PROMPT.format(f"Question {k}: how many dots?") for k in range(256)]
    words = ["one", "two", "three", "four", "five", "six", "seven", "eight"]
    rows = [(p, f"{words[j]} dots", None) for j in range(8) for p in prompts]  # a prompt's samples spread out
    app = create_app(model, group_size=8, group_timeout=120, timeout=300, max_batch_tokens=8192)

    async def go(url):
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(timeout=600, limits=limits) as c:
            return await asyncio.gather(*(c.post(f"{url}/get_reward", json={
                "query": [p + r + "<|im_end|>"], "prompts": [p], "labels": [None]}) for p, r, _ in rows))

    with running(app) as url:
        got = asyncio.run(go(url))
        health = httpx.get(f"{url}/health").json()
    assert [r.status_code for r in got].count(200) == len(rows), {r.status_code for r in got}
    assert health["rejected"] == 0 and health["timeouts"] == 0
    assert counts(app.app.state.server.health()) == {"groups": 256, "groups_timed_out": 0, "groups_failed": 0}
    rewards = {(p, r): resp.json()["rewards"][0] for (p, r, _), resp in zip(rows, got)}
    for k in (0, 97, 255):  # spot-check groups against direct joint scoring
        distinct = canonical_order([f"{w} dots" for w in words])
        want = mrrm.score({"prompt": f"Question {k}: how many dots?", "responses": distinct}, model)[0]
        for resp, w in zip(distinct, want):
            assert rewards[(prompts[k], resp)] == pytest.approx(w, **TOL)


@pytest.mark.slow
def test_a_huge_request_does_not_stall_the_others(model):
    """One /score request of 3,000 samples, then a one-sample request: the small one is answered long
    before the huge one (the worker goes round-robin over the active jobs, in encode chunks and token
    slices), and both get their scores; a huge request that times out stops being worked on."""
    import asyncio

    huge = {"samples": [{"prompt": f"Question {i}: what is shown?", "responses": ["a cat", "a dog"]} for i in range(3000)]}
    small = {"samples": [{"prompt": "What is shown?", "responses": ["a cat", "a dog"]}]}
    app = create_app(model, timeout=600, max_batch_tokens=2048)

    async def go(url):
        async with httpx.AsyncClient(timeout=600) as c:
            async def timed(body, delay):
                await asyncio.sleep(delay)
                r = await c.post(f"{url}/score", json=body)
                return r, time.monotonic()
            t0 = time.monotonic()
            (big, t_big), (little, t_little) = await asyncio.gather(timed(huge, 0), timed(small, 0.5))
            return big, little, t_big - t0, t_little - t0

    with running(app) as url:
        big, little, t_big, t_little = asyncio.run(go(url))
    assert big.status_code == little.status_code == 200
    assert len(big.json()["scores"]) == 3000
    # sent 0.5 s in, answered within a round or two; before, it waited for all 3,000 (t_little ~ t_big)
    assert t_little < 0.5 * t_big and t_little - 0.5 < 0.5, (t_little, t_big)
    assert little.json()["scores"] == [pytest.approx(s, **TOL) for s in mrrm.score(small["samples"], model)]

    app = create_app(model, timeout=1, max_batch_tokens=2048)
    with running(app) as url:
        r = httpx.post(f"{url}/score", json=huge, timeout=60)
        time.sleep(1.5)
        done = batcher_of(app).counters["samples"]
        time.sleep(1.0)
        assert batcher_of(app).counters["samples"] == done  # nothing more scored after the 504
    assert r.status_code == 504 and done < 3000


def test_policy_tokenizer_template_and_stop_token(model, tmp_path):
    """--policy-tokenizer PATH: a chat template mrrm does not know and a custom EOS are stripped."""
    tok = tiny.build_tokenizer()
    tok.chat_template = ("{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}### assistant:\n{% endif %}")
    tok.save_pretrained(tmp_path / "policy")
    prompt = tok.apply_chat_template([{"role": "user", "content": "Count the dots."}], tokenize=False,
                                     add_generation_prompt=True)
    app = create_app(model, policy_tokenizer=str(tmp_path / "policy"))
    with running(app) as url:
        r = httpx.post(f"{url}/get_reward", json={"query": [prompt + "three" + tok.eos_token], "prompts": [prompt]})
        health = httpx.get(f"{url}/health").json()
    want = mrrm.score({"prompt": "Count the dots.", "responses": ["three"]}, model)[0][0]
    assert r.json()["rewards"] == [pytest.approx(want, **TOL)]
    assert health["group_size"] == 1 and health["groups"] == 1 and health["pending"] == 0


def test_slow_or_lying_body_gets_408(model):
    """A client that sends less than its Content-Length (or dribbles its body) is answered 408 after
    body_timeout and the connection is closed; the server keeps serving."""
    import socket

    app = create_app(model, body_timeout=1.0)
    with running(app) as url:
        host, port = url.split("//")[1].split(":")
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"sa")
            t0 = time.monotonic()
            reply = b""
            while chunk := s.recv(4096):  # headers and body may come in separate segments; then the close
                reply += chunk
            assert b"408" in reply.split(b"\r\n")[0] and b"not received within 1 s" in reply
            assert 0.5 < time.monotonic() - t0 < 5
        assert httpx.get(f"{url}/health").status_code == 200
    with pytest.raises(ValueError, match="body_timeout"):
        create_app(model, body_timeout=0)


def test_error_details_hide_server_paths(model, tmp_path):
    """Media errors name the file relative to --media-root; other absolute paths (server directories,
    decoder sources) are hidden."""
    from mrrm.rl.serve import public_detail

    (tmp_path / "bad.png").write_bytes(b"not an image")
    rgb_image(3).save(tmp_path / "ok.png")
    app = create_app(model, media_root=tmp_path)
    with running(app) as url:
        image = httpx.post(f"{url}/score", json={"samples": [{"prompt": "p", "responses": ["a"], "image": "bad.png"}]})
        video = httpx.post(f"{url}/score", json={"samples": [{"prompt": "p", "responses": ["a"], "video": "ok.png"}]})
    assert image.status_code == 400 and "'bad.png'" in image.text
    assert video.status_code == 422 and "'ok.png'" in video.text
    for r in (image, video):
        assert str(tmp_path) not in r.text and "/src/" not in r.text
    assert public_detail("x /usr/lib/a.so: y", None) == "x <server path>: y"
    assert public_detail(f"file '{tmp_path}/sub/a.png'", tmp_path) == "file 'sub/a.png'"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["image", "video"])
def test_confinement_holds_while_the_file_is_swapped_for_a_symlink(model, tmp_path, kind):
    """A writer inside --media-root keeps swapping media/x between a regular file and a symlink to a
    file outside the root while requests name it: every request is either refused (403) or scored on
    the inside file, never on the outside one (the file is opened once and the opened file checked)."""
    import asyncio
    import shutil as sh
    import threading as th

    av = pytest.importorskip("av") if kind == "video" else None
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    ext = "png" if kind == "image" else "mp4"

    def write(path, seed):
        if kind == "image":
            rgb_image(seed).save(path)
            return
        with av.open(str(path), "w") as c:
            s = c.add_stream("libx264", rate=4)
            s.width = s.height = 32
            s.pix_fmt = "yuv420p"
            for _ in range(8):
                for p in s.encode(av.VideoFrame.from_ndarray(np.asarray(rgb_image(seed).resize((32, 32))), format="rgb24")):
                    c.mux(p)
            for p in s.encode():
                c.mux(p)

    write(root / f"inside.{ext}", 1)
    write(outside / f"secret.{ext}", 2)
    name = f"x.{ext}"
    sh.copy(root / f"inside.{ext}", root / name)
    sample = {"prompt": "What is shown?", "responses": ["a cat", "a dog"], kind: name}
    inside = mrrm.score({**sample, kind: str(root / f"inside.{ext}")}, model)[0]
    secret = mrrm.score({**sample, kind: str(outside / f"secret.{ext}")}, model)[0]
    assert inside != pytest.approx(secret, **TOL)
    stop = th.Event()

    def swap():
        while not stop.is_set():
            link = root / "tmp-link"
            with contextlib.suppress(FileNotFoundError):
                link.unlink()
            link.symlink_to(outside / f"secret.{ext}")
            os.replace(link, root / name)
            sh.copy(root / f"inside.{ext}", root / "tmp-copy")
            os.replace(root / "tmp-copy", root / name)

    app = create_app(model, media_root=root, timeout=120)

    async def go(url):
        async with httpx.AsyncClient(timeout=120) as c:
            return await asyncio.gather(*(c.post(f"{url}/score", json={"samples": [sample]}) for _ in range(150)))

    writer = th.Thread(target=swap, daemon=True)
    with running(app) as url:
        writer.start()
        try:
            got = asyncio.run(go(url))
        finally:
            stop.set()
            writer.join(timeout=10)
    statuses = [r.status_code for r in got]
    assert set(statuses) <= {200, 400, 403, 422}, set(statuses)
    scored = [r.json()["scores"][0] for r in got if r.status_code == 200]
    assert scored, statuses
    for s in scored:
        assert s == pytest.approx(inside, **TOL)  # never the outside file's scores


def test_frame_list_is_thinned_before_decoding(model, monkeypatch):
    """A video given as 300 frames: the server decodes only the frames the model keeps, and the
    scores equal scoring the whole list directly."""
    from mrrm.data import media

    frames = [rgb_image(k % 7).resize((16, 16)) for k in range(300)]
    sample = {"prompt": "What happens?", "responses": ["it moves", "nothing"]}
    want = mrrm.score({**sample, "video": frames}, model)[0]
    decoded = []
    real = media.load_image
    monkeypatch.setattr(media, "load_image", lambda src, **kw: decoded.append(1) or real(src, **kw))
    app = create_app(model)
    with running(app) as url:
        r = httpx.post(f"{url}/score", json={"samples": [{**sample, "video": [png_b64(f) for f in frames]}]}, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["scores"][0] == [pytest.approx(s, **TOL) for s in want]
    assert 0 < len(decoded) <= model.encoder.video_max_frames < 300


def test_too_many_images_per_sample_refused_before_decoding(model, monkeypatch):
    from mrrm.data import media
    from mrrm.data.encoding import SampleError

    b64 = png_b64(rgb_image(1).resize((8, 8)))
    decoded = []
    real = media.load_image
    monkeypatch.setattr(media, "load_image", lambda src, **kw: decoded.append(1) or real(src, **kw))
    too_many = {"prompt": "p", "responses": ["a"],
                "images": [b64] * (media.DEFAULT_MEDIA_BUDGETS.images_per_sample + 1)}
    with pytest.raises(SampleError, match="33 images, over the limit of 32 per sample"):
        model.encoder.encode(too_many, 0)
    app = create_app(model)
    with running(app) as url:
        r = httpx.post(f"{url}/score", json={"samples": [too_many]})
    assert r.status_code == 422 and "over the limit of 32 per sample" in r.text
    assert decoded == []


def test_per_sample_media_limits_are_the_model_encoder_s(model, monkeypatch):
    """The server's per-sample limits (--max-images-per-sample, --max-image-megapixels, ...) are the MediaBudgets
    of the model's encoder, inside the request's budget inside the in-flight pool: a /score sample and a
    /get_reward label are refused by them before anything is decoded."""
    from mrrm.data import media

    b64 = png_b64(rgb_image(1).resize((8, 8)))
    two = {"prompt": "p", "responses": ["a"], "images": [b64] * 2}
    app = create_app(model)
    monkeypatch.setattr(model.encoder, "media_budgets", media.MediaBudgets(images_per_sample=1, image_pixels=63))
    p = "<|im_start|>user\nDescribe it.<|im_end|>\n<|im_start|>assistant\n"
    with running(app) as url:
        many = httpx.post(f"{url}/score", json={"samples": [two]})
        big = httpx.post(f"{url}/score", json={"samples": [{**two, "images": [b64]}]})
        label = httpx.post(f"{url}/get_reward", json={"query": [p + "a cat"], "prompts": [p],
                                                      "labels": [{"images": [b64] * 2}]})
    assert many.status_code == 422 and "2 images, over the limit of 1 per sample (--max-images-per-sample" in many.text
    assert big.status_code == 400 and "over the limit of 6.3e-05 megapixels (--max-image-megapixels" in big.text
    assert label.status_code == 422 and "labels[0]: 2 images, over the limit of 1 per sample" in label.text


def test_request_pixel_budget(model):
    """The decoded pixels one request may hold: over --max-request-megapixels -> 413, the server fine."""
    b64 = png_b64(rgb_image(1).resize((100, 100)))  # 0.01 MP each
    app = create_app(model, max_request_megapixels=0.05)
    with running(app) as url:
        ok = httpx.post(f"{url}/score", json={"samples": [{"prompt": "p", "responses": ["a"], "images": [b64] * 4}]})
        over = httpx.post(f"{url}/score", json={"samples": [{"prompt": "p", "responses": ["a"], "images": [b64] * 3}] * 2})
    assert ok.status_code == 200, ok.text
    assert over.status_code == 413 and "request's media (--max-request-megapixels) over its limit of 0.05" in over.text


def test_inflight_pixel_pool(model):
    """All requests' decoded media together: over --max-inflight-megapixels -> 503 with Retry-After
    (temporary, unlike the request's own 413); what a request held is given back once it is answered,
    refused or failed, so the pool never leaks."""
    b64 = png_b64(rgb_image(1).resize((100, 100)))  # 0.01 MP each
    app = create_app(model, max_request_megapixels=1, max_inflight_megapixels=0.03)
    sample = {"prompt": "p", "responses": ["a"], "images": [b64] * 2}
    with running(app) as url:
        ok = httpx.post(f"{url}/score", json={"samples": [sample]})
        busy = httpx.post(f"{url}/score", json={"samples": [sample, sample]})
        bad = httpx.post(f"{url}/score", json={"samples": [sample, {**sample, "images": [b64, "nope.png"]}]})
        again = httpx.post(f"{url}/score", json={"samples": [sample]})
        health = httpx.get(f"{url}/health").json()
    assert ok.status_code == 200 and again.status_code == 200, (ok.text, again.text)
    assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
    assert "sample 1 image 1" in busy.text and "in-flight media (--max-inflight-megapixels)" in busy.text
    assert bad.status_code in (400, 403)
    assert health["media_megapixels_held"] == 0


def test_samples_per_request_limit(model):
    app = create_app(model, max_samples_per_request=3)
    s = {"prompt": "p", "responses": ["a"]}
    with running(app) as url:
        assert httpx.post(f"{url}/score", json={"samples": [s] * 3}).status_code == 200
        over = httpx.post(f"{url}/score", json={"samples": [s] * 4})
        q = httpx.post(f"{url}/get_reward", json={"query": ["pa"] * 4, "prompts": ["p"] * 4})
    assert over.status_code == 413 and "4 samples in one request, over the limit of 3" in over.text
    assert q.status_code == 413 and "4 queries" in q.text


def test_slow_headers_are_cut_off(model):
    """A connection that sends nothing, or dribbles its headers, is closed after --header-timeout; a
    normal request on the same server is answered, and keep-alive requests keep working."""
    import socket

    from mrrm.rl.serve import header_timeout_protocol

    app = create_app(model)
    with running(app, http=header_timeout_protocol(1.0)) as url:
        host, port = url.split("//")[1].split(":")
        with socket.create_connection((host, int(port)), timeout=10) as idle, \
                socket.create_connection((host, int(port)), timeout=10) as dribble:
            t0 = time.monotonic()
            dribble.sendall(b"POST /score HTTP/1.1\r\n")
            for _ in range(3):
                time.sleep(0.4)
                with contextlib.suppress(OSError):
                    dribble.sendall(b"X-Slow: 1\r\n")
            assert idle.recv(100) == b""  # closed by the server
            assert dribble.recv(100) == b""
            assert 0.8 < time.monotonic() - t0 < 5
        with httpx.Client() as c:  # one keep-alive connection, two requests
            assert c.get(f"{url}/health").status_code == 200
            time.sleep(0.3)
            assert c.get(f"{url}/health").status_code == 200


# --------------------------------------------------------------------------------------------------
# Deployments that depart from the README's (issue 27): joint rewards or an error naming the fix
# --------------------------------------------------------------------------------------------------


def joint(model, question, answers, **media):
    """Each answer's reward from joint scoring of the distinct answers in canonical order."""
    distinct = canonical_order([a for a in answers if a])
    scores = dict(zip(distinct, mrrm.score({"prompt": question, "responses": distinct, **media}, model)[0]))
    return [scores.get(a) for a in answers]


def test_more_rollouts_than_the_group_size_is_a_sticky_409_naming_both_numbers(model):
    """The trainer sends 3 rollouts of a prompt, the server expects 2: the extra one is refused with both
    numbers, and from then on every request is (the setting is wrong for every prompt); a retry of a
    rollout already scored is not an extra one."""
    p, q = QWEN_PROMPT.format("What is shown?"), QWEN_PROMPT.format("How many dots?")
    app = create_app(model, group_size=2, group_timeout=30)
    with running(app) as url:
        first = _one_query_requests(f"{url}/get_reward", [(p, "a cat", None), (p, "a dog", None)])
        retry = _one_query_requests(f"{url}/get_reward", [(p, "a dog", None)])[0]
        extra = _one_query_requests(f"{url}/get_reward", [(p, "a cow", None)])[0]
        later = _one_query_requests(f"{url}/get_reward", [(q, "three", None), (q, "four", None)])
        health = httpx.get(f"{url}/health").json()
    assert [r.status_code for r in first] == [200, 200] and retry.json() == first[1].json()
    assert extra.status_code == 409 and [r.status_code for r in later] == [409, 409]
    detail = extra.json()["detail"]
    assert "2 expected, 3 within" in detail and "--group-size" in detail and "n_samples_per_prompt" in detail
    assert later[0].json()["detail"] == detail and health["misconfigured"] == {"127.0.0.1": detail}
    assert health["groups_overfull"] == 1


def test_without_group_size_one_rollout_requests_of_a_prompt_are_refused(model):
    """A server started without --group-size scores what one request carries. OpenRLHF's one rollout per
    request would then be scored one by one (a classic reward model's numbers): the second rollout of a
    prompt is refused instead, naming --group-size."""
    p = QWEN_PROMPT.format("What is shown?")
    app = create_app(model)
    with running(app) as url:
        one = httpx.post(f"{url}/get_reward", json={"query": [p + "a cat<|im_end|>"], "prompts": [p]})
        two = httpx.post(f"{url}/get_reward", json={"query": [p + "a dog<|im_end|>"], "prompts": [p]})
    assert one.status_code == 200 and two.status_code == 409
    assert "--group-size (unset: the queries of one request)" in two.json()["detail"]


def test_a_bad_rollout_costs_one_reward(model):
    """A lone UTF-16 surrogate in one of four rollouts: 422 for that request only (again on OpenRLHF's
    retries, at once), and the other three get the joint rewards of the three."""
    p = QWEN_PROMPT.format("What is shown?")
    app = create_app(model, group_size=4, group_timeout=30)
    good = ["a cat", "a dog", "a red car"]

    async def go(url):
        async with httpx.AsyncClient(timeout=60) as c:
            def post(text):
                body = '{"query": ["%s%s<|im_end|>"], "prompts": ["%s"]}' % (
                    json_text(p), text, json_text(p))
                return c.post(f"{url}/get_reward", content=body.encode(), headers={"Content-Type": "application/json"})
            got = await asyncio.gather(*(post(t) for t in good + ["bad \\ud800 text"]))
            retry = await post("bad \\ud800 text")
            return got, retry

    with running(app) as url:
        got, retry = asyncio.run(go(url))
        health = httpx.get(f"{url}/health").json()
    assert [r.status_code for r in got] == [200, 200, 200, 422]
    assert "not valid Unicode text" in got[3].json()["detail"] and retry.status_code == 422
    want = joint(model, "What is shown?", good)
    assert [r.json()["rewards"][0] for r in got[:3]] == [pytest.approx(w, **TOL) for w in want]
    assert {r.json()["extra_logs"]["group_size"][0] for r in got[:3]} == {3}
    assert health["rollouts_rejected"] == 1 and health["groups_failed"] == 0


def json_text(s: str) -> str:
    import json

    return json.dumps(s)[1:-1]


def test_validation_rows_with_group_size_1_in_the_label_do_not_wait(model):
    """A validation set generated with n=1: its label {"group_size": 1} makes each prompt a group of one,
    answered at once although the server's --group-size is 8."""
    p = QWEN_PROMPT.format("What is shown?")
    app = create_app(model, group_size=8, group_timeout=30)
    with running(app) as url:
        t0 = time.monotonic()
        r = httpx.post(f"{url}/get_reward", json={"query": [p + "a cat<|im_end|>"], "prompts": [p],
                                                  "labels": ['{"group_size": 1}']}, timeout=60)
        took = time.monotonic() - t0
    assert r.status_code == 200 and took < 10
    assert r.json()["rewards"] == [pytest.approx(joint(model, "What is shown?", ["a cat"])[0], **TOL)]


def test_max_pending_refuses_new_groups_and_never_splits_one(model):
    """--max-pending below the group size is refused at start; at the limit a NEW group gets 429 while
    the rollouts of groups already open are always taken (a group is never split)."""
    with pytest.raises(ValueError, match="max_pending .4. must be at least the group size .8."):
        create_app(model, group_size=8, max_pending=4)
    a, b, c = (QWEN_PROMPT.format(f"Question {k}?") for k in "abc")
    app = create_app(model, group_size=3, group_timeout=30, max_pending=3)

    async def go(url):
        async with httpx.AsyncClient(timeout=60) as cl:
            def post(p, r):
                return cl.post(f"{url}/get_reward", json={"query": [p + r + "<|im_end|>"], "prompts": [p]})
            first = [asyncio.ensure_future(post(a, r)) for r in ("one", "two")]
            await asyncio.sleep(0.5)
            second = [asyncio.ensure_future(post(b, "one"))]  # 3 held: group b is the last that fits
            await asyncio.sleep(0.5)
            refused = await post(c, "one")  # a new group over the limit
            rest = [asyncio.ensure_future(post(b, r)) for r in ("two", "three")] + [asyncio.ensure_future(post(a, "three"))]
            return refused, await asyncio.gather(*first, *second, *rest)

    with running(app) as url:
        refused, answered = asyncio.run(go(url))
    assert refused.status_code == 429 and "max_pending 3" in refused.json()["detail"]
    assert [r.status_code for r in answered] == [200] * 6
    assert {r.json()["extra_logs"]["group_size"][0] for r in answered} == {3}


@pytest.mark.parametrize("prompt,user", [
    ("A chat between a curious user and an artificial intelligence assistant. USER: What is 2+2? ASSISTANT:",
     "What is 2+2?"),                                                                                    # Vicuna
    ("<|user|>\nWhat is 2+2?<|end|>\n<|assistant|>\n", "What is 2+2?"),                                  # Phi-3
    ("<|im_start|>user<|im_sep|>What is 2+2?<|im_end|><|im_start|>assistant<|im_sep|>", "What is 2+2?"),  # Phi-4
])
def test_other_policy_templates_are_taken_apart(model, prompt, user):
    app = create_app(model)
    with running(app) as url:
        r = httpx.post(f"{url}/get_reward", json={"query": [prompt + " 4</s>"], "prompts": [prompt]})
    assert r.status_code == 200, r.text
    assert r.json()["rewards"] == [pytest.approx(joint(model, user, [" 4"])[0], **TOL)]


def test_an_unknown_template_or_unmatched_placeholder_is_a_422_naming_the_fix(model):
    """A templated prompt in no known format is never scored as if it were the question; a Llama 3.2
    Vision <|image|> placeholder with a plain-string label is never scored text-only."""
    odd = "<|sys|>Be brief.<|human|>What is 2+2?<|bot|>"
    llama = ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>What is shown?<|eot_id|>"
             "<|start_header_id|>assistant<|end_header_id|>\n\n")
    app = create_app(model)
    plain = create_app(model, prompt_format="plain")
    with running(app) as url:
        unknown = httpx.post(f"{url}/get_reward", json={"query": [odd + "4"], "prompts": [odd]})
        image = httpx.post(f"{url}/get_reward", json={"query": [llama + "a cat<|eot_id|>"], "prompts": [llama],
                                                      "labels": ["a cat"]})
    with running(plain) as url:
        as_is = httpx.post(f"{url}/get_reward", json={"query": [odd + "4"], "prompts": [odd]})
    assert unknown.status_code == 422 and "--policy-tokenizer" in unknown.json()["detail"]
    assert image.status_code == 422 and "holds 1 image and 0 video placeholder(s)" in image.json()["detail"]
    assert as_is.status_code == 200
    assert as_is.json()["rewards"] == [pytest.approx(joint(model, odd, ["4"])[0], **TOL)]


@pytest.mark.slow
def test_a_10_mb_body_does_not_hold_up_a_small_request(model):
    """A 10 MB /get_reward body (its response too long for any max_length) sent first, a one-rollout
    request 0.2 s later: the small one is answered within a second, the big one refused (422) without being
    tokenized."""
    p = QWEN_PROMPT.format("What is shown?")
    big = {"query": [p + "word " * 2_000_000], "prompts": [p]}
    small = {"query": [QWEN_PROMPT.format("How many?") + "three<|im_end|>"], "prompts": [QWEN_PROMPT.format("How many?")]}
    app = create_app(model, max_body_bytes=64 * 1024 * 1024)

    async def go(url):
        async with httpx.AsyncClient(timeout=120) as c:
            async def timed(body, delay):
                await asyncio.sleep(delay)
                t0 = time.monotonic()
                r = await c.post(f"{url}/get_reward", json=body)
                return r, time.monotonic() - t0
            return await asyncio.gather(timed(big, 0), timed(small, 0.2))

    with running(app) as url:
        httpx.post(f"{url}/score", json={"samples": [{"prompt": "warm", "responses": ["up"]}]})
        (r_big, t_big), (r_small, t_small) = asyncio.run(go(url))
    assert r_small.status_code == 200 and t_small < 1.0, t_small
    assert r_big.status_code == 422 and "over the text budget" in r_big.json()["detail"]


@pytest.mark.slow
def test_replicas_behind_one_front_server(model, tmp_path):
    """--replicas 2: a second model copy in its own process; requests and groups spread over both, groups
    assembled once at the front, rewards equal joint scoring."""
    model.save_pretrained(tmp_path / "rm")
    front = mrrm.load(str(tmp_path / "rm"))
    app = create_app(front, group_size=2, group_timeout=60, replicas=2, checkpoint=str(tmp_path / "rm"),
                     replica_devices_=["cpu", "cpu"])
    prompts = [f"Question {k}: what is shown?" for k in range(12)]
    rows = [(QWEN_PROMPT.format(q), a, None) for q in prompts for a in ("a cat", "a dog")]
    with running(app) as url:
        got = _one_query_requests(f"{url}/get_reward", rows)
        health = httpx.get(f"{url}/health").json()
    assert [r.status_code for r in got] == [200] * len(rows)
    assert health["replicas"] == 2 and all(b.counters["samples"] > 0 for b in app.app.state.batchers)
    for k in (0, 5, 11):
        want = joint(front, prompts[k], ["a cat", "a dog"])
        assert [got[2 * k + j].json()["rewards"][0] for j in (0, 1)] == [pytest.approx(w, **TOL) for w in want]


# --------------------------------------------------------------------------------------------------
# Hostile input, round 3 (issue 29): the server's rows
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_text_too_long_for_any_max_length_is_refused_before_tokenizing(model):
    """An 8 MB response (/score) and forty 10 MB rollouts waiting for their groups (/get_reward) are refused
    at once, per sample / per rollout, without tokenizing or holding them; the server keeps serving."""
    limit = model.encoder.max_text_chars
    assert limit is not None and limit < 8_000_000
    app = create_app(model, group_size=4, group_timeout=60, max_body_bytes=64 * 1024 * 1024)
    with running(app) as url:
        t0 = time.monotonic()
        r = httpx.post(f"{url}/score", json={"samples": [{"prompt": "Hi", "responses": ["x" * 8_000_000, "ok"]}]},
                       timeout=120)
        took = time.monotonic() - t0
        assert r.status_code == 422 and "over the text budget" in r.json()["detail"] and took < 10, (r.text[:300], took)
        prompts = [QWEN_PROMPT.format(f"Question {k}?") for k in range(40)]

        async def flood():
            async with httpx.AsyncClient(timeout=120) as c:
                return await asyncio.gather(*(c.post(f"{url}/get_reward", json={
                    "query": [p + "y" * 10_000_000], "prompts": [p]}) for p in prompts))
        got = asyncio.run(flood())
        health = httpx.get(f"{url}/health").json()
    assert {g.status_code for g in got} == {422} and "over the text budget" in got[0].json()["detail"]
    assert health["pending"] == 0 and health["rollouts_rejected"] == 40


@pytest.mark.slow
def test_a_million_unknown_keys_are_refused_fast_with_a_short_answer(model):
    """Three 11 MB bodies of 1e6 unknown keys at once: each a 422 of a few hundred bytes, and /health keeps
    answering meanwhile (validation is bounded and off the event loop)."""
    import json as _json

    body = _json.dumps({"samples": [{"prompt": "Hi", "responses": ["a"], **{f"k{i}": 0 for i in range(1_000_000)}}]})
    app = create_app(model, max_body_bytes=64 * 1024 * 1024)

    async def go(url):
        async with httpx.AsyncClient(timeout=120) as c:
            async def probe():
                worst = 0.0
                for _ in range(20):
                    t0 = time.monotonic()
                    assert (await c.get(f"{url}/health")).status_code == 200
                    worst = max(worst, time.monotonic() - t0)
                    await asyncio.sleep(0.05)
                return worst
            posts = [c.post(f"{url}/score", content=body, headers={"Content-Type": "application/json"}) for _ in range(3)]
            return await asyncio.gather(probe(), *posts)

    with running(app) as url:
        worst, *answers = asyncio.run(go(url))
    for a in answers:
        assert a.status_code == 422 and "an object with 1000002 keys (at most 256)" in a.json()["detail"]
        assert len(a.content) < 500
    assert worst < 1.0, worst


def test_validation_errors_are_listed_at_most_ten(model):
    app = create_app(model)
    with running(app) as url:
        r = httpx.post(f"{url}/score", json={"samples": [{"prompt": 1, "responses": [2]} for _ in range(50)]})
    assert r.status_code == 422 and "and 90 more" in r.json()["detail"] and len(r.content) < 2500


@pytest.mark.slow
def test_the_url_token_never_reaches_the_log():
    """OpenRLHF's documented setup puts the token in the URL (/t/<token>/get_reward): uvicorn's access log
    writes request paths, and the server's log shows /t/*** instead."""
    env = {**os.environ, "MRRM_SERVE_TOKEN": TOKEN}
    with server_process("--access-log", env=env) as (url, proc):
        p = QWEN_PROMPT.format("What is shown?")
        r = httpx.post(f"{url}/t/{TOKEN}/get_reward", json={"query": [p + "a cat<|im_end|>"], "prompts": [p]}, timeout=60)
        assert r.status_code == 200, r.text
        httpx.post(f"{url}/t/wrong-{TOKEN}/get_reward", json={})
        proc.terminate()
        log = proc.stdout.read().decode()
    assert "POST /t/***/get_reward" in log and TOKEN not in log


def _from(address: str):
    """An async client whose requests come from another loopback address (another client machine)."""
    return httpx.AsyncClient(timeout=120, transport=httpx.AsyncHTTPTransport(local_address=address))


def test_groups_are_per_client_and_a_flood_cannot_hold_up_a_trainer(model):
    """Another client (another address) sending the same prompt never takes a slot of the trainer's group;
    a client flooding distinct one-rollout prompts gets 429 past --max-client-groups while the trainer's
    groups are scored at once; a misconfigured client is refused alone."""
    p = QWEN_PROMPT.format("What is shown?")
    app = create_app(model, group_size=2, group_timeout=3, max_client_groups=5)

    async def go(url):
        async with _from("127.0.0.1") as trainer, _from("127.0.0.2") as other:
            def post(c, prompt, r):
                return c.post(f"{url}/get_reward", json={"query": [prompt + r + "<|im_end|>"], "prompts": [prompt]})
            stray = asyncio.ensure_future(post(other, p, "a cow"))  # the same prompt, another client
            flood = [asyncio.ensure_future(post(other, QWEN_PROMPT.format("Spam 0"), "x"))]
            await asyncio.sleep(0.5)  # "Spam 0" is held first: one of the 5 groups the flood is allowed
            flood += [asyncio.ensure_future(post(other, QWEN_PROMPT.format(f"Spam {k}"), "x")) for k in range(1, 20)]
            await asyncio.sleep(0.3)
            t0 = time.monotonic()
            mine = await asyncio.gather(post(trainer, p, "a cat"), post(trainer, p, "a dog"))
            took = time.monotonic() - t0
            assert (await post(other, QWEN_PROMPT.format("Spam 0"), "y")).status_code == 200  # completes its group
            extra = await post(other, QWEN_PROMPT.format("Spam 0"), "z")  # ... and then overflows it
            stray.cancel()
            for f in flood:
                f.cancel()
            return mine, took, [f.result() for f in flood if f.done() and not f.cancelled()], extra

    with running(app) as url:
        mine, took, flood, extra = asyncio.run(go(url))
        after = httpx.post(f"{url}/get_reward", json={"query": [p + "a cat<|im_end|>", p + "a dog<|im_end|>"],
                                                      "prompts": [p, p], "labels": [{"uid": "step2-row0"}] * 2})
        health = httpx.get(f"{url}/health").json()
    want = joint(model, "What is shown?", ["a cat", "a dog"])
    assert [r.json()["rewards"][0] for r in mine] == [pytest.approx(w, **TOL) for w in want] and took < 10
    assert sum(r.status_code == 429 for r in flood) >= 15 and "max_groups 5" in next(
        r for r in flood if r.status_code == 429).json()["detail"]
    assert extra.status_code == 409 and list(health["misconfigured"]) == ["127.0.0.2"]
    assert after.status_code == 200 and after.json()["rewards"] == [pytest.approx(w, **TOL) for w in want]
