// Bernoulli log-likelihood with logits, per element (the launcher sums the event dim).
#pragma once

#include "common/hd.h"
#include "ops/fastmath.h"

namespace pyvae {
namespace ops {

// log Bern(x | sigmoid(l)) = x * l - softplus(l)   (minus BCE-with-logits; x may be in [0, 1])
// See NOTE: [Stable softplus]: finite for every finite l.
template <typename T>
PYVAE_HD PYVAE_FORCEINLINE T bernoulli_log_prob(T l, T x) {
  return x * l - math::softplus(l);
}

template <typename T>
struct BernoulliGrad {
  T l, x;
};

// d/dl = x - sigmoid(l), d/dx = l; both scaled by the upstream gradient g
template <typename T>
PYVAE_HD PYVAE_FORCEINLINE BernoulliGrad<T> bernoulli_log_prob_grad(T l, T x, T g) {
  BernoulliGrad<T> r;
  r.l = g * (x - math::sigmoid(l));
  r.x = g * l;
  return r;
}

}  // namespace ops
}  // namespace pyvae
