// MRRM_CHECK: TORCH_CHECK with a message built without iostreams.
//
// TORCH_CHECK(cond, a, b, ...) formats its arguments through std::ostringstream in the caller's
// object file. On the H200 machine (torch 2.11, its g++) mrrm._C came out with a private copy of
// libstdc++'s `ostream::_M_insert<long>` (nm: W, where the CPU machine's build imports it: U), and
// a TORCH_CHECK formatting an int64 crashed inside that copy (SIGSEGV, cuda-gdb backtrace in
// bench_perf/RESULTS.md). Building the message here from std::string pieces and std::to_string
// keeps mrrm._C's own code off the stream templates; TORCH_CHECK(cond, std::string) hands the
// string to c10::Error as it is (c10::str of one std::string does not touch a stream).
#pragma once

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstdio>
#include <string>
#include <type_traits>

namespace mrrm {
namespace detail {

inline void msg_append(std::string& s, const char* x) { s += x; }
inline void msg_append(std::string& s, const std::string& x) { s += x; }
template <class T, std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, bool>, int> = 0>
inline void msg_append(std::string& s, T x) { s += std::to_string(x); }
inline void msg_append(std::string& s, bool x) { s += x ? "true" : "false"; }
inline void msg_append(std::string& s, double x) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", x);
  s += buf;
}
inline void msg_append(std::string& s, c10::IntArrayRef x) {
  s += "[";
  for (size_t i = 0; i < x.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(x[i]);
  }
  s += "]";
}
inline void msg_append(std::string& s, c10::ScalarType t) { s += c10::toString(t); }
inline void msg_append(std::string& s, const c10::Device& d) { s += d.str(); }

}  // namespace detail

template <class... Args>
std::string msg(const Args&... args) {
  std::string s;
  (detail::msg_append(s, args), ...);
  return s;
}

}  // namespace mrrm

#define MRRM_CHECK(cond, ...) TORCH_CHECK(cond, ::mrrm::msg(__VA_ARGS__))
