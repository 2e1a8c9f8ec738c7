// CUDA epilogues of the fused linear layers: bias + activation forward, activation gradient + bias
// gradient backward. Same csrc/ops/activation.h math as the CPU; computed in float (double for
// double), stored in the tensor's dtype.
#include <stdexcept>
#include <string>

#include "common/params.h"
#include "cuda/common.cuh"
#include "cuda/kernels.h"
#include "ops/activation.h"

namespace pyvae {
namespace cuda {
namespace {

using Dispatched = AllFloatTypes;  // NOTE: [CUDA kernel dtypes]

// One thread per element, grid-stride.
template <ops::Act A, typename T>
__global__ void bias_act_kernel(LinearParams p) {
  using C = compute_t<T>;
  T* y = static_cast<T*>(p.y);
  const T* bias = static_cast<const T*>(p.bias);
  const int64_t n = p.rows * p.cols;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const C b = bias ? static_cast<C>(bias[i % p.cols]) : C(0);
    y[i] = static_cast<T>(ops::bias_act<A>(static_cast<C>(y[i]), b));
  }
}

// Block (32 x 8 threads) per tile of 32 columns x kRowsPerBlock rows: threadIdx.x walks columns
// (coalesced), threadIdx.y strides rows. Row block rb's column sums go to partial[rb]; colsum_kernel
// adds those in a fixed order, so the bias gradient is deterministic. gridDim.y is at most 65535
// (kMaxGridY), so blocks stride over the row blocks: any row count runs, and partial[rb] holds the
// same sum whatever the grid.
constexpr int kColTile = 32;
constexpr int kRowThreads = 8;
constexpr int kRowsPerBlock = 256;
constexpr int64_t kMaxGridY = 65535;

template <ops::Act A, typename T>
__global__ void act_bwd_kernel(LinearParams p, compute_t<T>* partial) {
  using C = compute_t<T>;
  const T* gy = static_cast<const T*>(p.grad_y);
  const T* y = static_cast<const T*>(p.out);
  T* gp = static_cast<T*>(p.grad_pre);
  const int64_t c = blockIdx.x * static_cast<int64_t>(kColTile) + threadIdx.x;
  const int64_t row_blocks = (p.rows + kRowsPerBlock - 1) / kRowsPerBlock;
  __shared__ C part[kRowThreads][kColTile];
  // The bound is the same for every thread of the block: the __syncthreads() below are reached by all.
  for (int64_t rb = blockIdx.y; rb < row_blocks; rb += gridDim.y) {
    const int64_t r0 = rb * kRowsPerBlock;
    const int64_t r1 = r0 + kRowsPerBlock < p.rows ? r0 + kRowsPerBlock : p.rows;
    C acc = 0;
    if (c < p.cols) {
      for (int64_t r = r0 + threadIdx.y; r < r1; r += kRowThreads) {
        const int64_t i = r * p.cols + c;
        const C g = A == ops::Act::kIdentity ? static_cast<C>(gy[i])
                                              : ops::act_backward<A>(static_cast<C>(gy[i]), static_cast<C>(y[i]));
        if (gp) gp[i] = static_cast<T>(g);
        acc += g;
      }
    }
    if (!partial) continue;
    part[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && c < p.cols) {
      C s = 0;
      for (int k = 0; k < kRowThreads; ++k) s += part[k][threadIdx.x];
      partial[rb * p.cols + c] = s;
    }
    __syncthreads();  // part is rewritten by the next row block
  }
}

template <typename T>
__global__ void colsum_kernel(const compute_t<T>* partial, int64_t row_blocks, int64_t cols, T* out) {
  const int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (c >= cols) return;
  compute_t<T> s = 0;
  for (int64_t k = 0; k < row_blocks; ++k) s += partial[k * cols + c];
  out[c] = static_cast<T>(s);
}

size_t size_of(DType d) { return d == DType::kFloat64 ? 8 : (d == DType::kFloat32 ? 4 : 2); }

}  // namespace

std::vector<DType> linear_kernel_dtypes() { return dtypes_in(Dispatched{}); }

// NOTE: [act_bwd workspace]
// The bias gradient is reduced in two deterministic passes: act_bwd_kernel writes one row of column
// sums per block row (row_blocks = ceil(rows / kRowsPerBlock) rows of cols partial sums, in the
// compute type), colsum_kernel adds them in a fixed order. That scratch comes from torch's caching
// allocator, passed in by the caller (pyvae/_gate.py act_bwd_workspace(); the cuBLASLt path's own
// workspace inside csrc/cuda/linear_lt.cu): a cudaMalloc here would be invisible to torch, fail
// instead of freeing torch's cache when memory is short, and break CUDA graph capture.
uint64_t act_bwd_workspace_bytes(DType dtype, int64_t rows, int64_t cols) {
  if (rows <= 0 || cols <= 0) return 0;
  const uint64_t row_blocks = static_cast<uint64_t>((rows + kRowsPerBlock - 1) / kRowsPerBlock);
  return row_blocks * static_cast<uint64_t>(cols) * (dtype == DType::kFloat64 ? 8u : 4u);
}

void bias_act_fwd(const LinearParams& p) {
  const int64_t n = p.rows * p.cols;
  if (n == 0) return;
  DeviceGuard guard(p.device);
  const int blocks = blocks_for(n, 256);
  ops::act_switch(p.act, [&](auto a) {
    by_dtype<Dispatched>(p.dtype, [&](auto t) {
      bias_act_kernel<decltype(a)::value, decltype(t)>
          <<<blocks, 256, 0, stream_of(p.stream)>>>(p);
    });
  });
  check_launch("bias_act_fwd");
}

void act_bwd(const LinearParams& p) {
  // grad_pre_t is CPU-only (the binding refuses it for CUDA; cuBLAS takes transposed operands).
  DeviceGuard guard(p.device);
  if (p.rows == 0) {
    if (p.grad_bias)
      check_cuda(cudaMemsetAsync(p.grad_bias, 0, static_cast<size_t>(p.cols) * size_of(p.dtype), stream_of(p.stream)),
                 "act_bwd: cudaMemsetAsync of grad_bias");
    return;
  }
  const int64_t row_blocks = (p.rows + kRowsPerBlock - 1) / kRowsPerBlock;
  const dim3 grid(static_cast<unsigned>((p.cols + kColTile - 1) / kColTile),
                  static_cast<unsigned>(row_blocks < kMaxGridY ? row_blocks : kMaxGridY));
  const cudaStream_t stream = stream_of(p.stream);
  // The partial column sums live in the caller's workspace (NOTE: [act_bwd workspace]).
  const uint64_t partial_bytes = static_cast<uint64_t>(row_blocks) * static_cast<uint64_t>(p.cols) *
                                 (p.dtype == DType::kFloat64 ? 8u : 4u);
  if (p.grad_bias && (!p.workspace || p.workspace_bytes < partial_bytes))
    throw std::invalid_argument("pyvae act_bwd: the bias gradient needs a workspace of " +
                                std::to_string(partial_bytes) + " bytes, got " + std::to_string(p.workspace_bytes) +
                                " (act_bwd_workspace_bytes)");
  ops::act_switch(p.act, [&](auto a) {
    by_dtype<Dispatched>(p.dtype, [&](auto t) {
      using T = decltype(t);
      using C = compute_t<T>;
      C* partial = p.grad_bias ? static_cast<C*>(p.workspace) : nullptr;
      act_bwd_kernel<decltype(a)::value, T><<<grid, dim3(kColTile, kRowThreads), 0, stream>>>(p, partial);
      if (partial) {
        colsum_kernel<T><<<static_cast<unsigned>((p.cols + 255) / 256), 256, 0, stream>>>(
            partial, row_blocks, p.cols, static_cast<T*>(p.grad_bias));
      }
    });
  });
  check_launch("act_bwd");
}

}  // namespace cuda
}  // namespace pyvae
