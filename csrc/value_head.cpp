// gather_value_head on the CPU.
//
// Only the M score rows of hidden [T, H] are ever touched: they are gathered (and converted to
// fp32) into an [M, H] buffer, the two GEMMs run on that buffer with at::mm, and the bias +
// activation + second-layer epilogue runs row-parallel. The backward gathers the same rows again
// (cheaper to redo than to keep an [M, H] copy alive between forward and backward) and writes only
// those rows of grad_hidden, summing repeated positions in fp32 before a single rounding to the
// hidden dtype.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <type_traits>
#include <vector>

#include "mrrm_ops.h"

namespace mrrm {

namespace {

enum class Act { kSilu, kGelu, kRelu, kSelu, kTanh };

Act parse_activation(const std::string& name) {
  if (name == "silu") return Act::kSilu;
  if (name == "gelu") return Act::kGelu;
  if (name == "relu") return Act::kRelu;
  if (name == "selu") return Act::kSelu;
  MRRM_CHECK(name == "tanh", "gather_value_head: unknown activation '", name,
              "'; expected one of silu, gelu, relu, selu, tanh");
  return Act::kTanh;
}

// torch.nn.functional.selu's constants.
constexpr float kSeluScale = 1.0507009873554804934193349852946f;
constexpr float kSeluAlpha = 1.6732632423543772848170429916717f;
constexpr float kInvSqrt2 = 0.70710678118654752440f;
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;

inline float sigmoid(float z) { return 1.0f / (1.0f + std::exp(-z)); }

// act(z). Branch points follow torch's kernels, so the derivative at the kinks matches autograd.
template <Act A>
inline float act_value(float z) {
  if constexpr (A == Act::kSilu) return z * sigmoid(z);
  if constexpr (A == Act::kGelu) return 0.5f * z * (1.0f + std::erf(z * kInvSqrt2));  // exact (erf) GELU
  if constexpr (A == Act::kRelu) return z > 0.0f ? z : 0.0f;
  if constexpr (A == Act::kSelu) return kSeluScale * (z > 0.0f ? z : kSeluAlpha * std::expm1(z));
  if constexpr (A == Act::kTanh) return std::tanh(z);
}

// d act / dz.
template <Act A>
inline float act_grad(float z) {
  if constexpr (A == Act::kSilu) {
    const float sg = sigmoid(z);
    return sg * (1.0f + z * (1.0f - sg));
  }
  if constexpr (A == Act::kGelu) return 0.5f * (1.0f + std::erf(z * kInvSqrt2)) + z * kInvSqrt2Pi * std::exp(-0.5f * z * z);
  if constexpr (A == Act::kRelu) return z > 0.0f ? 1.0f : 0.0f;  // torch: 0 at z == 0
  if constexpr (A == Act::kSelu) return z > 0.0f ? kSeluScale : kSeluScale * kSeluAlpha * std::exp(z);  // torch: left branch at 0
  if constexpr (A == Act::kTanh) {
    const float t = std::tanh(z);
    return 1.0f - t * t;
  }
}

// Calls fn(std::integral_constant<Act, A>{}) so the activation is a compile-time constant inside the
// row loops (no switch per element).
template <class Fn>
void dispatch_activation(Act act, Fn&& fn) {
  switch (act) {
    case Act::kSilu: return fn(std::integral_constant<Act, Act::kSilu>{});
    case Act::kGelu: return fn(std::integral_constant<Act, Act::kGelu>{});
    case Act::kRelu: return fn(std::integral_constant<Act, Act::kRelu>{});
    case Act::kSelu: return fn(std::integral_constant<Act, Act::kSelu>{});
    case Act::kTanh: return fn(std::integral_constant<Act, Act::kTanh>{});
  }
}

bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

// Checks shared by forward and backward. Reads positions once (O(M)) for the range check, since an
// out-of-range position would read or write outside hidden.
void check_head_args(const char* where, const at::Tensor& hidden, const at::Tensor& positions, const at::Tensor& w1,
                     const at::Tensor& w2) {
  MRRM_CHECK(hidden.device().is_cpu() && positions.device().is_cpu() && w1.device().is_cpu() && w2.device().is_cpu(),
              where, ": the C++ kernel takes CPU tensors (the GPU path is the Triton kernel)");
  MRRM_CHECK(hidden.dim() == 2, where, ": hidden must be [T, H], got shape ", hidden.sizes());
  MRRM_CHECK(is_float_dtype(hidden.scalar_type()), where, ": hidden must be a floating dtype, got ",
              hidden.scalar_type());
  MRRM_CHECK(positions.dim() == 1 && positions.scalar_type() == at::kLong, where,
              ": positions must be int64 [M], got ", positions.scalar_type(), " of shape ", positions.sizes());
  MRRM_CHECK(w1.dim() == 2 && w1.size(1) == hidden.size(1), where, ": w1 must be [D, H=", hidden.size(1),
              "], got shape ", w1.sizes());
  MRRM_CHECK(is_float_dtype(w1.scalar_type()) && is_float_dtype(w2.scalar_type()), where,
              ": weights must be floating point");
  MRRM_CHECK(w2.dim() == 2 && w2.size(0) == 1 && w2.size(1) == w1.size(0), where, ": w2 must be [1, D=", w1.size(0),
              "], got shape ", w2.sizes());
  const at::Tensor pos = positions.contiguous();
  const int64_t* p = pos.data_ptr<int64_t>();
  const int64_t T = hidden.size(0);
  for (int64_t m = 0; m < pos.numel(); ++m) {
    MRRM_CHECK(p[m] >= 0 && p[m] < T, where, ": positions[", m, "]=", p[m], " is out of range for hidden with T=", T,
                " rows");
  }
}

// rows[m, :] = float(hidden[positions[m], :]) -> fp32 [M, H]. Reads hidden through its strides, so a
// non-contiguous hidden is never copied whole.
at::Tensor gather_rows_fp32(const at::Tensor& hidden, const at::Tensor& positions) {
  const int64_t M = positions.numel();
  const int64_t H = hidden.size(1);
  at::Tensor rows = at::empty({M, H}, hidden.options().dtype(at::kFloat));
  const at::Tensor pos = positions.contiguous();
  const int64_t* p = pos.data_ptr<int64_t>();
  const int64_t s0 = hidden.stride(0), s1 = hidden.stride(1);
  float* out = rows.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden.scalar_type(), "gather_rows_fp32", [&] {
    const scalar_t* src = hidden.data_ptr<scalar_t>();
    at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, H)), [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {
        const scalar_t* row = src + p[m] * s0;
        float* dst = out + m * H;
        if (s1 == 1) {
          for (int64_t h = 0; h < H; ++h) dst[h] = static_cast<float>(row[h]);
        } else {
          for (int64_t h = 0; h < H; ++h) dst[h] = static_cast<float>(row[h * s1]);
        }
      }
    });
  });
  return rows;
}

at::Tensor as_fp32(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

}  // namespace

std::tuple<at::Tensor, at::Tensor> gather_value_head_fwd(const at::Tensor& hidden, const at::Tensor& positions,
                                                         const at::Tensor& w1, const at::Tensor& b1,
                                                         const at::Tensor& w2, const at::Tensor& b2,
                                                         const std::string& activation, double scale) {
  const Act act = parse_activation(activation);
  check_head_args("gather_value_head_fwd", hidden, positions, w1, w2);
  const int64_t D = w1.size(0);
  MRRM_CHECK(b1.dim() == 1 && b1.size(0) == D && b1.device().is_cpu(),
              "gather_value_head_fwd: b1 must be a CPU tensor [D=", D, "], got shape ", b1.sizes());
  MRRM_CHECK(b2.numel() == 1 && b2.device().is_cpu(), "gather_value_head_fwd: b2 must be a CPU tensor [1], got shape ",
              b2.sizes());
  MRRM_CHECK(is_float_dtype(b1.scalar_type()) && is_float_dtype(b2.scalar_type()),
              "gather_value_head_fwd: biases must be floating point");
  const int64_t M = positions.numel();

  const at::Tensor rows = gather_rows_fp32(hidden, positions);
  // z = rows @ w1^T: the one large GEMM, by BLAS. Its bias is added in the epilogue below.
  at::Tensor z = at::mm(rows, as_fp32(w1).t()).contiguous();
  at::Tensor out = at::empty({M}, hidden.options().dtype(at::kFloat));

  const at::Tensor b1f = as_fp32(b1), w2f = as_fp32(w2);
  const float* bias1 = b1f.data_ptr<float>();
  const float* head = w2f.data_ptr<float>();
  const float bias2 = b2.to(at::kFloat).item<float>();
  const float sc = static_cast<float>(scale);
  float* zp = z.data_ptr<float>();
  float* op = out.data_ptr<float>();
  // Epilogue per row: z += b1 (kept, it is the backward's input), out = scale * (act(z) . w2 + b2).
  dispatch_activation(act, [&](auto tag) {
    constexpr Act A = decltype(tag)::value;
    at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, D)), [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {
        float* zr = zp + m * D;
        float dot = 0.0f;
        for (int64_t d = 0; d < D; ++d) {
          const float zd = zr[d] + bias1[d];
          zr[d] = zd;
          dot += act_value<A>(zd) * head[d];
        }
        op[m] = sc * (dot + bias2);
      }
    });
  });
  return {out, z};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gather_value_head_bwd(
    const at::Tensor& grad_out, const at::Tensor& hidden, const at::Tensor& positions, const at::Tensor& w1,
    const at::Tensor& w2, const at::Tensor& z_in, const std::string& activation, double scale, bool need_hidden_grad) {
  const Act act = parse_activation(activation);
  check_head_args("gather_value_head_bwd", hidden, positions, w1, w2);
  const int64_t M = positions.numel();
  const int64_t D = w1.size(0);
  const int64_t H = hidden.size(1);
  MRRM_CHECK(grad_out.dim() == 1 && grad_out.numel() == M && is_float_dtype(grad_out.scalar_type()) &&
                  grad_out.device().is_cpu(),
              "gather_value_head_bwd: grad_out must be a floating CPU tensor [M=", M, "], got shape ", grad_out.sizes());
  MRRM_CHECK(z_in.dim() == 2 && z_in.size(0) == M && z_in.size(1) == D && z_in.scalar_type() == at::kFloat &&
                  z_in.device().is_cpu(),
              "gather_value_head_bwd: z must be the forward's fp32 [M=", M, ", D=", D, "] pre-activation, got ",
              z_in.scalar_type(), " of shape ", z_in.sizes());

  const at::Tensor z = z_in.contiguous();
  const at::Tensor w1f = as_fp32(w1), w2f = as_fp32(w2);
  // d out / d y = scale, so the head's upstream gradient is gy = scale * grad_out.
  const at::Tensor gy = (grad_out.to(at::kFloat) * static_cast<float>(scale)).contiguous();
  at::Tensor a = at::empty({M, D}, z.options());   // act(z), for grad_w2
  at::Tensor gz = at::empty({M, D}, z.options());  // d loss / d z
  const float* zp = z.data_ptr<float>();
  const float* gyp = gy.data_ptr<float>();
  const float* head = w2f.data_ptr<float>();
  float* ap = a.data_ptr<float>();
  float* gzp = gz.data_ptr<float>();
  dispatch_activation(act, [&](auto tag) {
    constexpr Act A = decltype(tag)::value;
    at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, D)), [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {
        const float g = gyp[m];
        for (int64_t d = 0; d < D; ++d) {
          const float zd = zp[m * D + d];
          ap[m * D + d] = act_value<A>(zd);
          gzp[m * D + d] = g * head[d] * act_grad<A>(zd);
        }
      }
    });
  });

  const at::Tensor rows = gather_rows_fp32(hidden, positions);
  at::Tensor grad_w1 = at::mm(gz.t(), rows);              // [D, H]
  at::Tensor grad_b1 = gz.sum(0);                          // [D]
  at::Tensor grad_w2 = at::mm(gy.view({1, M}), a);         // [1, D]
  at::Tensor grad_b2 = gy.sum().view({1});                 // [1]

  at::Tensor grad_hidden;
  if (need_hidden_grad) {
    const at::Tensor grad_rows = at::mm(gz, w1f);  // [M, H] fp32, one row per gathered position
    grad_hidden = at::zeros(hidden.sizes(), hidden.options());  // contiguous, whatever hidden's strides
    // Group the M rows by position (stable order, so the sums are deterministic); each distinct
    // position is then written by exactly one task: no races, no atomics, and repeated positions
    // are summed in fp32 and rounded once.
    const at::Tensor pos = positions.contiguous();
    const int64_t* p = pos.data_ptr<int64_t>();
    std::vector<int64_t> order(M);
    std::iota(order.begin(), order.end(), int64_t{0});
    std::stable_sort(order.begin(), order.end(), [p](int64_t i, int64_t j) { return p[i] < p[j]; });
    std::vector<int64_t> run_start;  // run r covers order[run_start[r] : run_start[r + 1]]
    run_start.reserve(M + 1);
    for (int64_t i = 0; i < M; ++i) {
      if (i == 0 || p[order[i]] != p[order[i - 1]]) run_start.push_back(i);
    }
    run_start.push_back(M);
    const int64_t runs = static_cast<int64_t>(run_start.size()) - 1;
    const float* gr = grad_rows.data_ptr<float>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden.scalar_type(), "gather_value_head_scatter", [&] {
      scalar_t* gh = grad_hidden.data_ptr<scalar_t>();
      at::parallel_for(0, runs, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, H)), [&](int64_t r0, int64_t r1) {
        std::vector<float> acc(H);
        for (int64_t r = r0; r < r1; ++r) {
          std::fill(acc.begin(), acc.end(), 0.0f);
          for (int64_t i = run_start[r]; i < run_start[r + 1]; ++i) {
            const float* src = gr + order[i] * H;
            for (int64_t h = 0; h < H; ++h) acc[h] += src[h];
          }
          scalar_t* dst = gh + p[order[run_start[r]]] * H;
          for (int64_t h = 0; h < H; ++h) dst[h] = static_cast<scalar_t>(acc[h]);
        }
      });
    });
  }
  return {grad_hidden, grad_w1.to(w1.scalar_type()), grad_b1.to(w1.scalar_type()), grad_w2.to(w2.scalar_type()),
          grad_b2.to(w2.scalar_type())};
}

}  // namespace mrrm
