// Run-time choice among the CPU kernel builds (see NOTE: [CPU dispatch] in dispatch.cpp).
#pragma once

#include <string>
#include <vector>

#include "common/params.h"

namespace pyvae {
namespace cpu {

using RowwiseFn = void (*)(const RowwiseParams&);
using ReparamFn = void (*)(const ReparamParams&);
using LinearFn = void (*)(const LinearParams&);
using BinarizeFn = void (*)(const BinarizeParams&);

struct KernelTable {
  const char* name;
  RowwiseFn bernoulli_log_prob_fwd, bernoulli_log_prob_bwd;
  RowwiseFn continuous_bernoulli_log_prob_fwd, continuous_bernoulli_log_prob_bwd;
  RowwiseFn gaussian_kl_fwd, gaussian_kl_bwd;
  RowwiseFn gaussian_log_prob_fwd, gaussian_log_prob_bwd;
  RowwiseFn bernoulli_elbo_fwd, bernoulli_elbo_bwd;
  ReparamFn reparameterize_fwd, reparameterize_bwd;
  LinearFn bias_act_fwd, act_bwd;
  BinarizeFn gather_binarize;
  void (*advise_huge_pages)(void* p, int64_t bytes);
};

const KernelTable& kernels();
// Names of the builds this processor can run, best first.
std::vector<std::string> supported_archs();
// Select a build by name (tests compare them); throws std::invalid_argument if unsupported.
void set_arch(const std::string& name);

}  // namespace cpu
}  // namespace pyvae
