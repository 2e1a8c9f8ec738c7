// Plumbing shared by the CUDA launchers: compute types, loads/stores, dtype dispatch, the device
// guard, errors.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

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

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string("pyvae CUDA: ") + what + " failed: " + cudaGetErrorString(err));
}

inline cudaStream_t stream_of(void* s) { return static_cast<cudaStream_t>(s); }

// Makes `device` the current device for the scope and restores the previous one after. Every launcher
// holds one: the stream it is given belongs to the tensors' device, which need not be the current one
// (a model on cuda:1 while cuda:0 is current), and a kernel launched on the current device with another
// device's stream fails or reads memory of the wrong device.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) : device_(device) {
    check_cuda(cudaGetDevice(&prev_), "cudaGetDevice");
    if (prev_ != device_) check_cuda(cudaSetDevice(device_), "cudaSetDevice");
  }
  ~DeviceGuard() {
    if (prev_ != device_) cudaSetDevice(prev_);  // best effort: a destructor must not throw
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0;
  int device_ = 0;
};

constexpr int kMaxGrid = 65535 * 8;

// Blocks of `threads` covering n items (at least 1, at most kMaxGrid; kernels grid-stride).
inline int blocks_for(int64_t n, int threads) {
  const int64_t b = (n + threads - 1) / threads;
  return static_cast<int>(b < kMaxGrid ? (b > 0 ? b : 1) : kMaxGrid);
}

// NOTE: [CUDA kernel dtypes]
// A launcher dispatches with by_dtype<List>: it instantiates its kernels for exactly the storage types
// of List and throws for any other dtype. Each .cu reports the list it dispatches over
// (*_kernel_dtypes() in csrc/cuda/kernels.h, exported as pyvae._C.cuda_kernel_dtypes), so a test can
// check that every dtype the binding accepts on CUDA (pyvae._C.rowwise_dtypes / linear_dtypes) has
// kernels: the report and the instantiation come from the same type list, not from a second table.
template <typename... Ts>
struct Types {};
using AllFloatTypes = Types<float, double, __half, __nv_bfloat16>;

template <typename T>
struct dtype_of;
template <>
struct dtype_of<float> {
  static constexpr DType value = DType::kFloat32;
};
template <>
struct dtype_of<double> {
  static constexpr DType value = DType::kFloat64;
};
template <>
struct dtype_of<__half> {
  static constexpr DType value = DType::kFloat16;
};
template <>
struct dtype_of<__nv_bfloat16> {
  static constexpr DType value = DType::kBFloat16;
};

template <typename F>
bool dispatch_in(DType, const F&, Types<>) {
  return false;
}
template <typename F, typename T, typename... Rest>
bool dispatch_in(DType dt, const F& f, Types<T, Rest...>) {
  if (dt == dtype_of<T>::value) {
    f(T{});
    return true;
  }
  return dispatch_in(dt, f, Types<Rest...>{});
}

// Calls f(T{}) with T the storage type of dt, T among List; throws when List has no such type.
template <typename List, typename F>
void by_dtype(DType dt, const F& f) {
  if (!dispatch_in(dt, f, List{}))
    throw std::invalid_argument("pyvae CUDA: no kernel for dtype code " + std::to_string(static_cast<int>(dt)));
}

template <typename... Ts>
std::vector<DType> dtypes_in(Types<Ts...>) {
  return {dtype_of<Ts>::value...};
}

}  // namespace cuda
}  // namespace pyvae
