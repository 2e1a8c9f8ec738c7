// NOTE: [CPU dispatch]
// csrc/cpu/kernels.cpp is compiled three times: baseline x86-64 (SSE2), x86-64-v3 (AVX2 + FMA) and
// x86-64-v4 (AVX-512, 512-bit vectors preferred). The widest build the processor supports is chosen
// once at import; PYVAE_CPU_ARCH=base|avx2|avx512 in the environment overrides it (capped at what
// the processor supports). One binary thus runs everywhere and still reaches memory bandwidth on
// AVX-512 machines, where it is ~1.8x the AVX2 build (see bench/RESULTS.md).
#include "cpu/dispatch.h"

#include <cstdlib>
#include <stdexcept>

#include "cpu/kernels.h"

namespace pyvae {
namespace cpu {
namespace {

#define PYVAE_TABLE(ARCH)                                                                       \
  KernelTable {                                                                                 \
#ARCH, ARCH::bernoulli_log_prob_fwd, ARCH::bernoulli_log_prob_bwd,                            \
        ARCH::continuous_bernoulli_log_prob_fwd, ARCH::continuous_bernoulli_log_prob_bwd,        \
        ARCH::gaussian_kl_fwd, ARCH::gaussian_kl_bwd, ARCH::gaussian_log_prob_fwd,               \
        ARCH::gaussian_log_prob_bwd,                                                            \
        ARCH::bernoulli_elbo_fwd, ARCH::bernoulli_elbo_bwd, ARCH::reparameterize_fwd,           \
        ARCH::reparameterize_bwd, ARCH::bias_act_fwd, ARCH::act_bwd, ARCH::gather_binarize,     \
        ARCH::advise_huge_pages_bytes                                                           \
  }

#if defined(PYVAE_CPU_MULTIARCH)
const KernelTable kTables[] = {PYVAE_TABLE(avx512), PYVAE_TABLE(avx2), PYVAE_TABLE(base)};
#else
const KernelTable kTables[] = {PYVAE_TABLE(base)};
#endif

bool supported(const KernelTable& t) {
  const std::string n = t.name;
#if defined(PYVAE_CPU_MULTIARCH)
  __builtin_cpu_init();
  if (n == "avx512") return __builtin_cpu_supports("x86-64-v4");
  if (n == "avx2") return __builtin_cpu_supports("x86-64-v3");
#endif
  return n == "base";
}

const KernelTable* choose(const std::string& wanted) {
  for (const auto& t : kTables)
    if (supported(t) && (wanted.empty() || wanted == t.name)) return &t;
  return nullptr;
}

const KernelTable* initial() {
  const char* env = std::getenv("PYVAE_CPU_ARCH");
  const KernelTable* t = env ? choose(env) : nullptr;
  return t ? t : choose("");
}

const KernelTable* g_current = initial();

}  // namespace

const KernelTable& kernels() { return *g_current; }

std::vector<std::string> supported_archs() {
  std::vector<std::string> out;
  for (const auto& t : kTables)
    if (supported(t)) out.emplace_back(t.name);
  return out;
}

void set_arch(const std::string& name) {
  const KernelTable* t = choose(name);
  if (!t) throw std::invalid_argument("pyvae: CPU kernel build '" + name + "' is not available here");
  g_current = t;
}

}  // namespace cpu
}  // namespace pyvae
