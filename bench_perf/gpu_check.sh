#!/usr/bin/env bash
# The one GPU validation script (run on the lent H100/H200 by the `device` tool, from the repo root):
#   1. build mrrm._C with its CUDA sources, in place;
#   2. run the op tests on CUDA (bf16/fp16 against the fp32 reference, forward and backward, every mask)
#      and the model's CUDA test;
#   3. the end-to-end comparison on a random-weights Qwen3-VL-4B in bf16 (bench_perf/test_e2e_gpu.py):
#      single vs joint vs independent vs the published path, N = 4 and 8, image and video prompts;
#      packed vs padded training step;
#   4. time the kernels (triton.testing.do_bench medians): mrrm vs SDPA flash first, then the slower
#      baselines (FlexAttention, eager) in a second pass so a timeout there loses nothing else;
#   5. print a short table last.
# Wheels under .whl/ (carried by the device tool: transformers pinned to the version tested on the CPU)
# are installed into /tmp/site first. What comes back from $OUT (at most 8 files): summary.md, log.txt,
# gpu_bench.json, gpu_bench_baselines.json, e2e.json, speedup_gpu.png.
# Budget: about 7 minutes on one H100/H200 for the round-1 stages, ~5 more for round2 + syncs (each
# new tile config and variant compiles once, ~5-15 s); every stage has its own timeout. In a 15-minute
# session, run MRRM_GPU_STAGES="errors round2 syncs kernels" first (what issue 17 measures).
# MRRM_GPU_STAGES picks stages after the build (default: all): errors tests e2e kernels baselines
# round2 syncs (round2 = issue 17: attention phases / tile sweeps / backward variants, value head under
# CUDA graphs with its split-K sweep; syncs = host syncs per packed scoring pass).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/mrrm_gpu_out}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
status=0
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
XDIST=""
python3 -c "import xdist" 2>/dev/null && XDIST="-n 8"

{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | sed 's/^/card: /'
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, '| triton', triton.__version__, '| transformers', transformers.__version__)"
} | tee "$OUT/summary.md"
CARD=$(grep '^card:' "$OUT/summary.md" | head -1 | cut -d' ' -f2- | cut -d, -f1)

STAGES=${MRRM_GPU_STAGES:-"errors tests e2e kernels baselines round2 syncs"}
stage() { echo "== $1 ($(date -u +%T))" | tee -a "$LOG"; }
want() { [[ " $STAGES " == *" $1 "* ]]; }

stage "build (MRRM_BUILD_CUDA=1, sm_90)"
start=$(date +%s)
if ! MRRM_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 python3 -m pip install --no-build-isolation --no-deps -e . >> "$LOG" 2>&1; then
  tail -40 "$LOG"; echo "BUILD FAILED"; exit 1
fi
python3 -c "import mrrm._C as C; assert C.has_cuda(), 'mrrm._C built without CUDA'; print('mrrm._C with CUDA: ok')" || exit 1
echo "build: $(( $(date +%s) - start )) s" | tee -a "$OUT/summary.md"

if want errors; then
stage "C++ error paths outside pytest (a bad index must raise, not crash)"
echo "libstdc++ stream code in mrrm._C (U = imported, as it must be; T/W = a private copy):" | tee -a "$LOG"
nm -C mrrm/_C*.so | grep -E "ostream::_M_insert<long>" | tee -a "$LOG"
cat > /tmp/mrrm_err.py <<'PY'
import torch, mrrm._C as C
torch.set_num_threads(16)
h, w1, b1, w2, b2 = torch.randn(50, 32), torch.randn(24, 32), torch.randn(24), torch.randn(1, 24), torch.randn(1)
for args, call in [((h, torch.tensor([0, 50]), w1, b1, w2, b2, "silu", 1.0), C.gather_value_head_fwd),
                   ((torch.randn(5), torch.tensor([0, 2, 5]), torch.tensor([0, 3]), 0), C.listwise_ce_fwd_bwd)]:
    try:
        call(*args)
        print("NO ERROR RAISED")
    except RuntimeError as e:
        print("raised:", str(e).splitlines()[0][:120])
PY
if ! timeout 60 python3 -X faulthandler /tmp/mrrm_err.py >> "$LOG" 2>&1; then
  status=1
  echo "the error path crashed; backtrace:" | tee -a "$LOG"
  timeout 120 cuda-gdb -q -batch -ex run -ex bt --args python3 /tmp/mrrm_err.py 2>&1 \
    | grep -v "^\[New Thread\|^\[Thread" | tail -60 | tee -a "$LOG"
  echo "with TORCH_SHOW_CPP_STACKTRACES=0 TORCH_DISABLE_ADDR2LINE=1:" | tee -a "$LOG"
  TORCH_SHOW_CPP_STACKTRACES=0 TORCH_DISABLE_ADDR2LINE=1 timeout 60 python3 /tmp/mrrm_err.py 2>&1 | tail -5 | tee -a "$LOG"
else
  tail -2 "$LOG"
fi
timeout 60 python3 -m pytest -q -p no:cacheprovider -p no:xdist "tests/ops/test_value_head.py::test_C_checks_inputs_itself" \
  "tests/ops/test_listwise_ce.py::test_C_checks_inputs_itself" 2>&1 | tail -8 | tee -a "$LOG"
fi

if want tests; then
stage "CUDA op tests"
timeout 120 python3 -m pytest -q -p no:cacheprovider $XDIST -rfE \
  tests/ops/test_varlen_attention.py tests/ops/test_value_head.py tests/ops/test_value_head_triton.py \
  tests/ops/test_listwise_ce.py tests/ops/test_dispatch.py "tests/model/test_model.py::test_cuda_scores_match_cpu" 2>&1 \
  | tee -a "$LOG" | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
grep -E "^(FAILED|ERROR)|[0-9]+ (passed|failed)" "$LOG" | tail -30 > "$OUT/tests_summary.tmp"
fi

if want e2e; then
stage "end-to-end: Qwen3-VL-4B architecture, bf16"
timeout 180 python3 -m pytest -q -p no:cacheprovider bench_perf/test_e2e_gpu.py --benchmark-only \
  --benchmark-json="$OUT/e2e.json" --benchmark-columns=median,rounds >> "$LOG" 2>&1
[ $? -eq 0 ] || { status=1; tail -30 "$LOG"; }
fi

# kernel benchmarks in two passes, each with its own JSON, so a timeout in the slow baselines
# loses nothing of the first: bench NAME FILTER JSON
bench() {
  stage "kernel benchmarks: $1"
  timeout "${4:-150}" python3 -m pytest -q -p no:cacheprovider bench_perf/test_kernels_gpu.py --benchmark-only -k "$2" \
    --benchmark-json="$OUT/$3" --benchmark-columns=median,rounds >> "$LOG" 2>&1
  [ $? -eq 0 ] || { status=1; tail -30 "$LOG"; }
}
want kernels && bench "mrrm, SDPA flash / cuDNN, head, listwise_ce" \
  "(test_varlen_attention_gpu or test_gather_value_head_gpu or listwise) and (mrrm_triton or sdpa or listwise)" gpu_bench.json
want baselines && bench "FlexAttention and eager baselines" "(test_varlen_attention_gpu or test_gather_value_head_gpu) and (flex or eager)" gpu_bench_baselines.json
# round 2 (issue 17): phases and tile sweeps, backward variants, the value head under CUDA graphs
want round2 && bench "attention phases, tiles, backward variants; value head under CUDA graphs" \
  "phase_tiles or backward_variants or cudagraph" gpu_bench_round2.json 300
if want syncs; then
stage "host syncs per scoring pass"
timeout 120 python3 -m pytest -q -p no:cacheprovider bench_perf/test_e2e_gpu.py --benchmark-only -k host_syncs \
  --benchmark-json="$OUT/gpu_bench_syncs.json" >> "$LOG" 2>&1
[ $? -eq 0 ] || { status=1; tail -30 "$LOG"; }
fi

stage "summary"
jsons=$(ls "$OUT"/gpu_bench*.json 2>/dev/null)
if [ -n "$jsons" ]; then
  python3 -m bench_perf.gpu_summary $jsons --card "$CARD ($(date -u +%F))" | tee -a "$OUT/summary.md"
fi
if [ -f "$OUT/e2e.json" ]; then
  python3 -m bench_perf.report "$OUT/e2e.json" --png "$OUT/speedup_gpu.png" | tee -a "$OUT/summary.md"
fi
if [ -f "$OUT/tests_summary.tmp" ]; then
  echo "### CUDA tests" >> "$OUT/summary.md"
  cat "$OUT/tests_summary.tmp" | tee -a "$OUT/summary.md"
  rm -f "$OUT/tests_summary.tmp"
fi
echo "exit status: $status" | tee -a "$OUT/summary.md"
exit $status
