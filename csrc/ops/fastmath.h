// Elementary functions for the kernels, host and device.
//
// NOTE: [Vectorizable transcendentals]
// Without -ffast-math, gcc leaves expf/log1pf as scalar libm calls, which makes a fused ELBO pass
// ~25x slower than memory bandwidth allows. The float versions below are branch-free polynomials
// (plain arithmetic, bit casts and selects) that gcc vectorizes and nvcc compiles as is. Their
// relative error is a few float ulps. Selects are written `cond ? a : x` so a NaN argument falls
// through to the result: NaN in gives NaN out, and +-inf map to the right limits. The double
// versions call libm: float64 is the reference and gradcheck dtype, so it gets full precision.
#pragma once

#include <cmath>

#include "common/hd.h"

namespace pyvae {
namespace math {

// ---------------------------------------------------------------------------------------------
// exp(x) = 2^n * e^r, n = round(x / ln2), r = x - n*ln2 in [-ln2/2, ln2/2].
// 2^n is applied as two factors 2^(n>>1) * 2^(n - n>>1) so that results down to the subnormal
// range and up to overflow (inf) come out right without a branch.
PYVAE_HD PYVAE_FORCEINLINE float exp(float x) {
  const float xc0 = x > 89.0f ? 89.0f : x;  // e^89 > FLT_MAX: still overflows to inf below
  const float xc = xc0 < -105.0f ? -105.0f : xc0;  // e^-105 rounds to 0
  // round to nearest through the 1.5 * 2^23 shifter; n is read back from the bits.
  const float shifted = xc * 1.44269504088896341f + 12582912.0f;
  const int32_t n = static_cast<int32_t>(float_to_bits(shifted) - 0x4B400000u);
  const float nf = shifted - 12582912.0f;
  const float r = (xc - nf * 0.693359375f) - nf * -2.12194440e-4f;  // Cody-Waite ln2 split
  float p = 0.001394858118146658f;
  p = p * r + 0.008375128731131554f;
  p = p * r + 0.041666217148303986f;
  p = p * r + 0.16666415333747864f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t n1 = n >> 1;
  const int32_t n2 = n - n1;
  const float s1 = bits_to_float(static_cast<uint32_t>(n1 + 127) << 23);
  const float s2 = bits_to_float(static_cast<uint32_t>(n2 + 127) << 23);
  return (p * s1) * s2;
}
PYVAE_HD PYVAE_FORCEINLINE double exp(double x) { return ::exp(x); }

// ---------------------------------------------------------------------------------------------
// log1p(t) for t in [0, 1] (the range softplus needs): t * q(t), q a degree-9 fit of log1p(t)/t,
// relative error ~5e-9 before float rounding.
PYVAE_HD PYVAE_FORCEINLINE float log1p_unit(float t) {
  float q = -0.003256378462538123f;
  q = q * t + 0.019907161593437195f;
  q = q * t - 0.057064201682806015f;
  q = q * t + 0.10614264756441116f;
  q = q * t - 0.15311862528324127f;
  q = q * t + 0.19678117334842682f;
  q = q * t - 0.24954558908939362f;
  q = q * t + 0.33330005407333374f;
  q = q * t - 0.4999990463256836f;
  q = q * t + 1.0f;
  return t * q;
}
PYVAE_HD PYVAE_FORCEINLINE double log1p_unit(double t) { return ::log1p(t); }

// ---------------------------------------------------------------------------------------------
// log(x) for positive normal finite x (Box-Muller's uniforms; |logits| in continuous_bernoulli.h): x = 2^e * m, m in [sqrt(1/2), sqrt(2)),
// log(x) = e*ln2 + log1p(m - 1) with a degree-8 fit of log1p(f)/f on that interval.
PYVAE_HD PYVAE_FORCEINLINE float log_positive(float x) {
  const uint32_t bits = float_to_bits(x);
  // Move the mantissa into [sqrt(1/2), sqrt(2)) by subtracting the bits of sqrt(1/2) first.
  const uint32_t shifted = bits - 0x3F3504F3u;
  const int32_t e = static_cast<int32_t>(shifted) >> 23;
  const float m = bits_to_float((shifted & 0x007FFFFFu) + 0x3F3504F3u);
  const float f = m - 1.0f;
  float q = 0.08743945509195328f;
  q = q * f - 0.14377330243587494f;
  q = q * f + 0.14949095249176025f;
  q = q * f - 0.16560696065425873f;
  q = q * f + 0.19956977665424347f;
  q = q * f - 0.2500215470790863f;
  q = q * f + 0.3333418369293213f;
  q = q * f - 0.49999988079071045f;
  q = q * f + 1.0f;
  const float ef = static_cast<float>(e);
  return f * q + ef * 0.693359375f + ef * -2.12194440e-4f;
}
PYVAE_HD PYVAE_FORCEINLINE double log_positive(double x) { return ::log(x); }

// ---------------------------------------------------------------------------------------------
// sin(2*pi*u) and cos(2*pi*u) for u in [0, 1]: reduce to a quarter turn j and a remainder
// theta in [-pi/4, pi/4], evaluate Taylor polynomials (error < 3e-8), rotate by j quarters.
PYVAE_HD PYVAE_FORCEINLINE void sincos_2pi(float u, float* s_out, float* c_out) {
  const float q4 = u * 4.0f;
  const float shifted = q4 + 12582912.0f;  // round to nearest
  const uint32_t j = float_to_bits(shifted) - 0x4B400000u;
  const float jf = shifted - 12582912.0f;
  const float theta = (q4 - jf) * 1.57079632679489662f;  // in [-pi/4, pi/4]
  const float t2 = theta * theta;
  float sp = 2.7557319223985893e-06f;  // 1/9!
  sp = sp * t2 - 1.9841269841269841e-04f;
  sp = sp * t2 + 8.3333333333333333e-03f;
  sp = sp * t2 - 1.6666666666666667e-01f;
  const float s = theta + theta * t2 * sp;
  float cp = 2.4801587301587302e-05f;  // 1/8!
  cp = cp * t2 - 1.3888888888888889e-03f;
  cp = cp * t2 + 4.1666666666666667e-02f;
  cp = cp * t2 - 0.5f;
  const float c = 1.0f + t2 * cp;
  const uint32_t k = j & 3u;
  // rotation by k quarter turns: (s, c) -> (c, -s) -> (-s, -c) -> (-c, s)
  const float rs = (k & 1u) ? c : s;
  const float rc = (k & 1u) ? s : c;
  *s_out = (k >= 2u) ? -rs : rs;             // sin(theta + k*pi/2): s, c, -s, -c
  *c_out = (k == 1u || k == 2u) ? -rc : rc;  // cos(theta + k*pi/2): c, -s, -c, s
}

// ---------------------------------------------------------------------------------------------
// expm1(x) = e^x - 1: a degree-8 Taylor polynomial for |x| < 0.5 (relative error < 1e-8, no
// cancellation near 0), exp(x) - 1 elsewhere; both are computed and one is selected.
PYVAE_HD PYVAE_FORCEINLINE float expm1(float x) {
  float p = 2.48015873015873e-05f;  // 1/8!
  p = p * x + 1.98412698412698e-04f;
  p = p * x + 1.38888888888889e-03f;
  p = p * x + 8.33333333333333e-03f;
  p = p * x + 4.16666666666667e-02f;
  p = p * x + 1.66666666666667e-01f;
  p = p * x + 0.5f;
  const float small = x + x * x * p;
  const float large = exp(x) - 1.0f;
  const float ax = x < 0.0f ? -x : x;
  return ax < 0.5f ? small : large;  // NaN: the comparison fails and NaN comes from `large`
}
PYVAE_HD PYVAE_FORCEINLINE double expm1(double x) { return ::expm1(x); }

// tanh(x) = sign(x) * e / (e + 2) with e = expm1(2|x|); |x| is capped at 9, where tanh is 1 in
// float, so e stays finite.
PYVAE_HD PYVAE_FORCEINLINE float tanh(float x) {
  const float ax0 = x < 0.0f ? -x : x;
  const float ax = ax0 > 9.0f ? 9.0f : ax0;
  const float e = expm1(2.0f * ax);
  const float t = e / (e + 2.0f);
  return x < 0.0f ? -t : t;
}
PYVAE_HD PYVAE_FORCEINLINE double tanh(double x) { return ::tanh(x); }

// ---------------------------------------------------------------------------------------------
// +inf of T (the limits of NOTE: [Infinite inputs] in bernoulli.h are selected with it)
template <typename T>
PYVAE_HD PYVAE_FORCEINLINE T inf_() {
  return static_cast<T>(INFINITY);
}

// NOTE: [Stable softplus]
// softplus(l) = log(1 + e^l) = max(l, 0) + log1p(e^-|l|). With t = e^-|l| in (0, 1] nothing
// overflows for any finite l, and the same t gives sigmoid(l) = 1/(1+t) (l >= 0) or t/(1+t).
template <typename T>
PYVAE_HD PYVAE_FORCEINLINE T abs_(T x) {
  return x < T(0) ? -x : x;  // NaN falls through
}

template <typename T>
PYVAE_HD PYVAE_FORCEINLINE T relu_(T x) {
  return x < T(0) ? T(0) : x;  // NaN falls through
}

// softplus(l) = max(l, 0) + log1p(exp(-|l|))
template <typename T>
PYVAE_HD PYVAE_FORCEINLINE T softplus(T l) {
  const T t = exp(-abs_(l));
  return relu_(l) + log1p_unit(t);
}

// sigmoid(l) = 1 / (1 + exp(-l)), evaluated through t = exp(-|l|) (see [Stable softplus])
template <typename T>
PYVAE_HD PYVAE_FORCEINLINE T sigmoid(T l) {
  const T t = exp(-abs_(l));
  return (l < T(0) ? t : T(1)) / (T(1) + t);
}

}  // namespace math
}  // namespace pyvae
