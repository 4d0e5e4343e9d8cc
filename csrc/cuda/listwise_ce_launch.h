// The plain-C++ interface of the listwise_ce CUDA kernel (csrc/cuda/listwise_ce.cu). It names no
// ATen or c10 type on purpose: the .cu file is compiled by nvcc's host compiler, and host code that
// instantiates libstdc++'s stream templates there (as every TORCH_CHECK message does) can carry
// copies that clash with the libstdc++ the process loads. Seen on the H200 machine: a TORCH_CHECK
// formatting an int64 in a .cpp file of mrrm._C crashed in `ostream::_M_insert<long>`, which the
// .so defined itself instead of importing it. The ATen glue lives in csrc/listwise_ce_cuda.cpp,
// compiled by the same C++ compiler as the rest of the extension.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

namespace mrrm {
namespace cuda_launch {

enum ScoreType : int { kScoreFloat = 0, kScoreDouble = 1, kScoreHalf = 2, kScoreBFloat16 = 3 };

// One launch, one warp per group. probs / scratch are in the accumulation type (double for double
// scores, float otherwise). Returns the launch status (cudaGetLastError after the launch).
cudaError_t listwise_ce(int score_type, const void* scores, const int64_t* offsets, const int64_t* int_targets,
                        const void* probs, void* scratch, float* per_group, float* grad, int64_t B, int64_t M,
                        int64_t loss, cudaStream_t stream);

}  // namespace cuda_launch
}  // namespace mrrm
