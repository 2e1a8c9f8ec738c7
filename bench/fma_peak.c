/* The CPU's float32 FMA peak, the ceiling for the GEMM numbers of `pyvae bench gemm`.
 *
 * Every thread runs 12 independent chains of 512-bit fused multiply-adds (enough to cover the FMA
 * latency on current x86 cores), so the rate is bounded by FMA throughput alone.
 *
 *   gcc -O2 -mavx512f -fopenmp bench/fma_peak.c -o /tmp/fma_peak && OMP_NUM_THREADS=2 /tmp/fma_peak
 */
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <time.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(void) {
  const long rounds = 20000000; /* x 12 FMAs x 16 lanes x 2 FLOP per thread */
  for (int rep = 0; rep < 3; rep++) {
    float sink = 0.f;
    const double t0 = now();
#pragma omp parallel reduction(+ : sink)
    {
      __m512 acc[12];
      const __m512 a = _mm512_set1_ps(0.999999f), c = _mm512_set1_ps(1e-7f);
      for (int i = 0; i < 12; i++) acc[i] = _mm512_set1_ps((float)i);
      for (long r = 0; r < rounds; r++) {
#pragma GCC unroll 12 /* keeps the 12 accumulators in registers */
        for (int i = 0; i < 12; i++) acc[i] = _mm512_fmadd_ps(acc[i], a, c);
      }
      for (int i = 0; i < 12; i++) sink += _mm512_reduce_add_ps(acc[i]);
    }
    const double dt = now() - t0;
    const int n = omp_get_max_threads();
    printf("%d threads: %.0f GFLOP/s float32 FMA peak (checksum %g)\n", n, n * rounds * 12.0 * 32.0 / dt / 1e9,
           sink);
  }
  return 0;
}
