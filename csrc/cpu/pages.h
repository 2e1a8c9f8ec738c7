// Memory advice for large outputs of the CPU kernels (included by each per-instruction-set launcher file).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <string>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace pyvae {
namespace cpu {
namespace PYVAE_CPU_ARCH {

// NOTE: [Huge pages for fresh outputs]
// The same faults come 512 times fewer with 2 MiB pages: on the 2-core AMD EPYC VM (`pyvae bench elbo`,
// stop 13) one read of two [16384, 784] float32 tensors and one write of a fresh third took 18.2 ms with
// 4 KiB pages and 8.4 ms when the fresh tensor was advised onto huge pages, and the ELBO step writing such
// a gradient went from 19.2 to 14.1 ms. (torch's own THP_MEM_ALLOC_ENABLE=1 does this for every allocation
// of 2 MB and more, for a whole process, if set before its first allocation.) So a kernel that writes a
// fresh output of kHugeAdviceBytes or more advises the kernel to back it with transparent huge pages
// (madvise MADV_HUGEPAGE over the whole 2 MiB-aligned pages inside it) before its first store, for its own
// output only. Advice changes no data: memory already mapped keeps its contents (the kernel's khugepaged may
// later merge such pages in the background). Where THP is off ("never") or unsupported, the call has no
// effect and its result is ignored. Measured with `pyvae bench elbo` (bench/RESULTS.md, stop 13); tested in
// tests/test_pages.py.
// Where the kernel's THP defrag setting is "madvise" (a common default), a fault in an advised range may
// compact memory synchronously to find a free 2 MiB page; on a machine whose memory is fragmented that can
// cost more than the faults it saves. PYVAE_HUGE_PAGES=off in the environment (read once, at the first
// large output) turns the advice off. The advice is not chosen by measurement on the running machine as the
// layer routes are: a huge page costs one fault and one 2 MiB clear where 4 KiB pages cost 512 of each, so
// apart from that compaction it is not expected to lose anywhere, but only this VM has measured it.
constexpr int64_t kHugeAdviceBytes = int64_t(4) << 20;

inline bool huge_page_advice_on() {
  static const bool on = [] {
    const char* v = std::getenv("PYVAE_HUGE_PAGES");
    if (v == nullptr) return true;
    const std::string s(v);
    return !(s == "off" || s == "0" || s == "false" || s == "no");
  }();
  return on;
}

// Null p: nothing.
template <typename T>
inline void advise_huge_pages(T* p, int64_t n) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const int64_t bytes = n * int64_t(sizeof(T));
  if (p == nullptr || bytes < kHugeAdviceBytes || !huge_page_advice_on()) return;
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t b = reinterpret_cast<uintptr_t>(p), e = b + static_cast<uintptr_t>(bytes);
  const uintptr_t b2 = (b + kHuge - 1) & ~(kHuge - 1), e2 = e & ~(kHuge - 1);
  if (e2 > b2) (void)madvise(reinterpret_cast<void*>(b2), e2 - b2, MADV_HUGEPAGE);
#else
  (void)p;
  (void)n;
#endif
}

}  // namespace PYVAE_CPU_ARCH
}  // namespace cpu
}  // namespace pyvae
