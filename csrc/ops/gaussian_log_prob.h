// Diagonal Gaussian log-density with log-variance, per element (the launcher sums the event dim).
#pragma once

#include "common/hd.h"
#include "ops/fastmath.h"

namespace pyvae {
namespace ops {

// NOTE: [Tiny variances]
// Written as (x - m)^2 e^-lv, the quadratic term overflows through its factor e^-lv: below lv = -88.7 in
// float32 (a learned variance collapsing onto a constant pixel gets there) e^-lv is inf, so x = m gives
// 0 * inf = NaN and x - m = 1e-3 gives -inf where log p is -2.2e32. As (d e^(-lv/2))^2, d = x - m, it is
// finite wherever its value is down to lv = -177, where e^(-lv/2) overflows (below it the term is finite
// only for |d| under ~1e-19, which this form reads as overflow). At d = 0 the term is 0 for every lv, its limit along x = m even at lv = -inf
// (log p = +inf there, as for a point mass; -inf at any other x, where the term's overflow wins over
// lv = -inf): the ``_limits`` form takes both by selects. It costs ~9% of the CPU kernel in cache (the
// extra product and selects), so the CPU kernels sum a row with the first form and again with ``_limits``
// only when that sum is NaN or -inf, the two ways the first form goes wrong (NOTE: [Infinite inputs] in
// bernoulli.h); the CUDA kernels take ``_limits`` always. The gradient takes the safe form always (it has
// no row sum to look at; no cost measured): d/dm = d e^-lv as (d e^(-lv/2)) e^(-lv/2), 0 at d = 0.

// log N(x | m, e^lv) = -0.5 * (log(2 pi) + lv + (x - m)^2 e^-lv): NaN or -inf where e^-lv overflows
// (lv < -88.7 in float32), where ``_limits`` below gives the value or its limit
template <typename T>
PYVAE_HD PYVAE_FORCEINLINE T gaussian_log_prob(T x, T m, T lv) {
  const T d = x - m;
  return T(-0.5) * (T(1.8378770664093454835606594728112) + lv + d * d * math::exp(-lv));
}

// the same, with the quadratic term 0 at x = m for every lv (NOTE: [Tiny variances])
template <typename T>
PYVAE_HD PYVAE_FORCEINLINE T gaussian_log_prob_limits(T x, T m, T lv) {
  const T d = x - m;
  const T s = d * math::exp(T(-0.5) * lv);
  const T q = d == T(0) ? T(0) : s * s;
  const T t = q == math::inf_<T>() ? q : lv + q;  // the quadratic's overflow wins over lv, also lv = -inf
  return T(-0.5) * (T(1.8378770664093454835606594728112) + t);
}

template <typename T>
struct GaussianGrad {
  T x, m, lv;
};

// w = (x - m) e^-lv: d/dx = -w, d/dm = w, d/dlv = 0.5 ((x - m) w - 1); all scaled by g. Through
// e^(-lv/2), with w = 0 at x = m (NOTE: [Tiny variances]).
template <typename T>
PYVAE_HD PYVAE_FORCEINLINE GaussianGrad<T> gaussian_log_prob_grad(T x, T m, T lv, T g) {
  const T d = x - m;
  const T e = math::exp(T(-0.5) * lv);
  const T s = d * e;
  const bool zero = d == T(0);
  const T w = zero ? T(0) : s * e;
  const T q = zero ? T(0) : s * s;
  GaussianGrad<T> r;
  r.m = g * w;
  r.x = -r.m;
  r.lv = g * T(0.5) * (q - T(1));
  return r;
}

}  // namespace ops
}  // namespace pyvae
