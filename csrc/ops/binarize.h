// Dynamic binarization: a Bernoulli draw of each pixel from its grey level.
#pragma once

#include "common/hd.h"

namespace pyvae {
namespace ops {

// x ~ Bernoulli(p) as [u < p] with u ~ U[0, 1) (NOTE: [Counter-based binarization] in ops/philox.h):
// p = 0 never gives 1, p = 1 always does (u < 1), NaN gives 0.
template <typename T>
PYVAE_HD PYVAE_FORCEINLINE T binarize(T p, float u) {
  return static_cast<T>(u) < p ? T(1) : T(0);
}

}  // namespace ops
}  // namespace pyvae
