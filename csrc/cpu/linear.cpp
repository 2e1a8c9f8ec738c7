// CPU epilogues of the fused linear layers (the GEMMs are torch's). Compiled per instruction set
// like kernels.cpp; math from csrc/ops/activation.h.
#include <algorithm>
#include <type_traits>
#include <cstdint>
#include <vector>

#include "common/hd.h"
#include "common/params.h"
#include "cpu/kernels.h"
#include "cpu/pages.h"
#include "ops/activation.h"

namespace pyvae {
namespace cpu {
namespace PYVAE_CPU_ARCH {
namespace {

// Storage S, compute type C: bfloat16 (as uint16 bits) and float compute in float, double in double.
template <typename S>
struct Io {
  using C = S;
  static C load(const S* p, int64_t i) { return p[i]; }
  static void store(S* p, int64_t i, C v) { p[i] = v; }
};
template <>
struct Io<uint16_t> {
  using C = float;
  static C load(const uint16_t* p, int64_t i) { return bf16_to_float(p[i]); }
  static void store(uint16_t* p, int64_t i, C v) { p[i] = float_to_bf16(v); }
};

constexpr int64_t kParallelGrain = 32768;
constexpr int64_t kRowChunk = 64;  // rows per partial bias-gradient sum (fixed: results do not
                                   // depend on the thread count)

template <ops::Act A, typename S>
void bias_act_fwd_t(const LinearParams& p) {
  S* y = static_cast<S*>(p.y);
  const S* bias = static_cast<const S*>(p.bias);
  const int64_t R = p.rows, N = p.cols;
#pragma omp parallel for schedule(static) if (R * N >= kParallelGrain)
  for (int64_t r = 0; r < R; ++r) {
    S* yr = y + r * N;
    if (bias) {
#pragma omp simd
      for (int64_t c = 0; c < N; ++c)
        Io<S>::store(yr, c, ops::bias_act<A>(Io<S>::load(yr, c), Io<S>::load(bias, c)));
    } else {
#pragma omp simd
      for (int64_t c = 0; c < N; ++c) Io<S>::store(yr, c, ops::act_forward<A>(Io<S>::load(yr, c)));
    }
  }
}

template <ops::Act A, typename S>
void act_bwd_t(const LinearParams& p) {
  using C = typename Io<S>::C;
  const S* gy = static_cast<const S*>(p.grad_y);
  const S* y = static_cast<const S*>(p.out);
  S* gp = static_cast<S*>(p.grad_pre);
  S* gb = static_cast<S*>(p.grad_bias);
  S* gpt = static_cast<S*>(p.grad_pre_t);
  const int64_t R = p.rows, N = p.cols;
  advise_huge_pages(gp, R * N);  // NOTE: [Huge pages for fresh outputs] in csrc/cpu/pages.h
  advise_huge_pages(gpt, R * N);
  const int64_t chunks = (R + kRowChunk - 1) / kRowChunk;
  std::vector<C> partial(gb ? static_cast<size_t>(chunks * N) : 0);
  // grad_pre_t without grad_pre (only the weight gradient is wanted): the chunk's rows of
  // dL/d(pre) go to a per-thread scratch block, transposed from there.
  const bool scratch_rows = gpt && !gp && A != ops::Act::kIdentity;
#pragma omp parallel if (R * N >= kParallelGrain)
  {
    std::vector<S> scratch(scratch_rows ? static_cast<size_t>(kRowChunk * N) : 0);
#pragma omp for schedule(static)
    for (int64_t k = 0; k < chunks; ++k) {
      C* acc = gb ? partial.data() + k * N : nullptr;
      if (acc) std::fill(acc, acc + N, C(0));
      const int64_t r0 = k * kRowChunk, r1 = std::min(R, r0 + kRowChunk);
      // Where row r of dL/d(pre) is (written below, or grad_y itself for identity), or nullptr.
      const auto pre_row = [&](int64_t r) -> S* {
        if (gp) return gp + r * N;
        if (scratch_rows) return scratch.data() + (r - r0) * N;
        return nullptr;
      };
      for (int64_t r = r0; r < r1; ++r) {
        const S* gyr = gy + r * N;
        const S* yr = A == ops::Act::kIdentity ? nullptr : y + r * N;
        S* gpr = pre_row(r);
#pragma omp simd
        for (int64_t c = 0; c < N; ++c) {
          const C g = A == ops::Act::kIdentity ? Io<S>::load(gyr, c)
                                                : ops::act_backward<A>(Io<S>::load(gyr, c), Io<S>::load(yr, c));
          if (gpr) Io<S>::store(gpr, c, g);
          if (acc) acc[c] += g;
        }
      }
      if (gpt) {
        // The chunk's rows of dL/d(pre) (just written, still in cache) stored transposed: column c
        // of the chunk becomes r1 - r0 contiguous elements of row c of grad_pre_t.
        const bool own = gp || scratch_rows;
        const S* src = own ? pre_row(r0) : gy + r0 * N;  // rows r0.. at stride N
        for (int64_t c = 0; c < N; ++c) {
          S* dst = gpt + c * R + r0;
#pragma omp simd
          for (int64_t r = 0; r < r1 - r0; ++r) dst[r] = src[r * N + c];
        }
      }
    }
  }
  if (gb) {
    for (int64_t c = 0; c < N; ++c) {
      C s = 0;
      for (int64_t k = 0; k < chunks; ++k) s += partial[k * N + c];
      Io<S>::store(gb, c, s);
    }
  }
}

template <typename F>
void storage_switch(DType dt, const F& f) {
  if (dt == DType::kFloat64) f(double{});
  else if (dt == DType::kBFloat16) f(uint16_t{});
  else f(float{});
}

}  // namespace

void bias_act_fwd(const LinearParams& p) {
  ops::act_switch(p.act, [&](auto a) { storage_switch(p.dtype, [&](auto s) { bias_act_fwd_t<decltype(a)::value, decltype(s)>(p); }); });
}

void act_bwd(const LinearParams& p) {
  ops::act_switch(p.act, [&](auto a) { storage_switch(p.dtype, [&](auto s) { act_bwd_t<decltype(a)::value, decltype(s)>(p); }); });
}

}  // namespace PYVAE_CPU_ARCH
}  // namespace cpu
}  // namespace pyvae
