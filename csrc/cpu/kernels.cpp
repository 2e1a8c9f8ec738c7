// CPU launchers: OpenMP over rows, `omp simd` over the event dim, math from csrc/ops.
// Compiled once per instruction set with -DPYVAE_CPU_ARCH=<name> (see CMakeLists.txt).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "common/params.h"
#include "cpu/kernels.h"
#include "cpu/pages.h"
#include "ops/bernoulli.h"
#include "ops/continuous_bernoulli.h"
#include "ops/elbo.h"
#include "ops/gaussian_kl.h"
#include "ops/gaussian_log_prob.h"

#ifndef PYVAE_CPU_ARCH
#error "compile with -DPYVAE_CPU_ARCH=base|avx2|avx512"
#endif

namespace pyvae {
namespace cpu {
namespace PYVAE_CPU_ARCH {
namespace {

// Below this many elements a kernel runs on the calling thread: an OpenMP fork costs a few
// microseconds, more than the whole op at these sizes.
constexpr int64_t kParallelGrain = 32768;

template <typename F>
void parallel_rows(int64_t rows, int64_t work_per_row, const F& f) {
  const bool par = rows > 1 && rows * work_per_row >= kParallelGrain;
#pragma omp parallel for schedule(static) if (par)
  for (int64_t r = 0; r < rows; ++r) f(r);
}

// NOTE: [Fault fresh outputs in blocks]
// A large output is usually fresh memory (glibc maps every allocation over 32 MB anew, and torch's CPU
// allocator keeps nothing), so the first store to each of its 4 KiB pages is a page fault. Taken one
// at a time between a row's loads and stores, the faults cost more than the same faults taken in a
// burst: on the 2-core AMD EPYC VM the ELBO forward writing its [16384, 784] gradient ran at 1.5-1.6x
// `torch.add` into a fresh tensor with the faults interleaved, 1.24-1.28x when each thread first stored
// one byte into every page of its next ~1 MB block of rows and then computed the block (256-row blocks
// measured best among 4, 16, 64, 256, 1024, 8192; interleaved in one process). A page already mapped
// costs one store per 4 KiB.
constexpr int64_t kFaultBlockBytes = int64_t(1) << 20;
constexpr int64_t kPageBytes = 4096;

template <typename T>
void touch_pages(T* p, int64_t n) {
  volatile char* c = reinterpret_cast<volatile char*>(p);
  const int64_t bytes = n * int64_t(sizeof(T));
  for (int64_t i = 0; i < bytes; i += kPageBytes) c[i] = 0;
}

inline int64_t max_threads() {
#ifdef _OPENMP
  return std::max(1, omp_get_max_threads());
#else
  return 1;
#endif
}

// f(r0, r1) over blocks of `block` rows, the blocks split statically over the threads as parallel_rows.
template <typename F>
void parallel_blocks(int64_t rows, int64_t block, int64_t work_per_row, const F& f) {
  const int64_t n = (rows + block - 1) / block;
  const bool par = n > 1 && rows * work_per_row >= kParallelGrain;
#pragma omp parallel for schedule(static) if (par)
  for (int64_t k = 0; k < n; ++k) f(k * block, std::min(rows, (k + 1) * block));
}

// NOTE: [bfloat16 logits]
// Under autocast the decoder's logits are bfloat16. The ELBO's one-pass forward reads them as they are (a
// bfloat16 widens to float32 exactly) and writes their gradient in bfloat16, rounded to nearest even as
// torch's .to() rounds (NaN: torch's quiet NaN 0x7FC0): the gradients are bit for bit those of widening
// the logits first, computing in float32 and narrowing the gradient (the value's row sums may differ in
// their last bits: the loop vectorizes in another order), without those two [B, D] casts, and with half
// the bytes of logits and gradient for the ELBO itself to move (tests/test_bernoulli_elbo.py).
struct BF16 {
  uint16_t bits;
};

template <typename T>
inline T load_as(T v) {
  return v;
}
template <typename T>
inline T load_as(BF16 v) {
  const uint32_t u = uint32_t(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return T(f);
}
template <typename L, typename T>
inline L store_as(T v) {
  if constexpr (std::is_same_v<L, BF16>) {
    const float f = float(v);
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    if (f != f) return BF16{uint16_t(0x7FC0)};
    return BF16{uint16_t((u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16)};
  } else {
    return L(v);
  }
}

template <typename T>
const T* row_of(const Operand& o, int64_t r, int64_t cols) {
  return static_cast<const T*>(o.data) + (r % o.mod) * cols;
}

// Calls f(std::integral_constant<bool, A>{}) for a run-time flag (always, true or false).
template <typename F>
void bool_switch(bool a, const F& f) {
  if (a) f(std::true_type{});
  else f(std::false_type{});
}

// Calls f(std::integral_constant<bool, A>{}, std::integral_constant<bool, B>{}) for run-time flags,
// so inner loops carry no branch on which gradients are wanted; not at all when neither is set.
template <typename F>
void bool_switch2(bool a, bool b, const F& f) {
  if (a && b) f(std::true_type{}, std::true_type{});
  else if (a) f(std::true_type{}, std::false_type{});
  else if (b) f(std::false_type{}, std::true_type{});
}

// ---------------------------------------------------------- Bernoulli and continuous Bernoulli
// Both take (logits a, x b) per row; TERM(l, x) is the per-element log-density and GRAD(l, x, g) its
// gradient {l, x} scaled by g, from csrc/ops (bernoulli.h, continuous_bernoulli.h).
// ``limits``: the same term exact at infinite logits, for a row whose sum is NaN (NOTE: [Infinite inputs]
// in csrc/ops/bernoulli.h).
template <typename T, typename Term, typename Limits>
void logits_x_fwd(const RowwiseParams& p, const Term& term, const Limits& limits) {
  const int64_t D = p.cols;
  T* out = static_cast<T*>(p.out);
  parallel_rows(p.rows, D, [&](int64_t r) {
    const T* l = row_of<T>(p.a, r, D);
    const T* x = row_of<T>(p.b, r, D);
    T acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t c = 0; c < D; ++c) acc += term(l[c], x[c]);
    if (acc != acc) {
      acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int64_t c = 0; c < D; ++c) acc += limits(l[c], x[c]);
    }
    out[r] = acc;
  });
}

template <typename T, typename Grad>
void logits_x_bwd(const RowwiseParams& p, const Grad& grad) {
  const int64_t D = p.cols;
  const T* G = static_cast<const T*>(p.grad_out);
  advise_huge_pages(static_cast<T*>(p.grad_a), p.rows * D);  // NOTE: [Huge pages for fresh outputs]
  advise_huge_pages(static_cast<T*>(p.grad_b), p.rows * D);
  bool_switch2(p.grad_a != nullptr, p.grad_b != nullptr, [&](auto want_l, auto want_x) {
    parallel_rows(p.rows, D, [&](int64_t r) {
      const T* l = row_of<T>(p.a, r, D);
      const T* x = row_of<T>(p.b, r, D);
      T* gl = want_l ? static_cast<T*>(p.grad_a) + r * D : nullptr;
      T* gx = want_x ? static_cast<T*>(p.grad_b) + r * D : nullptr;
      const T g = G[r];
#pragma omp simd
      for (int64_t c = 0; c < D; ++c) {
        const auto d = grad(l[c], x[c], g);
        if (want_l) gl[c] = d.l;
        if (want_x) gx[c] = d.x;
      }
    });
  });
}

template <typename T>
void bernoulli_log_prob_fwd_t(const RowwiseParams& p) {
  logits_x_fwd<T>(p, [](T l, T x) { return ops::bernoulli_log_prob(l, x); },
                  [](T l, T x) { return ops::bernoulli_log_prob_limits(l, x); });
}

template <typename T>
void bernoulli_log_prob_bwd_t(const RowwiseParams& p) {
  logits_x_bwd<T>(p, [](T l, T x, T g) { return ops::bernoulli_log_prob_grad(l, x, g); });
}

template <typename T>
void continuous_bernoulli_log_prob_fwd_t(const RowwiseParams& p) {
  logits_x_fwd<T>(p, [](T l, T x) { return ops::continuous_bernoulli_log_prob(l, x); },
                  [](T l, T x) { return ops::continuous_bernoulli_log_prob_limits(l, x); });
}

template <typename T>
void continuous_bernoulli_log_prob_bwd_t(const RowwiseParams& p) {
  logits_x_bwd<T>(p, [](T l, T x, T g) { return ops::continuous_bernoulli_log_prob_grad(l, x, g); });
}

// ------------------------------------------------------------------------------------------ KL
// Short rows (the latent dim, Z = 20) against the standard prior, mu and logvar unbroadcast: rows in
// blocks of kKlBlock. The terms of a whole block are one contiguous vector loop (no per-row tail),
// and the block's row sums run across rows (lane j sums row j), not as a horizontal reduction per
// row; per-row reductions were most of the time at Z = 20.
constexpr int64_t kKlBlock = 16;
constexpr int64_t kKlMaxCols = 64;

// Whether the blocked kernels take this call: standard prior, Z <= kKlMaxCols, mu and logvar unbroadcast.
bool kl_short_rows(const RowwiseParams& p) {
  return p.c.data == nullptr && p.cols <= kKlMaxCols && p.a.mod >= p.rows && p.b.mod >= p.rows;
}

template <typename T>
void gaussian_kl_fwd_short_rows(const RowwiseParams& p) {
  const int64_t D = p.cols, R = p.rows;
  const T* mu = static_cast<const T*>(p.a.data);
  const T* lv = static_cast<const T*>(p.b.data);
  T* out = static_cast<T*>(p.out);
  const int64_t blocks = (R + kKlBlock - 1) / kKlBlock;
#pragma omp parallel for schedule(static) if (R * D >= kParallelGrain)
  for (int64_t k = 0; k < blocks; ++k) {
    const int64_t r0 = k * kKlBlock, n = std::min(kKlBlock, R - r0);
    alignas(64) T terms[kKlBlock * kKlMaxCols];
    const T* m = mu + r0 * D;
    const T* l = lv + r0 * D;
#pragma omp simd
    for (int64_t i = 0; i < n * D; ++i) terms[i] = ops::kl_std_normal(m[i], l[i]);
    alignas(64) T acc[kKlBlock] = {};
    for (int64_t c = 0; c < D; ++c) {
#pragma omp simd
      for (int64_t j = 0; j < kKlBlock; ++j) acc[j] += j < n ? terms[j * D + c] : T(0);
    }
    for (int64_t j = 0; j < n; ++j) out[r0 + j] = acc[j];
  }
}

template <typename T>
void gaussian_kl_fwd_t(const RowwiseParams& p) {
  const int64_t D = p.cols;
  T* out = static_cast<T*>(p.out);
  const bool std_prior = p.c.data == nullptr;
  if (kl_short_rows(p)) {
    gaussian_kl_fwd_short_rows<T>(p);
    return;
  }
  parallel_rows(p.rows, D, [&](int64_t r) {
    const T* mu = row_of<T>(p.a, r, D);
    const T* lv = row_of<T>(p.b, r, D);
    T acc = 0;
    if (std_prior) {
#pragma omp simd reduction(+ : acc)
      for (int64_t c = 0; c < D; ++c) acc += ops::kl_std_normal(mu[c], lv[c]);
    } else {
      const T* pm = row_of<T>(p.c, r, D);
      const T* plv = row_of<T>(p.d, r, D);
#pragma omp simd reduction(+ : acc)
      for (int64_t c = 0; c < D; ++c) acc += ops::kl_normal(mu[c], lv[c], pm[c], plv[c]);
      if (!(acc < std::numeric_limits<T>::infinity())) {  // NaN or +inf: NOTE: [Tiny variances]
        acc = 0;
#pragma omp simd reduction(+ : acc)
        for (int64_t c = 0; c < D; ++c) acc += ops::kl_normal_limits(mu[c], lv[c], pm[c], plv[c]);
      }
    }
    out[r] = acc;
  });
}

// The backward of the same case: the block's per-row upstream gradients are spread over its
// elements once, then one contiguous vector loop computes and stores both gradients.
template <typename T>
void gaussian_kl_bwd_short_rows(const RowwiseParams& p) {
  const int64_t D = p.cols, R = p.rows;
  const T* mu = static_cast<const T*>(p.a.data);
  const T* lv = static_cast<const T*>(p.b.data);
  const T* G = static_cast<const T*>(p.grad_out);
  const int64_t blocks = (R + kKlBlock - 1) / kKlBlock;
  bool_switch2(p.grad_a != nullptr, p.grad_b != nullptr, [&](auto want_mu, auto want_lv) {
    T* gmu = static_cast<T*>(p.grad_a);
    T* glv = static_cast<T*>(p.grad_b);
#pragma omp parallel for schedule(static) if (R * D >= kParallelGrain)
    for (int64_t k = 0; k < blocks; ++k) {
      const int64_t r0 = k * kKlBlock, n = std::min(kKlBlock, R - r0), e0 = r0 * D;
      alignas(64) T g[kKlBlock * kKlMaxCols];
      for (int64_t j = 0; j < n; ++j) std::fill(g + j * D, g + (j + 1) * D, G[r0 + j]);
#pragma omp simd
      for (int64_t i = 0; i < n * D; ++i) {
        const auto d = ops::kl_std_normal_grad(mu[e0 + i], lv[e0 + i], g[i]);
        if (want_mu) gmu[e0 + i] = d.mu;
        if (want_lv) glv[e0 + i] = d.lv;
      }
    }
  });
}

template <typename T>
void gaussian_kl_bwd_t(const RowwiseParams& p) {
  const int64_t D = p.cols;
  const T* G = static_cast<const T*>(p.grad_out);
  T* gmu = static_cast<T*>(p.grad_a);
  T* glv = static_cast<T*>(p.grad_b);
  T* gpm = static_cast<T*>(p.grad_c);
  T* gplv = static_cast<T*>(p.grad_d);
  // Gradients are cheap next to their memory traffic: compute all four, store what is wanted.
  const bool std_prior = p.c.data == nullptr;
  if (kl_short_rows(p)) {
    gaussian_kl_bwd_short_rows<T>(p);
    return;
  }
  parallel_rows(p.rows, D, [&](int64_t r) {
    const T* mu = row_of<T>(p.a, r, D);
    const T* lv = row_of<T>(p.b, r, D);
    const T g = G[r];
    const int64_t o = r * D;
    if (std_prior) {
#pragma omp simd
      for (int64_t c = 0; c < D; ++c) {
        const auto d = ops::kl_std_normal_grad(mu[c], lv[c], g);
        if (gmu) gmu[o + c] = d.mu;
        if (glv) glv[o + c] = d.lv;
      }
    } else {
      const T* pm = row_of<T>(p.c, r, D);
      const T* plv = row_of<T>(p.d, r, D);
#pragma omp simd
      for (int64_t c = 0; c < D; ++c) {
        const auto d = ops::kl_normal_grad(mu[c], lv[c], pm[c], plv[c], g);
        if (gmu) gmu[o + c] = d.mu;
        if (glv) glv[o + c] = d.lv;
        if (gpm) gpm[o + c] = d.pm;
        if (gplv) gplv[o + c] = d.plv;
      }
    }
  });
}

// ---------------------------------------------------------------------------- Gaussian log-prob
template <typename T>
void gaussian_log_prob_fwd_t(const RowwiseParams& p) {
  const int64_t D = p.cols;
  T* out = static_cast<T*>(p.out);
  parallel_rows(p.rows, D, [&](int64_t r) {
    const T* x = row_of<T>(p.a, r, D);
    const T* m = row_of<T>(p.b, r, D);
    const T* lv = row_of<T>(p.c, r, D);
    T acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t c = 0; c < D; ++c) acc += ops::gaussian_log_prob(x[c], m[c], lv[c]);
    if (!(acc > -std::numeric_limits<T>::infinity())) {  // NaN or -inf: NOTE: [Tiny variances] in csrc/ops/gaussian_log_prob.h
      acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int64_t c = 0; c < D; ++c) acc += ops::gaussian_log_prob_limits(x[c], m[c], lv[c]);
    }
    out[r] = acc;
  });
}

template <typename T>
void gaussian_log_prob_bwd_t(const RowwiseParams& p) {
  const int64_t D = p.cols;
  const T* G = static_cast<const T*>(p.grad_out);
  T* gx = static_cast<T*>(p.grad_a);
  T* gm = static_cast<T*>(p.grad_b);
  T* glv = static_cast<T*>(p.grad_c);
  for (T* g : {gx, gm, glv}) advise_huge_pages(g, p.rows * D);  // NOTE: [Huge pages for fresh outputs]
  parallel_rows(p.rows, D, [&](int64_t r) {
    const T* x = row_of<T>(p.a, r, D);
    const T* m = row_of<T>(p.b, r, D);
    const T* lv = row_of<T>(p.c, r, D);
    const T g = G[r];
    const int64_t o = r * D;
#pragma omp simd
    for (int64_t c = 0; c < D; ++c) {
      const auto d = ops::gaussian_log_prob_grad(x[c], m[c], lv[c], g);
      if (gx) gx[o + c] = d.x;
      if (gm) gm[o + c] = d.m;
      if (glv) glv[o + c] = d.lv;
    }
  });
}

// --------------------------------------------------------------------------------- fused ELBO
// NOTE: [ELBO in one pass]
// With grad_a (and/or grad_c, grad_d) set, the forward also writes the gradients of the ELBO while it
// reads logits and x for the value, for the upstream gradient ``grad_out[b]`` that backward is
// expected to bring (pyvae/ops/bernoulli_elbo.py guesses it; 1 where grad_out is null): d/dlogits =
// g (x - sigmoid(l)) / L, d/dmu = -g mu, d/dlogvar = g (1 - e^lv) / 2, the same functions of the same
// scale as bernoulli_elbo_bwd_t, so bit for bit its result. When the guess holds, backward returns
// them untouched: the step moves logits and x once and the gradient once, instead of a second read of
// logits and x (two-pass) or a second read and write of the gradient (scaling it afterwards).
template <typename T, typename L = T>
void bernoulli_elbo_fwd_t(const RowwiseParams& p) {
  const int64_t B = p.rows, D = p.cols, Z = p.cols2, S = p.samples;
  T* out = static_cast<T*>(p.out);
  T* gmu = static_cast<T*>(p.grad_c);
  T* glv = static_cast<T*>(p.grad_d);
  const T* G = static_cast<const T*>(p.grad_out);
  // Written over the logits themselves (NOTE: [ELBO gradient into the logits]), a row's logits are gone once
  // its loop has run, so its sum cannot be taken again with the exact-limit form (NOTE: [Infinite inputs] in
  // csrc/ops/bernoulli.h) when it comes out NaN: such a row is probed first (l * 0 is NaN exactly where l is
  // inf or NaN; one multiply-add an element, the row then in L1) and summed with that form when it holds one.
  const bool aliased = p.grad_a != nullptr && static_cast<const void*>(p.grad_a) == p.a.data;
  bool_switch(p.grad_a != nullptr, [&](auto want_l) {
    auto row = [&](int64_t b) {
      const auto unit = ops::elbo_grad_scales(G ? G[b] : T(1), S);
      const T* x = row_of<T>(p.b, b, D);
      T recon = 0;
      for (int64_t s = 0; s < S; ++s) {
        const L* l = static_cast<const L*>(p.a.data) + (s * B + b) * D;
        L* gl = want_l ? static_cast<L*>(p.grad_a) + (s * B + b) * D : nullptr;
        T acc = 0;
        if (want_l) {  // one loop: e^-|l| is computed once for the term and its gradient (the compiler
                       // shares it), and the sum is bit for bit the value-only loop's (tested)
          auto fused = [&](auto term) {
            T sum = 0;
#pragma omp simd reduction(+ : sum)
            for (int64_t c = 0; c < D; ++c) {
              const T lc = load_as<T>(l[c]);
              sum += term(lc, x[c]);
              gl[c] = store_as<L>(ops::bernoulli_log_prob_grad(lc, x[c], unit.recon).l);
            }
            return sum;
          };
          T probe = 0;
          if (aliased) {
#pragma omp simd reduction(+ : probe)
            for (int64_t c = 0; c < D; ++c) probe += load_as<T>(l[c]) * T(0);
          }
          acc = probe != probe ? fused([](T lc, T xc) { return ops::bernoulli_log_prob_limits(lc, xc); })
                               : fused([](T lc, T xc) { return ops::bernoulli_log_prob(lc, xc); });
        } else {
#pragma omp simd reduction(+ : acc)
          for (int64_t c = 0; c < D; ++c) acc += ops::bernoulli_log_prob(load_as<T>(l[c]), x[c]);
        }
        if (acc != acc && !aliased) {  // an infinite logit, or a NaN: NOTE: [Infinite inputs]
          acc = 0;
#pragma omp simd reduction(+ : acc)
          for (int64_t c = 0; c < D; ++c) acc += ops::bernoulli_log_prob_limits(load_as<T>(l[c]), x[c]);
        }
        recon += acc;
      }
      const T* mu = row_of<T>(p.c, b, Z);
      const T* lv = row_of<T>(p.d, b, Z);
      T kl = 0;
#pragma omp simd reduction(+ : kl)
      for (int64_t c = 0; c < Z; ++c) kl += ops::kl_std_normal(mu[c], lv[c]);
      if (gmu || glv) {
        for (int64_t c = 0; c < Z; ++c) {
          const auto d = ops::kl_std_normal_grad(mu[c], lv[c], unit.kl);
          if (gmu) gmu[b * Z + c] = d.mu;
          if (glv) glv[b * Z + c] = d.lv;
        }
      }
      out[b] = ops::elbo_combine(recon, S, kl);
    };
    if (!want_l) {
      parallel_rows(B, S * D + Z, row);
      return;
    }
    // NOTE: [Fault fresh outputs in blocks]
    L* gl = static_cast<L*>(p.grad_a);
    // ~1 MB blocks, and at least two per thread so that a small batch is still split over the threads
    const int64_t per_thread = (B + 2 * max_threads() - 1) / (2 * max_threads());
    const int64_t blk = std::max<int64_t>(1, std::min(per_thread, kFaultBlockBytes / (S * D * int64_t(sizeof(L)))));
    // Written over the logits themselves (NOTE: [ELBO gradient into the logits]): their pages are mapped,
    // and a touch would clobber a logit before it is read.
    const bool fresh = static_cast<const void*>(gl) != p.a.data;
    if (fresh) advise_huge_pages(gl, S * B * D);  // NOTE: [Huge pages for fresh outputs]
    parallel_blocks(B, blk, S * D + Z, [&](int64_t r0, int64_t r1) {
      if (fresh)
        for (int64_t s = 0; s < S; ++s) touch_pages(gl + (s * B + r0) * D, (r1 - r0) * D);
      for (int64_t b = r0; b < r1; ++b) row(b);
    });
  });
}

template <typename T>
void bernoulli_elbo_bwd_t(const RowwiseParams& p) {
  const int64_t B = p.rows, D = p.cols, Z = p.cols2, S = p.samples;
  const T* G = static_cast<const T*>(p.grad_out);
  T* gmu = static_cast<T*>(p.grad_c);
  T* glv = static_cast<T*>(p.grad_d);
  advise_huge_pages(static_cast<T*>(p.grad_a), S * B * D);  // NOTE: [Huge pages for fresh outputs]
  advise_huge_pages(static_cast<T*>(p.grad_b), B * D);
  bool_switch2(p.grad_a != nullptr, p.grad_b != nullptr, [&](auto want_l, auto want_x) {
    parallel_rows(B, S * D + Z, [&](int64_t b) {
      const auto scale = ops::elbo_grad_scales(G[b], S);
      const T* x = row_of<T>(p.b, b, D);
      T* gx = want_x ? static_cast<T*>(p.grad_b) + b * D : nullptr;
      for (int64_t s = 0; s < S; ++s) {
        const T* l = static_cast<const T*>(p.a.data) + (s * B + b) * D;
        T* gl = want_l ? static_cast<T*>(p.grad_a) + (s * B + b) * D : nullptr;
        const bool first = s == 0;
#pragma omp simd
        for (int64_t c = 0; c < D; ++c) {
          const auto d = ops::bernoulli_log_prob_grad(l[c], x[c], scale.recon);
          if (want_l) gl[c] = d.l;
          if (want_x) gx[c] = first ? d.x : gx[c] + d.x;
        }
      }
    });
  });
  if (gmu || glv) {
    parallel_rows(B, Z, [&](int64_t b) {
      const auto scale = ops::elbo_grad_scales(G[b], S);
      const T* mu = row_of<T>(p.c, b, Z);
      const T* lv = row_of<T>(p.d, b, Z);
#pragma omp simd
      for (int64_t c = 0; c < Z; ++c) {
        const auto d = ops::kl_std_normal_grad(mu[c], lv[c], scale.kl);
        if (gmu) gmu[b * Z + c] = d.mu;
        if (glv) glv[b * Z + c] = d.lv;
      }
    });
  }
}

}  // namespace

#define PYVAE_CPU_DEFINE(NAME, PARAMS)                                        \
  void NAME(const PARAMS& p) {                                                \
    if (p.dtype == DType::kFloat64) NAME##_t<double>(p);                      \
    else NAME##_t<float>(p);                                                  \
  }

PYVAE_CPU_DEFINE(bernoulli_log_prob_fwd, RowwiseParams)
PYVAE_CPU_DEFINE(bernoulli_log_prob_bwd, RowwiseParams)
PYVAE_CPU_DEFINE(continuous_bernoulli_log_prob_fwd, RowwiseParams)
PYVAE_CPU_DEFINE(continuous_bernoulli_log_prob_bwd, RowwiseParams)
PYVAE_CPU_DEFINE(gaussian_kl_fwd, RowwiseParams)
PYVAE_CPU_DEFINE(gaussian_kl_bwd, RowwiseParams)
PYVAE_CPU_DEFINE(gaussian_log_prob_fwd, RowwiseParams)
PYVAE_CPU_DEFINE(gaussian_log_prob_bwd, RowwiseParams)
// kBFloat16 here means bfloat16 logits and logits gradient, everything else float32 (NOTE: [bfloat16
// logits]).
void bernoulli_elbo_fwd(const RowwiseParams& p) {
  if (p.dtype == DType::kFloat64) bernoulli_elbo_fwd_t<double>(p);
  else if (p.dtype == DType::kBFloat16) bernoulli_elbo_fwd_t<float, BF16>(p);
  else bernoulli_elbo_fwd_t<float>(p);
}
PYVAE_CPU_DEFINE(bernoulli_elbo_bwd, RowwiseParams)

}  // namespace PYVAE_CPU_ARCH
}  // namespace cpu
}  // namespace pyvae
