"""The CUDA path's logic that runs without a GPU: dtype coverage of the compiled kernels, no device memory
taken outside torch's allocator, the graph-safe seed, the device index and the act_bwd workspace as the
gate passes them. The numerical and capture checks that need a GPU are in tests/test_cuda_gpu.py.
"""
import importlib
import pathlib
import re

import pytest
import torch

import pyvae
from pyvae import _C, _gate
R = importlib.import_module("pyvae.ops.reparameterize")  # the module (pyvae.ops.reparameterize is also a function)

ROOT = pathlib.Path(__file__).resolve().parents[1]
FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


# ------------------------------------------------------------------------ kernels for every dtype
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_ops_compute_every_float_dtype_in_itself_on_cuda(dtype):
    """The ops take all four float dtypes; on CUDA each must reach a kernel of its own dtype. A dtype
    missing from the binding's CUDA tables would be computed in float32 (kernel_dtype's fallback):
    float64 gradchecks on a GPU would then fail by precision, not by error."""
    cuda = torch.device("cuda", 0)
    assert dtype in _gate.ROWWISE_DTYPES["cuda"]
    assert dtype in _gate.LINEAR_DTYPES["cuda"]
    assert _gate.kernel_dtype(dtype, cuda) == dtype
    assert _gate.kernel_dtype(dtype, cuda, "linear") == dtype


@pytest.mark.skipif(not _C.cuda_built, reason="the CUDA launchers' dispatch lists exist in CUDA builds (CI)")
def test_every_accepted_cuda_dtype_has_compiled_kernels():
    """Each (family, dtype) the binding accepts on CUDA is in the dispatch list its launchers instantiate
    kernels from (NOTE: [CUDA kernel dtypes] in csrc/cuda/common.cuh)."""
    compiled = _gate.CUDA_KERNEL_DTYPES
    assert set(compiled) == {"rowwise", "reparameterize", "linear"}
    for family, accepted in (("rowwise", _gate.ROWWISE_DTYPES["cuda"]),
                             ("reparameterize", _gate.ROWWISE_DTYPES["cuda"]),
                             ("linear", _gate.LINEAR_DTYPES["cuda"])):
        missing = [d for d in accepted if d not in compiled[family]]
        assert not missing, f"{family}: accepted on CUDA without a kernel: {missing}"


def test_kernel_dtype_report_absent_without_cuda():
    assert (_C.cuda_kernel_dtypes is None) == (not _C.cuda_built)


# ------------------------------------------------------------------- device memory outside torch
_COMMENT = re.compile(r"//[^\n]*|/\*.*?\*/", re.S)
_RAW_ALLOC = re.compile(r"\bcuda(?:Malloc|Free)\w*\b|\bcuMem(?:Alloc|Free)\w*\b")


def _code(path):
    return _COMMENT.sub("", path.read_text())


def test_no_device_allocation_in_csrc_cuda():
    """Every workspace comes from torch's allocator (NOTE: [act_bwd workspace] in csrc/cuda/linear.cu):
    a cudaMalloc*/cudaFree* (or driver cuMemAlloc*/cuMemFree*) call in the CUDA sources fails this."""
    files = sorted((ROOT / "csrc").rglob("*.cu")) + sorted((ROOT / "csrc").rglob("*.cuh")) + \
        sorted((ROOT / "csrc" / "cuda").rglob("*.h"))
    assert files
    found = [f"{f.relative_to(ROOT)}: {m.group(0)}" for f in files for m in _RAW_ALLOC.finditer(_code(f))]
    assert not found, found


def test_allocation_scan_sees_a_call():
    # The scan is not vacuous: it finds a call, and not a word in a comment.
    assert _RAW_ALLOC.search(_COMMENT.sub("", "x; cudaMallocAsync(&p, n, s);"))
    assert not _RAW_ALLOC.search(_COMMENT.sub("", "// a cudaMalloc here would be invisible\n"))


# ------------------------------------------------------------------------- cuBLASLt plan key
def _body(code, signature):
    """The body of the C++ function whose definition starts with ``signature`` (braces matched)."""
    start = code.index("{", code.index(signature))
    depth = 0
    for i in range(start, len(code)):
        depth += {"{": 1, "}": -1}.get(code[i], 0)
        if depth == 0:
            return code[start + 1:i]
    raise AssertionError(f"unbalanced braces after {signature}")


def test_cublaslt_plan_key_holds_the_alignment_of_every_pointer_the_heuristic_saw():
    """NOTE: [cuBLASLt plan cache]: cublasLtMatmulAlgoGetHeuristic reads the alignment of A, B, D and, per
    cublasLt.h, of the bias and aux pointers set on the descriptor before it runs (build_plan sets the
    first call's). A plan keyed without one of them is reused for a later call whose pointer is less
    aligned (a bias view 16 bytes off a 256-byte boundary, a ReLU mask at an odd offset): an algorithm
    chosen for 256-byte-aligned vectors then reads misaligned ones. The code is compiled in CI and never
    run here, so this reads it: every pointer set per call has its alignment in the key."""
    code = _code(ROOT / "csrc" / "cuda" / "linear_lt.cu")
    per_call = re.findall(r"CUBLASLT_MATMUL_DESC_\w+_POINTER,\s*g\.(\w+)", _body(code, "void set_pointers("))
    assert sorted(per_call) == ["aux", "bias"], per_call
    key = _body(code, "PlanKey key_for(")
    missing = [f for f in ["a", "b", "d"] + per_call if not re.search(rf"alignment_of\(g\.{f}\)", key)]
    assert not missing, f"the plan key lacks the alignment of {missing}"


def test_body_finds_a_whole_function():
    # The scan above is not vacuous: it reads a function to its closing brace, nested braces included.
    code = "int f(int a) { if (a) { return 1; } return 2; }\nint g() { return 3; }"
    assert _body(code, "int f(") == " if (a) { return 1; } return 2; "


# ----------------------------------------------------------------------------- act_bwd workspace
def test_act_bwd_needs_no_workspace_on_cpu():
    assert _gate.act_bwd_workspace_bytes(torch.float32, torch.device("cpu"), 1000, 500) == 0
    g = torch.randn(7, 5)
    assert _gate.act_bwd_workspace(g) is None
    gb = torch.empty(5)
    _gate.act_bwd(act=_gate.ACTIVATIONS["identity"], grad_y=g, grad_bias=gb)
    torch.testing.assert_close(gb, g.sum(0))


def test_act_bwd_checks_a_given_workspace():
    g = torch.randn(7, 5)
    with pytest.raises(RuntimeError, match="workspace must be a contiguous torch.uint8"):
        _gate.act_bwd(act=0, grad_y=g, grad_bias=torch.empty(5), workspace=torch.empty(4))  # float32


@pytest.mark.skipif(not _C.cuda_built, reason="the CUDA launcher's size exists in CUDA builds (CI)")
@pytest.mark.parametrize("dtype,size", [(torch.float32, 4), (torch.float64, 8), (torch.float16, 4),
                                        (torch.bfloat16, 4)])
def test_act_bwd_workspace_size(dtype, size):
    """One row of partial column sums (compute type) per 256-row block."""
    cuda = torch.device("cuda", 0)
    for rows, cols in [(1, 1), (256, 3), (257, 3), (100_000, 500)]:
        assert _gate.act_bwd_workspace_bytes(dtype, cuda, rows, cols) == -(-rows // 256) * cols * size
    assert _gate.act_bwd_workspace_bytes(dtype, cuda, 0, 5) == 0


@pytest.mark.skipif(_C.cuda_built, reason="checks a build without CUDA")
def test_act_bwd_workspace_size_without_cuda_raises():
    with pytest.raises(RuntimeError, match="built without CUDA"):
        _C.act_bwd_workspace_bytes(device=_C.device_codes["cuda"], dtype=0, rows=3, cols=4)


# -------------------------------------------------------------------------------- device index
def test_device_index():
    assert _gate.device_index(torch.device("cpu")) == 0
    assert _gate.device_index(torch.device("cuda", 3)) == 3


# ---------------------------------------------------------------------------------- graph-safe seed
def test_seed_source():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    cpu_gen = torch.Generator()
    assert R.seed_source(cpu, None, capturing=False) == "host"
    assert R.seed_source(cpu, cpu_gen, capturing=False) == "host"
    assert R.seed_source(cuda, None, capturing=False) == "device"  # the device's CUDA generator
    assert R.seed_source(cuda, None, capturing=True) == "device"
    assert R.seed_source(cuda, cpu_gen, capturing=False) == "host"  # same draw as on the CPU
    with pytest.raises(RuntimeError, match="CPU generator cannot seed a draw under CUDA graph capture"):
        R.seed_source(cuda, cpu_gen, capturing=True)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        R.seed_source(cuda, 5, capturing=False)


def test_cpu_seed_is_the_host_draw_as_before():
    """On the CPU the seed tensor is draw_seed's value with offset 0, drawn from the same generator."""
    a = R.seed_for("cpu", torch.Generator().manual_seed(11))
    assert a.device.type == "cpu" and a.dtype == torch.int64
    assert a.tolist() == [R.draw_seed(torch.Generator().manual_seed(11)), 0]
    torch.manual_seed(5)
    b = R.seed_for("cpu")
    torch.manual_seed(5)
    assert b.tolist() == [R.draw_seed(), 0]


def test_op_refuses_a_seed_on_another_device():
    mu = torch.zeros(3)
    with pytest.raises(ValueError, match="seed must be on the CPU or on mu's device"):
        torch.ops.pyvae.reparameterize(mu, mu, 0, torch.zeros(2, dtype=torch.int64, device="meta"))


def test_gate_and_binding_refuse_a_device_seed_for_cpu_inputs():
    mu, z = torch.zeros(4), torch.empty(4)
    with pytest.raises(RuntimeError, match="seed_tensor must be None on cpu"):
        _gate.reparameterize_fwd(mu=mu, logvar=mu, z=z, samples=1, seed=1, offset=0,
                                 seed_tensor=torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="seed_ptr .* is CUDA-only"):
        _C.reparameterize_fwd(device=_C.device_codes["cpu"], dtype=0, numel=4, samples=1, mu=mu.data_ptr(),
                              logvar=mu.data_ptr(), grad_out=0, z=z.data_ptr(), grad_mu=0, grad_logvar=0, eps=0,
                              seed=1, offset=0, seed_ptr=mu.data_ptr(), stream=0, device_index=0)


def test_binding_refuses_saved_eps_off_the_cpu():
    """NOTE: [Saved eps]: only the CPU kernels read and write the eps buffer; a CUDA call with one is refused
    before anything runs (the CUDA kernels would ignore it and the caller would read garbage)."""
    mu, z = torch.zeros(4), torch.empty(4)
    with pytest.raises(ValueError, match="eps .* is CPU-only"):
        _C.reparameterize_fwd(device=_C.device_codes["cuda"], dtype=0, numel=4, samples=1, mu=mu.data_ptr(),
                              logvar=mu.data_ptr(), grad_out=0, z=z.data_ptr(), grad_mu=0, grad_logvar=0,
                              eps=z.data_ptr(), seed=1, offset=0, seed_ptr=0, stream=0, device_index=0)


@pytest.mark.parametrize("row0", [0, 1, 3, 2**40])
@pytest.mark.parametrize("seed", [0, 1, 2**62 - 1, 123456789123])
def test_device_shard_seed_mix_equals_the_host_one(seed, row0):
    """The sharded draw's seed mix done with int64 tensor arithmetic (the on-device path) equals the
    Python-integer one of the host path, bit for bit."""
    t = R._mix_seed(torch.tensor([seed, 0], dtype=torch.int64), row0)
    assert t.tolist() == [(seed + R._MIX * (row0 + 1)) % 2**62, 0]


@pytest.mark.parametrize("shard", [None, (4, 8), (3, 5)])
def test_shard_takes_a_cpu_seed_tensor_like_an_int(shard):
    mu, lv = torch.randn(5, 4), torch.randn(5, 4)
    a = R.reparameterize_shard(mu, lv, 2, 987654321, shard)
    b = R.reparameterize_shard(mu, lv, 2, torch.tensor([987654321, 0]), shard)
    assert torch.equal(a, b)


def test_public_draw_unchanged_on_cpu():
    """pyvae.reparameterize on the CPU draws exactly what it drew with a host int seed."""
    mu, lv = torch.randn(3, 17), torch.randn(3, 17)
    z = pyvae.reparameterize(mu, lv, samples=2, generator=torch.Generator().manual_seed(4))
    seed = R.draw_seed(torch.Generator().manual_seed(4))
    assert torch.equal(z, torch.ops.pyvae.reparameterize(mu, lv, 2, torch.tensor([seed, 0])))
