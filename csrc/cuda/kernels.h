// CUDA launchers (csrc/cuda/*.cu). Same params and per-op operand meaning as csrc/cpu/kernels.h;
// p.stream is the caller's cudaStream_t on device p.device, which each launcher makes current for the
// launch. float32, float64, float16 and bfloat16 (float accumulation for the half types).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "common/params.h"

namespace pyvae {
namespace cuda {

void bernoulli_log_prob_fwd(const RowwiseParams& p);
void bernoulli_log_prob_bwd(const RowwiseParams& p);
void continuous_bernoulli_log_prob_fwd(const RowwiseParams& p);
void continuous_bernoulli_log_prob_bwd(const RowwiseParams& p);
void gaussian_kl_fwd(const RowwiseParams& p);
void gaussian_kl_bwd(const RowwiseParams& p);
void gaussian_log_prob_fwd(const RowwiseParams& p);
void gaussian_log_prob_bwd(const RowwiseParams& p);
void bernoulli_elbo_fwd(const RowwiseParams& p);
void bernoulli_elbo_bwd(const RowwiseParams& p);
void reparameterize_fwd(const ReparamParams& p);
void reparameterize_bwd(const ReparamParams& p);
void gather_binarize(const BinarizeParams& p);
void bias_act_fwd(const LinearParams& p);
// With p.grad_bias, p.workspace must hold act_bwd_workspace_bytes(p.dtype, p.rows, p.cols) bytes.
void act_bwd(const LinearParams& p);
// Bytes of scratch act_bwd needs for its deterministic bias-gradient reduction (0 when rows == 0).
uint64_t act_bwd_workspace_bytes(DType dtype, int64_t rows, int64_t cols);

// The dtypes each family's launchers instantiate kernels for (NOTE: [CUDA kernel dtypes] in
// csrc/cuda/common.cuh): the row ops (elbo.cu), reparameterize (reparameterize.cu) and the linear
// epilogues (linear.cu).
std::vector<DType> rowwise_kernel_dtypes();
std::vector<DType> reparam_kernel_dtypes();
std::vector<DType> linear_kernel_dtypes();

#if defined(PYVAE_WITH_CUBLASLT)
// The cuBLASLt GEMMs of a linear layer (csrc/cuda/linear_lt.cu, NOTE: [cuBLASLt path]). Each returns
// kLtDone, or kLtUnsupported when cuBLASLt has no algorithm for the problem (nothing was written: the
// caller computes it another way); any other failure throws std::runtime_error. p.device is made
// current for the call; p.workspace is caller-owned device memory used on p.stream.
constexpr int kLtDone = 0;
constexpr int kLtUnsupported = 1;

// Loads libcublasLt (path, or when empty: $PYVAE_CUBLASLT_LIBRARY, libcublasLt.so.<header major>,
// libcublasLt.so) unless already loaded. Thread-safe. False with *why set when it cannot.
bool lt_load(const std::string& path, std::string* why);
// The loaded library's cublasLtGetVersion(), 0 when none is loaded.
size_t lt_version();
// CUBLAS_VERSION of the cublasLt.h this was compiled against (major * 10000 + minor * 100 + patch).
int lt_header_version();
// Loaded, and the CUDA runtime sees at least one device.
bool lt_usable(std::string* why);

// y = act(x W^T + bias); reads x, weight, bias (or null), act, fuse_act; writes y and, for ReLU when
// aux is set, the bit mask (aux, aux_ld >= out_features).
int lt_linear_fwd(const LinearLtParams& p);
// grad_weight = grad_pre^T x, and grad_bias = column sums of grad_pre when grad_bias is set.
int lt_linear_wgrad(const LinearLtParams& p);
// grad_x = grad_pre W. With aux (the previous layer's ReLU mask, aux_ld >= in_features): grad_x is
// instead the previous layer's pre-activation gradient, (grad_pre W) * relu'(its pre-activation),
// and grad_bias (if set, [in]) its column sums; x must then be that layer's output (this layer's
// input), used when cuBLASLt has no ReLU-gradient epilogue for the problem.
int lt_linear_dgrad(const LinearLtParams& p);
#endif

}  // namespace cuda
}  // namespace pyvae
