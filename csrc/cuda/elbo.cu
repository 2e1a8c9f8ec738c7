// CUDA launchers of the row-reduction ops: bernoulli_log_prob, gaussian_log_prob, gaussian_kl and the
// fused bernoulli_elbo. Same math as the CPU (csrc/ops); float16/bfloat16 are computed and accumulated
// in float, float64 in double.
//
// NOTE: [Row kernels on HBM]
// These ops read each input once and write one number per row (forward) or one gradient per input
// element (backward): they are memory-bound, and the kernels are shaped for that.
//   - A group of G lanes per row (G = 32, a warp, for image-sized rows; G = 8 for rows of at most 64
//     elements, the latent's Z), kThreads / G rows per block, the grid striding over rows. The old
//     shape, a 256-thread block per 784-element row, left most lanes with three elements, a block
//     reduction through shared memory with two __syncthreads per row, and a tail of idle warps.
//   - 16-byte loads and stores (4 float, 2 double, 8 half) when every operand's rows start on a
//     16-byte boundary: its base address is, and cols * sizeof(T) is a multiple of 16 (784 float32,
//     float16 and bfloat16 rows are; float64 rows of 784 too). Otherwise one element per lane per step
//     (kScalar), the same code with a vector of 1. The host decides per launch (vector_ok).
//   - One shuffle reduction per row, inside the group: no shared memory, no block barrier. The fused
//     ELBO reduces its two sums (reconstruction, KL) in the same shuffle steps.
//   - __restrict__ row pointers (inputs and outputs never alias: the ops allocate the outputs).
// Exponentials and logarithms are the csrc/ops polynomials (csrc/ops/fastmath.h), not the hardware
// MUFU approximations: they keep the GPU within a few float ulps of the CPU kernels. At 8 bytes read
// per element (float32 forward) an H100 (3.35 TB/s) must retire ~420 G elements/s, and its 132 SMs
// issue ~33 T lane-instructions/s: ~80 instructions per element are free, more than the
// ~40 a Bernoulli term costs (bench/cuda_sass.py prints the kernels' instruction counts).
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "common/params.h"
#include "cuda/common.cuh"
#include "cuda/kernels.h"
#include "ops/bernoulli.h"
#include "ops/continuous_bernoulli.h"
#include "ops/elbo.h"
#include "ops/gaussian_kl.h"
#include "ops/gaussian_log_prob.h"

namespace pyvae {
namespace cuda {
namespace {

using Dispatched = AllFloatTypes;  // NOTE: [CUDA kernel dtypes]

constexpr int kThreads = 256;

// Elements per 16-byte vector, or 1 for the scalar variant.
template <typename T, bool VEC>
constexpr int width() {
  return VEC ? static_cast<int>(16 / sizeof(T)) : 1;
}

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T e[N];
};

// Elements [u * N, u * N + N) of a row into compute-type registers: one 16-byte load for N > 1.
template <int N, typename T>
__device__ __forceinline__ void load_vec(const T* __restrict__ row, int64_t u, compute_t<T> (&out)[N]) {
  const Vec<T, N> v = *reinterpret_cast<const Vec<T, N>*>(row + u * N);
#pragma unroll
  for (int k = 0; k < N; ++k) out[k] = static_cast<compute_t<T>>(v.e[k]);
}

template <int N, typename T>
__device__ __forceinline__ void store_vec(T* __restrict__ row, int64_t u, const compute_t<T> (&in)[N]) {
  Vec<T, N> v;
#pragma unroll
  for (int k = 0; k < N; ++k) v.e[k] = static_cast<T>(in[k]);
  *reinterpret_cast<Vec<T, N>*>(row + u * N) = v;
}

template <typename T>
__device__ __forceinline__ const T* row_of(const Operand& o, int64_t r, int64_t cols) {
  return static_cast<const T*>(o.data) + (r % o.mod) * cols;
}

// The lanes of this thread's row group, as a shuffle mask (a group never straddles a warp).
template <int G>
__device__ __forceinline__ unsigned group_mask() {
  if constexpr (G == 32) {
    return 0xffffffffu;
  } else {
    const unsigned lane = threadIdx.x % 32u;
    return ((1u << G) - 1u) << (lane / G * G);
  }
}

// Sum over the G lanes of a row group; every lane gets the total.
template <int G, typename C>
__device__ __forceinline__ C group_sum(C v, unsigned mask) {
#pragma unroll
  for (int o = G / 2; o > 0; o /= 2) v += __shfl_xor_sync(mask, v, o, G);
  return v;
}

// Rows of this thread's group: first, then every `stride` rows (grid-stride).
template <int G>
struct RowLoop {
  static constexpr int kRowsPerBlock = kThreads / G;
  int lane;
  int64_t first, stride;
  __device__ __forceinline__ RowLoop()
      : lane(static_cast<int>(threadIdx.x % G)),
        first(static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / G),
        stride(static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {}
};

// ------------------------------------------------------------------------------ forward kernels
// Op selects the per-element term; every op reads up to four operands a..d of one row.
enum class Fwd { kBernoulli, kContinuousBernoulli, kKLStd, kKL, kGaussian };

template <Fwd OP>
constexpr int operands() {
  return OP == Fwd::kKL ? 4 : (OP == Fwd::kGaussian ? 3 : 2);
}

template <Fwd OP, typename T, int G, bool VEC>
__global__ void __launch_bounds__(kThreads) rowwise_fwd_kernel(const RowwiseParams p) {
  using C = compute_t<T>;
  constexpr int N = width<T, VEC>();
  const int64_t D = p.cols;
  const int64_t units = D / N;  // VEC: the host checked that N divides D
  const unsigned mask = group_mask<G>();
  T* __restrict__ out = static_cast<T*>(p.out);
  const RowLoop<G> loop;
  for (int64_t r = loop.first; r < p.rows; r += loop.stride) {
    const T* __restrict__ a = row_of<T>(p.a, r, D);
    const T* __restrict__ b = row_of<T>(p.b, r, D);
    const T* __restrict__ c = operands<OP>() >= 3 ? row_of<T>(p.c, r, D) : nullptr;
    const T* __restrict__ d = operands<OP>() >= 4 ? row_of<T>(p.d, r, D) : nullptr;
    C acc = 0;
    for (int64_t u = loop.lane; u < units; u += G) {
      C va[N], vb[N], vc[N], vd[N];
      load_vec<N>(a, u, va);
      load_vec<N>(b, u, vb);
      if constexpr (operands<OP>() >= 3) load_vec<N>(c, u, vc);
      if constexpr (operands<OP>() >= 4) load_vec<N>(d, u, vd);
#pragma unroll
      for (int k = 0; k < N; ++k) {
        if (OP == Fwd::kBernoulli) acc += ops::bernoulli_log_prob_limits(va[k], vb[k]);
        if (OP == Fwd::kContinuousBernoulli) acc += ops::continuous_bernoulli_log_prob_limits(va[k], vb[k]);
        if (OP == Fwd::kKLStd) acc += ops::kl_std_normal(va[k], vb[k]);
        if (OP == Fwd::kKL) acc += ops::kl_normal_limits(va[k], vb[k], vc[k], vd[k]);
        if (OP == Fwd::kGaussian) acc += ops::gaussian_log_prob_limits(va[k], vb[k], vc[k]);
      }
    }
    const C total = group_sum<G>(acc, mask);
    if (loop.lane == 0) store(out, r, total);
  }
}

// ----------------------------------------------------------------------------- backward kernels
template <Fwd OP, typename T, int G, bool VEC>
__global__ void __launch_bounds__(kThreads) rowwise_bwd_kernel(const RowwiseParams p) {
  using C = compute_t<T>;
  constexpr int N = width<T, VEC>();
  const int64_t D = p.cols;
  const int64_t units = D / N;
  T* __restrict__ ga = static_cast<T*>(p.grad_a);
  T* __restrict__ gb = static_cast<T*>(p.grad_b);
  T* __restrict__ gc = static_cast<T*>(p.grad_c);
  T* __restrict__ gd = static_cast<T*>(p.grad_d);
  const T* __restrict__ grad_out = static_cast<const T*>(p.grad_out);
  const RowLoop<G> loop;
  for (int64_t r = loop.first; r < p.rows; r += loop.stride) {
    const T* __restrict__ a = row_of<T>(p.a, r, D);
    const T* __restrict__ b = row_of<T>(p.b, r, D);
    const T* __restrict__ c = operands<OP>() >= 3 ? row_of<T>(p.c, r, D) : nullptr;
    const T* __restrict__ d = operands<OP>() >= 4 ? row_of<T>(p.d, r, D) : nullptr;
    const C g = load(grad_out, r);
    const int64_t o = r * D;
    for (int64_t u = loop.lane; u < units; u += G) {
      C va[N], vb[N], vc[N], vd[N];
      C oa[N], ob[N], oc[N], od[N];
      load_vec<N>(a, u, va);
      load_vec<N>(b, u, vb);
      if constexpr (operands<OP>() >= 3) load_vec<N>(c, u, vc);
      if constexpr (operands<OP>() >= 4) load_vec<N>(d, u, vd);
#pragma unroll
      for (int k = 0; k < N; ++k) {
        if (OP == Fwd::kBernoulli) {
          const auto v = ops::bernoulli_log_prob_grad(va[k], vb[k], g);
          oa[k] = v.l;
          ob[k] = v.x;
        }
        if (OP == Fwd::kContinuousBernoulli) {
          const auto v = ops::continuous_bernoulli_log_prob_grad(va[k], vb[k], g);
          oa[k] = v.l;
          ob[k] = v.x;
        }
        if (OP == Fwd::kKLStd) {
          const auto v = ops::kl_std_normal_grad(va[k], vb[k], g);
          oa[k] = v.mu;
          ob[k] = v.lv;
        }
        if (OP == Fwd::kKL) {
          const auto v = ops::kl_normal_grad(va[k], vb[k], vc[k], vd[k], g);
          oa[k] = v.mu;
          ob[k] = v.lv;
          oc[k] = v.pm;
          od[k] = v.plv;
        }
        if (OP == Fwd::kGaussian) {
          const auto v = ops::gaussian_log_prob_grad(va[k], vb[k], vc[k], g);
          oa[k] = v.x;
          ob[k] = v.m;
          oc[k] = v.lv;
        }
      }
      if (ga) store_vec<N>(ga + o, u, oa);
      if (gb) store_vec<N>(gb + o, u, ob);
      if constexpr (operands<OP>() >= 3) {
        if (gc) store_vec<N>(gc + o, u, oc);
      }
      if constexpr (operands<OP>() >= 4) {
        if (gd) store_vec<N>(gd + o, u, od);
      }
    }
  }
}

// --------------------------------------------------------------------------------- fused ELBO
// Operands: a = logits [S * B, D] (row s * B + r), b = x ([mod, D]), c = mu, d = logvar [B, Z]. The
// D-sized operands take the vector path; the Z-sized ones (a few dozen elements) are read one element
// per lane.
template <typename T, int G, bool VEC>
__global__ void __launch_bounds__(kThreads) elbo_fwd_kernel(const RowwiseParams p) {
  using C = compute_t<T>;
  constexpr int N = width<T, VEC>();
  const int64_t B = p.rows, D = p.cols, Z = p.cols2, S = p.samples;
  const int64_t units = D / N;
  const unsigned mask = group_mask<G>();
  const T* __restrict__ logits = static_cast<const T*>(p.a.data);
  T* __restrict__ out = static_cast<T*>(p.out);
  const RowLoop<G> loop;
  for (int64_t r = loop.first; r < B; r += loop.stride) {
    const T* __restrict__ x = row_of<T>(p.b, r, D);
    C recon = 0;
    for (int64_t s = 0; s < S; ++s) {
      const T* __restrict__ l = logits + (s * B + r) * D;
      for (int64_t u = loop.lane; u < units; u += G) {
        C vl[N], vx[N];
        load_vec<N>(l, u, vl);
        load_vec<N>(x, u, vx);
#pragma unroll
        for (int k = 0; k < N; ++k) recon += ops::bernoulli_log_prob_limits(vl[k], vx[k]);
      }
    }
    const T* __restrict__ mu = row_of<T>(p.c, r, Z);
    const T* __restrict__ lv = row_of<T>(p.d, r, Z);
    C kl = 0;
    for (int64_t j = loop.lane; j < Z; j += G) kl += ops::kl_std_normal(load(mu, j), load(lv, j));
    // Both sums in the same shuffle steps.
#pragma unroll
    for (int o = G / 2; o > 0; o /= 2) {
      recon += __shfl_xor_sync(mask, recon, o, G);
      kl += __shfl_xor_sync(mask, kl, o, G);
    }
    if (loop.lane == 0) store(out, r, ops::elbo_combine(recon, S, kl));
  }
}

template <typename T, int G, bool VEC>
__global__ void __launch_bounds__(kThreads) elbo_bwd_kernel(const RowwiseParams p) {
  using C = compute_t<T>;
  constexpr int N = width<T, VEC>();
  const int64_t B = p.rows, D = p.cols, Z = p.cols2, S = p.samples;
  const int64_t units = D / N;
  const T* __restrict__ logits = static_cast<const T*>(p.a.data);
  const T* __restrict__ grad_out = static_cast<const T*>(p.grad_out);
  T* __restrict__ gl = static_cast<T*>(p.grad_a);
  T* __restrict__ gx = static_cast<T*>(p.grad_b);
  T* __restrict__ gmu = static_cast<T*>(p.grad_c);
  T* __restrict__ glv = static_cast<T*>(p.grad_d);
  const RowLoop<G> loop;
  for (int64_t r = loop.first; r < B; r += loop.stride) {
    const auto scale = ops::elbo_grad_scales(load(grad_out, r), S);
    const T* __restrict__ x = row_of<T>(p.b, r, D);
    for (int64_t u = loop.lane; u < units; u += G) {
      C vx[N], dx[N];
      load_vec<N>(x, u, vx);
#pragma unroll
      for (int k = 0; k < N; ++k) dx[k] = 0;
      for (int64_t s = 0; s < S; ++s) {
        const int64_t o = (s * B + r) * D;
        C vl[N], dl[N];
        load_vec<N>(logits + o, u, vl);
#pragma unroll
        for (int k = 0; k < N; ++k) {
          const auto v = ops::bernoulli_log_prob_grad(vl[k], vx[k], scale.recon);
          dl[k] = v.l;
          dx[k] += v.x;
        }
        if (gl) store_vec<N>(gl + o, u, dl);
      }
      if (gx) store_vec<N>(gx + r * D, u, dx);
    }
    const T* __restrict__ mu = row_of<T>(p.c, r, Z);
    const T* __restrict__ lv = row_of<T>(p.d, r, Z);
    for (int64_t j = loop.lane; j < Z; j += G) {
      const auto v = ops::kl_std_normal_grad(load(mu, j), load(lv, j), scale.kl);
      if (gmu) store(gmu, r * Z + j, v.mu);
      if (glv) store(glv, r * Z + j, v.lv);
    }
  }
}

// ------------------------------------------------------------------------------------ dispatch
bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// The vector path is safe: 16-byte vectors tile each row (cols * size a multiple of 16) and every
// pointer read or written that way starts on 16 bytes (null ones are not used).
bool vector_ok(int64_t cols, size_t size, std::initializer_list<const void*> ptrs) {
  if ((cols * static_cast<int64_t>(size)) % 16 != 0) return false;
  for (const void* q : ptrs)
    if (q && !aligned16(q)) return false;
  return true;
}

// One row group per row: a warp for image-sized rows, 8 lanes for rows of at most 64 elements.
int group_for(int64_t cols) { return cols <= 64 ? 8 : 32; }

int grid_for(int64_t rows, int group) {
  const int64_t b = (rows + kThreads / group - 1) / (kThreads / group);
  return static_cast<int>(b < kMaxGrid ? (b > 0 ? b : 1) : kMaxGrid);
}

// Calls launch(T{}, integral_constant<G>, bool_constant<VEC>) for the geometry of p.
template <typename F>
void by_shape(const RowwiseParams& p, int group, bool vec, const F& launch) {
  by_dtype<Dispatched>(p.dtype, [&](auto t) {
    using T = decltype(t);
    if (group == 8) {
      if (vec) launch(T{}, std::integral_constant<int, 8>{}, std::true_type{});
      else launch(T{}, std::integral_constant<int, 8>{}, std::false_type{});
    } else {
      if (vec) launch(T{}, std::integral_constant<int, 32>{}, std::true_type{});
      else launch(T{}, std::integral_constant<int, 32>{}, std::false_type{});
    }
  });
}

size_t size_of(DType d) { return d == DType::kFloat64 ? 8 : (d == DType::kFloat32 ? 4 : 2); }

template <Fwd OP>
void fwd(const RowwiseParams& p, const char* name) {
  DeviceGuard guard(p.device);
  const int group = group_for(p.cols);
  const bool vec = vector_ok(p.cols, size_of(p.dtype), {p.a.data, p.b.data, p.c.data, p.d.data});
  by_shape(p, group, vec, [&](auto t, auto g, auto v) {
    rowwise_fwd_kernel<OP, decltype(t), decltype(g)::value, decltype(v)::value>
        <<<grid_for(p.rows, group), kThreads, 0, stream_of(p.stream)>>>(p);
  });
  check_launch(name);
}

template <Fwd OP>
void bwd(const RowwiseParams& p, const char* name) {
  DeviceGuard guard(p.device);
  const int group = group_for(p.cols);
  const bool vec = vector_ok(p.cols, size_of(p.dtype), {p.a.data, p.b.data, p.c.data, p.d.data, p.grad_a,
                                                        p.grad_b, p.grad_c, p.grad_d});
  by_shape(p, group, vec, [&](auto t, auto g, auto v) {
    rowwise_bwd_kernel<OP, decltype(t), decltype(g)::value, decltype(v)::value>
        <<<grid_for(p.rows, group), kThreads, 0, stream_of(p.stream)>>>(p);
  });
  check_launch(name);
}

}  // namespace

std::vector<DType> rowwise_kernel_dtypes() { return dtypes_in(Dispatched{}); }

void bernoulli_log_prob_fwd(const RowwiseParams& p) { fwd<Fwd::kBernoulli>(p, "bernoulli_log_prob_fwd"); }
void bernoulli_log_prob_bwd(const RowwiseParams& p) { bwd<Fwd::kBernoulli>(p, "bernoulli_log_prob_bwd"); }
void continuous_bernoulli_log_prob_fwd(const RowwiseParams& p) {
  fwd<Fwd::kContinuousBernoulli>(p, "continuous_bernoulli_log_prob_fwd");
}
void continuous_bernoulli_log_prob_bwd(const RowwiseParams& p) {
  bwd<Fwd::kContinuousBernoulli>(p, "continuous_bernoulli_log_prob_bwd");
}
void gaussian_kl_fwd(const RowwiseParams& p) {
  if (p.c.data) fwd<Fwd::kKL>(p, "gaussian_kl_fwd");
  else fwd<Fwd::kKLStd>(p, "gaussian_kl_fwd");
}
void gaussian_kl_bwd(const RowwiseParams& p) {
  if (p.c.data) bwd<Fwd::kKL>(p, "gaussian_kl_bwd");
  else bwd<Fwd::kKLStd>(p, "gaussian_kl_bwd");
}
void gaussian_log_prob_fwd(const RowwiseParams& p) { fwd<Fwd::kGaussian>(p, "gaussian_log_prob_fwd"); }
void gaussian_log_prob_bwd(const RowwiseParams& p) { bwd<Fwd::kGaussian>(p, "gaussian_log_prob_bwd"); }

// The fused ELBO always takes a warp per row (D is an image; Z rides along in the same row loop).
void bernoulli_elbo_fwd(const RowwiseParams& p) {
  DeviceGuard guard(p.device);
  const bool vec = vector_ok(p.cols, size_of(p.dtype), {p.a.data, p.b.data});
  by_dtype<Dispatched>(p.dtype, [&](auto t) {
    using T = decltype(t);
    if (vec) elbo_fwd_kernel<T, 32, true><<<grid_for(p.rows, 32), kThreads, 0, stream_of(p.stream)>>>(p);
    else elbo_fwd_kernel<T, 32, false><<<grid_for(p.rows, 32), kThreads, 0, stream_of(p.stream)>>>(p);
  });
  check_launch("bernoulli_elbo_fwd");
}
void bernoulli_elbo_bwd(const RowwiseParams& p) {
  DeviceGuard guard(p.device);
  const bool vec = vector_ok(p.cols, size_of(p.dtype), {p.a.data, p.b.data, p.grad_a, p.grad_b});
  by_dtype<Dispatched>(p.dtype, [&](auto t) {
    using T = decltype(t);
    if (vec) elbo_bwd_kernel<T, 32, true><<<grid_for(p.rows, 32), kThreads, 0, stream_of(p.stream)>>>(p);
    else elbo_bwd_kernel<T, 32, false><<<grid_for(p.rows, 32), kThreads, 0, stream_of(p.stream)>>>(p);
  });
  check_launch("bernoulli_elbo_bwd");
}

}  // namespace cuda
}  // namespace pyvae
