// listwise_ce on the GPU: ONE launch, one warp per group, several warps per block. The per-group
// math is listwise_ce_group.h, the same code the CPU kernel runs with one thread per group.
//
// Groups are short (N ~ 4..64) and independent, so a warp per group keeps all 32 lanes busy for
// typical N with no shared memory and no block-level synchronisation; longer groups are handled by
// the lane-strided loops, at any N.
//
// This file includes no ATen/c10 header (see listwise_ce_launch.h for why); half and bfloat16
// scores are CUDA's __half / __nv_bfloat16, bit-identical to at::Half / at::BFloat16.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <limits>

#include "listwise_ce_group.h"
#include "listwise_ce_launch.h"

namespace mrrm {
namespace listwise {
// torch's build passes -D__CUDA_NO_HALF_CONVERSIONS__ (and the bfloat16 twin): the implicit
// conversions that at::Half / at::BFloat16 provide are spelled out for CUDA's own types here.
template <>
MRRM_HD inline float load<float, __half>(const __half* p, int64_t i) { return __half2float(p[i]); }
template <>
MRRM_HD inline float load<float, __nv_bfloat16>(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }
}  // namespace listwise

namespace cuda_launch {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kThreads = kWarpsPerBlock * 32;

template <class scalar_t, class acc_t>
__global__ void __launch_bounds__(kThreads)
listwise_ce_kernel(const scalar_t* __restrict__ scores, const int64_t* __restrict__ offsets,
                   const int64_t* __restrict__ int_targets, const acc_t* __restrict__ probs,
                   acc_t* __restrict__ scratch, float* __restrict__ per_group, float* __restrict__ grad, int64_t B,
                   int64_t M, int64_t loss) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (b >= B) return;  // uniform across the warp: all lanes share b
  const listwise::WarpLanes lanes;
  const int64_t lo = offsets[b];
  const int64_t hi = offsets[b + 1];
  const int64_t n = hi - lo;
  // The host does not read offsets/targets back (that would synchronise the stream); the Python op
  // validates them. Bad values must not make the kernel read out of bounds: flag the group with NaN.
  const bool bad_group = lo < 0 || hi > M || n < 1 ||
                         (loss == listwise::kBest && (int_targets[b] < 0 || int_targets[b] >= n));
  if (bad_group) {
    if (lanes.lane() == 0) per_group[b] = std::numeric_limits<float>::quiet_NaN();
    if (lo >= 0 && hi <= M) {
      for (int64_t j = lo + lanes.lane(); j < hi; j += listwise::WarpLanes::width)
        grad[j] = std::numeric_limits<float>::quiet_NaN();
    }
    return;
  }
  listwise::Group<scalar_t, acc_t> g;
  g.scores = scores + lo;
  g.n = n;
  g.target = loss == listwise::kBest ? int_targets[b] : 0;
  g.ranks = loss == listwise::kPlackettLuce ? int_targets + lo : nullptr;
  g.probs = loss == listwise::kSoft ? probs + lo : nullptr;
  g.scratch = scratch != nullptr ? scratch + lo : nullptr;
  g.grad = grad + lo;
  const acc_t group_loss = listwise::group_loss_and_grad(lanes, loss, g);
  if (lanes.lane() == 0) per_group[b] = static_cast<float>(group_loss);
}

template <class scalar_t, class acc_t>
cudaError_t launch(const void* scores, const int64_t* offsets, const int64_t* int_targets, const void* probs,
                   void* scratch, float* per_group, float* grad, int64_t B, int64_t M, int64_t loss,
                   cudaStream_t stream) {
  const int64_t blocks = (B + kWarpsPerBlock - 1) / kWarpsPerBlock;
  listwise_ce_kernel<scalar_t, acc_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      static_cast<const scalar_t*>(scores), offsets, int_targets, static_cast<const acc_t*>(probs),
      static_cast<acc_t*>(scratch), per_group, grad, B, M, loss);
  return cudaGetLastError();
}

}  // namespace

cudaError_t listwise_ce(int score_type, const void* scores, const int64_t* offsets, const int64_t* int_targets,
                        const void* probs, void* scratch, float* per_group, float* grad, int64_t B, int64_t M,
                        int64_t loss, cudaStream_t stream) {
  switch (score_type) {
    case kScoreFloat:
      return launch<float, float>(scores, offsets, int_targets, probs, scratch, per_group, grad, B, M, loss, stream);
    case kScoreDouble:
      return launch<double, double>(scores, offsets, int_targets, probs, scratch, per_group, grad, B, M, loss, stream);
    case kScoreHalf:
      return launch<__half, float>(scores, offsets, int_targets, probs, scratch, per_group, grad, B, M, loss, stream);
    case kScoreBFloat16:
      return launch<__nv_bfloat16, float>(scores, offsets, int_targets, probs, scratch, per_group, grad, B, M, loss,
                                          stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace cuda_launch
}  // namespace mrrm
