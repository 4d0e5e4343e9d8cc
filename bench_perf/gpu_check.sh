#!/usr/bin/env bash
# The one GPU validation script (run on the lent H100/H200 by the `device` tool, from the repo root):
#   1. build mrrm._C with its CUDA sources, in place;
#   2. run the op tests on CUDA (bf16/fp16 against the fp32 reference, forward and backward, every mask);
#   3. time the kernels (triton.testing.do_bench medians) against torch eager, SDPA flash and FlexAttention;
#   4. print a short table last.
# Everything it writes goes under $OUT (default /tmp/mrrm_gpu_out). Budget: under 8 minutes on one H100.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/mrrm_gpu_out}
mkdir -p "$OUT"
status=0

{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | sed 's/^/card: /'
  python -c "import torch, triton, transformers; print('torch', torch.__version__, '| triton', triton.__version__, '| transformers', transformers.__version__)"
} | tee "$OUT/card.txt"
CARD=$(grep '^card:' "$OUT/card.txt" | head -1 | cut -d' ' -f2- | cut -d, -f1)

echo "== build (MRRM_BUILD_CUDA=1, sm_90)"
start=$(date +%s)
if ! MRRM_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
python -c "import mrrm._C as C; assert C.has_cuda(), 'mrrm._C built without CUDA'; print('mrrm._C with CUDA: ok')" || exit 1
echo "build: $(( $(date +%s) - start )) s"

echo "== CUDA op tests"
timeout 240 python -m pytest -q -p no:cacheprovider -x --junitxml="$OUT/tests.xml" \
  tests/test_varlen_attention.py tests/test_value_head.py tests/test_value_head_triton.py \
  tests/test_listwise_ce.py tests/test_dispatch.py 2>&1 | tee "$OUT/tests.txt" | tail -15
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== kernel benchmarks"
timeout 300 python -m pytest -q -p no:cacheprovider bench_perf/test_kernels_gpu.py --benchmark-only \
  --benchmark-json="$OUT/gpu_bench.json" --benchmark-columns=median,rounds > "$OUT/bench.txt" 2>&1
[ $? -eq 0 ] || { status=1; tail -30 "$OUT/bench.txt"; }

echo "== summary"
if [ -f "$OUT/gpu_bench.json" ]; then
  python -m bench_perf.gpu_summary "$OUT/gpu_bench.json" --card "$CARD ($(date -u +%F))" | tee "$OUT/summary.md"
fi
grep -E "passed|failed" "$OUT/tests.txt" | tail -1
exit $status
