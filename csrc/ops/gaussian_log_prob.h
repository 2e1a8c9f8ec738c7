// Diagonal Gaussian log-density with log-variance, per element (the launcher sums the event dim).
#pragma once

#include "common/hd.h"
#include "ops/fastmath.h"

namespace pyvae {
namespace ops {

// log N(x | m, e^lv) = -0.5 * (log(2 pi) + lv + (x - m)^2 e^-lv)
template <typename T>
PYVAE_HD PYVAE_FORCEINLINE T gaussian_log_prob(T x, T m, T lv) {
  const T d = x - m;
  return T(-0.5) * (T(1.8378770664093454835606594728112) + lv + d * d * math::exp(-lv));
}

template <typename T>
struct GaussianGrad {
  T x, m, lv;
};

// w = (x - m) e^-lv: d/dx = -w, d/dm = w, d/dlv = 0.5 ((x - m) w - 1); all scaled by g
template <typename T>
PYVAE_HD PYVAE_FORCEINLINE GaussianGrad<T> gaussian_log_prob_grad(T x, T m, T lv, T g) {
  const T d = x - m;
  const T w = d * math::exp(-lv);
  GaussianGrad<T> r;
  r.m = g * w;
  r.x = -r.m;
  r.lv = g * T(0.5) * (d * w - T(1));
  return r;
}

}  // namespace ops
}  // namespace pyvae
