"""`import mrrm` stays light: its heavy parts (torch, transformers, the model) load on first use.

The time of `python -c "import mrrm"` in a fresh interpreter, against the bare interpreter start
(`python -c "pass"`) measured in interleaved rounds in the same run; extra_info records both medians
and the modules `import mrrm` loaded. The budget (issue 31): under 0.5 s, and no torch.
"""
import statistics
import subprocess
import sys
import time

ROUNDS = 7
BUDGET_S = 0.5


def _wall(code: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - t0


def test_import_mrrm_is_light(benchmark):
    bare, mrrm_ = [], []
    for _ in range(ROUNDS):  # interleaved: both see the same machine load
        bare.append(_wall("pass"))
        mrrm_.append(_wall("import mrrm"))
    loaded = subprocess.run([sys.executable, "-c", "import sys, mrrm; print(' '.join(sorted(sys.modules)))"],
                            check=True, capture_output=True, text=True).stdout.split()
    benchmark.pedantic(_wall, args=("import mrrm",), rounds=3, iterations=1)
    med_bare, med_mrrm = statistics.median(bare), statistics.median(mrrm_)
    benchmark.extra_info.update(bare_interpreter_s=med_bare, import_mrrm_s=med_mrrm, import_cost_s=med_mrrm - med_bare,
                                heavy_modules=[m for m in ("torch", "transformers", "numpy", "PIL") if m in loaded])
    assert "torch" not in loaded and "transformers" not in loaded, "import mrrm loaded torch or transformers"
    assert med_mrrm < BUDGET_S, f"import mrrm took {med_mrrm:.3f} s (median of {ROUNDS}), over {BUDGET_S} s"
