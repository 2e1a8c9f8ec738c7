// CUDA launchers for the fused ELBO ops. Same math as the CPU (csrc/ops), one block per row with a
// CUB block reduction over the event dim; float16/bfloat16 are computed and accumulated in float.
#include <cub/block/block_reduce.cuh>

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

int grid_for(int64_t n) { return static_cast<int>(n < kMaxGrid ? n : kMaxGrid); }

template <typename T>
__device__ __forceinline__ const T* row(const Operand& o, int64_t r, int64_t cols) {
  return static_cast<const T*>(o.data) + (r % o.mod) * cols;
}

template <int THREADS, typename C>
__device__ __forceinline__ C block_sum(C v) {
  using Reduce = cub::BlockReduce<C, THREADS>;
  __shared__ typename Reduce::TempStorage tmp;
  const C s = Reduce(tmp).Sum(v);
  __syncthreads();  // tmp is reused by the next row
  return s;
}

// ------------------------------------------------------------------------------ forward kernels
// Op selects the per-element term; every op reads up to four operands a..d of one row.
enum class Fwd { kBernoulli, kContinuousBernoulli, kKLStd, kKL, kGaussian };

template <Fwd OP, typename T, int THREADS>
__global__ void __launch_bounds__(THREADS) rowwise_fwd_kernel(RowwiseParams p) {
  using C = compute_t<T>;
  const int64_t D = p.cols;
  for (int64_t r = blockIdx.x; r < p.rows; r += gridDim.x) {
    const T* a = row<T>(p.a, r, D);
    const T* b = row<T>(p.b, r, D);
    const T* c = OP == Fwd::kKL || OP == Fwd::kGaussian ? row<T>(p.c, r, D) : nullptr;
    const T* d = OP == Fwd::kKL ? row<T>(p.d, r, D) : nullptr;
    C acc = 0;
    for (int64_t j = threadIdx.x; j < D; j += THREADS) {
      if (OP == Fwd::kBernoulli) acc += ops::bernoulli_log_prob(load(a, j), load(b, j));
      if (OP == Fwd::kContinuousBernoulli) acc += ops::continuous_bernoulli_log_prob(load(a, j), load(b, j));
      if (OP == Fwd::kKLStd) acc += ops::kl_std_normal(load(a, j), load(b, j));
      if (OP == Fwd::kKL) acc += ops::kl_normal(load(a, j), load(b, j), load(c, j), load(d, j));
      if (OP == Fwd::kGaussian) acc += ops::gaussian_log_prob(load(a, j), load(b, j), load(c, j));
    }
    const C total = block_sum<THREADS>(acc);
    if (threadIdx.x == 0) store(static_cast<T*>(p.out), r, total);
  }
}

// ----------------------------------------------------------------------------- backward kernels
template <Fwd OP, typename T, int THREADS>
__global__ void __launch_bounds__(THREADS) rowwise_bwd_kernel(RowwiseParams p) {
  using C = compute_t<T>;
  const int64_t D = p.cols;
  T* ga = static_cast<T*>(p.grad_a);
  T* gb = static_cast<T*>(p.grad_b);
  T* gc = static_cast<T*>(p.grad_c);
  T* gd = static_cast<T*>(p.grad_d);
  for (int64_t r = blockIdx.x; r < p.rows; r += gridDim.x) {
    const T* a = row<T>(p.a, r, D);
    const T* b = row<T>(p.b, r, D);
    const T* c = OP == Fwd::kKL || OP == Fwd::kGaussian ? row<T>(p.c, r, D) : nullptr;
    const T* d = OP == Fwd::kKL ? row<T>(p.d, r, D) : nullptr;
    const C g = load(static_cast<const T*>(p.grad_out), r);
    const int64_t o = r * D;
    for (int64_t j = threadIdx.x; j < D; j += THREADS) {
      if (OP == Fwd::kBernoulli) {
        const auto v = ops::bernoulli_log_prob_grad(load(a, j), load(b, j), g);
        if (ga) store(ga, o + j, v.l);
        if (gb) store(gb, o + j, v.x);
      }
      if (OP == Fwd::kContinuousBernoulli) {
        const auto v = ops::continuous_bernoulli_log_prob_grad(load(a, j), load(b, j), g);
        if (ga) store(ga, o + j, v.l);
        if (gb) store(gb, o + j, v.x);
      }
      if (OP == Fwd::kKLStd) {
        const auto v = ops::kl_std_normal_grad(load(a, j), load(b, j), g);
        if (ga) store(ga, o + j, v.mu);
        if (gb) store(gb, o + j, v.lv);
      }
      if (OP == Fwd::kKL) {
        const auto v = ops::kl_normal_grad(load(a, j), load(b, j), load(c, j), load(d, j), g);
        if (ga) store(ga, o + j, v.mu);
        if (gb) store(gb, o + j, v.lv);
        if (gc) store(gc, o + j, v.pm);
        if (gd) store(gd, o + j, v.plv);
      }
      if (OP == Fwd::kGaussian) {
        const auto v = ops::gaussian_log_prob_grad(load(a, j), load(b, j), load(c, j), g);
        if (ga) store(ga, o + j, v.x);
        if (gb) store(gb, o + j, v.m);
        if (gc) store(gc, o + j, v.lv);
      }
    }
  }
}

// --------------------------------------------------------------------------------- fused ELBO
template <typename T, int THREADS>
__global__ void __launch_bounds__(THREADS) elbo_fwd_kernel(RowwiseParams p) {
  using C = compute_t<T>;
  const int64_t B = p.rows, D = p.cols, Z = p.cols2, S = p.samples;
  for (int64_t r = blockIdx.x; r < B; r += gridDim.x) {
    const T* x = row<T>(p.b, r, D);
    C recon = 0;
    for (int64_t s = 0; s < S; ++s) {
      const T* l = static_cast<const T*>(p.a.data) + (s * B + r) * D;
      for (int64_t j = threadIdx.x; j < D; j += THREADS) recon += ops::bernoulli_log_prob(load(l, j), load(x, j));
    }
    const T* mu = row<T>(p.c, r, Z);
    const T* lv = row<T>(p.d, r, Z);
    C kl = 0;
    for (int64_t j = threadIdx.x; j < Z; j += THREADS) kl += ops::kl_std_normal(load(mu, j), load(lv, j));
    const C recon_total = block_sum<THREADS>(recon);
    const C kl_total = block_sum<THREADS>(kl);
    if (threadIdx.x == 0) store(static_cast<T*>(p.out), r, ops::elbo_combine(recon_total, S, kl_total));
  }
}

template <typename T, int THREADS>
__global__ void __launch_bounds__(THREADS) elbo_bwd_kernel(RowwiseParams p) {
  using C = compute_t<T>;
  const int64_t B = p.rows, D = p.cols, Z = p.cols2, S = p.samples;
  T* gl = static_cast<T*>(p.grad_a);
  T* gx = static_cast<T*>(p.grad_b);
  T* gmu = static_cast<T*>(p.grad_c);
  T* glv = static_cast<T*>(p.grad_d);
  for (int64_t r = blockIdx.x; r < B; r += gridDim.x) {
    const auto scale = ops::elbo_grad_scales(load(static_cast<const T*>(p.grad_out), r), S);
    const T* x = row<T>(p.b, r, D);
    for (int64_t j = threadIdx.x; j < D; j += THREADS) {
      const C xj = load(x, j);
      C dx = 0;
      for (int64_t s = 0; s < S; ++s) {
        const int64_t o = (s * B + r) * D + j;
        const auto v = ops::bernoulli_log_prob_grad(load(static_cast<const T*>(p.a.data), o), xj, scale.recon);
        if (gl) store(gl, o, v.l);
        dx += v.x;
      }
      if (gx) store(gx, r * D + j, dx);
    }
    const T* mu = row<T>(p.c, r, Z);
    const T* lv = row<T>(p.d, r, Z);
    for (int64_t j = threadIdx.x; j < Z; j += THREADS) {
      const auto v = ops::kl_std_normal_grad(load(mu, j), load(lv, j), scale.kl);
      if (gmu) store(gmu, r * Z + j, v.mu);
      if (glv) store(glv, r * Z + j, v.lv);
    }
  }
}

// ------------------------------------------------------------------------------------ dispatch
// Small event dims (the latent's Z) get one warp per row; image-sized rows a 256-thread block.
template <template <typename, int> class Launch, typename T>
void launch_rows(const RowwiseParams& p, int64_t cols) {
  if (cols <= 64) Launch<T, 32>::run(p);
  else Launch<T, 256>::run(p);
}

template <Fwd OP>
struct FwdLaunch {
  template <typename T, int THREADS>
  struct L {
    static void run(const RowwiseParams& p) {
      rowwise_fwd_kernel<OP, T, THREADS><<<grid_for(p.rows), THREADS, 0, stream_of(p.stream)>>>(p);
    }
  };
};
template <Fwd OP>
struct BwdLaunch {
  template <typename T, int THREADS>
  struct L {
    static void run(const RowwiseParams& p) {
      rowwise_bwd_kernel<OP, T, THREADS><<<grid_for(p.rows), THREADS, 0, stream_of(p.stream)>>>(p);
    }
  };
};
template <typename T, int THREADS>
struct ElboFwdLaunch {
  static void run(const RowwiseParams& p) {
    elbo_fwd_kernel<T, THREADS><<<grid_for(p.rows), THREADS, 0, stream_of(p.stream)>>>(p);
  }
};
template <typename T, int THREADS>
struct ElboBwdLaunch {
  static void run(const RowwiseParams& p) {
    elbo_bwd_kernel<T, THREADS><<<grid_for(p.rows), THREADS, 0, stream_of(p.stream)>>>(p);
  }
};

template <Fwd OP>
void fwd(const RowwiseParams& p, const char* name) {
  by_dtype(p.dtype, [&](auto t) { launch_rows<FwdLaunch<OP>::template L, decltype(t)>(p, p.cols); });
  check_launch(name);
}
template <Fwd OP>
void bwd(const RowwiseParams& p, const char* name) {
  by_dtype(p.dtype, [&](auto t) { launch_rows<BwdLaunch<OP>::template L, decltype(t)>(p, p.cols); });
  check_launch(name);
}


}  // namespace

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

void bernoulli_elbo_fwd(const RowwiseParams& p) {
  by_dtype(p.dtype, [&](auto t) { launch_rows<ElboFwdLaunch, decltype(t)>(p, p.cols); });
  check_launch("bernoulli_elbo_fwd");
}
void bernoulli_elbo_bwd(const RowwiseParams& p) {
  by_dtype(p.dtype, [&](auto t) { launch_rows<ElboBwdLaunch, decltype(t)>(p, p.cols); });
  check_launch("bernoulli_elbo_bwd");
}

}  // namespace cuda
}  // namespace pyvae
