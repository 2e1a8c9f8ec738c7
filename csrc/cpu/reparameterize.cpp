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

// eps for elements [i0, i0 + n) of the draw (seed, offset), n <= kChunk; NOTE: [Counter-based eps]
void fill_normals(uint64_t seed, uint64_t offset, int64_t i0, int64_t n, float* dst) {
  alignas(64) float buf[kChunk + 8];
  const int64_t c0 = i0 / 4;
  const int64_t c1 = (i0 + n + 3) / 4;
#pragma omp simd
  for (int64_t c = c0; c < c1; ++c) {
    const philox::Normal4 v = philox::normal4(seed, offset + static_cast<uint64_t>(c));
    for (int k = 0; k < 4; ++k) buf[4 * (c - c0) + k] = v.v[k];
  }
  std::copy(buf + (i0 - 4 * c0), buf + (i0 - 4 * c0) + n, dst);
}

// uniforms of elements [i0, i0 + n) of the draw (seed, 0), n <= kChunk; NOTE: [Counter-based binarization]
void fill_uniforms(uint64_t seed, int64_t i0, int64_t n, float* dst) {
  alignas(64) float buf[kChunk + 8];
  const int64_t c0 = i0 / 4;
  const int64_t c1 = (i0 + n + 3) / 4;
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
