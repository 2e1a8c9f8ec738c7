// Host/device qualifiers shared by every header in csrc/ops.
#pragma once

#if defined(__CUDACC__)
#define PYVAE_HD __host__ __device__
#define PYVAE_FORCEINLINE __forceinline__
#else
#define PYVAE_HD
#define PYVAE_FORCEINLINE inline __attribute__((always_inline))
#endif

#include <cstdint>
#include <cstring>

namespace pyvae {

// Bit casts that compile to register moves on both sides (and vectorize on the CPU).
PYVAE_HD PYVAE_FORCEINLINE float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

PYVAE_HD PYVAE_FORCEINLINE uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

}  // namespace pyvae

namespace pyvae {

// bfloat16 stored as its 16 bits (CPU kernels; CUDA uses __nv_bfloat16).
PYVAE_HD PYVAE_FORCEINLINE float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

// Round to nearest even; NaN stays NaN (a quiet bit is forced so rounding cannot make it inf).
PYVAE_HD PYVAE_FORCEINLINE uint16_t float_to_bf16(float f) {
  const uint32_t u = float_to_bits(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  return static_cast<uint16_t>(nan ? ((u >> 16) | 0x40u) : rounded);
}

}  // namespace pyvae
