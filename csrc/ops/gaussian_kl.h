// Analytic KL divergence between diagonal Gaussians, per element (the launcher sums the event dim).
#pragma once

#include "common/hd.h"
#include "ops/fastmath.h"

namespace pyvae {
namespace ops {

// KL(N(mu, e^lv) || N(0, 1)) = 0.5 * (mu^2 + e^lv - 1 - lv)
template <typename T>
PYVAE_HD PYVAE_FORCEINLINE T kl_std_normal(T mu, T lv) {
  // lv = +inf: exp(lv) - lv is inf - inf; its limit is +inf (NOTE: [Infinite inputs] in bernoulli.h)
  const T lin = lv == math::inf_<T>() ? T(0) : lv;
  return T(0.5) * (mu * mu + math::exp(lv) - T(1) - lin);
}

template <typename T>
struct KLStdGrad {
  T mu, lv;
};

// d/dmu = mu, d/dlv = 0.5 * (e^lv - 1); both scaled by the upstream gradient g
template <typename T>
PYVAE_HD PYVAE_FORCEINLINE KLStdGrad<T> kl_std_normal_grad(T mu, T lv, T g) {
  KLStdGrad<T> r;
  r.mu = g * mu;
  r.lv = g * T(0.5) * (math::exp(lv) - T(1));
  return r;
}

// KL(N(mu, e^lv) || N(pm, e^plv)) = 0.5 * (plv - lv + e^(lv - plv) + (mu - pm)^2 e^-plv - 1)
// (mu - pm)^2 e^-plv as (d e^(-plv/2))^2, the gradient's form and ``_limits``': d^2 alone loses its precision
// to underflow (|d| below 1e-19 in float32) where e^-plv makes the product count. NaN where d = 0 and
// e^(-plv/2) overflows (plv < -177 in float32), where ``_limits`` below gives the value; the CPU kernels
// sum a row again with it when its sum is NaN or +inf (NOTE: [Tiny variances] in gaussian_log_prob.h)
template <typename T>
PYVAE_HD PYVAE_FORCEINLINE T kl_normal(T mu, T lv, T pm, T plv) {
  const T s = (mu - pm) * math::exp(T(-0.5) * plv);
  const T lin = lv == math::inf_<T>() ? T(0) : lv;  // lv = +inf, finite plv: +inf, as kl_std_normal
  return T(0.5) * (plv - lin + math::exp(lv - plv) + s * s - T(1));
}

// the same, with the quadratic term 0 at d = 0 for any plv (NOTE: [Tiny variances] in gaussian_log_prob.h),
// and +inf for a point-mass prior (plv = -inf), where plv - lv + e^(lv - plv) is -inf + inf
template <typename T>
PYVAE_HD PYVAE_FORCEINLINE T kl_normal_limits(T mu, T lv, T pm, T plv) {
  const T d = mu - pm;
  const T s = d * math::exp(T(-0.5) * plv);
  const T q = d == T(0) ? T(0) : s * s;
  const T lin = lv == math::inf_<T>() ? T(0) : lv;
  const T plin = plv == -math::inf_<T>() ? T(0) : plv;
  return T(0.5) * (plin - lin + math::exp(lv - plv) + q - T(1));
}

template <typename T>
struct KLGrad {
  T mu, lv, pm, plv;
};

// d/dmu = (mu - pm) e^-plv = -d/dpm; d/dlv = 0.5 (e^(lv-plv) - 1);
// d/dplv = 0.5 (1 - e^(lv-plv) - (mu - pm)^2 e^-plv); all scaled by g
template <typename T>
PYVAE_HD PYVAE_FORCEINLINE KLGrad<T> kl_normal_grad(T mu, T lv, T pm, T plv, T g) {
  const T d = mu - pm;
  const T e = math::exp(T(-0.5) * plv);  // d e^-plv as (d e^(-plv/2)) e^(-plv/2), as kl_normal's term
  const T s = d * e;
  const bool zero = d == T(0);
  const T w = zero ? T(0) : s * e;
  const T q = zero ? T(0) : s * s;
  const T ratio = math::exp(lv - plv);
  KLGrad<T> r;
  r.mu = g * w;
  r.pm = -r.mu;
  r.lv = g * T(0.5) * (ratio - T(1));
  r.plv = g * T(0.5) * (T(1) - ratio - q);
  return r;
}

}  // namespace ops
}  // namespace pyvae
