// CUDA launchers (csrc/cuda/*.cu). Same params and per-op operand meaning as csrc/cpu/kernels.h;
// p.stream is the caller's cudaStream_t. float32, float16 and bfloat16 (float accumulation).
#pragma once

#include "common/params.h"

namespace pyvae {
namespace cuda {

void bernoulli_log_prob_fwd(const RowwiseParams& p);
void bernoulli_log_prob_bwd(const RowwiseParams& p);
void gaussian_kl_fwd(const RowwiseParams& p);
void gaussian_kl_bwd(const RowwiseParams& p);
void gaussian_log_prob_fwd(const RowwiseParams& p);
void gaussian_log_prob_bwd(const RowwiseParams& p);
void bernoulli_elbo_fwd(const RowwiseParams& p);
void bernoulli_elbo_bwd(const RowwiseParams& p);
void reparameterize_fwd(const ReparamParams& p);
void reparameterize_bwd(const ReparamParams& p);
void bias_act_fwd(const LinearParams& p);
void act_bwd(const LinearParams& p);

}  // namespace cuda
}  // namespace pyvae
