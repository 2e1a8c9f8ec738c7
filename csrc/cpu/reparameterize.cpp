// CPU launchers of reparameterize. In a file of its own because it is compiled with
// -ffp-contract=off (CMakeLists.txt): fused multiply-adds would change the last bit of some draws
// between the baseline, AVX2 and AVX-512 builds, and NOTE: [Counter-based eps] promises the same
// eps for a seed everywhere. (The CUDA twin is compiled with --fmad=false for the same reason.)
#include <algorithm>
#include <cstdint>

#include "common/params.h"
#include "cpu/kernels.h"
#include "cpu/pages.h"
#include "ops/binarize.h"
#include "ops/philox.h"
#include "ops/reparameterize.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#ifndef PYVAE_CPU_ARCH
#error "compile with -DPYVAE_CPU_ARCH=base|avx2|avx512"
#endif

namespace pyvae {
namespace cpu {
namespace PYVAE_CPU_ARCH {
namespace {

constexpr int64_t kParallelGrain = 4096;  // elements; a draw costs ~30x a memory pass per element

// ----------------------------------------------------------------------------- reparameterize
constexpr int64_t kChunk = 2048;  // elements per task; a multiple of 4

// NOTE: [Philox in vector lanes]
// gcc 12 vectorizes an omp simd loop over philox::words4 with 64-bit lanes for the 32 x 32 -> 64-bit
// products: 8 counters a 512-bit vector, and repacking around them. The AVX-512 build computes the words
// of 32 counters at a time instead, 16 in the 32-bit lanes of each of two vectors (two independent chains:
// one's multiplies run while the other's wait), the high and low halves of each product from vpmuludq on
// the even lanes and on the odd lanes shifted down. Integer arithmetic, so the words are philox::words4's
// bit for bit (tests: every build against the block function, counters that carry into the high word).
// The uniforms of a B=8192 Fashion-MNIST batch (6.4M) took 6.1 ms on one thread of the Zen 5 EPYC with
// the compiler's loop and 2.8 ms with this one (ad hoc; bench/RESULTS.md, stop 25). Other builds keep
// the omp simd loops.
#if defined(__AVX512F__)
constexpr int64_t kBlock = 32;  // counters per philox_block

inline void mulhilo16(__m512i a, __m512i m, __m512i* hi, __m512i* lo) {
  const __m512i even = _mm512_mul_epu32(a, m);                        // lanes 0, 2, ..: 64-bit products
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);  // lanes 1, 3, ..
  *lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
  *hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
}

// w[h][k], lane j: word k of counter c + 16 h + j of the draw seed (philox::words4).
inline void philox_block(uint64_t seed, uint64_t c, __m512i w[2][4]) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(philox::kM0));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(philox::kM1));
  for (int h = 0; h < 2; ++h) {
    const uint64_t base = c + 16 * static_cast<uint64_t>(h);
    const __m512i lo = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(base)));
    const __m512i hi = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(base >> 32)));
    w[h][0] = _mm512_add_epi32(lo, lane);
    // a lane whose low word wrapped past 2^32 carries one into its high word
    const __mmask16 carry = _mm512_cmplt_epu32_mask(w[h][0], lo);
    w[h][1] = _mm512_mask_add_epi32(hi, carry, hi, _mm512_set1_epi32(1));
    w[h][2] = _mm512_setzero_si512();
    w[h][3] = _mm512_setzero_si512();
  }
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const __m512i key0 = _mm512_set1_epi32(static_cast<int>(k0)), key1 = _mm512_set1_epi32(static_cast<int>(k1));
    for (int h = 0; h < 2; ++h) {
      __m512i hi0, lo0, hi1, lo1;
      mulhilo16(w[h][0], m0, &hi0, &lo0);
      mulhilo16(w[h][2], m1, &hi1, &lo1);
      w[h][0] = _mm512_ternarylogic_epi32(hi1, w[h][1], key0, 0x96);  // hi1 ^ c1 ^ k0
      w[h][2] = _mm512_ternarylogic_epi32(hi0, w[h][3], key1, 0x96);  // hi0 ^ c3 ^ k1
      w[h][1] = lo1;
      w[h][3] = lo0;
    }
    k0 += philox::kW0;
    k1 += philox::kW1;
  }
}

// The uniforms (philox::uniform_open1) of 16 counters' words w[0..3], stored in element order: element
// 4 i + k (counter i, word k) at out[4 i + k].
inline void store_uniforms16(const __m512i w[4], float* out) {
  const __m512 scale = _mm512_set1_ps(5.9604644775390625e-08f);  // 2^-24, as uniform_open1
  __m512 f[4];
  for (int k = 0; k < 4; ++k) f[k] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(w[k], 8)), scale);
  // a 4 x 16 transpose: within each 128-bit lane first, then across lanes
  const __m512 a = _mm512_unpacklo_ps(f[0], f[1]), b = _mm512_unpackhi_ps(f[0], f[1]);
  const __m512 c = _mm512_unpacklo_ps(f[2], f[3]), d = _mm512_unpackhi_ps(f[2], f[3]);
  // e0: counters 0, 4, 8, 12 (one per 128-bit lane, its four words), e1: 1, 5, 9, 13, e2: 2, 6, .., e3: 3, 7, ..
  const __m512 e0 = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(c)));
  const __m512 e1 = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(c)));
  const __m512 e2 = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(b), _mm512_castps_pd(d)));
  const __m512 e3 = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(b), _mm512_castps_pd(d)));
  const __m512 lo01 = _mm512_shuffle_f32x4(e0, e1, 0x44), hi01 = _mm512_shuffle_f32x4(e0, e1, 0xEE);
  const __m512 lo23 = _mm512_shuffle_f32x4(e2, e3, 0x44), hi23 = _mm512_shuffle_f32x4(e2, e3, 0xEE);
  _mm512_storeu_ps(out + 0, _mm512_shuffle_f32x4(lo01, lo23, 0x88));   // counters 0-3
  _mm512_storeu_ps(out + 16, _mm512_shuffle_f32x4(lo01, lo23, 0xDD));  // 4-7
  _mm512_storeu_ps(out + 32, _mm512_shuffle_f32x4(hi01, hi23, 0x88));  // 8-11
  _mm512_storeu_ps(out + 48, _mm512_shuffle_f32x4(hi01, hi23, 0xDD));  // 12-15
}
#else
constexpr int64_t kBlock = 1;
#endif

// eps for elements [i0, i0 + n) of the draw (seed, offset), n <= kChunk; NOTE: [Counter-based eps]
void fill_normals(uint64_t seed, uint64_t offset, int64_t i0, int64_t n, float* dst) {
  alignas(64) float buf[kChunk + 4 * kBlock + 8];
  const int64_t c0 = i0 / 4;
  const int64_t c1 = (i0 + n + 3) / 4;
#if defined(__AVX512F__)
  // the words by philox_block (NOTE: [Philox in vector lanes]), Box-Muller by the simd loop of other builds
  alignas(64) uint32_t r[4][kBlock];
  for (int64_t c = c0; c < c1; c += kBlock) {
    __m512i w[2][4];
    philox_block(seed, offset + static_cast<uint64_t>(c), w);
    for (int h = 0; h < 2; ++h)
      for (int k = 0; k < 4; ++k) _mm512_store_si512(reinterpret_cast<__m512i*>(r[k] + 16 * h), w[h][k]);
    float* b = buf + 4 * (c - c0);
#pragma omp simd
    for (int64_t j = 0; j < kBlock; ++j) {
      const philox::Normal4 v = philox::normal4_of(philox::U32x4{{r[0][j], r[1][j], r[2][j], r[3][j]}});
      for (int k = 0; k < 4; ++k) b[4 * j + k] = v.v[k];
    }
  }
#else
#pragma omp simd
  for (int64_t c = c0; c < c1; ++c) {
    const philox::Normal4 v = philox::normal4(seed, offset + static_cast<uint64_t>(c));
    for (int k = 0; k < 4; ++k) buf[4 * (c - c0) + k] = v.v[k];
  }
#endif
  std::copy(buf + (i0 - 4 * c0), buf + (i0 - 4 * c0) + n, dst);
}

// uniforms of elements [i0, i0 + n) of the draw (seed, 0), n <= kChunk; NOTE: [Counter-based binarization]
void fill_uniforms(uint64_t seed, int64_t i0, int64_t n, float* dst) {
  alignas(64) float buf[kChunk + 4 * kBlock + 8];
  const int64_t c0 = i0 / 4;
  const int64_t c1 = (i0 + n + 3) / 4;
#if defined(__AVX512F__)
  for (int64_t c = c0; c < c1; c += kBlock) {  // NOTE: [Philox in vector lanes]
    __m512i w[2][4];
    philox_block(seed, static_cast<uint64_t>(c), w);
    store_uniforms16(w[0], buf + 4 * (c - c0));
    store_uniforms16(w[1], buf + 4 * (c - c0) + 64);
  }
#else
#pragma omp simd
  for (int64_t c = c0; c < c1; ++c) {
    const philox::U32x4 w = philox::words4(seed, static_cast<uint64_t>(c));
    // the four stores spelled out: as a k loop, gcc 12 kept w in memory and left this loop scalar
    float* b = buf + 4 * (c - c0);
    b[0] = philox::uniform_open1(w.v[0]);
    b[1] = philox::uniform_open1(w.v[1]);
    b[2] = philox::uniform_open1(w.v[2]);
    b[3] = philox::uniform_open1(w.v[3]);
  }
#endif
  std::copy(buf + (i0 - 4 * c0), buf + (i0 - 4 * c0) + n, dst);
}

// NOTE: [Saved eps]
// A backward that draws eps again pays the Philox rounds and Box-Muller's log, sqrt and sincos a second
// time, ~30x a memory pass per element: on the 2-core AMD EPYC VM the backward of a [16384, 20] draw took
// 0.46 ms against 0.29 ms for eager torch's, which reads the eps it kept (pyvae bench elbo, stop 12). So
// the CPU eager path (pyvae/ops/reparameterize.py, NOTE: [Lean reparameterize]) passes an eps buffer: the
// forward stores the eps it drew (as the kernel dtype, the value the draw path converts them to), the
// backward reads them: the same numbers into the same csrc/ops function, so the gradients are bit for bit
// those of drawing again. It costs 4 (8 for float64) bytes per element of z until backward. The CUDA
// kernels always draw again: there the draw is cheap against the memory it would save.
template <typename T>
void reparameterize_fwd_t(const ReparamParams& p) {
  const int64_t M = p.numel;
  const int64_t chunks = (M + kChunk - 1) / kChunk;
  const int64_t tasks = p.samples * chunks;
  const T* mu = static_cast<const T*>(p.mu);
  const T* lv = static_cast<const T*>(p.logvar);
  T* z = static_cast<T*>(p.z);
  T* keep = static_cast<T*>(p.eps);
#pragma omp parallel for schedule(static) if (p.samples * M >= kParallelGrain)
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t s = t / chunks;
    const int64_t m0 = (t % chunks) * kChunk;
    const int64_t n = std::min(kChunk, M - m0);
    alignas(64) float eps[kChunk];
    fill_normals(p.seed, p.offset, s * M + m0, n, eps);
    T* zs = z + s * M + m0;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) zs[j] = ops::reparameterize(mu[m0 + j], lv[m0 + j], T(eps[j]));
    if (keep) {
      T* es = keep + s * M + m0;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) es[j] = T(eps[j]);
    }
  }
}

template <typename T>
void reparameterize_bwd_t(const ReparamParams& p) {
  const int64_t M = p.numel;
  const int64_t chunks = (M + kChunk - 1) / kChunk;
  const T* lv = static_cast<const T*>(p.logvar);
  const T* G = static_cast<const T*>(p.grad_out);
  T* gmu = static_cast<T*>(p.grad_mu);
  T* glv = static_cast<T*>(p.grad_logvar);
  const T* kept = static_cast<const T*>(p.eps);
#pragma omp parallel for schedule(static) if (p.samples * M >= kParallelGrain)
  for (int64_t t = 0; t < chunks; ++t) {
    const int64_t m0 = t * kChunk;
    const int64_t n = std::min(kChunk, M - m0);
    alignas(64) float eps[kChunk];
    for (int64_t s = 0; s < p.samples; ++s) {
      const T* g = G + s * M + m0;
      const bool first = s == 0;
      // The mu gradient needs no eps (ops::reparameterize_grad_mu).
      if (gmu) {
        T* gm = gmu + m0;
        if (first) {
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) gm[j] = ops::reparameterize_grad_mu(g[j]);
        } else {
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) gm[j] += ops::reparameterize_grad_mu(g[j]);
        }
      }
      if (!glv) continue;
      T* gl = glv + m0;
      const T* l = lv + m0;
      if (kept) {  // NOTE: [Saved eps]
        const T* es = kept + s * M + m0;
        if (first) {
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) gl[j] = ops::reparameterize_grad_lv(l[j], es[j], g[j]);
        } else {
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) gl[j] += ops::reparameterize_grad_lv(l[j], es[j], g[j]);
        }
        continue;
      }
      fill_normals(p.seed, p.offset, s * M + m0, n, eps);
      // Branch-free inner loops (one per case) so they vectorize.
      if (first) {
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) gl[j] = ops::reparameterize_grad_lv(l[j], T(eps[j]), g[j]);
      } else {
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) gl[j] += ops::reparameterize_grad_lv(l[j], T(eps[j]), g[j]);
      }
    }
  }
}


}  // namespace

void reparameterize_fwd(const ReparamParams& p) {
  if (p.dtype == DType::kFloat64) reparameterize_fwd_t<double>(p);
  else reparameterize_fwd_t<float>(p);
}

void reparameterize_bwd(const ReparamParams& p) {
  if (p.dtype == DType::kFloat64) reparameterize_bwd_t<double>(p);
  else reparameterize_bwd_t<float>(p);
}

// Rows in chunks of at most kChunk elements' uniforms; each chunk is drawn for its global element range.
void gather_binarize(const BinarizeParams& p) {
  const int64_t R = p.rows, D = p.cols;
  if (R == 0 || D == 0) return;
  advise_huge_pages(p.out, R * D);  // NOTE: [Huge pages for fresh outputs] in csrc/cpu/pages.h
#pragma omp parallel for schedule(static) if (R * D >= kParallelGrain)
  for (int64_t r = 0; r < R; ++r) {
    const float* src = p.src + (p.index ? p.index[r] : r) * D;
    float* out = p.out + r * D;
    const int64_t e0 = (p.first_row + r) * D;
    alignas(64) float u[kChunk];
    for (int64_t c0 = 0; c0 < D; c0 += kChunk) {
      const int64_t n = std::min(kChunk, D - c0);
      fill_uniforms(p.seed, e0 + c0, n, u);
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) out[c0 + j] = ops::binarize(src[c0 + j], u[j]);
    }
  }
}

void advise_huge_pages_bytes(void* p, int64_t bytes) { advise_huge_pages(static_cast<char*>(p), bytes); }

}  // namespace PYVAE_CPU_ARCH
}  // namespace cpu
}  // namespace pyvae
