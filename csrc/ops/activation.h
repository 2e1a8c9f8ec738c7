// Activations of the fused linear layers, forward and derivative, host and device.
//
// NOTE: [Derivative from the output]
// Every derivative is written in terms of the layer's output y = act(a), so the backward pass needs
// only what the forward returns (no saved pre-activation):
//   relu' = [y > 0], tanh' = 1 - y^2, sigmoid' = y (1 - y), softplus' = sigmoid(a) = -expm1(-y)
// (e^y = 1 + e^a gives sigmoid(a) = 1 - e^-y; expm1 keeps it exact when y is tiny).
#pragma once

#include <type_traits>

#include "common/hd.h"
#include "ops/fastmath.h"

namespace pyvae {
namespace ops {

enum class Act : int { kIdentity = 0, kReLU = 1, kTanh = 2, kSigmoid = 3, kSoftplus = 4 };
constexpr int kNumActs = 5;
// The activation names Python uses (pyvae._C.activation_codes maps each to its Act code), by code.
constexpr const char* kActNames[kNumActs] = {"identity", "relu", "tanh", "sigmoid", "softplus"};

// y = act(a)
template <Act A, typename T>
PYVAE_HD PYVAE_FORCEINLINE T act_forward(T a) {
  if (A == Act::kReLU) return math::relu_(a);
  if (A == Act::kTanh) return math::tanh(a);
  if (A == Act::kSigmoid) return math::sigmoid(a);
  if (A == Act::kSoftplus) return math::softplus(a);
  return a;
}

// dy/da as a function of y; see NOTE: [Derivative from the output]
template <Act A, typename T>
PYVAE_HD PYVAE_FORCEINLINE T act_derivative_from_output(T y) {
  if (A == Act::kReLU) return y > T(0) ? T(1) : T(0);
  if (A == Act::kTanh) return T(1) - y * y;
  if (A == Act::kSigmoid) return y * (T(1) - y);
  if (A == Act::kSoftplus) return -math::expm1(-y);
  return T(1);
}

// y = act(acc + bias): the forward epilogue of a linear layer
template <Act A, typename T>
PYVAE_HD PYVAE_FORCEINLINE T bias_act(T acc, T bias) {
  return act_forward<A>(acc + bias);
}

// dL/da = dL/dy * act'(a), from y
template <Act A, typename T>
PYVAE_HD PYVAE_FORCEINLINE T act_backward(T grad_y, T y) {
  return grad_y * act_derivative_from_output<A>(y);
}

// Calls f(std::integral_constant<Act, A>{}) for a run-time activation code, so launchers get the
// activation as a compile-time constant (no branch in their inner loops). Host only.
template <typename F>
inline void act_switch(int act, const F& f) {
  switch (static_cast<Act>(act)) {
    case Act::kIdentity: f(std::integral_constant<Act, Act::kIdentity>{}); break;
    case Act::kReLU: f(std::integral_constant<Act, Act::kReLU>{}); break;
    case Act::kTanh: f(std::integral_constant<Act, Act::kTanh>{}); break;
    case Act::kSigmoid: f(std::integral_constant<Act, Act::kSigmoid>{}); break;
    case Act::kSoftplus: f(std::integral_constant<Act, Act::kSoftplus>{}); break;
  }
}

}  // namespace ops
}  // namespace pyvae
