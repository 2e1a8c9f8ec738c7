// Continuous Bernoulli log-density with logits, per element (the launcher sums the event dim).
//
// CB(x | lambda) = C(lambda) lambda^x (1 - lambda)^(1 - x) on x in [0, 1] (Loaiza-Ganem & Cunningham,
// NeurIPS 2019, "The continuous Bernoulli"). With lambda = sigmoid(l) the normalizer is
// C = l / tanh(l / 2) (-> 2 as l -> 0), and with h = l / 2:
//   log p(x | l) = x l - softplus(l) + log C(l) = (x - 1/2) l - G(h),    G(h) = log(sinh(h) / h)
//   d/dl log p   = x - E[x],   E[x] = 1/2 + K(h) / 2,                   K(h) = coth(h) - 1/h = G'(h)
//   d/dx log p   = l
// (softplus(l) - l/2 = log(2 cosh h), and log C = log 2 + log(h cosh h / sinh h).) G is even and
// K odd; their Taylor series (coefficients 2^2n B_2n / (2n (2n)!) and 2^2n B_2n / (2n)!, B the
// Bernoulli numbers; checked in exact rational arithmetic, tests/test_continuous_bernoulli_log_prob.py)
// converge for |h| < pi:
//   G(h) = h^2/6 - h^4/180 + h^6/2835 - ...      so log C(l) = log 2 + l^2/12 - 7 l^4/1440 + ...
//   K(h) = h/3 - h^3/45 + 2 h^5/945 - ...        so E[x] = 1/2 + l/12 - l^3/720 + ...
#pragma once

#include "common/hd.h"
#include "ops/bernoulli.h"
#include "ops/fastmath.h"

namespace pyvae {
namespace ops {

// NOTE: [Continuous Bernoulli in two regimes]
// |l| < 1: G and K by their Taylor series in u = h^2 <= 1/4. Each term is at most 1/39 of the one
// before, so 6 terms reach float precision and 12 double (14 are kept). (x - 1/2) l - G(h) and
// x - 1/2 - K(h)/2 subtract nothing close: the value and the gradient keep their relative precision
// as l -> 0 (log C itself is log 2 + O(l^2), and the closed forms below would cancel there).
// |l| >= 1: with a = |l| and t = e^-a <= 1/e, log(sinh(h)/h) = a/2 - log a + log1p(-t), so
//   log p = (x l - max(l, 0)) + log a + log1p(t / (1 - t))        (-log1p(-t) = log1p(t / (1 - t)))
//   d/dl  = (l < 0 ? x : x - 1) + 1/l + (l < 0 ? s : -s),  s = t / (1 - t) = 1 / (e^a - 1)
// log a >= 0 and t / (1 - t) is in (0, 0.582]: two positive terms, and the Bernoulli grouping of
// NOTE: [Exact Bernoulli terms] for the rest (exact for x = 0 or 1). Nothing overflows for any finite
// l (t underflows to 0 for large |l|); a NaN in l or x falls through both regimes to the result.
// What remains is the cancellation the inputs bring: for x near 1/2 and |l| a little above 1,
// x l - max(l, 0) ~ -|l|/2 nearly cancels the positive terms (by up to ~12x at |l| = 1), so the error
// is a few ulps of |l|, not of the result; so is any row sum of such terms.
// Both regimes are computed and one is selected, so the loop stays branch-free and vectorizes.
// At l = +-inf (NOTE: [Infinite inputs] in bernoulli.h) the density concentrates at x = 1 (+inf) or
// x = 0 (-inf): log p is +inf there (log a wins over a Bernoulli term of 0) and -inf at any other x (the
// linear term wins over log a); the gradient's limit, x - 1 or x, needs nothing extra.

// G(h) / u and K(h) / h as polynomials in u = h^2, Horner from the highest term (Taylor, above).
PYVAE_HD PYVAE_FORCEINLINE float cb_log_sinhc_over_u(float u) {
  float p = -1.8036702e-7f;
  p = p * u + 2.1377799e-6f;
  p = p * u - 2.6455026e-5f;
  p = p * u + 3.5273369e-4f;
  p = p * u - 5.5555556e-3f;
  return p * u + 0.16666667f;
}
PYVAE_HD PYVAE_FORCEINLINE double cb_log_sinhc_over_u(double u) {
  double p = -8.5837197618956095e-16;
  p = p * u + 9.123468230859098e-15;
  p = p * u - 9.754877841593701e-14;
  p = p * u + 1.0502923908637557e-12;
  p = p * u - 1.1402575602296091e-11;
  p = p * u + 1.2504359176004997e-10;
  p = p * u - 1.3884130493737299e-09;
  p = p * u + 1.5661391322766983e-08;
  p = p * u - 1.803670234005331e-07;
  p = p * u + 2.1377799155576935e-06;
  p = p * u - 2.6455026455026456e-05;
  p = p * u + 3.527336860670194e-04;
  p = p * u - 5.555555555555556e-03;
  return p * u + 0.16666666666666666;
}

PYVAE_HD PYVAE_FORCEINLINE float cb_langevin_over_h(float u) {
  float p = -2.1644043e-6f;
  p = p * u + 2.1377799e-5f;
  p = p * u - 2.1164021e-4f;
  p = p * u + 2.1164021e-3f;
  p = p * u - 2.2222222e-2f;
  return p * u + 0.33333333f;
}
PYVAE_HD PYVAE_FORCEINLINE double cb_langevin_over_h(double u) {
  double p = -2.4034415333307705e-14;
  p = p * u + 2.3721017400233653e-13;
  p = p * u - 2.3411706819824882e-12;
  p = p * u + 2.3106432599002624e-11;
  p = p * u - 2.2805151204592183e-10;
  p = p * u + 2.2507846516808994e-09;
  p = p * u - 2.2214608789979678e-08;
  p = p * u + 2.1925947851873778e-07;
  p = p * u - 2.1644042808063972e-06;
  p = p * u + 2.1377799155576935e-05;
  p = p * u - 2.1164021164021165e-04;
  p = p * u + 2.1164021164021165e-03;
  p = p * u - 2.2222222222222223e-02;
  return p * u + 0.3333333333333333;
}

// log CB(x | sigmoid(l)) = (x - 1/2) l - log(sinh(l/2) / (l/2)); see
// NOTE: [Continuous Bernoulli in two regimes]. x in [0, 1] (0 and 1 included); finite for finite l,
// NaN at l = +-inf, where ``kLimits`` gives the limit (NOTE: [Infinite inputs] in bernoulli.h).
template <bool kLimits, typename T>
PYVAE_HD PYVAE_FORCEINLINE T cb_log_prob(T l, T x) {
  const T a = math::abs_(l);
  const T h = T(0.5) * l;
  const T u = h * h;
  const T small = (x - T(0.5)) * l - u * cb_log_sinhc_over_u(u);
  const T t = math::exp(-a);
  const T lin = kLimits ? bernoulli_linear_limits(l, x) : bernoulli_linear(l, x);
  const T large = lin + (math::log_positive(a) + math::log1p_unit(t / (T(1) - t)));
  if (!kLimits) return a < T(1) ? small : large;  // NaN: the comparison fails and NaN comes from `large`
  // |l| = inf: +inf where the Bernoulli term is 0, else that term (-inf; NaN from x stays NaN)
  const T limit = lin == T(0) ? a : lin;
  return a < T(1) ? small : (a == math::inf_<T>() ? limit : large);  // NaN: both comparisons fail -> `large`
}

template <typename T>
PYVAE_HD PYVAE_FORCEINLINE T continuous_bernoulli_log_prob(T l, T x) {
  return cb_log_prob<false>(l, x);
}

template <typename T>
PYVAE_HD PYVAE_FORCEINLINE T continuous_bernoulli_log_prob_limits(T l, T x) {
  return cb_log_prob<true>(l, x);
}

template <typename T>
struct ContinuousBernoulliGrad {
  T l, x;
};

// d/dl = x - E[x] = x - 1/2 - K(l/2) / 2 (series, |l| < 1) or (l < 0 ? x : x - 1) + 1/l +-
// 1/(e^|l| - 1) (NOTE: [Continuous Bernoulli in two regimes]); d/dx = l; both scaled by the
// upstream gradient g.
template <typename T>
PYVAE_HD PYVAE_FORCEINLINE ContinuousBernoulliGrad<T> continuous_bernoulli_log_prob_grad(T l, T x, T g) {
  const T a = math::abs_(l);
  const T h = T(0.5) * l;
  const T small = (x - T(0.5)) - T(0.5) * h * cb_langevin_over_h(h * h);
  const T t = math::exp(-a);
  const T s = t / (T(1) - t);
  const bool neg = l < T(0);  // NaN: false, and s is NaN
  const T large = ((neg ? x : x - T(1)) + T(1) / l) + (neg ? s : -s);
  ContinuousBernoulliGrad<T> r;
  r.l = g * (a < T(1) ? small : large);
  r.x = g * l;
  return r;
}

}  // namespace ops
}  // namespace pyvae
