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
//
// NOTE: [Infinite inputs]
// An infinite input whose density has a limit gives that limit, not NaN (float16 logits overflow to +-inf
// beyond 65504, a diverging model's in any dtype). Written as x * l - max(l, 0), the linear term is
// inf - inf or 0 * inf at l = +-inf. As -w |l|, w = 1 - x for l > 0 and w = x otherwise (the same value
// for finite l), with the product taken as 0 where its weight w is 0, it is exact there:
// log Bern(1 | sigmoid(+inf)) = log Bern(0 | sigmoid(-inf)) = 0 and any other x gives -inf. A NaN in l
// or x still gives NaN (through the softplus term, or through w). That form costs three more vector
// instructions an element, ~8% of the CPU kernel in cache, so the CPU kernels sum a row with the first
// form and sum it again with the second (``*_limits``) only when the first sum is NaN; the CUDA kernels,
// with ALU to spare, take the second form directly. The same rule elsewhere: gaussian_kl at logvar = +inf
// is +inf (gaussian_kl.h), the continuous Bernoulli's limits are in continuous_bernoulli.h.

// x * l - max(l, 0): 0 or -|l| for binary x, NaN at l = +-inf (NOTE: [Infinite inputs])
template <typename T>
PYVAE_HD PYVAE_FORCEINLINE T bernoulli_linear(T l, T x) {
  return x * l - math::relu_(l);
}

// the same, and its limit at l = +-inf (NOTE: [Infinite inputs])
template <typename T>
PYVAE_HD PYVAE_FORCEINLINE T bernoulli_linear_limits(T l, T x) {
  const T w = l > T(0) ? T(1) - x : x;
  return w == T(0) ? T(0) : -(w * math::abs_(l));
}

// log Bern(x | sigmoid(l)) = x * l - softplus(l) = (x * l - max(l, 0)) - log1p(e^-|l|)
// (minus BCE-with-logits; x may be in [0, 1]). See NOTE: [Stable softplus] and
// NOTE: [Exact Bernoulli terms]: finite for every finite l (NaN at l = +-inf: ``_limits`` below).
template <typename T>
PYVAE_HD PYVAE_FORCEINLINE T bernoulli_log_prob(T l, T x) {
  return bernoulli_linear(l, x) - math::log1p_unit(math::exp(-math::abs_(l)));
}

// the same, and its limit (0 or -inf) at l = +-inf (NOTE: [Infinite inputs])
template <typename T>
PYVAE_HD PYVAE_FORCEINLINE T bernoulli_log_prob_limits(T l, T x) {
  return bernoulli_linear_limits(l, x) - math::log1p_unit(math::exp(-math::abs_(l)));
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
