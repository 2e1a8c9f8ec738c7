// Reparameterized Gaussian sample and its gradient, per element. eps comes from ops/philox.h.
#pragma once

#include "common/hd.h"
#include "ops/fastmath.h"

namespace pyvae {
namespace ops {

// z = mu + exp(lv / 2) * eps
template <typename T>
PYVAE_HD PYVAE_FORCEINLINE T reparameterize(T mu, T lv, T eps) {
  return mu + math::exp(T(0.5) * lv) * eps;
}

template <typename T>
struct ReparamGrad {
  T mu, lv;
};

// dz/dmu = 1, dz/dlv = 0.5 * exp(lv / 2) * eps; both scaled by g. Uses eps, not z - mu, so the
// gradient stays exact when exp(lv / 2) * eps is below the rounding of mu. The two halves are
// separate so a caller that needs only the mu gradient draws no eps.
template <typename T>
PYVAE_HD PYVAE_FORCEINLINE T reparameterize_grad_mu(T g) {
  return g;
}

template <typename T>
PYVAE_HD PYVAE_FORCEINLINE T reparameterize_grad_lv(T lv, T eps, T g) {
  return g * T(0.5) * math::exp(T(0.5) * lv) * eps;
}

template <typename T>
PYVAE_HD PYVAE_FORCEINLINE ReparamGrad<T> reparameterize_grad(T lv, T eps, T g) {
  ReparamGrad<T> r;
  r.mu = reparameterize_grad_mu(g);
  r.lv = reparameterize_grad_lv(lv, eps, g);
  return r;
}

}  // namespace ops
}  // namespace pyvae
