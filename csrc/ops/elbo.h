// How the fused SGVB estimator B combines its two terms (Kingma & Welling 2013, eq. 10):
// per datapoint, the reconstruction log-likelihood averaged over L samples minus the analytic KL.
#pragma once

#include "common/hd.h"

namespace pyvae {
namespace ops {

// ELBO = (1/L) sum_l log p(x | z_l) - KL(q(z|x) || p(z))
template <typename T>
PYVAE_HD PYVAE_FORCEINLINE T elbo_combine(T recon_sum, int64_t samples, T kl) {
  return recon_sum / T(samples) - kl;
}

// Upstream gradient g of the ELBO reaches each reconstruction term as g / L and the KL as -g.
template <typename T>
struct ElboScales {
  T recon, kl;
};

template <typename T>
PYVAE_HD PYVAE_FORCEINLINE ElboScales<T> elbo_grad_scales(T g, int64_t samples) {
  ElboScales<T> s;
  s.recon = g / T(samples);
  s.kl = -g;
  return s;
}

}  // namespace ops
}  // namespace pyvae
