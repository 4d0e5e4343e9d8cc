"""Reward-server throughput on the CPU (`python -m mrrm.serve`, the built-in default model): OpenRLHF's shape,
ONE rollout per /get_reward request, the server assembling each prompt's 8 into a group (--group-size 8),
against the same rollouts sent as multi-query requests (one request per prompt carrying its 8).

The server runs as its own process (as in a deployment); the client is aiohttp, OpenRLHF's HTTP library,
with one session and no connection limit, every request of a burst in flight at once, a trainer's order
(rollout j of every prompt of a wave, then rollout j + 1). A burst is WAVES waves of PROMPTS prompts x 8
rollouts. Every round uses prompts never sent before (a repeated request is answered from the server's
retry record without scoring). The two ways alternate round by round; extra_info records each one's
median rewards/s and their ratio, and the server's CPU seconds per reward.

Two response lengths: GRPO-like answers (RESPONSE_WORDS words, ~2.5 tokens each) and 3-token answers. With
real answers the model's work dominates and one-rollout requests come close to multi-query ones; with
3-token answers each request's HTTP handling (~0.4 ms of server CPU, plus the client's) is most of the cost.
"""
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time

import pytest

from .conftest import SMALL

aiohttp = pytest.importorskip("aiohttp")
httpx = pytest.importorskip("httpx")

PROMPTS, WAVES = (8, 1) if SMALL else (32, 4)
ROUNDS = 2 if SMALL else 5
GROUP = 8
TEMPLATE = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
            "<|im_start|>assistant\n")
WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight"]
RESPONSE_WORDS = 60


@pytest.fixture(scope="module")
def server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "mrrm.serve", "--port", str(port), "--group-size", str(GROUP),
                             "--timeout", "600", "--group-timeout", "120", "--max-queue", "100000"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            httpx.get(f"{base}/health", timeout=2)
            break
        except httpx.HTTPError:
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.3)
    try:
        yield base, proc.pid
    finally:
        proc.terminate()
        proc.wait(30)


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _burst(tag: str, words: int) -> list[list[tuple[str, str]]]:
    """waves x prompts, each prompt's GROUP (prompt, response) rollouts."""
    out = []
    for w in range(WAVES):
        for k in range(PROMPTS):
            p = TEMPLATE.format(f"Question {k} of wave {w} ({tag}): how many dots are in the picture?")
            out.append([(p, " ".join([f"{WORDS[j]} dots"] * max(1, words // 2))) for j in range(GROUP)])
    return out


async def _send(url: str, groups, one_per_request: bool) -> list[float]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=600)) as s:
        async def post(rows):
            body = {"query": [p + r + "<|im_end|>" for p, r in rows], "prompts": [p for p, _ in rows]}
            async with s.post(url, json=body) as resp:
                assert resp.status == 200, await resp.text()
                return (await resp.json())["rewards"]

        if one_per_request:  # a trainer's order: rollout j of every prompt of a wave, then j + 1
            order = [[g[j]] for w in range(WAVES) for j in range(GROUP) for g in groups[w * PROMPTS:(w + 1) * PROMPTS]]
        else:
            order = groups
        answers = await asyncio.gather(*(post(rows) for rows in order))
    return [r for a in answers for r in a]


@pytest.mark.parametrize("words", [RESPONSE_WORDS, 1], ids=["answers-60-words", "answers-1-word"])
def test_one_rollout_requests_vs_multi_query(benchmark, server, words):
    base, pid = server
    url = f"{base}/get_reward"
    rewards = GROUP * PROMPTS * WAVES
    asyncio.run(_send(url, _burst(f"warm-up {words}", words), False))
    times = {"multi_query": [], "one_rollout": []}
    cpu = {"multi_query": [], "one_rollout": []}
    for r in range(ROUNDS):  # alternating, so drift hits both alike
        for name in times:
            groups = _burst(f"{name} {words} {r}", words)
            c0, t0 = _cpu_seconds(pid), time.perf_counter()
            got = asyncio.run(_send(url, groups, name == "one_rollout"))
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(_cpu_seconds(pid) - c0)
            assert len(got) == rewards
    med = {k: statistics.median(v) for k, v in times.items()}
    per_s = {k: rewards / v for k, v in med.items()}
    benchmark.group = f"reward server /get_reward, group size {GROUP}, default model, CPU ({words}-word answers)"
    benchmark.extra_info.update(
        rewards_per_burst=rewards, rounds=ROUNDS, words_per_answer=words,
        rewards_per_s=per_s, ratio_one_rollout_vs_multi=per_s["one_rollout"] / per_s["multi_query"],
        server_cpu_ms_per_reward={k: 1000 * statistics.median(v) / rewards for k, v in cpu.items()},
        seconds=times)
    groups = _burst(f"timed {words}", words)
    benchmark.pedantic(lambda: asyncio.run(_send(url, groups, True)), rounds=1, iterations=1)
