#!/usr/bin/env bash
# The test command of the README: lint (ruff, configured in pyproject.toml), the unit tests (with
# the Triton AOT compile for sm_90), then a short benchmark smoke run (small sizes, a few rounds each).
# `pytest tests -m "not slow"` is the quick subset (CONTRIBUTING.md).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m ruff check mrrm kernels tests bench_perf scripts
python scripts/check_layout.py  # the package's layers, no import circles, tests mirror the package, README length
python -m pytest tests -q -p no:cacheprovider "$@"
MRRM_BENCH_SMALL=1 python -m pytest bench_perf --benchmark-only -q -p no:cacheprovider --benchmark-columns=median,iqr,rounds
