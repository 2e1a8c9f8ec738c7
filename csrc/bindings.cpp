// The pybind11 module pyvae._C: kernels on raw pointers. It does not link libtorch (DESIGN.md,
// decision 2): the ops (pyvae/ops/) validate inputs and allocate outputs; pyvae/_gate.py, the only
// caller, checks every tensor and passes data_ptr()s here by keyword.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/params.h"
#include "cpu/dispatch.h"
#include "ops/activation.h"
#include "ops/philox.h"
#if defined(PYVAE_WITH_CUDA)
#include "cuda/kernels.h"
#endif

namespace py = pybind11;

namespace pyvae {
namespace {

// NOTE: [Codes are defined here]
// Device, dtype and activation codes are C++ enums (Device below, DType in common/params.h, ops::Act in
// ops/activation.h); the module exports each as a name -> code dict, and which dtypes each kernel
// family takes on each device, so Python (pyvae/_gate.py) reads them instead of repeating numbers.
enum Device : int { kCPU = 0, kCUDA = 1 };

constexpr DType kAllDTypes[] = {DType::kFloat32, DType::kFloat64, DType::kFloat16, DType::kBFloat16};

const char* dtype_name(DType d) {
  switch (d) {
    case DType::kFloat32: return "float32";
    case DType::kFloat64: return "float64";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
  }
  return "?";
}

// The dtypes the row ops and reparameterize take: CPU launchers are built for float32 and float64
// (Python computes half inputs in float32 there); CUDA launchers for all four (csrc/cuda/common.cuh).
bool rowwise_supports(int device, DType d) {
  return device == kCUDA || d == DType::kFloat32 || d == DType::kFloat64;
}

// The fused ELBO's CPU forward also takes kBFloat16: bfloat16 logits and logits gradient, the rest float32
// (NOTE: [bfloat16 logits] in csrc/cpu/kernels.cpp).
bool elbo_fwd_supports(int device, DType d) { return rowwise_supports(device, d) || d == DType::kBFloat16; }

// The linear epilogues: CPU float32, float64 and bfloat16 (csrc/cpu/linear.cpp); CUDA all four.
bool linear_supports(int device, DType d) { return device == kCUDA || d != DType::kFloat16; }

DType checked_dtype(int device, int dtype, bool (*supports)(int, DType)) {
  if (device != kCPU && device != kCUDA)
    throw std::invalid_argument("pyvae._C: device code " + std::to_string(device) + " is not cpu (0) or cuda (1)");
  for (DType d : kAllDTypes)
    if (static_cast<int>(d) == dtype && supports(device, d)) return d;
  throw std::invalid_argument("pyvae._C: dtype code " + std::to_string(dtype) + " not supported on this device");
}

template <typename T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

[[noreturn]] void no_cuda() {
  throw std::runtime_error("pyvae._C was built without CUDA kernels (PYVAE_CUDA=OFF or nvcc not found)");
}

// Runs a launcher on the CPU build chosen at import (cpu/dispatch.h) or on CUDA.
template <typename P>
void launch(int device, void (*const cpu::KernelTable::*cpu_fn)(const P&), void (*cuda_fn)(const P&), const P& p) {
  if (device == kCPU) {
    (cpu::kernels().*cpu_fn)(p);
  } else {
    if (!cuda_fn) no_cuda();
    cuda_fn(p);
  }
}

using RowwiseFn = void (*)(const RowwiseParams&);

// One Python entry per row-reduction op; every argument named, and positional too: the gate's prepared
// calls (NOTE: [Prepared kernel calls] in pyvae/_gate.py) place them by the names of this signature.
// pyvae/_gate.py checks each tensor's size, dtype, device and layout before its pointer gets here.
void def_rowwise(py::module_& m, const char* name, RowwiseFn cpu::KernelTable::*cpu_fn, RowwiseFn cuda_fn,
                 bool (*supports)(int, DType) = rowwise_supports) {
  m.def(
      name,
      [cpu_fn, cuda_fn, supports](int device, int dtype, int64_t rows, int64_t cols, int64_t cols2, int64_t samples,
                        uintptr_t a, int64_t a_mod, uintptr_t b, int64_t b_mod, uintptr_t c, int64_t c_mod,
                        uintptr_t d, int64_t d_mod, uintptr_t grad_out, uintptr_t out, uintptr_t grad_a,
                        uintptr_t grad_b, uintptr_t grad_c, uintptr_t grad_d, uintptr_t stream, int device_index) {
        RowwiseParams p;
        p.dtype = checked_dtype(device, dtype, supports);
        p.rows = rows;
        p.cols = cols;
        p.cols2 = cols2;
        p.samples = samples;
        p.a = {ptr<const void>(a), a_mod};
        p.b = {ptr<const void>(b), b_mod};
        p.c = {ptr<const void>(c), c_mod};
        p.d = {ptr<const void>(d), d_mod};
        p.grad_out = ptr<const void>(grad_out);
        p.out = ptr<void>(out);
        p.grad_a = ptr<void>(grad_a);
        p.grad_b = ptr<void>(grad_b);
        p.grad_c = ptr<void>(grad_c);
        p.grad_d = ptr<void>(grad_d);
        p.stream = ptr<void>(stream);
        p.device = device_index;
        if (rows == 0) return;
        launch(device, cpu_fn, cuda_fn, p);
      },
      py::arg("device"), py::arg("dtype"), py::arg("rows"), py::arg("cols"), py::arg("cols2"),
      py::arg("samples"), py::arg("a"), py::arg("a_mod"), py::arg("b"), py::arg("b_mod"), py::arg("c"),
      py::arg("c_mod"), py::arg("d"), py::arg("d_mod"), py::arg("grad_out"), py::arg("out"), py::arg("grad_a"),
      py::arg("grad_b"), py::arg("grad_c"), py::arg("grad_d"), py::arg("stream"), py::arg("device_index"),
      py::call_guard<py::gil_scoped_release>());
}

using ReparamFn = void (*)(const ReparamParams&);

void def_reparam(py::module_& m, const char* name, ReparamFn cpu::KernelTable::*cpu_fn, ReparamFn cuda_fn) {
  m.def(
      name,
      [cpu_fn, cuda_fn](int device, int dtype, int64_t numel, int64_t samples, uintptr_t mu, uintptr_t logvar,
                        uintptr_t grad_out, uintptr_t z, uintptr_t grad_mu, uintptr_t grad_logvar, uintptr_t eps,
                        uint64_t seed, uint64_t offset, uintptr_t seed_ptr, uintptr_t stream, int device_index) {
        // A seed in device memory is read by the CUDA kernels only (NOTE: [Graph-safe seed]).
        if (seed_ptr && device != kCUDA)
          throw std::invalid_argument("pyvae._C: seed_ptr (a seed in device memory) is CUDA-only");
        // Saved eps are written and read by the CPU kernels only (NOTE: [Saved eps]).
        if (eps && device != kCPU) throw std::invalid_argument("pyvae._C: eps (saved normals) is CPU-only");
        ReparamParams p;
        p.dtype = checked_dtype(device, dtype, rowwise_supports);
        p.numel = numel;
        p.samples = samples;
        p.mu = ptr<const void>(mu);
        p.logvar = ptr<const void>(logvar);
        p.grad_out = ptr<const void>(grad_out);
        p.z = ptr<void>(z);
        p.grad_mu = ptr<void>(grad_mu);
        p.grad_logvar = ptr<void>(grad_logvar);
        p.eps = ptr<void>(eps);
        p.seed = seed;
        p.offset = offset;
        p.seed_ptr = ptr<const int64_t>(seed_ptr);
        p.stream = ptr<void>(stream);
        p.device = device_index;
        if (numel == 0 || samples == 0) return;
        launch(device, cpu_fn, cuda_fn, p);
      },
      py::arg("device"), py::arg("dtype"), py::arg("numel"), py::arg("samples"), py::arg("mu"),
      py::arg("logvar"), py::arg("grad_out"), py::arg("z"), py::arg("grad_mu"), py::arg("grad_logvar"), py::arg("eps"),
      py::arg("seed"), py::arg("offset"), py::arg("seed_ptr"), py::arg("stream"), py::arg("device_index"),
      py::call_guard<py::gil_scoped_release>());
}

// Dynamic binarization of a gathered batch (float32; NOTE: [Counter-based binarization]).
void def_binarize(py::module_& m) {
  m.def(
      "gather_binarize",
      [](int device, uintptr_t src, uintptr_t index, uintptr_t out, int64_t rows, int64_t cols, int64_t first_row,
         uint64_t seed, uintptr_t stream, int device_index) {
        if (device != kCPU && device != kCUDA)
          throw std::invalid_argument("pyvae._C: device code " + std::to_string(device) + " is not cpu (0) or cuda (1)");
        BinarizeParams p;
        p.src = ptr<const float>(src);
        p.index = ptr<const int64_t>(index);
        p.out = ptr<float>(out);
        p.rows = rows;
        p.cols = cols;
        p.first_row = first_row;
        p.seed = seed;
        p.stream = ptr<void>(stream);
        p.device = device_index;
        if (rows == 0 || cols == 0) return;
#if defined(PYVAE_WITH_CUDA)
        launch(device, &cpu::KernelTable::gather_binarize, &cuda::gather_binarize, p);
#else
        launch(device, &cpu::KernelTable::gather_binarize, static_cast<void (*)(const BinarizeParams&)>(nullptr), p);
#endif
      },
      py::kw_only(), py::arg("device"), py::arg("src"), py::arg("index"), py::arg("out"), py::arg("rows"),
      py::arg("cols"), py::arg("first_row"), py::arg("seed"), py::arg("stream"), py::arg("device_index"),
      py::call_guard<py::gil_scoped_release>());
}

// The CPU kernels' huge-page advice (NOTE: [Huge pages for fresh outputs] in csrc/cpu/pages.h) on a buffer
// of the caller's: the benchmarks time their memory floor on memory advised as pyvae's own outputs are.
void def_advise_huge_pages(py::module_& m) {
  m.def(
      "advise_huge_pages", [](uintptr_t p, int64_t bytes) { cpu::kernels().advise_huge_pages(ptr<void>(p), bytes); },
      py::arg("p"), py::arg("bytes"));
}

using LinearFn = void (*)(const LinearParams&);

void def_linear(py::module_& m, const char* name, LinearFn cpu::KernelTable::*cpu_fn, LinearFn cuda_fn) {
  m.def(
      name,
      [cpu_fn, cuda_fn](int device, int dtype, int act, int64_t rows, int64_t cols, uintptr_t y, uintptr_t bias,
                        uintptr_t grad_y, uintptr_t out, uintptr_t grad_pre, uintptr_t grad_bias, uintptr_t grad_pre_t,
                        uintptr_t workspace, uint64_t workspace_bytes, uintptr_t stream, int device_index) {
        if (grad_pre_t && device != kCPU)
          throw std::invalid_argument("pyvae._C: grad_pre_t (the transposed gradient) is CPU-only");
        LinearParams p;
        p.dtype = checked_dtype(device, dtype, linear_supports);
        if (act < 0 || act >= ops::kNumActs)
          throw std::invalid_argument("pyvae._C: unknown activation code " + std::to_string(act));
        p.act = act;
        p.rows = rows;
        p.cols = cols;
        p.y = ptr<void>(y);
        p.bias = ptr<const void>(bias);
        p.grad_y = ptr<const void>(grad_y);
        p.out = ptr<const void>(out);
        p.grad_pre = ptr<void>(grad_pre);
        p.grad_bias = ptr<void>(grad_bias);
        p.grad_pre_t = ptr<void>(grad_pre_t);
        p.workspace = ptr<void>(workspace);
        p.workspace_bytes = workspace_bytes;
        p.stream = ptr<void>(stream);
        p.device = device_index;
        if (cols == 0) return;
        launch(device, cpu_fn, cuda_fn, p);
      },
      py::kw_only(), py::arg("device"), py::arg("dtype"), py::arg("act"), py::arg("rows"), py::arg("cols"),
      py::arg("y"), py::arg("bias"), py::arg("grad_y"), py::arg("out"), py::arg("grad_pre"), py::arg("grad_bias"),
      py::arg("grad_pre_t"), py::arg("workspace"), py::arg("workspace_bytes"), py::arg("stream"),
      py::arg("device_index"), py::call_guard<py::gil_scoped_release>());
}

using LinearLtFn = int (*)(const LinearLtParams&);

// cuBLASLt GEMMs of a linear layer (NOTE: [cuBLASLt path] in csrc/cuda/linear_lt.cu), one signature for
// the three (the fields of LinearLtParams, by name) -> 0 done, 1 unsupported (nothing written).
// fn == nullptr: not built.
void def_linear_lt(py::module_& m, const char* name, LinearLtFn fn) {
  m.def(
      name,
      [fn](int dtype, int act, int64_t rows, int64_t in_features, int64_t out_features, uintptr_t x,
           uintptr_t weight, uintptr_t bias, uintptr_t y, uintptr_t grad_pre, uintptr_t grad_x,
           uintptr_t grad_weight, uintptr_t grad_bias, uintptr_t aux, int64_t aux_ld, uintptr_t workspace,
           uint64_t workspace_bytes, bool allow_tf32, bool strict_reduction, bool fuse_act, int device,
           uintptr_t stream) -> int {
        if (!fn)
          throw std::runtime_error(
              "pyvae._C was built without the cuBLASLt path (no CUDA, or cublasLt.h not found at build "
              "time; see CONTRIBUTING.md)");
        LinearLtParams p;
        p.dtype = checked_dtype(kCUDA, dtype, linear_supports);
        if (act < 0 || act >= ops::kNumActs)
          throw std::invalid_argument("pyvae._C: unknown activation code " + std::to_string(act));
        p.act = act;
        p.rows = rows;
        p.in_features = in_features;
        p.out_features = out_features;
        p.x = ptr<const void>(x);
        p.weight = ptr<const void>(weight);
        p.bias = ptr<const void>(bias);
        p.y = ptr<void>(y);
        p.grad_pre = ptr<const void>(grad_pre);
        p.grad_x = ptr<void>(grad_x);
        p.grad_weight = ptr<void>(grad_weight);
        p.grad_bias = ptr<void>(grad_bias);
        p.aux = ptr<void>(aux);
        p.aux_ld = aux_ld;
        p.workspace = ptr<void>(workspace);
        p.workspace_bytes = workspace_bytes;
        p.allow_tf32 = allow_tf32;
        p.strict_reduction = strict_reduction;
        p.fuse_act = fuse_act;
        p.device = device;
        p.stream = ptr<void>(stream);
        return fn(p);
      },
      py::kw_only(), py::arg("dtype"), py::arg("act"), py::arg("rows"), py::arg("in_features"),
      py::arg("out_features"), py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("y"), py::arg("grad_pre"),
      py::arg("grad_x"), py::arg("grad_weight"), py::arg("grad_bias"), py::arg("aux"), py::arg("aux_ld"),
      py::arg("workspace"), py::arg("workspace_bytes"), py::arg("allow_tf32"), py::arg("strict_reduction"),
      py::arg("fuse_act"), py::arg("device"), py::arg("stream"),
      py::call_guard<py::gil_scoped_release>());
}

#if defined(PYVAE_WITH_CUDA)
#define PYVAE_CUDA_FN(NAME) &cuda::NAME
#else
#define PYVAE_CUDA_FN(NAME) nullptr
#endif
#if defined(PYVAE_WITH_CUBLASLT)
#define PYVAE_LT_FN(NAME) &cuda::NAME
#else
#define PYVAE_LT_FN(NAME) nullptr
#endif

}  // namespace
}  // namespace pyvae

PYBIND11_MODULE(_C, m) {
  using namespace pyvae;
  m.doc() = "pyvae compiled kernels (raw-pointer interface; use pyvae.ops)";

  {
    py::dict devices, dtypes, acts, rowwise, linear;
    devices["cpu"] = static_cast<int>(kCPU);
    devices["cuda"] = static_cast<int>(kCUDA);
    for (DType d : kAllDTypes) dtypes[dtype_name(d)] = static_cast<int>(d);
    for (int a = 0; a < ops::kNumActs; ++a) acts[ops::kActNames[a]] = a;
    for (int dev : {static_cast<int>(kCPU), static_cast<int>(kCUDA)}) {
      py::list r, l;
      for (DType d : kAllDTypes) {
        if (rowwise_supports(dev, d)) r.append(dtype_name(d));
        if (linear_supports(dev, d)) l.append(dtype_name(d));
      }
      const char* name = dev == kCPU ? "cpu" : "cuda";
      rowwise[name] = r;
      linear[name] = l;
    }
    m.attr("device_codes") = devices;
    m.attr("dtype_codes") = dtypes;
    m.attr("activation_codes") = acts;
    m.attr("rowwise_dtypes") = rowwise;  // row ops and reparameterize
    m.attr("linear_dtypes") = linear;    // bias_act_fwd, act_bwd and the cuBLASLt entries
    m.attr("normals_per_counter") = philox::kNormalsPerCounter;
  }

#if defined(PYVAE_WITH_CUDA)
  m.attr("cuda_built") = true;
  {
    // Which dtypes the CUDA launchers instantiate kernels for, reported by the launchers' own
    // dispatch lists (NOTE: [CUDA kernel dtypes] in csrc/cuda/common.cuh); tests/test_cuda_code.py
    // checks that every dtype rowwise_dtypes / linear_dtypes accept on CUDA is among them.
    py::dict k;
    const auto names = [](const std::vector<DType>& ds) {
      py::list l;
      for (DType d : ds) l.append(dtype_name(d));
      return l;
    };
    k["rowwise"] = names(cuda::rowwise_kernel_dtypes());
    k["reparameterize"] = names(cuda::reparam_kernel_dtypes());
    k["linear"] = names(cuda::linear_kernel_dtypes());
    m.attr("cuda_kernel_dtypes") = k;
  }
#else
  m.attr("cuda_built") = false;
  m.attr("cuda_kernel_dtypes") = py::none();
#endif
  m.def(
      "act_bwd_workspace_bytes",
      [](int device, int dtype, int64_t rows, int64_t cols) -> uint64_t {
        const DType d = checked_dtype(device, dtype, linear_supports);
        if (device != kCUDA) return 0;  // the CPU launcher allocates its own host scratch
#if defined(PYVAE_WITH_CUDA)
        return cuda::act_bwd_workspace_bytes(d, rows, cols);
#else
        (void)d;
        (void)rows;
        (void)cols;
        no_cuda();
#endif
      },
      py::kw_only(), py::arg("device"), py::arg("dtype"), py::arg("rows"), py::arg("cols"),
      "Bytes of device workspace act_bwd needs for a bias gradient of a [rows, cols] problem (0 on CPU).");

#define PYVAE_ROWWISE(NAME) def_rowwise(m, #NAME, &cpu::KernelTable::NAME, PYVAE_CUDA_FN(NAME))
  PYVAE_ROWWISE(bernoulli_log_prob_fwd);
  PYVAE_ROWWISE(bernoulli_log_prob_bwd);
  PYVAE_ROWWISE(continuous_bernoulli_log_prob_fwd);
  PYVAE_ROWWISE(continuous_bernoulli_log_prob_bwd);
  PYVAE_ROWWISE(gaussian_kl_fwd);
  PYVAE_ROWWISE(gaussian_kl_bwd);
  PYVAE_ROWWISE(gaussian_log_prob_fwd);
  PYVAE_ROWWISE(gaussian_log_prob_bwd);
  def_rowwise(m, "bernoulli_elbo_fwd", &cpu::KernelTable::bernoulli_elbo_fwd, PYVAE_CUDA_FN(bernoulli_elbo_fwd),
              elbo_fwd_supports);
  PYVAE_ROWWISE(bernoulli_elbo_bwd);
#undef PYVAE_ROWWISE
  def_reparam(m, "reparameterize_fwd", &cpu::KernelTable::reparameterize_fwd, PYVAE_CUDA_FN(reparameterize_fwd));
  def_reparam(m, "reparameterize_bwd", &cpu::KernelTable::reparameterize_bwd, PYVAE_CUDA_FN(reparameterize_bwd));
  def_binarize(m);
  def_advise_huge_pages(m);

  def_linear(m, "bias_act_fwd", &cpu::KernelTable::bias_act_fwd, PYVAE_CUDA_FN(bias_act_fwd));
  def_linear(m, "act_bwd", &cpu::KernelTable::act_bwd, PYVAE_CUDA_FN(act_bwd));

#if defined(PYVAE_WITH_CUBLASLT)
  m.attr("cublaslt_built") = true;
  m.attr("cublaslt_header_version") = cuda::lt_header_version();
#else
  m.attr("cublaslt_built") = false;
  m.attr("cublaslt_header_version") = 0;
#endif
  def_linear_lt(m, "cublaslt_linear_fwd", PYVAE_LT_FN(lt_linear_fwd));
  def_linear_lt(m, "cublaslt_linear_wgrad", PYVAE_LT_FN(lt_linear_wgrad));
  def_linear_lt(m, "cublaslt_linear_dgrad", PYVAE_LT_FN(lt_linear_dgrad));
  m.def(
      "cublaslt_load",
      [](const std::string& path) -> std::string {
#if defined(PYVAE_WITH_CUBLASLT)
        std::string why;
        return cuda::lt_load(path, &why) ? std::string() : why;
#else
        (void)path;
        return "pyvae._C was built without the cuBLASLt path";
#endif
      },
      py::arg("path") = "", py::call_guard<py::gil_scoped_release>(),
      "Load libcublasLt (path, or the default names when empty) unless loaded. '' on success, else why not.");
  m.def(
      "cublaslt_unavailable_reason",
      []() -> std::string {
#if defined(PYVAE_WITH_CUBLASLT)
        std::string why;
        return cuda::lt_usable(&why) ? std::string() : why;
#else
        return "pyvae._C was built without the cuBLASLt path (no CUDA, or cublasLt.h not found at build time)";
#endif
      },
      py::call_guard<py::gil_scoped_release>(),
      "'' when the cuBLASLt path can run (built with it, library loaded, a CUDA device present), else why not.");
  m.def(
      "cublaslt_available",
      []() -> bool {
#if defined(PYVAE_WITH_CUBLASLT)
        return cuda::lt_usable(nullptr);
#else
        return false;
#endif
      },
      py::call_guard<py::gil_scoped_release>(),
      "Built with cublasLt.h, libcublasLt loads, and the CUDA runtime sees a device.");
  m.def(
      "cublaslt_version",
      []() -> size_t {
#if defined(PYVAE_WITH_CUBLASLT)
        return cuda::lt_version();
#else
        return 0;
#endif
      },
      "cublasLtGetVersion() of the loaded library; 0 when none is loaded.");

  m.def("cpu_arch", [] { return std::string(cpu::kernels().name); },
        "Name of the CPU kernel build in use (avx512, avx2 or base).");
  m.def("cpu_archs", &cpu::supported_archs, "CPU kernel builds this processor can run, best first.");
  m.def("set_cpu_arch", &cpu::set_arch, py::arg("name"), "Use another CPU kernel build (for tests).");
  m.def(
      "philox4x32_10",
      [](std::array<uint32_t, 4> ctr, std::array<uint32_t, 2> key) {
        philox::U32x4 c{{ctr[0], ctr[1], ctr[2], ctr[3]}};
        const philox::U32x4 r = philox::philox4x32_10(c, key[0], key[1]);
        return std::array<uint32_t, 4>{r.v[0], r.v[1], r.v[2], r.v[3]};
      },
      py::arg("counter"), py::arg("key"), "Philox4x32-10 block function (for known-answer tests).");
  m.def(
      "normal4",
      [](uint64_t seed, uint64_t counter) {
        const philox::Normal4 n = philox::normal4(seed, counter);
        return std::array<float, 4>{n.v[0], n.v[1], n.v[2], n.v[3]};
      },
      py::arg("seed"), py::arg("counter"), "The four N(0, 1) draws of one Philox counter.");
}
