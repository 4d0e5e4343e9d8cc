// listwise_ce on the CPU: one task per group, running the per-group code that the CUDA kernel runs
// per warp (listwise_ce_group.h), so both devices share one implementation of the math.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "listwise_ce_group.h"
#include "mrrm_ops.h"

namespace mrrm {

namespace {

// Shape/dtype/device checks that read no tensor data (valid for both devices). The Python op
// validates values too; these guard direct calls of mrrm._C.
void check_listwise_args(const at::Tensor& scores, const at::Tensor& group_offsets, const at::Tensor& targets,
                         int64_t loss) {
  MRRM_CHECK(loss == listwise::kBest || loss == listwise::kPlackettLuce || loss == listwise::kSoft,
              "listwise_ce: loss must be 0 (best), 1 (plackett_luce) or 2 (soft), got ", loss);
  MRRM_CHECK(scores.dim() == 1, "listwise_ce: scores must be 1-D [M], got shape ", scores.sizes());
  const auto st = scores.scalar_type();
  MRRM_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf,
              "listwise_ce: scores must be float32/float64/bfloat16/float16, got ", st);
  MRRM_CHECK(group_offsets.dim() == 1 && group_offsets.numel() >= 1,
              "listwise_ce: group_offsets must be 1-D [B+1] with at least one element, got shape ",
              group_offsets.sizes());
  MRRM_CHECK(group_offsets.scalar_type() == at::kLong, "listwise_ce: group_offsets must be int64, got ",
              group_offsets.scalar_type());
  MRRM_CHECK(targets.dim() == 1, "listwise_ce: targets must be 1-D, got shape ", targets.sizes());
  MRRM_CHECK(group_offsets.device() == scores.device() && targets.device() == scores.device(),
              "listwise_ce: scores, group_offsets and targets must be on one device, got ", scores.device(), ", ",
              group_offsets.device(), ", ", targets.device());
  const int64_t M = scores.numel();
  const int64_t B = group_offsets.numel() - 1;
  const auto tt = targets.scalar_type();
  if (loss == listwise::kBest) {
    MRRM_CHECK(tt == at::kLong || tt == at::kInt, "listwise_ce: targets for loss 'best' must be int64, got ", tt);
    MRRM_CHECK(targets.numel() == B, "listwise_ce: targets for loss 'best' must be [B=", B, "], got ",
                targets.numel());
  } else if (loss == listwise::kPlackettLuce) {
    MRRM_CHECK(tt == at::kLong || tt == at::kInt,
                "listwise_ce: targets (ranks) for loss 'plackett_luce' must be int32/int64, got ", tt);
    MRRM_CHECK(targets.numel() == M, "listwise_ce: targets (ranks) for loss 'plackett_luce' must be [M=", M,
                "], got ", targets.numel());
  } else {
    MRRM_CHECK(at::isFloatingType(tt), "listwise_ce: targets for loss 'soft' must be floating point, got ", tt);
    MRRM_CHECK(targets.numel() == M, "listwise_ce: targets for loss 'soft' must be [M=", M, "], got ",
                targets.numel());
  }
}

// O(B) checks of the offsets and of the `best` targets, affordable on the CPU. A bad offset would
// otherwise make a group read outside `scores`.
void check_listwise_values_cpu(const int64_t* offsets, int64_t B, int64_t M, const int64_t* best_targets) {
  MRRM_CHECK(offsets[0] == 0, "listwise_ce: group_offsets[0] must be 0, got ", offsets[0]);
  MRRM_CHECK(offsets[B] == M, "listwise_ce: group_offsets[-1] must equal the number of scores (", M, "), got ",
              offsets[B]);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = offsets[b + 1] - offsets[b];
    MRRM_CHECK(n >= 1, "listwise_ce: group ", b, " has ", n, " scores (group_offsets must be strictly increasing)");
    if (best_targets != nullptr) {
      MRRM_CHECK(best_targets[b] >= 0 && best_targets[b] < n, "listwise_ce: targets[", b, "]=", best_targets[b],
                  " is out of range for group ", b, " of ", n, " scores");
    }
  }
}

std::tuple<at::Tensor, at::Tensor> listwise_ce_cpu(const at::Tensor& scores_in, const at::Tensor& offsets_in,
                                                   const at::Tensor& targets_in, int64_t loss) {
  const at::Tensor scores = scores_in.contiguous();
  const at::Tensor offsets = offsets_in.contiguous();
  const int64_t M = scores.numel();
  const int64_t B = offsets.numel() - 1;
  at::Tensor per_group = at::empty({B}, scores.options().dtype(at::kFloat));
  at::Tensor grad = at::empty({M}, scores.options().dtype(at::kFloat));

  // Integer targets are read as int64 and soft targets in the accumulation type, so the group code
  // is instantiated per score dtype only (a copy of [M] at most, when the caller's dtype differs).
  const at::Tensor int_targets =
      loss == listwise::kSoft ? at::Tensor() : targets_in.to(at::kLong).contiguous();
  const int64_t* off = offsets.data_ptr<int64_t>();
  check_listwise_values_cpu(off, B, M, loss == listwise::kBest ? int_targets.data_ptr<int64_t>() : nullptr);
  if (B == 0) return {per_group, grad};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "listwise_ce_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
    const at::Tensor probs = loss == listwise::kSoft ? targets_in.to(acc_dtype).contiguous() : at::Tensor();
    // Plackett-Luce keeps each response's logsumexp in a workspace, as the GPU kernel does.
    const at::Tensor scratch = loss == listwise::kPlackettLuce ? at::empty({M}, scores.options().dtype(acc_dtype))
                                                               : at::Tensor();
    const scalar_t* s = scores.data_ptr<scalar_t>();
    const int64_t* tgt = int_targets.defined() ? int_targets.data_ptr<int64_t>() : nullptr;
    const acc_t* p = probs.defined() ? probs.data_ptr<acc_t>() : nullptr;
    acc_t* work = scratch.defined() ? scratch.data_ptr<acc_t>() : nullptr;
    float* loss_out = per_group.data_ptr<float>();
    float* grad_out = grad.data_ptr<float>();

    // Groups are small (N ~ 4..64): hand each task enough of them to amortise its start-up;
    // Plackett-Luce costs ~N^2 per group, the others ~N.
    const int64_t mean_n = std::max<int64_t>(1, M / B);
    const int64_t work_per_group = loss == listwise::kPlackettLuce ? mean_n * mean_n : mean_n;
    const int64_t grain = std::max<int64_t>(1, 32768 / work_per_group);
    at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
      const listwise::SerialLanes lanes;
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t lo = off[b];
        listwise::Group<scalar_t, acc_t> g;
        g.scores = s + lo;
        g.n = off[b + 1] - lo;
        g.target = loss == listwise::kBest ? tgt[b] : 0;
        g.ranks = loss == listwise::kPlackettLuce ? tgt + lo : nullptr;
        g.probs = loss == listwise::kSoft ? p + lo : nullptr;
        g.scratch = work != nullptr ? work + lo : nullptr;
        g.grad = grad_out + lo;
        loss_out[b] = static_cast<float>(listwise::group_loss_and_grad(lanes, loss, g));
      }
    });
  });
  return {per_group, grad};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> listwise_ce_fwd_bwd(const at::Tensor& scores, const at::Tensor& group_offsets,
                                                       const at::Tensor& targets, int64_t loss) {
  check_listwise_args(scores, group_offsets, targets, loss);
  if (scores.is_cuda()) {
#ifdef MRRM_WITH_CUDA
    return listwise_ce_fwd_bwd_cuda(scores, group_offsets, targets, loss);
#else
    MRRM_CHECK(false,
                "listwise_ce: got CUDA tensors but mrrm._C was built without its CUDA sources (torch CPU build or "
                "no nvcc at install time); rebuild with MRRM_BUILD_CUDA=1 or use backend='reference'");
#endif
  }
  MRRM_CHECK(scores.device().is_cpu(), "listwise_ce: unsupported device ", scores.device());
  return listwise_ce_cpu(scores, group_offsets, targets, loss);
}

}  // namespace mrrm
