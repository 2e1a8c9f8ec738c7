// The GEMMs of the fused linear layer on cuBLASLt, with its epilogues where they exist and pyvae's
// kernels (csrc/cuda/linear.cu, math of csrc/ops/activation.h) where they do not.
//
// NOTE: [cuBLASLt path]
// This file has only been compiled (nvcc 13, sm_80 and sm_90, -Werror=all-warnings, in CI), never run:
// the project's machines have no GPU. tests/test_cublaslt.py holds the numerical checks that run
// wherever torch sees one.
//
// Layout. torch tensors are row-major, cuBLASLt is column-major. A contiguous row-major [r, c] buffer
// read column-major is the [c, r] matrix M^T with leading dimension c, so the row-major product
// C = A @ B is the column-major C^T = B^T @ A^T: swap the operands, copy nothing. For a layer with
// x [rows, in], W [out, in], y and dZ = dL/d(pre-activation) [rows, out]:
//   forward  y  = x W^T:   y^T [out, rows] = op(W, T) @ op(x, N)     m = out, n = rows, k = in
//            (W's buffer is the column-major W^T [in, out], ld in, transposed back to W [out, in];
//             x's is x^T [in, rows], ld in; y's is y^T [out, rows], ld out)
//   wgrad    dW = dZ^T x:  dW^T [in, out]  = op(x, N) @ op(dZ, T)    m = in,  n = out,  k = rows
//   dgrad    dx = dZ W:    dx^T [in, rows] = op(W, N) @ op(dZ, N)    m = in,  n = rows, k = out
// In all three, D's rows are features and D's columns (or k) are batch rows, which places the
// epilogue vectors where pyvae wants them:
//   BIAS on the forward: a vector of D's m = out rows, broadcast over the batch: the bias [out].
//   BGRADB on the wgrad: a vector of D's n = out columns, op(B) = dZ summed over k = rows: dL/db [out].
//   DRELU_BGRAD on the dgrad: a vector of D's m = in rows summed over the batch: the previous layer's
//   bias gradient [in]. (BGRADA would sum op(A) = x over the batch: not what we need.)
// ReLU mask. RELU_AUX(_BIAS) writes one bit per element of D (the forward's [out, rows]), with a
// leading dimension in bits that must be a multiple of 128: aux_ld = round_up(out, 128), so
// rows * aux_ld / 8 bytes. The bit order inside a byte is cuBLASLt's and undocumented: pyvae never
// decodes the mask, it only hands it back to cuBLASLt. The dgrad of layer L produces dL/dy_{L-1},
// whose D [in_L = out_{L-1}, rows] has the shape of layer L-1's forward D, so layer L-1's mask fits
// DRELU_BGRAD there: dL/d(pre-activation of L-1) and its bias gradient come out of layer L's dgrad.
// Inside one layer (the op pyvae::linear_act) no GEMM produces dL/dy, so the mask is of no use:
// the single-layer backward takes relu' from the output like every other activation
// (NOTE: [Derivative from the output] in csrc/ops/activation.h, pyvae's act_bwd kernel).
//
// Epilogue per activation, forward:
//   identity                  BIAS (DEFAULT without a bias)
//   relu                      RELU_AUX_BIAS / RELU_AUX when the mask is asked for, else RELU_BIAS /
//                             RELU (or, with fuse_act = false, as tanh below)
//   tanh, sigmoid, softplus   BIAS (DEFAULT without a bias), then pyvae's bias_act kernel with no bias
// Backward (pyvae/_cublaslt.py): pyvae's act_bwd kernel makes dZ from y (skipped for identity), then
// the wgrad with BGRADB when the bias gradient is wanted, and the dgrad with DEFAULT (DRELU_BGRAD /
// DRELU across two layers, linear_dgrad_relu in pyvae/_cublaslt.py).
//
// Fallbacks, per GEMM:
//   - cuBLASLt has no algorithm for the epilogue asked (the heuristic returns none, or says
//     NOT_SUPPORTED; or cublasLtMatmul says NOT_SUPPORTED): the GEMM is redone with DEFAULT and the
//     epilogue's work is done by pyvae's kernels: bias_act (bias and activation), act_bwd's column
//     sum (BGRADB), act_bwd with relu' from the previous layer's output (DRELU). Except a forward that
//     must write the ReLU mask, which only cuBLASLt can produce: it returns kLtUnsupported.
//   - no algorithm even with DEFAULT (e.g. a float64 problem, an alignment it does not take):
//     kLtUnsupported with nothing written; pyvae/_cublaslt.py then uses torch's GEMM + pyvae's kernels.
//   - any other status, or a CUDA error: std::runtime_error naming the function and the status,
//     which pybind11 raises as RuntimeError.
//
// Types. D, C, the bias and the bias gradients all have the input dtype: cuBLASLt's default
// CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE is the output type for non-fp8, non-integer GEMMs, and bias
// gradients are documented as the output type (cublasLt.h). float32, float16 and bfloat16 compute in
// CUBLAS_COMPUTE_32F with float alpha/beta (float32 in CUBLAS_COMPUTE_32F_FAST_TF32 when the caller
// says torch allows TF32); float64 in CUBLAS_COMPUTE_64F with double alpha/beta. Which epilogues exist
// for float64 (and for a given alignment) is not written in cublasLt.h: the heuristic answers and the
// fallbacks take a "no". The heuristic gets each pointer's real alignment (as torch does), so views at
// odd offsets get algorithms that can read them.
//
// ReLU and NaN. cublasLt.h defines the ReLU epilogue as x := max(x, 0) and does not say what becomes
// of a NaN; torch.relu and pyvae's relu (csrc/ops/fastmath.h) keep it. Unverified here;
// tests/test_cublaslt.py checks it on a GPU. fuse_act = false gives pyvae's ReLU.
//
// Library and state. libcublasLt is loaded with dlopen, never linked, so _C imports on machines
// without it; a CUDA build of torch has already loaded the same soname, which dlopen then returns.
// One cuBLASLt handle per device, created on first use under a mutex and never destroyed
// (cublasLtDestroy at process exit can run after the CUDA context is gone); threads share it, which
// the cuBLAS guide ("Thread Safety") allows for a handle whose configuration nobody changes: ours
// has none, stream and workspace are arguments of each cublasLtMatmul. The workspace is the caller's,
// allocated by torch (pyvae/_cublaslt.py keeps one per device and stream). Descriptors and the chosen
// algorithm are cached per problem: NOTE: [cuBLASLt plan cache].
//
// NOTE: [cuBLASLt plan cache]
// Creating the matmul and layout descriptors and running cublasLtMatmulAlgoGetHeuristic cost tens of
// microseconds of host time per GEMM, as much as a small layer's whole GEMM, and a training step runs
// three GEMMs per layer with the same shapes every step. So a Plan (descriptors + the heuristic's
// algorithm, or the answer "no algorithm") is built once per PlanKey: device, types, transposes,
// m/n/k, leading dimensions, epilogue, whether the bias and mask pointers are set, the mask's leading
// dimension, the workspace size, the reduction scheme and the alignment of A, B, D, the bias and the
// mask (the heuristic was told those: cublasLt.h says it reads the bias and aux pointers' values for
// their alignment; an algorithm chosen for 256-byte-aligned operands may not read 4-byte-aligned ones).
// The bias and mask pointers change every call: they are set on the cached matmul descriptor under
// the plan's own mutex, held until cublasLtMatmul has been enqueued (it reads the descriptor then, not
// when the GEMM runs), so two threads running the same problem do not race on the descriptor. The
// map is guarded by one mutex; plans are shared_ptrs, so clearing the map (past kMaxPlans entries)
// never destroys a plan another thread is using. Plans are never tied to a stream or a workspace
// address: both are arguments of each cublasLtMatmul.
#include <cublasLt.h>
#include <dlfcn.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#include "common/params.h"
#include "cuda/common.cuh"
#include "cuda/kernels.h"
#include "ops/activation.h"

namespace pyvae {
namespace cuda {
namespace {

// Every cuBLASLt function used. The pointer types come from cublasLt.h, so a misspelt name or a
// changed signature fails to compile rather than to load.
#define PYVAE_LT_FUNCTIONS(X)               \
  X(cublasLtCreate)                         \
  X(cublasLtGetVersion)                     \
  X(cublasLtGetStatusName)                  \
  X(cublasLtMatmulDescCreate)               \
  X(cublasLtMatmulDescDestroy)              \
  X(cublasLtMatmulDescSetAttribute)         \
  X(cublasLtMatrixLayoutCreate)             \
  X(cublasLtMatrixLayoutDestroy)            \
  X(cublasLtMatmulPreferenceCreate)         \
  X(cublasLtMatmulPreferenceDestroy)        \
  X(cublasLtMatmulPreferenceSetAttribute)   \
  X(cublasLtMatmulAlgoGetHeuristic)         \
  X(cublasLtMatmul)

struct LtApi {
#define PYVAE_LT_MEMBER(name) decltype(&::name) name = nullptr;
  PYVAE_LT_FUNCTIONS(PYVAE_LT_MEMBER)
#undef PYVAE_LT_MEMBER
};

struct LtLibrary {
  std::mutex mu;                            // guards loading and the handle table
  std::atomic<const LtApi*> api{nullptr};   // set once, when fully loaded; never unset
  LtApi storage;
  size_t version = 0;
  std::vector<cublasLtHandle_t> handles;    // by device ordinal, created on first use
};

// Never destroyed: handles and the library must outlive every static destructor that might use them.
LtLibrary& library() {
  static LtLibrary* lib = new LtLibrary;
  return *lib;
}

// Opens `name` and resolves every function; on failure appends the reason to *why.
bool open_library(LtLibrary& lib, const std::string& name, std::string* why) {
  void* dl = dlopen(name.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!dl) {
    const char* err = dlerror();  // names the file already
    *why += (err ? std::string(err) : name + ": dlopen failed") + "; ";
    return false;
  }
  LtApi api;
  std::string missing;
#define PYVAE_LT_RESOLVE(fn)                                      \
  api.fn = reinterpret_cast<decltype(&::fn)>(dlsym(dl, #fn));     \
  if (!api.fn) missing += std::string(missing.empty() ? "" : ", ") + #fn;
  PYVAE_LT_FUNCTIONS(PYVAE_LT_RESOLVE)
#undef PYVAE_LT_RESOLVE
  if (!missing.empty()) {
    *why += name + ": missing " + missing + "; ";
    dlclose(dl);
    return false;
  }
  // The header's types and enums are those of one major version (CUBLAS_VERSION = major * 10000 + ...).
  const size_t version = api.cublasLtGetVersion();
  if (version / 10000 != CUBLAS_VER_MAJOR) {
    *why += name + ": cuBLASLt " + std::to_string(version) + ", but pyvae was built against major version " +
            std::to_string(CUBLAS_VER_MAJOR) + "; ";
    dlclose(dl);
    return false;
  }
  lib.storage = api;
  lib.version = version;
  lib.api.store(&lib.storage, std::memory_order_release);
  return true;  // the handle stays open for the life of the process
}

const LtApi* loaded_api() { return library().api.load(std::memory_order_acquire); }

const char* status_name(cublasStatus_t s) {
  const LtApi* api = loaded_api();
  const char* n = api ? api->cublasLtGetStatusName(s) : nullptr;
  return n ? n : "unknown status";
}

[[noreturn]] void lt_fail(const char* fn, cublasStatus_t s) {
  throw std::runtime_error(std::string("pyvae cuBLASLt: ") + fn + " failed: " + status_name(s) + " (status " +
                           std::to_string(static_cast<int>(s)) + ")");
}

void lt_check(cublasStatus_t s, const char* fn) {
  if (s != CUBLAS_STATUS_SUCCESS) lt_fail(fn, s);
}

const LtApi& api_or_throw() {
  if (const LtApi* api = loaded_api()) return *api;
  std::string why;
  if (!lt_load("", &why)) throw std::runtime_error("pyvae cuBLASLt: the library is not available: " + why);
  return *loaded_api();
}

// The handle of the current device (the caller holds a DeviceGuard for it).
cublasLtHandle_t handle_for(const LtApi& api, int device) {
  if (device < 0) throw std::invalid_argument("pyvae cuBLASLt: negative device ordinal");
  LtLibrary& lib = library();
  std::lock_guard<std::mutex> lock(lib.mu);
  if (lib.handles.size() <= static_cast<size_t>(device)) lib.handles.resize(device + 1, nullptr);
  cublasLtHandle_t& h = lib.handles[device];
  if (!h) lt_check(api.cublasLtCreate(&h), "cublasLtCreate");
  return h;
}

// A cuBLASLt descriptor destroyed at scope exit.
template <typename H>
struct Owned {
  H h = nullptr;
  cublasStatus_t (*destroy)(H) = nullptr;
  explicit Owned(cublasStatus_t (*d)(H)) : destroy(d) {}
  ~Owned() {
    if (h) destroy(h);
  }
  Owned(const Owned&) = delete;
  Owned& operator=(const Owned&) = delete;
};

// The largest power of two (<= 256, cuBLASLt's default requirement) dividing the address.
uint32_t alignment_of(const void* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  uint32_t align = 256;
  while (align > 1 && a % align != 0) align /= 2;
  return align;
}

// One column-major GEMM D[m, n] = op(A)[m, k] @ op(B)[k, n] (+ epilogue), in cuBLASLt's terms.
struct Gemm {
  cudaDataType_t type = CUDA_R_32F;
  cublasComputeType_t compute = CUBLAS_COMPUTE_32F;
  cudaDataType_t scale = CUDA_R_32F;
  cublasOperation_t trans_a = CUBLAS_OP_N;
  cublasOperation_t trans_b = CUBLAS_OP_N;
  int64_t m = 0, n = 0, k = 0;
  const void* a = nullptr;
  int64_t lda = 0;
  const void* b = nullptr;
  int64_t ldb = 0;
  void* d = nullptr;
  int64_t ldd = 0;
  cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_DEFAULT;
  const void* bias = nullptr;  // CUBLASLT_MATMUL_DESC_BIAS_POINTER: the bias, or the bias gradient written
  const void* aux = nullptr;   // CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER: the ReLU bit mask
  int64_t aux_ld = 0;
};

Gemm gemm_for(const LinearLtParams& p) {
  Gemm g;
  switch (p.dtype) {
    case DType::kFloat32:
      g.type = CUDA_R_32F;
      g.compute = p.allow_tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
      g.scale = CUDA_R_32F;
      break;
    case DType::kFloat16:
      g.type = CUDA_R_16F;
      g.compute = CUBLAS_COMPUTE_32F;
      g.scale = CUDA_R_32F;
      break;
    case DType::kBFloat16:
      g.type = CUDA_R_16BF;
      g.compute = CUBLAS_COMPUTE_32F;
      g.scale = CUDA_R_32F;
      break;
    case DType::kFloat64:
      g.type = CUDA_R_64F;
      g.compute = CUBLAS_COMPUTE_64F;
      g.scale = CUDA_R_64F;
      break;
  }
  return g;
}

template <typename V>
void set_desc(const LtApi& api, cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attr, const V& v) {
  lt_check(api.cublasLtMatmulDescSetAttribute(desc, attr, &v, sizeof(v)), "cublasLtMatmulDescSetAttribute");
}

template <typename V>
void set_pref(const LtApi& api, cublasLtMatmulPreference_t pref, cublasLtMatmulPreferenceAttributes_t attr,
              const V& v) {
  lt_check(api.cublasLtMatmulPreferenceSetAttribute(pref, attr, &v, sizeof(v)),
           "cublasLtMatmulPreferenceSetAttribute");
}

// ------------------------------------------------------------------------------- plan cache
// NOTE: [cuBLASLt plan cache]. Every field that the descriptors or the heuristic depend on.
struct PlanKey {
  int device;
  int type, compute, scale, trans_a, trans_b;
  int64_t m, n, k, lda, ldb, ldd;
  uint32_t epilogue;
  bool has_bias, has_aux, strict;
  int64_t aux_ld;
  uint64_t workspace_bytes;
  uint32_t align_a, align_b, align_d;
  // The heuristic saw the first call's bias and mask pointers (set before it runs, build_plan): a
  // later call's may be less aligned (a bias view, a mask at an offset in a larger buffer).
  uint32_t align_bias, align_aux;

  bool operator==(const PlanKey& o) const { return std::memcmp(this, &o, sizeof(PlanKey)) == 0; }
};

struct PlanKeyHash {
  size_t operator()(const PlanKey& k) const {
    // FNV-1a over the bytes (the key is zero-initialized, so padding bytes are equal too).
    const unsigned char* b = reinterpret_cast<const unsigned char*>(&k);
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < sizeof(PlanKey); ++i) h = (h ^ b[i]) * 1099511628211ull;
    return static_cast<size_t>(h);
  }
};

struct Plan {
  const LtApi* api = nullptr;
  std::mutex mu;  // held while the pointer attributes are set and cublasLtMatmul enqueues
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  bool supported = false;  // the heuristic found an algorithm (and cublasLtMatmul has not refused it)
  cublasLtMatmulAlgo_t algo = {};

  Plan() = default;
  Plan(const Plan&) = delete;
  Plan& operator=(const Plan&) = delete;
  ~Plan() {
    if (!api) return;
    if (desc) api->cublasLtMatmulDescDestroy(desc);
    if (a) api->cublasLtMatrixLayoutDestroy(a);
    if (b) api->cublasLtMatrixLayoutDestroy(b);
    if (d) api->cublasLtMatrixLayoutDestroy(d);
  }
};

constexpr size_t kMaxPlans = 4096;

struct PlanCache {
  std::mutex mu;
  std::unordered_map<PlanKey, std::shared_ptr<Plan>, PlanKeyHash> plans;
};

// Never destroyed, like the handles (a plan's destructor calls into libcublasLt).
PlanCache& plan_cache() {
  static PlanCache* cache = new PlanCache;
  return *cache;
}

PlanKey key_for(const Gemm& g, const LinearLtParams& p) {
  PlanKey k;
  std::memset(&k, 0, sizeof k);  // padding included: the key is compared and hashed as bytes
  k.device = p.device;
  k.type = static_cast<int>(g.type);
  k.compute = static_cast<int>(g.compute);
  k.scale = static_cast<int>(g.scale);
  k.trans_a = static_cast<int>(g.trans_a);
  k.trans_b = static_cast<int>(g.trans_b);
  k.m = g.m;
  k.n = g.n;
  k.k = g.k;
  k.lda = g.lda;
  k.ldb = g.ldb;
  k.ldd = g.ldd;
  k.epilogue = static_cast<uint32_t>(g.epilogue);
  k.has_bias = g.bias != nullptr;
  k.has_aux = g.aux != nullptr;
  k.strict = p.strict_reduction && (g.type == CUDA_R_16F || g.type == CUDA_R_16BF);
  k.aux_ld = g.aux ? g.aux_ld : 0;
  k.workspace_bytes = p.workspace_bytes;
  k.align_a = alignment_of(g.a);
  k.align_b = alignment_of(g.b);
  k.align_d = alignment_of(g.d);
  k.align_bias = g.bias ? alignment_of(g.bias) : 0;
  k.align_aux = g.aux ? alignment_of(g.aux) : 0;
  return k;
}

// Sets the per-call pointer attributes (the caller holds plan.mu).
void set_pointers(const LtApi& api, const Plan& plan, const Gemm& g) {
  if (g.bias) set_desc(api, plan.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, g.bias);
  if (g.aux) set_desc(api, plan.desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, g.aux);
}

// Descriptors and the heuristic's algorithm for g (the first call's pointers set on the descriptor).
std::shared_ptr<Plan> build_plan(const LtApi& api, cublasLtHandle_t handle, const Gemm& g, const PlanKey& key) {
  auto plan = std::make_shared<Plan>();
  plan->api = &api;
  lt_check(api.cublasLtMatmulDescCreate(&plan->desc, g.compute, g.scale), "cublasLtMatmulDescCreate");
  set_desc(api, plan->desc, CUBLASLT_MATMUL_DESC_TRANSA, static_cast<int32_t>(g.trans_a));
  set_desc(api, plan->desc, CUBLASLT_MATMUL_DESC_TRANSB, static_cast<int32_t>(g.trans_b));
  set_desc(api, plan->desc, CUBLASLT_MATMUL_DESC_EPILOGUE, static_cast<uint32_t>(g.epilogue));
  if (g.aux) set_desc(api, plan->desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, g.aux_ld);
  set_pointers(api, *plan, g);

  // Stored shapes: op(A) is [m, k], so A is [k, m] when transposed; likewise B.
  const bool ta = g.trans_a != CUBLAS_OP_N;
  const bool tb = g.trans_b != CUBLAS_OP_N;
  lt_check(api.cublasLtMatrixLayoutCreate(&plan->a, g.type, ta ? g.k : g.m, ta ? g.m : g.k, g.lda),
           "cublasLtMatrixLayoutCreate");
  lt_check(api.cublasLtMatrixLayoutCreate(&plan->b, g.type, tb ? g.n : g.k, tb ? g.k : g.n, g.ldb),
           "cublasLtMatrixLayoutCreate");
  lt_check(api.cublasLtMatrixLayoutCreate(&plan->d, g.type, g.m, g.n, g.ldd), "cublasLtMatrixLayoutCreate");

  Owned<cublasLtMatmulPreference_t> pref(api.cublasLtMatmulPreferenceDestroy);
  lt_check(api.cublasLtMatmulPreferenceCreate(&pref.h), "cublasLtMatmulPreferenceCreate");
  set_pref(api, pref.h, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, static_cast<uint64_t>(key.workspace_bytes));
  set_pref(api, pref.h, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, key.align_a);
  set_pref(api, pref.h, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, key.align_b);
  set_pref(api, pref.h, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, key.align_d);
  set_pref(api, pref.h, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, key.align_d);
  if (key.strict) {
    // torch's allow_{fp16,bf16}_reduced_precision_reduction = False: split-K partial sums stay in the
    // compute type (no reduction in the half output type).
    set_pref(api, pref.h, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK,
             static_cast<uint32_t>(CUBLASLT_REDUCTION_SCHEME_NONE | CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE));
  }

  cublasLtMatmulHeuristicResult_t result = {};
  int found = 0;
  const cublasStatus_t hs = api.cublasLtMatmulAlgoGetHeuristic(handle, plan->desc, plan->a, plan->b, plan->d,
                                                                plan->d, pref.h, 1, &result, &found);
  if (hs != CUBLAS_STATUS_NOT_SUPPORTED) lt_check(hs, "cublasLtMatmulAlgoGetHeuristic");
  plan->supported = hs == CUBLAS_STATUS_SUCCESS && found > 0 && result.state == CUBLAS_STATUS_SUCCESS;
  if (plan->supported) plan->algo = result.algo;
  return plan;
}

std::shared_ptr<Plan> plan_for(const LtApi& api, cublasLtHandle_t handle, const Gemm& g, const LinearLtParams& p) {
  const PlanKey key = key_for(g, p);
  PlanCache& cache = plan_cache();
  std::lock_guard<std::mutex> lock(cache.mu);
  auto it = cache.plans.find(key);
  if (it != cache.plans.end()) return it->second;
  if (cache.plans.size() >= kMaxPlans) cache.plans.clear();  // plans in use live on in their shared_ptrs
  std::shared_ptr<Plan> plan = build_plan(api, handle, g, key);
  cache.plans.emplace(key, plan);
  return plan;
}

// Runs g on p's stream with p's workspace. False when cuBLASLt has no algorithm for it (nothing
// enqueued); throws on any other failure.
bool run(const LtApi& api, cublasLtHandle_t handle, const Gemm& g, const LinearLtParams& p) {
  const std::shared_ptr<Plan> plan = plan_for(api, handle, g, p);
  std::lock_guard<std::mutex> lock(plan->mu);
  if (!plan->supported) return false;
  set_pointers(api, *plan, g);
  const float alpha_f = 1.0f, beta_f = 0.0f;
  const double alpha_d = 1.0, beta_d = 0.0;
  const bool dbl = g.scale == CUDA_R_64F;
  // beta = 0: C is not read; it is given D's pointer and layout, as cuBLASLt's samples do.
  const cublasStatus_t ms = api.cublasLtMatmul(
      handle, plan->desc, dbl ? static_cast<const void*>(&alpha_d) : &alpha_f, g.a, plan->a, g.b, plan->b,
      dbl ? static_cast<const void*>(&beta_d) : &beta_f, g.d, plan->d, g.d, plan->d, &plan->algo, p.workspace,
      static_cast<size_t>(p.workspace_bytes), stream_of(p.stream));
  if (ms == CUBLAS_STATUS_NOT_SUPPORTED) {
    plan->supported = false;  // remembered: the next call goes straight to the fallback
    return false;
  }
  lt_check(ms, "cublasLtMatmul");
  return true;
}

void check_problem(const LinearLtParams& p, const char* what) {
  if (p.rows <= 0 || p.in_features <= 0 || p.out_features <= 0)
    throw std::invalid_argument(std::string("pyvae cuBLASLt ") + what +
                                ": every dimension must be positive (the caller handles empty problems)");
  if (p.act < 0 || p.act > 4)
    throw std::invalid_argument(std::string("pyvae cuBLASLt ") + what + ": unknown activation code " +
                                std::to_string(p.act));
}

void check_aux_ld(const LinearLtParams& p, int64_t features, const char* what) {
  if (p.aux_ld < features || p.aux_ld % 128 != 0)
    throw std::invalid_argument(std::string("pyvae cuBLASLt ") + what + ": aux_ld = " + std::to_string(p.aux_ld) +
                                " must be a multiple of 128 and at least " + std::to_string(features));
}

cublasLtEpilogue_t forward_epilogue(bool bias, bool relu, bool mask) {
  if (relu && mask) return bias ? CUBLASLT_EPILOGUE_RELU_AUX_BIAS : CUBLASLT_EPILOGUE_RELU_AUX;
  if (relu) return bias ? CUBLASLT_EPILOGUE_RELU_BIAS : CUBLASLT_EPILOGUE_RELU;
  return bias ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
}

LinearParams epilogue_params(const LinearLtParams& p, int act, int64_t cols) {
  LinearParams e;
  e.dtype = p.dtype;
  e.act = act;
  e.rows = p.rows;
  e.cols = cols;
  e.stream = p.stream;
  e.device = p.device;
  // act_bwd's bias-gradient scratch (NOTE: [act_bwd workspace]) reuses the cuBLASLt workspace: the
  // GEMM before it on the same stream is done with it by then. pyvae/_cublaslt.py sizes it for both.
  e.workspace = p.workspace;
  e.workspace_bytes = p.workspace_bytes;
  return e;
}

}  // namespace

bool lt_load(const std::string& path, std::string* why) {
  LtLibrary& lib = library();
  std::lock_guard<std::mutex> lock(lib.mu);
  if (lib.api.load(std::memory_order_acquire)) return true;
  std::vector<std::string> names;
  if (!path.empty()) {
    names.push_back(path);
  } else {
    if (const char* env = std::getenv("PYVAE_CUBLASLT_LIBRARY")) {
      if (*env) names.emplace_back(env);
    }
    names.push_back("libcublasLt.so." + std::to_string(CUBLAS_VER_MAJOR));
    names.push_back("libcublasLt.so");
  }
  std::string reasons;
  for (const std::string& name : names)
    if (open_library(lib, name, &reasons)) return true;
  if (reasons.size() >= 2) reasons.resize(reasons.size() - 2);  // the last "; "
  if (why) *why = reasons;
  return false;
}

int lt_header_version() { return CUBLAS_VERSION; }

size_t lt_version() {
  LtLibrary& lib = library();
  std::lock_guard<std::mutex> lock(lib.mu);
  return lib.api.load(std::memory_order_acquire) ? lib.version : 0;
}

bool lt_usable(std::string* why) {
  std::string reason;
  if (!lt_load("", &reason)) {
    if (why) *why = "libcublasLt could not be loaded: " + reason;
    return false;
  }
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess || count == 0) {
    cudaGetLastError();  // not sticky, but do not leave it for the next check_launch to find
    if (why) *why = std::string("no CUDA device: ") + (err != cudaSuccess ? cudaGetErrorString(err) : "count is 0");
    return false;
  }
  return true;
}

int lt_linear_fwd(const LinearLtParams& p) {
  check_problem(p, "linear_fwd");
  const LtApi& api = api_or_throw();
  const bool relu = p.act == static_cast<int>(ops::Act::kReLU);
  const bool mask = relu && p.aux != nullptr;
  if (mask) check_aux_ld(p, p.out_features, "linear_fwd");
  DeviceGuard guard(p.device);
  const cublasLtHandle_t handle = handle_for(api, p.device);

  // y^T [out, rows] = op(W, T) [out, in] @ op(x, N) [in, rows]   (NOTE: [cuBLASLt path])
  Gemm g = gemm_for(p);
  g.trans_a = CUBLAS_OP_T;
  g.trans_b = CUBLAS_OP_N;
  g.m = p.out_features;
  g.n = p.rows;
  g.k = p.in_features;
  g.a = p.weight;
  g.lda = p.in_features;
  g.b = p.x;
  g.ldb = p.in_features;
  g.d = p.y;
  g.ldd = p.out_features;
  const bool fused_relu = relu && (p.fuse_act || mask);
  g.epilogue = forward_epilogue(p.bias != nullptr, fused_relu, mask);
  g.bias = p.bias;
  if (mask) {
    g.aux = p.aux;
    g.aux_ld = p.aux_ld;
  }
  bool bias_done = true;
  bool act_done = fused_relu || p.act == static_cast<int>(ops::Act::kIdentity);
  if (!run(api, handle, g, p)) {
    if (mask || g.epilogue == CUBLASLT_EPILOGUE_DEFAULT) return kLtUnsupported;
    g.epilogue = CUBLASLT_EPILOGUE_DEFAULT;
    g.bias = nullptr;
    if (!run(api, handle, g, p)) return kLtUnsupported;
    bias_done = p.bias == nullptr;
    act_done = p.act == static_cast<int>(ops::Act::kIdentity);
  }
  if (!act_done || !bias_done) {
    // y = act(y + bias) in place, bias only if the GEMM did not add it (csrc/cuda/linear.cu).
    LinearParams e = epilogue_params(p, p.act, p.out_features);
    e.y = p.y;
    e.bias = bias_done ? nullptr : p.bias;
    bias_act_fwd(e);
  }
  return kLtDone;
}

int lt_linear_wgrad(const LinearLtParams& p) {
  check_problem(p, "linear_wgrad");
  const LtApi& api = api_or_throw();
  DeviceGuard guard(p.device);
  const cublasLtHandle_t handle = handle_for(api, p.device);

  // dW^T [in, out] = op(x, N) [in, rows] @ op(dZ, T) [rows, out]; BGRADB sums op(B) = dZ over k = rows.
  Gemm g = gemm_for(p);
  g.trans_a = CUBLAS_OP_N;
  g.trans_b = CUBLAS_OP_T;
  g.m = p.in_features;
  g.n = p.out_features;
  g.k = p.rows;
  g.a = p.x;
  g.lda = p.in_features;
  g.b = p.grad_pre;
  g.ldb = p.out_features;
  g.d = p.grad_weight;
  g.ldd = p.in_features;
  if (p.grad_bias) {
    g.epilogue = CUBLASLT_EPILOGUE_BGRADB;
    g.bias = p.grad_bias;
  }
  bool bias_done = true;
  if (!run(api, handle, g, p)) {
    if (!p.grad_bias) return kLtUnsupported;
    g.epilogue = CUBLASLT_EPILOGUE_DEFAULT;
    g.bias = nullptr;
    if (!run(api, handle, g, p)) return kLtUnsupported;
    bias_done = false;
  }
  if (!bias_done) {
    // Column sums of dZ with pyvae's deterministic reduction (identity: no gradient is rewritten).
    LinearParams e = epilogue_params(p, static_cast<int>(ops::Act::kIdentity), p.out_features);
    e.grad_y = p.grad_pre;
    e.grad_bias = p.grad_bias;
    act_bwd(e);
  }
  return kLtDone;
}

int lt_linear_dgrad(const LinearLtParams& p) {
  check_problem(p, "linear_dgrad");
  const LtApi& api = api_or_throw();
  const bool mask = p.aux != nullptr;
  if (mask) {
    check_aux_ld(p, p.in_features, "linear_dgrad");
    if (!p.x)
      throw std::invalid_argument(
          "pyvae cuBLASLt linear_dgrad: with a ReLU mask, x (the previous layer's output) is required");
  }
  DeviceGuard guard(p.device);
  const cublasLtHandle_t handle = handle_for(api, p.device);

  // dx^T [in, rows] = op(W, N) [in, out] @ op(dZ, N) [out, rows]; DRELU_BGRAD's vector runs along
  // D's m = in rows: the previous layer's bias gradient.
  Gemm g = gemm_for(p);
  g.trans_a = CUBLAS_OP_N;
  g.trans_b = CUBLAS_OP_N;
  g.m = p.in_features;
  g.n = p.rows;
  g.k = p.out_features;
  g.a = p.weight;
  g.lda = p.in_features;
  g.b = p.grad_pre;
  g.ldb = p.out_features;
  g.d = p.grad_x;
  g.ldd = p.in_features;
  if (mask) {
    g.epilogue = p.grad_bias ? CUBLASLT_EPILOGUE_DRELU_BGRAD : CUBLASLT_EPILOGUE_DRELU;
    g.bias = p.grad_bias;
    g.aux = p.aux;
    g.aux_ld = p.aux_ld;
  }
  bool relu_done = true;
  if (!run(api, handle, g, p)) {
    if (!mask) return kLtUnsupported;
    g.epilogue = CUBLASLT_EPILOGUE_DEFAULT;
    g.bias = nullptr;
    g.aux = nullptr;
    if (!run(api, handle, g, p)) return kLtUnsupported;
    relu_done = false;
  }
  if (!relu_done) {
    // relu' from the previous layer's output (= this layer's input x), in place, with its bias gradient.
    LinearParams e = epilogue_params(p, static_cast<int>(ops::Act::kReLU), p.in_features);
    e.grad_y = p.grad_x;
    e.out = p.x;
    e.grad_pre = p.grad_x;
    e.grad_bias = p.grad_bias;
    act_bwd(e);
  }
  return kLtDone;
}

}  // namespace cuda
}  // namespace pyvae
