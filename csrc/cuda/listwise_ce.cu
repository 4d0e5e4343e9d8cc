// listwise_ce on the GPU: ONE launch, one warp per group, several warps per block. The per-group
// math is listwise_ce_group.h, the same code the CPU kernel runs with one thread per group.
//
// Groups are short (N ~ 4..64) and independent, so a warp per group keeps all 32 lanes busy for
// typical N with no shared memory and no block-level synchronisation; longer groups are handled by
// the lane-strided loops, at any N.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <limits>

#include "listwise_ce_group.h"

// The declaration from mrrm_ops.h, repeated rather than included: that header pulls in
// <torch/extension.h> (pybind11 and the Python API), which nvcc compiles slowly and warns about.
// A signature that drifted from mrrm_ops.h would leave the symbol undefined and fail the import.
namespace mrrm {
std::tuple<at::Tensor, at::Tensor> listwise_ce_fwd_bwd_cuda(const at::Tensor& scores, const at::Tensor& group_offsets,
                                                            const at::Tensor& targets, int64_t loss);
}  // namespace mrrm

namespace mrrm {

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

}  // namespace

std::tuple<at::Tensor, at::Tensor> listwise_ce_fwd_bwd_cuda(const at::Tensor& scores_in, const at::Tensor& offsets_in,
                                                            const at::Tensor& targets_in, int64_t loss) {
  // Shapes and dtypes were checked by listwise_ce_fwd_bwd, the only caller; re-check what this
  // launcher itself relies on.
  TORCH_CHECK(scores_in.is_cuda() && offsets_in.device() == scores_in.device() &&
                  targets_in.device() == scores_in.device(),
              "listwise_ce (cuda): scores, group_offsets and targets must be on one CUDA device");
  TORCH_CHECK(offsets_in.scalar_type() == at::kLong && offsets_in.dim() == 1 && offsets_in.numel() >= 1,
              "listwise_ce (cuda): group_offsets must be int64 [B+1]");
  const c10::cuda::CUDAGuard device_guard(scores_in.device());
  const at::Tensor scores = scores_in.contiguous();
  const at::Tensor offsets = offsets_in.contiguous();
  const int64_t M = scores.numel();
  const int64_t B = offsets.numel() - 1;
  at::Tensor per_group = at::empty({B}, scores.options().dtype(at::kFloat));
  at::Tensor grad = at::empty({M}, scores.options().dtype(at::kFloat));
  if (B == 0) return {per_group, grad};
  const int64_t blocks = (B + kWarpsPerBlock - 1) / kWarpsPerBlock;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "listwise_ce (cuda): too many groups (", B, ")");

  // As on the CPU: integer targets as int64, soft targets in the accumulation type, so the kernel is
  // instantiated per score dtype only.
  const at::Tensor int_targets = loss == listwise::kSoft ? at::Tensor() : targets_in.to(at::kLong).contiguous();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "listwise_ce_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
    const at::Tensor probs = loss == listwise::kSoft ? targets_in.to(acc_dtype).contiguous() : at::Tensor();
    const at::Tensor scratch =
        loss == listwise::kPlackettLuce ? at::empty({M}, scores.options().dtype(acc_dtype)) : at::Tensor();
    listwise_ce_kernel<scalar_t, acc_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        scores.data_ptr<scalar_t>(), offsets.data_ptr<int64_t>(),
        int_targets.defined() ? int_targets.data_ptr<int64_t>() : nullptr,
        probs.defined() ? probs.data_ptr<acc_t>() : nullptr, scratch.defined() ? scratch.data_ptr<acc_t>() : nullptr,
        per_group.data_ptr<float>(), grad.data_ptr<float>(), B, M, loss);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {per_group, grad};
}

}  // namespace mrrm
