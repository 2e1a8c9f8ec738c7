// Plain parameter structs that cross from the binding to the CPU and CUDA launchers.
// The binding fills them from tensors Python has already validated; launchers only read them.
#pragma once

#include <cstdint>

namespace pyvae {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// A contiguous row-major [mod, cols] block. Row r of an op reads row (r % mod): this is how an
// operand with fewer leading dims (x [B, D] against logits [L, B, D], a prior [Z]) broadcasts
// without being copied.
struct Operand {
  const void* data = nullptr;
  int64_t mod = 1;
};

// Ops that reduce the last (event) dim of elementwise terms: out[r] = sum_c term(row r, col c).
// The meaning of a..d per op is written beside each launcher declaration (csrc/cpu/kernels.h).
struct RowwiseParams {
  DType dtype = DType::kFloat32;
  int64_t rows = 0;     // output rows (product of the leading dims)
  int64_t cols = 0;     // event size D
  int64_t cols2 = 0;    // second event size (bernoulli_elbo: Z)
  int64_t samples = 1;  // bernoulli_elbo: leading sample dim of the logits
  Operand a, b, c, d;
  const void* grad_out = nullptr;  // [rows], backward only
  void* out = nullptr;             // [rows], forward only
  // Backward outputs, each [rows, cols] (or as documented per op); nullptr = not requested.
  void* grad_a = nullptr;
  void* grad_b = nullptr;
  void* grad_c = nullptr;
  void* grad_d = nullptr;
  void* stream = nullptr;  // cudaStream_t on CUDA
  int device = 0;          // CUDA: the ordinal of the device holding every tensor (made current for the launch)
};

// z[s, m] = mu[m] + exp(logvar[m] / 2) * eps[s * numel + m], eps from Philox (seed, offset).
// The draw's (seed, offset) is either passed by value (seed, offset) or, CUDA only, read by the kernel
// from device memory (seed_ptr; NOTE: [Graph-safe seed] in pyvae/ops/reparameterize.py).
struct ReparamParams {
  DType dtype = DType::kFloat32;
  int64_t numel = 0;    // elements of mu (and of logvar, same shape)
  int64_t samples = 1;  // S draws per element
  const void* mu = nullptr;
  const void* logvar = nullptr;
  const void* grad_out = nullptr;  // [S, numel], backward only
  void* z = nullptr;               // [S, numel], forward only
  void* grad_mu = nullptr;         // [numel]
  void* grad_logvar = nullptr;     // [numel]
  // CPU only (NOTE: [Saved eps] in csrc/cpu/reparameterize.cpp): [S, numel] of the kernel dtype; the forward
  // writes its eps here when set, and the backward reads them from here instead of drawing them again.
  void* eps = nullptr;
  uint64_t seed = 0;
  uint64_t offset = 0;
  // CUDA only: when set, two int64 in device memory, {seed, offset} (bit-cast to uint64), read by the
  // kernel instead of seed and offset above, so that a captured CUDA graph draws anew on each replay.
  const int64_t* seed_ptr = nullptr;
  void* stream = nullptr;
  int device = 0;  // CUDA: the ordinal of the device holding every tensor
};

// Dynamic binarization of a gathered batch (NOTE: [Counter-based binarization] in ops/philox.h):
// out[r, c] = [u < src[index[r], c]], u the uniform of element (first_row + r) * cols + c of the draw
// (seed, 0). float32 only.
struct BinarizeParams {
  const float* src = nullptr;      // [src_rows, cols]
  const int64_t* index = nullptr;  // [rows] rows of src (each in [0, src_rows)), or nullptr: rows 0..rows-1
  float* out = nullptr;            // [rows, cols]
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t first_row = 0;  // the batch's first row in the global batch (data-parallel shards)
  uint64_t seed = 0;
  void* stream = nullptr;
  int device = 0;
};

}  // namespace pyvae

namespace pyvae {

// Epilogues of a linear layer y = act(x W^T + b) around a library GEMM (DESIGN.md, decision 5).
struct LinearParams {
  DType dtype = DType::kFloat32;
  int act = 0;  // ops::Act
  int64_t rows = 0;
  int64_t cols = 0;
  void* y = nullptr;               // forward: the GEMM result [rows, cols], overwritten by act(y + bias)
  const void* bias = nullptr;      // [cols] or nullptr
  const void* grad_y = nullptr;    // backward: [rows, cols]
  const void* out = nullptr;       // backward: the forward's output y [rows, cols]
  void* grad_pre = nullptr;        // backward: dL/d(pre-activation) [rows, cols], or nullptr
  void* grad_bias = nullptr;       // backward: [cols] (sum of grad_pre over rows), or nullptr
  // backward, CPU only: also write dL/d(pre-activation) transposed, [cols, rows] row-major (the
  // first operand of the weight-gradient GEMM; NOTE: [CPU GEMM backend] in pyvae/_gemm.py), or nullptr.
  // grad_pre may then be nullptr when only the weight gradient is wanted.
  void* grad_pre_t = nullptr;
  // backward, CUDA, with grad_bias: scratch for the per-block column sums (act_bwd_workspace_bytes()
  // in csrc/cuda/kernels.h), device memory from torch's allocator, used on `stream` only.
  void* workspace = nullptr;
  uint64_t workspace_bytes = 0;
  void* stream = nullptr;
  int device = 0;  // CUDA: the ordinal of the device holding every tensor
};

}  // namespace pyvae

namespace pyvae {

// One linear layer's GEMM run by cuBLASLt (csrc/cuda/linear_lt.cu, NOTE: [cuBLASLt path]), in the
// row-major (torch) terms of y = act(x @ weight^T + bias). Every matrix is contiguous row-major.
// Which fields an entry reads is written beside its declaration in csrc/cuda/kernels.h.
struct LinearLtParams {
  DType dtype = DType::kFloat32;
  int act = 0;  // ops::Act
  int64_t rows = 0;
  int64_t in_features = 0;
  int64_t out_features = 0;
  const void* x = nullptr;         // [rows, in]
  const void* weight = nullptr;    // [out, in]
  const void* bias = nullptr;      // forward: [out] or nullptr
  void* y = nullptr;               // forward: [rows, out]
  const void* grad_pre = nullptr;  // backward: dL/d(pre-activation) [rows, out]
  void* grad_x = nullptr;          // dgrad: [rows, in]
  void* grad_weight = nullptr;     // wgrad: [out, in]
  void* grad_bias = nullptr;       // wgrad: [out]; dgrad with the ReLU mask: [in]; or nullptr
  // ReLU bit mask in cuBLASLt's layout: written by the forward, read by the dgrad of the next layer.
  void* aux = nullptr;
  int64_t aux_ld = 0;  // in bits: a multiple of 128, >= the features the mask covers
  void* workspace = nullptr;
  uint64_t workspace_bytes = 0;
  bool allow_tf32 = false;        // float32: CUBLAS_COMPUTE_32F_FAST_TF32
  bool strict_reduction = false;  // half types: no split-K reduction in the output type
  bool fuse_act = true;           // let cuBLASLt apply the ReLU (else: pyvae's kernel does)
  int device = 0;
  void* stream = nullptr;
};

}  // namespace pyvae
