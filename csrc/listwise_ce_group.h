// The per-group math of listwise_ce, written once for the CPU and the GPU.
//
// Every function here is `__host__ __device__` under nvcc and plain C++ otherwise. The only thing
// that differs between the two devices is the "lanes" policy: how many workers share one group and
// how they reduce across each other.
//   SerialLanes: width 1, lane 0; reductions are the identity (the CPU kernel, one thread per group).
//   WarpLanes:   width 32, lane = threadIdx.x % 32; sum/max by __shfl_xor_sync butterflies (the CUDA
//                kernel, one warp per group).
// Lane l handles elements l, l + width, l + 2*width, ... of its group, so with width 1 the code is
// the plain serial loop. Because the CPU kernel runs this very code, the CPU tests exercise the GPU
// algorithm (same passes, same numerics, only the summation order differs).
//
// Conventions: `acc_t` is the accumulation type (float, or double for fp64 scores); outputs are
// fp32. Every max-subtraction starts from a real score of the group (never from -inf), so the code
// never evaluates exp(-inf) or inf - inf, whatever the fast-math flags.
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define MRRM_HD __host__ __device__
#else
#define MRRM_HD
#endif

namespace mrrm {
namespace listwise {

// Loss codes shared with mrrm/ops/listwise_ce.py (LOSS_CODES).
enum LossCode : int64_t { kBest = 0, kPlackettLuce = 1, kSoft = 2 };

MRRM_HD inline float exp_(float x) { return ::expf(x); }
MRRM_HD inline double exp_(double x) { return ::exp(x); }
MRRM_HD inline float log_(float x) { return ::logf(x); }
MRRM_HD inline double log_(double x) { return ::log(x); }
template <class T>
MRRM_HD inline T max_(T a, T b) { return a > b ? a : b; }

// One worker per group.
struct SerialLanes {
  static constexpr int width = 1;
  MRRM_HD int lane() const { return 0; }
  template <class T>
  MRRM_HD T sum(T x) const { return x; }
  template <class T>
  MRRM_HD T max(T x) const { return x; }
  MRRM_HD void sync() const {}
};

#if defined(__CUDACC__)
// One warp per group. All 32 lanes must call sum/max/sync together (the group loops may leave lanes
// idle, but every lane reaches the reductions, which sit outside the loops).
// The bodies are guarded by __CUDA_ARCH__ so that nvcc's host pass, which also compiles these
// __host__ __device__ members, sees valid (never called) host code.
struct WarpLanes {
  static constexpr int width = 32;
  MRRM_HD int lane() const {
#ifdef __CUDA_ARCH__
    return static_cast<int>(threadIdx.x & 31u);
#else
    return 0;
#endif
  }
  template <class T>
  MRRM_HD T sum(T x) const {
#ifdef __CUDA_ARCH__
    // xor butterfly: every lane ends with the full sum, so any lane may use the result.
    for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
#endif
    return x;
  }
  template <class T>
  MRRM_HD T max(T x) const {
#ifdef __CUDA_ARCH__
    for (int offset = 16; offset > 0; offset >>= 1) x = max_(x, __shfl_xor_sync(0xffffffffu, x, offset));
#endif
    return x;
  }
  // Orders the lanes' global-memory writes (the Plackett-Luce scratch) before other lanes read them.
  MRRM_HD void sync() const {
#ifdef __CUDA_ARCH__
    __syncwarp();
#endif
  }
};
#endif  // __CUDACC__

// One group's inputs and outputs; pointers are already offset to the group's first element.
template <class scalar_t, class acc_t>
struct Group {
  const scalar_t* scores;  // [n]
  int64_t n;               // >= 1
  int64_t target;          // best: index of the preferred response within the group
  const int64_t* ranks;    // plackett_luce: [n], 1 = best, ties allowed
  const acc_t* probs;      // soft: [n], a distribution over the group
  acc_t* scratch;          // plackett_luce: [n] workspace for the per-response logsumexps
  float* grad;             // [n] out: d loss / d scores
};

template <class acc_t, class scalar_t>
MRRM_HD inline acc_t load(const scalar_t* p, int64_t i) { return static_cast<acc_t>(p[i]); }

// Max of the group's scores, identical on every lane.
template <class Lanes, class scalar_t, class acc_t>
MRRM_HD inline acc_t group_max(const Lanes& lanes, const Group<scalar_t, acc_t>& g) {
  acc_t m = load<acc_t>(g.scores, 0);  // a real score: lanes with no element keep a valid value
  for (int64_t j = lanes.lane(); j < g.n; j += Lanes::width) m = max_(m, load<acc_t>(g.scores, j));
  return lanes.max(m);
}

// best: loss = LSE - s_t; grad = softmax - onehot(t).
template <class Lanes, class scalar_t, class acc_t>
MRRM_HD inline acc_t best_loss(const Lanes& lanes, const Group<scalar_t, acc_t>& g) {
  const acc_t m = group_max(lanes, g);
  acc_t sum_exp = 0;
  for (int64_t j = lanes.lane(); j < g.n; j += Lanes::width) sum_exp += exp_(load<acc_t>(g.scores, j) - m);
  sum_exp = lanes.sum(sum_exp);
  const acc_t lse = m + log_(sum_exp);
  for (int64_t j = lanes.lane(); j < g.n; j += Lanes::width) {
    const acc_t p = exp_(load<acc_t>(g.scores, j) - lse);
    g.grad[j] = static_cast<float>(j == g.target ? p - acc_t(1) : p);
  }
  return lse - load<acc_t>(g.scores, g.target);
}

// soft: loss = sum_i p_i (LSE - s_i); grad = softmax * sum(p) - p. Written with sum(p) rather than
// 1 so that the gradient is exactly that of the loss even when the targets sum to 1 only roughly.
template <class Lanes, class scalar_t, class acc_t>
MRRM_HD inline acc_t soft_loss(const Lanes& lanes, const Group<scalar_t, acc_t>& g) {
  const acc_t m = group_max(lanes, g);
  acc_t sum_exp = 0, sum_p = 0;
  for (int64_t j = lanes.lane(); j < g.n; j += Lanes::width) {
    sum_exp += exp_(load<acc_t>(g.scores, j) - m);
    sum_p += g.probs[j];
  }
  sum_exp = lanes.sum(sum_exp);
  sum_p = lanes.sum(sum_p);
  const acc_t lse = m + log_(sum_exp);
  acc_t loss = 0;
  for (int64_t j = lanes.lane(); j < g.n; j += Lanes::width) {
    const acc_t s = load<acc_t>(g.scores, j);
    const acc_t p = g.probs[j];
    g.grad[j] = static_cast<float>(exp_(s - lse) * sum_p - p);
    loss += p * (lse - s);  // each term >= 0: no cancellation between LSE * sum(p) and sum(p * s)
  }
  return lanes.sum(loss);
}

// plackett_luce with ties (Breslow): C_i = {j : rank_j >= rank_i} (i itself and its tied peers
// included), LSE_i = logsumexp over C_i,
//   loss   = sum_i (LSE_i - s_i)
//   grad_k = -1 + sum_{i : k in C_i} softmax_{C_i}(k) = -1 + sum_{i : rank_i <= rank_k} exp(s_k - LSE_i).
// Each term exp(s_k - LSE_i) <= 1 because k is in C_i, so the pairwise form is stable where the
// factored form exp(s_k) * sum_i exp(-LSE_i) is not. O(n^2) per group in two passes:
//   1. lane-strided over i: LSE_i by an online (running max) logsumexp over the whole group,
//      written to scratch[i];
//   2. after a lane sync, lane-strided over k: grad_k from the LSE_i of every i.
// No per-lane storage grows with n, so any group size works.
template <class Lanes, class scalar_t, class acc_t>
MRRM_HD inline acc_t plackett_luce_loss(const Lanes& lanes, const Group<scalar_t, acc_t>& g) {
  acc_t loss = 0;
  for (int64_t i = lanes.lane(); i < g.n; i += Lanes::width) {
    const int64_t rank_i = g.ranks[i];
    const acc_t s_i = load<acc_t>(g.scores, i);
    acc_t run_max = s_i;  // C_i contains i, so starting at s_i is exact (no -inf)
    acc_t run_sum = 0;
    for (int64_t j = 0; j < g.n; ++j) {
      if (g.ranks[j] < rank_i) continue;  // j is ranked strictly better: not a competitor of i
      const acc_t s_j = load<acc_t>(g.scores, j);
      if (s_j > run_max) {
        run_sum = run_sum * exp_(run_max - s_j) + acc_t(1);
        run_max = s_j;
      } else {
        run_sum += exp_(s_j - run_max);
      }
    }
    const acc_t lse_i = run_max + log_(run_sum);
    g.scratch[i] = lse_i;
    loss += lse_i - s_i;
  }
  lanes.sync();
  for (int64_t k = lanes.lane(); k < g.n; k += Lanes::width) {
    const int64_t rank_k = g.ranks[k];
    const acc_t s_k = load<acc_t>(g.scores, k);
    acc_t grad = -1;
    for (int64_t i = 0; i < g.n; ++i) {
      if (g.ranks[i] <= rank_k) grad += exp_(s_k - g.scratch[i]);
    }
    g.grad[k] = static_cast<float>(grad);
  }
  return lanes.sum(loss);
}

// The group's loss (identical on every lane) after writing its gradient to g.grad.
// The caller guarantees n >= 1 and, for `best`, 0 <= target < n.
template <class Lanes, class scalar_t, class acc_t>
MRRM_HD inline acc_t group_loss_and_grad(const Lanes& lanes, int64_t loss, const Group<scalar_t, acc_t>& g) {
  if (loss == kBest) return best_loss(lanes, g);
  if (loss == kPlackettLuce) return plackett_luce_loss(lanes, g);
  return soft_loss(lanes, g);
}

}  // namespace listwise
}  // namespace mrrm
