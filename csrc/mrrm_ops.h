// Declarations of the mrrm._C ops. One pybind11 module (bindings.cpp); each op in its own file.
#pragma once
#include <torch/extension.h>

#include "check.h"

#include <string>
#include <tuple>

namespace mrrm {

// ---- gather_value_head (CPU, value_head.cpp) -----------------------------------------------
// out = scale * (act(hidden[positions] @ w1^T + b1) @ w2^T + b2). hidden [T, H] fp32/bf16,
// positions int64 [M], w1 [D, H], b1 [D], w2 [1, D], b2 [1] (fp32 or bf16). fp32 accumulation.
// Returns (out fp32 [M], z fp32 [M, D] = the pre-activation, kept for the backward).
std::tuple<at::Tensor, at::Tensor> gather_value_head_fwd(
    const at::Tensor& hidden, const at::Tensor& positions, const at::Tensor& w1, const at::Tensor& b1,
    const at::Tensor& w2, const at::Tensor& b2, const std::string& activation, double scale);

// Returns (grad_hidden [T, H] in hidden's dtype, zero except the gathered rows (undefined when
// need_hidden_grad is false), grad_w1 [D, H], grad_b1 [D], grad_w2 [1, D], grad_b2 [1] in the
// weights' dtype). Repeated positions accumulate.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gather_value_head_bwd(
    const at::Tensor& grad_out, const at::Tensor& hidden, const at::Tensor& positions, const at::Tensor& w1,
    const at::Tensor& w2, const at::Tensor& z, const std::string& activation, double scale,
    bool need_hidden_grad);

// ---- listwise_ce (listwise_ce.cpp on the CPU; listwise_ce_cuda.cpp + cuda/listwise_ce.cu on the GPU) --
// scores [M] fp32/bf16/fp16/fp64, group_offsets int64 [B+1], targets: loss 0 (best) int64 [B],
// loss 1 (plackett_luce) int32/int64 ranks [M], loss 2 (soft) float probabilities [M].
// Returns (per_group_loss fp32 [B], unit_grad fp32 [M] = d loss[group(i)] / d scores[i]).
// Dispatches on scores.device().
std::tuple<at::Tensor, at::Tensor> listwise_ce_fwd_bwd(
    const at::Tensor& scores, const at::Tensor& group_offsets, const at::Tensor& targets, int64_t loss);

#ifdef MRRM_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> listwise_ce_fwd_bwd_cuda(
    const at::Tensor& scores, const at::Tensor& group_offsets, const at::Tensor& targets, int64_t loss);
#endif

}  // namespace mrrm
