"""CPU threads of a training run: how many (`--threads`, 0 = auto) and how they wait.

torch runs its CPU kernels on an OpenMP team, by default one thread per core, and GNU OpenMP's
threads spin while they wait for each other at the end of every parallel region. Alone on the
machine that is the fastest; next to other CPU-bound processes it is the worst case: a team thread
that the scheduler took off its core holds the whole team, and the others burn their share spinning.
On the shared 2-core machine, next to three `while True: pass` neighbours, torch's default team took
16 s per demo step (6.2 CPU-seconds, 31x its step without them, for 2.5x less CPU) where this policy
took 0.64 s (3.6x for 2.8x less CPU) (bench_perf/test_contention_cpu.py, bench_perf/RESULTS.md). The
policy here:

- waiting: OMP_WAIT_POLICY=PASSIVE, so a waiting thread sleeps and gives its core back. GNU OpenMP
  reads it once, when torch loads, so the entry points (`python -m mrrm.train`, `mrrm train`) call
  `prefer_passive_waiting()` before importing torch; a value already in the environment is kept. A
  process that loaded torch first (train() called from Python) keeps torch's spinning threads, and
  the run's threads line says so.
- count (`--threads 0`): OMP_NUM_THREADS when set; otherwise the CPUs this process may use (its CPU
  affinity, capped by a cgroup CPU quota). `--threads N` pins N. The count is a property of the machine,
  never of its load: the thread count changes a run's floating-point results (the demo's losses part from
  step 15 between 1 and 2 threads, and its 6,000 steps end at another held-out accuracy), and the same
  command on the same machine must give the same bits whatever else runs there. The CPUs other processes
  keep busy at the start (/proc/stat over 0.2 s) are only reported, in the run's threads line.

The count is recorded in the run's config.yaml: a rerun from it uses the same count on any machine.
"""
from __future__ import annotations

import math
import os
import sys
import time

WAIT_ENV = "OMP_WAIT_POLICY"
PROBE_S = 0.2


def prefer_passive_waiting() -> None:
    """OMP_WAIT_POLICY=PASSIVE unless the environment already sets it; effective only before torch loads."""
    if "torch" not in sys.modules:
        os.environ.setdefault(WAIT_ENV, "PASSIVE")


def cpus_available() -> int:
    """The CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota (a container's
    --cpus), at least 1."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        n = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    return max(1, n)


def _cgroup_quota() -> float | None:
    """CPUs of the cgroup's CFS quota (v2 cpu.max, v1 cpu.cfs_quota_us), None without one."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as fh:
            quota, period = fh.read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as fq, open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as fp:
            quota, period = int(fq.read()), int(fp.read())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def _cpu_jiffies(cpus) -> tuple[int, int] | None:
    """(busy, total) clock ticks of the given CPUs since boot, from /proc/stat; None where there is none."""
    busy = total = 0
    try:
        with open("/proc/stat") as fh:
            for line in fh:
                name, *fields = line.split()
                if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
                    continue
                ticks = [int(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
                total += sum(ticks)
                busy += sum(ticks) - ticks[3] - ticks[4]
    except (OSError, ValueError):
        return None
    return (busy, total) if total else None


def busy_elsewhere(seconds: float = PROBE_S) -> float | None:
    """How many of this process's CPUs other processes kept busy over `seconds` (this process's own CPU
    time in the window taken out); None where /proc/stat cannot tell (not Linux)."""
    try:
        cpus = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        return None
    first, own0, t0 = _cpu_jiffies(cpus), time.process_time(), time.perf_counter()
    if first is None:
        return None
    time.sleep(seconds)
    second, own1, t1 = _cpu_jiffies(cpus), time.process_time(), time.perf_counter()
    if second is None or second[1] == first[1]:
        return None
    share = (second[0] - first[0]) / (second[1] - first[1])  # busy fraction of the CPUs' ticks
    return max(0.0, share * len(cpus) - (own1 - own0) / (t1 - t0))


def choose(requested: int) -> tuple[int, str]:
    """(threads, why) for --threads `requested` (0 = auto; see the module docstring)."""
    if requested > 0:
        return requested, "--threads"
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env), "OMP_NUM_THREADS"
    return cpus_available(), "the CPUs this process may use"


def waits_passively() -> bool:
    """Whether torch's OpenMP threads were told to sleep while waiting (OMP_WAIT_POLICY=PASSIVE when torch
    loaded: it is read then, so the environment now is what it saw unless changed since)."""
    return os.environ.get(WAIT_ENV, "").strip().lower() == "passive"


def apply(requested: int) -> tuple[int, str]:
    """Choose the count and set it (torch.set_num_threads); returns (threads, the line that says so)."""
    import torch  # not at the top: prefer_passive_waiting() must be importable before torch loads

    n, why = choose(requested)
    torch.set_num_threads(n)
    wait = "OpenMP threads sleep while waiting (OMP_WAIT_POLICY=PASSIVE)" if waits_passively() else \
        "OpenMP threads spin while waiting (OMP_WAIT_POLICY=PASSIVE before torch loads makes them sleep)"
    busy = busy_elsewhere()
    load = f"; {busy:.1f} of {cpus_available()} CPUs busy with other processes now" if busy is not None and busy >= 0.5 \
        else ""
    return n, f"threads: {n} ({why}); {wait}{load}"
