#!/usr/bin/env bash
# The test command of the README: the unit tests, the Triton AOT compile for sm_90, then a short
# benchmark smoke run (small sizes, each benchmark a few rounds).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pytest tests -q -p no:cacheprovider "$@"
MRRM_BENCH_SMALL=1 python -m pytest bench_perf --benchmark-only -q -p no:cacheprovider --benchmark-columns=median,iqr,rounds
