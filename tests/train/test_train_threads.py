"""mrrm.train's CPU thread policy (issue 31): --threads, the automatic count, and the OpenMP wait policy the
entry points set before torch loads. Measured next to CPU-bound neighbours in bench_perf/test_contention_cpu.py."""
import os
import subprocess
import sys
import time

import pytest
import torch

from mrrm.train import threads
from mrrm.train.recipe import parse_args


def test_threads_flag_and_choice(monkeypatch):
    assert parse_args([]).threads == 0 and parse_args(["--threads", "3"]).threads == 3
    with pytest.raises(SystemExit):
        parse_args(["--threads", "-1"])
    assert threads.choose(3) == (3, "--threads")
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert threads.choose(0) == (5, "OMP_NUM_THREADS")
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert threads.choose(0) == (threads.cpus_available(), "the CPUs this process may use")  # never the load
    before = torch.get_num_threads()
    try:
        n, line = threads.apply(1)
        assert n == 1 and torch.get_num_threads() == 1 and line.startswith("threads: 1 (--threads)")
    finally:
        torch.set_num_threads(before)


def test_cpus_available_respects_a_cgroup_quota(monkeypatch):
    monkeypatch.setattr(threads, "_cgroup_quota", lambda: 1.5)
    assert threads.cpus_available() == min(2, len(os.sched_getaffinity(0)))
    monkeypatch.setattr(threads, "_cgroup_quota", lambda: 0.2)
    assert threads.cpus_available() == 1


@pytest.mark.slow
def test_busy_elsewhere_sees_a_spinning_neighbour():
    """A spinning neighbour keeps at least most of a CPU busy (all of one on an idle machine; with other
    load, the CPUs are busy anyway), and this process's own sleeping is not counted."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        busy = threads.busy_elsewhere(0.3)
    finally:
        spinner.kill()
        spinner.wait()
    assert busy is not None and 0.6 <= busy <= threads.cpus_available() + 0.05, busy


def test_importing_the_train_package_leaves_torch_for_the_entry_point_to_load():
    code = "import sys, mrrm.train, mrrm.train.threads; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


@pytest.mark.slow
@pytest.mark.parametrize("preset, expected", [(None, "PASSIVE"), ("active", "active")])
def test_the_entry_point_sets_passive_waiting_before_torch_loads(preset, expected):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if preset:
        env["OMP_WAIT_POLICY"] = preset
    code = "import os, sys; import mrrm.train.__main__; print(os.environ['OMP_WAIT_POLICY'], 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == [expected, "True"]
