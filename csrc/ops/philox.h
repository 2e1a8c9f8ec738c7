// Counter-based random numbers: Philox4x32-10 and Box-Muller normals, host and device.
//
// NOTE: [Counter-based eps]
// Element i of a draw of standard normals takes lane i % 4 of the Box-Muller transform of
// Philox4x32-10(counter = offset + i / 4, key = seed). A draw therefore depends only on
// (seed, offset, i): not on the device, the thread count or the launch geometry, and a backward
// pass can regenerate eps instead of storing it. Validated against Random123's published
// known-answer vectors (tests/kat_vectors).
#pragma once

#include <cmath>

#include "common/hd.h"
#include "ops/fastmath.h"

namespace pyvae {
namespace philox {

constexpr uint32_t kM0 = 0xD2511F53u;
constexpr uint32_t kM1 = 0xCD9E8D57u;
constexpr uint32_t kW0 = 0x9E3779B9u;  // golden ratio
constexpr uint32_t kW1 = 0xBB67AE85u;  // sqrt(3) - 1

struct U32x4 {
  uint32_t v[4];
};

PYVAE_HD PYVAE_FORCEINLINE void mulhilo(uint32_t a, uint32_t b, uint32_t* hi, uint32_t* lo) {
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(p >> 32);
  *lo = static_cast<uint32_t>(p);
}

// Philox4x32 with 10 rounds: counter c[4], key k[2] -> 4 random words.
PYVAE_HD PYVAE_FORCEINLINE U32x4 philox4x32_10(U32x4 c, uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo(kM0, c.v[0], &hi0, &lo0);
    mulhilo(kM1, c.v[2], &hi1, &lo1);
    U32x4 n;
    n.v[0] = hi1 ^ c.v[1] ^ k0;
    n.v[1] = lo1;
    n.v[2] = hi0 ^ c.v[3] ^ k1;
    n.v[3] = lo0;
    c = n;
    k0 += kW0;
    k1 += kW1;
  }
  return c;
}

// Uniform in (0, 1] from the top 24 bits (never 0, so its log is finite).
PYVAE_HD PYVAE_FORCEINLINE float uniform_open0(uint32_t r) {
  return static_cast<float>((r >> 8) + 1u) * 5.9604644775390625e-08f;  // 2^-24
}
// Uniform in [0, 1) from the top 24 bits.
PYVAE_HD PYVAE_FORCEINLINE float uniform_open1(uint32_t r) {
  return static_cast<float>(r >> 8) * 5.9604644775390625e-08f;
}

// Standard normals per Philox counter (the four lanes of one block); element i of a draw uses
// counter offset + i / kNormalsPerCounter. pyvae._C exports it, so Python code that places a draw
// (a data-parallel shard's offset) reads it from here.
constexpr int kNormalsPerCounter = 4;

// NOTE: [Counter-based binarization]
// The same layout for uniforms: element i of a draw takes word i % 4 of Philox4x32-10(counter =
// offset + i / 4, key = seed), as a float in [0, 1) from its top 24 bits. Dynamic binarization of
// training batches (csrc/ops/binarize.h) draws element (row, col) of a global batch as element
// row * cols + col, so a data-parallel shard draws exactly the uniforms of its rows.
PYVAE_HD PYVAE_FORCEINLINE U32x4 words4(uint64_t seed, uint64_t counter) {
  U32x4 c;
  c.v[0] = static_cast<uint32_t>(counter);
  c.v[1] = static_cast<uint32_t>(counter >> 32);
  c.v[2] = 0u;
  c.v[3] = 0u;
  return philox4x32_10(c, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

struct Normal4 {
  float v[4];
};

// Four N(0, 1) draws from a counter's four words r: Box-Muller on (r0, r1) and (r2, r3):
// n = sqrt(-2 log u1) * (cos(2 pi u2), sin(2 pi u2)).
PYVAE_HD PYVAE_FORCEINLINE Normal4 normal4_of(const U32x4& r) {
  Normal4 out;
  for (int pair = 0; pair < 2; ++pair) {
    const float u1 = uniform_open0(r.v[2 * pair]);
    const float u2 = uniform_open1(r.v[2 * pair + 1]);
    const float rad = sqrtf(-2.0f * math::log_positive(u1));
    float s, co;
    math::sincos_2pi(u2, &s, &co);
    out.v[2 * pair] = rad * co;
    out.v[2 * pair + 1] = rad * s;
  }
  return out;
}

// The four normals of one counter of the draw seed.
PYVAE_HD PYVAE_FORCEINLINE Normal4 normal4(uint64_t seed, uint64_t counter) {
  return normal4_of(words4(seed, counter));
}

// The normal for element i of the draw (seed, offset); see [Counter-based eps].
PYVAE_HD PYVAE_FORCEINLINE float normal_at(uint64_t seed, uint64_t offset, uint64_t i) {
  const Normal4 n = normal4(seed, offset + i / kNormalsPerCounter);
  return n.v[i % kNormalsPerCounter];
}

}  // namespace philox
}  // namespace pyvae
