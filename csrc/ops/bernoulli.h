// Bernoulli log-likelihood with logits, per element (the launcher sums the event dim).
#pragma once

#include "common/hd.h"
#include "ops/fastmath.h"

namespace pyvae {
namespace ops {

// NOTE: [Exact Bernoulli terms]
// x * l - softplus(l) cancels catastrophically when the result is near 0 (x = 1, l >> 0:
// l - (l + tiny) is 0 in float), and so does x - sigmoid(l). Grouping the terms as below keeps
// both exact for binary x: x * l - max(l, 0) is exactly 0 or -|l|, and the gradient adds
// sigmoid(-|l|) = t / (1 + t) to 0, x or x - 1, never subtracting two numbers close to 1.

// log Bern(x | sigmoid(l)) = x * l - softplus(l) = (x * l - max(l, 0)) - log1p(e^-|l|)
// (minus BCE-with-logits; x may be in [0, 1]). See NOTE: [Stable softplus] and
// NOTE: [Exact Bernoulli terms]: finite for every finite l.
template <typename T>
PYVAE_HD PYVAE_FORCEINLINE T bernoulli_log_prob(T l, T x) {
  return (x * l - math::relu_(l)) - math::log1p_unit(math::exp(-math::abs_(l)));
}

template <typename T>
struct BernoulliGrad {
  T l, x;
};

// d/dl = x - sigmoid(l) = (l < 0 ? x - s : x - 1 + s) with s = sigmoid(-|l|) = t / (1 + t),
// t = e^-|l| (NOTE: [Exact Bernoulli terms]); d/dx = l; both scaled by the upstream gradient g
template <typename T>
PYVAE_HD PYVAE_FORCEINLINE BernoulliGrad<T> bernoulli_log_prob_grad(T l, T x, T g) {
  const T t = math::exp(-math::abs_(l));
  const T s = t / (T(1) + t);
  const bool neg = l < T(0);  // NaN: false, and s is NaN
  BernoulliGrad<T> r;
  r.l = g * ((neg ? x : x - T(1)) + (neg ? -s : s));
  r.x = g * l;
  return r;
}

}  // namespace ops
}  // namespace pyvae
