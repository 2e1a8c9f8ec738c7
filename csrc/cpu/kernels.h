// CPU launchers. kernels.cpp is compiled once per instruction set (base, avx2, avx512) into its own
// namespace; dispatch.cpp picks one at run time (see NOTE: [CPU dispatch] in dispatch.cpp).
#pragma once

#include "common/params.h"

#define PYVAE_CPU_DECLARE_KERNELS(ARCH)                                                       \
  namespace pyvae {                                                                           \
  namespace cpu {                                                                             \
  namespace ARCH {                                                                            \
  /* a = logits, b = x; grad_a = d/dlogits, grad_b = d/dx */                                  \
  void bernoulli_log_prob_fwd(const RowwiseParams& p);                                        \
  void bernoulli_log_prob_bwd(const RowwiseParams& p);                                        \
  /* a = logits, b = x (continuous Bernoulli); grad_a = d/dlogits, grad_b = d/dx */          \
  void continuous_bernoulli_log_prob_fwd(const RowwiseParams& p);                             \
  void continuous_bernoulli_log_prob_bwd(const RowwiseParams& p);                             \
  /* a = mu, b = logvar, c = prior mu, d = prior logvar (c, d null: N(0, I)) */               \
  void gaussian_kl_fwd(const RowwiseParams& p);                                               \
  void gaussian_kl_bwd(const RowwiseParams& p);                                               \
  /* a = x, b = mean, c = logvar */                                                           \
  void gaussian_log_prob_fwd(const RowwiseParams& p);                                         \
  void gaussian_log_prob_bwd(const RowwiseParams& p);                                         \
  /* a = logits [samples*rows, cols], b = x, c = mu [rows, cols2], d = logvar [rows, cols2];  \
     grad_b is [rows, cols] summed over samples */                                            \
  void bernoulli_elbo_fwd(const RowwiseParams& p);                                            \
  void bernoulli_elbo_bwd(const RowwiseParams& p);                                            \
  void reparameterize_fwd(const ReparamParams& p);                                            \
  void reparameterize_bwd(const ReparamParams& p);                                            \
  void gather_binarize(const BinarizeParams& p);                                              \
  /* NOTE: [Huge pages for fresh outputs] on a caller's buffer (the benchmarks' memory floor) */ \
  void advise_huge_pages_bytes(void* p, int64_t bytes);                                       \
  /* linear-layer epilogues: y = act(y + bias) in place; grad_pre, grad_bias from grad_y, y */ \
  void bias_act_fwd(const LinearParams& p);                                                   \
  void act_bwd(const LinearParams& p);                                                        \
  }                                                                                           \
  }                                                                                           \
  }

PYVAE_CPU_DECLARE_KERNELS(base)
#if defined(PYVAE_CPU_MULTIARCH)
PYVAE_CPU_DECLARE_KERNELS(avx2)
PYVAE_CPU_DECLARE_KERNELS(avx512)
#endif
