// The ATen side of listwise_ce on CUDA tensors: checks, allocation, the stream, and the launch of
// the kernel in csrc/cuda/listwise_ce.cu through its plain-C++ interface. Compiled by the C++
// compiler with the other .cpp files, only in CUDA builds (see cuda/listwise_ce_launch.h for why
// the glue is not in the .cu file).
#ifdef MRRM_WITH_CUDA

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <limits>

#include "cuda/listwise_ce_launch.h"
#include "listwise_ce_group.h"
#include "mrrm_ops.h"

namespace mrrm {

std::tuple<at::Tensor, at::Tensor> listwise_ce_fwd_bwd_cuda(const at::Tensor& scores_in, const at::Tensor& offsets_in,
                                                            const at::Tensor& targets_in, int64_t loss) {
  // Shapes and dtypes were checked by listwise_ce_fwd_bwd, the only caller; re-check what this
  // launcher itself relies on.
  MRRM_CHECK(scores_in.is_cuda() && offsets_in.device() == scores_in.device() &&
                  targets_in.device() == scores_in.device(),
              "listwise_ce (cuda): scores, group_offsets and targets must be on one CUDA device");
  MRRM_CHECK(offsets_in.scalar_type() == at::kLong && offsets_in.dim() == 1 && offsets_in.numel() >= 1,
              "listwise_ce (cuda): group_offsets must be int64 [B+1]");
  const c10::cuda::CUDAGuard device_guard(scores_in.device());
  const at::Tensor scores = scores_in.contiguous();
  const at::Tensor offsets = offsets_in.contiguous();
  const int64_t M = scores.numel();
  const int64_t B = offsets.numel() - 1;
  at::Tensor per_group = at::empty({B}, scores.options().dtype(at::kFloat));
  at::Tensor grad = at::empty({M}, scores.options().dtype(at::kFloat));
  if (B == 0) return {per_group, grad};
  MRRM_CHECK((B + 7) / 8 <= std::numeric_limits<int32_t>::max(), "listwise_ce (cuda): too many groups (", B, ")");

  int score_type;
  at::ScalarType acc_dtype = at::kFloat;
  switch (scores.scalar_type()) {
    case at::kFloat: score_type = cuda_launch::kScoreFloat; break;
    case at::kDouble: score_type = cuda_launch::kScoreDouble; acc_dtype = at::kDouble; break;
    case at::kHalf: score_type = cuda_launch::kScoreHalf; break;
    case at::kBFloat16: score_type = cuda_launch::kScoreBFloat16; break;
    default: MRRM_CHECK(false, "listwise_ce (cuda): unsupported scores dtype ", scores.scalar_type());
  }
  // As on the CPU: integer targets as int64, soft targets in the accumulation type, so the kernel is
  // instantiated per score dtype only.
  const at::Tensor int_targets = loss == listwise::kSoft ? at::Tensor() : targets_in.to(at::kLong).contiguous();
  const at::Tensor probs = loss == listwise::kSoft ? targets_in.to(acc_dtype).contiguous() : at::Tensor();
  const at::Tensor scratch =
      loss == listwise::kPlackettLuce ? at::empty({M}, scores.options().dtype(acc_dtype)) : at::Tensor();
  const cudaError_t err = cuda_launch::listwise_ce(
      score_type, scores.data_ptr(), offsets.data_ptr<int64_t>(),
      int_targets.defined() ? int_targets.data_ptr<int64_t>() : nullptr, probs.defined() ? probs.data_ptr() : nullptr,
      scratch.defined() ? scratch.data_ptr() : nullptr, per_group.data_ptr<float>(), grad.data_ptr<float>(), B, M,
      loss, at::cuda::getCurrentCUDAStream());
  MRRM_CHECK(err == cudaSuccess, "listwise_ce (cuda): kernel launch failed: ", cudaGetErrorString(err));
  return {per_group, grad};
}

}  // namespace mrrm

#endif  // MRRM_WITH_CUDA
