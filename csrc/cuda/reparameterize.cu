// CUDA launchers of reparameterize, compiled with --fmad=false (CMakeLists.txt) so that the draws
// are computed with the same roundings as the CPU builds (see csrc/cpu/reparameterize.cpp).
#include "common/params.h"
#include "cuda/common.cuh"
#include "cuda/kernels.h"
#include "ops/binarize.h"
#include "ops/philox.h"
#include "ops/reparameterize.h"

namespace pyvae {
namespace cuda {
namespace {

using Dispatched = AllFloatTypes;  // NOTE: [CUDA kernel dtypes]

// The draw's (seed, offset): from device memory when the caller gave it there (graph-safe: a captured
// graph reads the value its replay's generator step wrote; NOTE: [Graph-safe seed] in
// pyvae/ops/reparameterize.py), else the values passed by value. int64 -> uint64 is the same
// two's-complement reinterpretation the host path applies, so one seed value gives one stream.
struct Key {
  uint64_t seed, offset;
};
__device__ __forceinline__ Key key_of(const ReparamParams& p) {
  if (p.seed_ptr) return {static_cast<uint64_t>(p.seed_ptr[0]), static_cast<uint64_t>(p.seed_ptr[1])};
  return {p.seed, p.offset};
}

// ----------------------------------------------------------------------------- reparameterize
// One thread per Philox counter: four consecutive elements of the [S, M] draw.
template <typename T>
__global__ void reparam_fwd_kernel(ReparamParams p) {
  using C = compute_t<T>;
  const int64_t total = p.samples * p.numel;
  const int64_t groups = (total + 3) / 4;
  const T* __restrict__ mu = static_cast<const T*>(p.mu);
  const T* __restrict__ lv = static_cast<const T*>(p.logvar);
  T* __restrict__ z = static_cast<T*>(p.z);
  const Key key = key_of(p);
  for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < groups;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const philox::Normal4 n = philox::normal4(key.seed, key.offset + static_cast<uint64_t>(c));
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int64_t i = 4 * c + k;
      if (i < total) {
        const int64_t m = i % p.numel;
        store(z, i, ops::reparameterize(load(mu, m), load(lv, m), static_cast<C>(n.v[k])));
      }
    }
  }
}

// One thread per element of mu: sums the S samples' gradients in a fixed order (deterministic).
template <typename T>
__global__ void reparam_bwd_kernel(ReparamParams p) {
  using C = compute_t<T>;
  const T* __restrict__ lv = static_cast<const T*>(p.logvar);
  const T* __restrict__ G = static_cast<const T*>(p.grad_out);
  T* __restrict__ gmu = static_cast<T*>(p.grad_mu);
  T* __restrict__ glv = static_cast<T*>(p.grad_logvar);
  const Key key = key_of(p);
  for (int64_t m = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; m < p.numel;
       m += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const C lvm = load(lv, m);
    C dmu = 0, dlv = 0;
    for (int64_t s = 0; s < p.samples; ++s) {
      const int64_t i = s * p.numel + m;
      const C eps = static_cast<C>(philox::normal_at(key.seed, key.offset, static_cast<uint64_t>(i)));
      const auto v = ops::reparameterize_grad(lvm, eps, load(G, i));
      dmu += v.mu;
      dlv += v.lv;
    }
    if (gmu) store(gmu, m, dmu);
    if (glv) store(glv, m, dlv);
  }
}

// ------------------------------------------------------------------------------ binarization
// One thread per Philox counter: four consecutive elements of the global draw
// (NOTE: [Counter-based binarization]); the batch's elements are first_row * cols onwards.
__global__ void gather_binarize_kernel(BinarizeParams p) {
  const int64_t first = p.first_row * p.cols;
  const int64_t last = first + p.rows * p.cols;
  const int64_t c_first = first / 4;
  const int64_t c_last = (last + 3) / 4;
  for (int64_t c = c_first + blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < c_last;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const philox::U32x4 w = philox::words4(p.seed, static_cast<uint64_t>(c));
    for (int k = 0; k < 4; ++k) {
      const int64_t e = 4 * c + k;
      if (e < first || e >= last) continue;
      const int64_t r = (e - first) / p.cols, col = (e - first) % p.cols;
      const int64_t src_row = p.index ? p.index[r] : r;
      p.out[r * p.cols + col] = ops::binarize(p.src[src_row * p.cols + col], philox::uniform_open1(w.v[k]));
    }
  }
}

}  // namespace

void gather_binarize(const BinarizeParams& p) {
  if (p.rows == 0 || p.cols == 0) return;
  DeviceGuard guard(p.device);
  const int64_t counters = (p.rows * p.cols + 6) / 4 + 1;
  gather_binarize_kernel<<<blocks_for(counters, 256), 256, 0, stream_of(p.stream)>>>(p);
  check_launch("gather_binarize");
}

std::vector<DType> reparam_kernel_dtypes() { return dtypes_in(Dispatched{}); }

void reparameterize_fwd(const ReparamParams& p) {
  DeviceGuard guard(p.device);
  const int64_t groups = (p.samples * p.numel + 3) / 4;
  by_dtype<Dispatched>(p.dtype, [&](auto t) {
    reparam_fwd_kernel<decltype(t)><<<blocks_for(groups, 256), 256, 0, stream_of(p.stream)>>>(p);
  });
  check_launch("reparameterize_fwd");
}
void reparameterize_bwd(const ReparamParams& p) {
  DeviceGuard guard(p.device);
  by_dtype<Dispatched>(p.dtype, [&](auto t) {
    reparam_bwd_kernel<decltype(t)><<<blocks_for(p.numel, 256), 256, 0, stream_of(p.stream)>>>(p);
  });
  check_launch("reparameterize_bwd");
}

}  // namespace cuda
}  // namespace pyvae
