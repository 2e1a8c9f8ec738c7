// Plumbing shared by the CUDA launchers: compute types, loads/stores, dtype dispatch, errors.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>
#include <type_traits>

#include "common/params.h"

namespace pyvae {
namespace cuda {

// Storage type T, compute/accumulate type: double for double, float otherwise (half types).
template <typename T>
using compute_t = typename std::conditional<std::is_same<T, double>::value, double, float>::type;

template <typename T>
__device__ __forceinline__ compute_t<T> load(const T* p, int64_t i) {
  return static_cast<compute_t<T>>(p[i]);
}

template <typename T, typename C>
__device__ __forceinline__ void store(T* p, int64_t i, C v) {
  p[i] = static_cast<T>(v);
}

inline void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("pyvae CUDA kernel ") + what + " failed: " + cudaGetErrorString(err));
}

inline cudaStream_t stream_of(void* s) { return static_cast<cudaStream_t>(s); }

constexpr int kMaxGrid = 65535 * 8;

// Blocks of `threads` covering n items (at least 1, at most kMaxGrid; kernels grid-stride).
inline int blocks_for(int64_t n, int threads) {
  const int64_t b = (n + threads - 1) / threads;
  return static_cast<int>(b < kMaxGrid ? (b > 0 ? b : 1) : kMaxGrid);
}

// Calls f(T{}) with T the storage type of dt.
template <typename F>
void by_dtype(DType dt, const F& f) {
  switch (dt) {
    case DType::kFloat32: f(float{}); break;
    case DType::kFloat64: f(double{}); break;
    case DType::kFloat16: f(__half{}); break;
    case DType::kBFloat16: f(__nv_bfloat16{}); break;
  }
}

}  // namespace cuda
}  // namespace pyvae
