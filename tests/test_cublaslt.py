"""pyvae._cublaslt, the cuBLASLt path of the fused linear layer (NOTE: [cuBLASLt path] in
csrc/cuda/linear_lt.cu).

The numerical tests need a GPU and the built path, and skip elsewhere (saying which is missing): each
compares against float64 torch on the same input values, with at most twice torch's own error in the
tested dtype (plus a small floor). A GPU machine whose build has the path must have it available
(test_available_wherever_it_can_run), so a library that fails to load does not turn the numerical tests
into skips. The rest run everywhere: the module imports and says why the path is unavailable, the
bindings exist in every build and fail loudly, and a build has the path exactly when it should
(PYVAE_EXPECT_CUBLASLT=1, set by .ci/run; without it, from what this machine shows). The loader
tests need the build with the path and a libcublasLt.so.<major>: PYVAE_TEST_CUBLASLT_LIBRARY=<path>
(CI extracts the library for this), else the nvidia wheels in sys.path and the CUDA toolkit are
searched.
"""
import glob
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from pyvae import _C, _cublaslt

GPU = torch.cuda.is_available() and _cublaslt.available()
needs_gpu = pytest.mark.skipif(
    not GPU, reason=f"needs a CUDA device and the cuBLASLt path: {_cublaslt.unavailable_reason() or 'no CUDA device'}")

ACTS = {0: lambda t: t, 1: torch.relu, 2: torch.tanh, 3: torch.sigmoid, 4: F.softplus}
ACT_IDS = {0: "identity", 1: "relu", 2: "tanh", 3: "sigmoid", 4: "softplus"}
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# Absolute floor added to 2x torch's own error (a same-dtype torch result can be exact by luck).
FLOOR = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
# (in_features, out_features, rows): 1-element, odd sizes, a mask row over 128 bits, the VAE's layer,
# 1000+7 features, many rows.
SHAPES = [(1, 1, 1), (3, 5, 7), (13, 130, 6), (784, 500, 37), (20, 1007, 3), (500, 40, 1031)]


def _params(shape, dtype, bias=True, seed=0):
    in_f, out_f, rows = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_f, generator=g)
    w = torch.randn(out_f, in_f, generator=g) / in_f ** 0.5
    b = torch.randn(out_f, generator=g) * 0.5 if bias else None
    return tuple(None if t is None else t.to("cuda", dtype) for t in (x, w, b))


def _assert_within(ours, torch_same, ref, dtype, what):
    """ours and torch's same-dtype result both against the float64 reference ref."""
    err = (ours.double() - ref).abs().max().item()
    err_torch = (torch_same.double() - ref).abs().max().item()
    assert err <= 2 * err_torch + FLOOR[dtype], f"{what}: error {err:.3g}, torch's own {err_torch:.3g}"


def _null_call(fn, rows, act=0):
    # A raw entry (keyword arguments only) with every pointer null.
    null = dict.fromkeys(("x", "weight", "bias", "y", "grad_pre", "grad_x", "grad_weight", "grad_bias", "aux",
                          "aux_ld", "workspace", "workspace_bytes", "stream"), 0)
    return fn(dtype=0, act=act, rows=rows, in_features=3, out_features=4, allow_tf32=False, strict_reduction=False,
              fuse_act=True, device=0, **null)


def _require(result, dtype, what):
    # None: the path declined a problem on a GPU where it is available. linear_bwd never may (a GEMM
    # without an algorithm falls back to torch.mm); linear_fwd and linear_dgrad_relu only when even
    # the DEFAULT epilogue has no algorithm (NOTE: [cuBLASLt path]). cuBLASLt has float64 GEMMs
    # (CUBLAS_COMPUTE_64F), so this fails in every dtype: a decline is a finding, not a skip.
    if result is None:
        pytest.fail(f"{what}: the cuBLASLt path declined a {dtype} problem")
    return result


def _cuda_toolkit_dirs(sub):
    """``sub`` (include, lib64) of the CUDA toolkit this machine has: $CUDA_HOME, $CUDA_PATH, nvcc's."""
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
    if nvcc:
        roots.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    dirs = []
    for r in filter(None, roots):
        dirs += [os.path.join(r, sub)] + sorted(glob.glob(os.path.join(r, "targets", "*", sub)))
    return dirs


def _wheel_dirs(sub):
    """nvidia/cu13/``sub`` then nvidia/cublas/``sub`` in each sys.path entry (the nvidia-cublas wheel)."""
    return [os.path.join(base or ".", "nvidia", layout, sub) for base in sys.path for layout in ("cu13", "cublas")]


def _find_header():
    """Where the build's default search (CMakeLists.txt, PYVAE_CUBLASLT=AUTO) would find cublasLt.h."""
    for d in _wheel_dirs("include") + _cuda_toolkit_dirs("include"):
        if os.path.isfile(os.path.join(d, "cublasLt.h")):
            return d
    return None


def _find_library():
    """A libcublasLt.so.<major> for the loader tests: $PYVAE_TEST_CUBLASLT_LIBRARY, the nvidia wheels in
    sys.path (as pyvae._cublaslt looks), the CUDA toolkit; None when this machine has none."""
    env = os.environ.get("PYVAE_TEST_CUBLASLT_LIBRARY")
    if env:
        return env  # named explicitly: the test must use it (and fail if it does not load)
    name = f"libcublasLt.so.{_C.cublaslt_header_version // 10000}"
    for d in _wheel_dirs("lib") + _cuda_toolkit_dirs("lib64") + _cuda_toolkit_dirs("lib"):
        if os.path.isfile(os.path.join(d, name)):
            return os.path.join(d, name)
    return None


needs_lt_build = pytest.mark.skipif(not _C.cublaslt_built, reason="pyvae was built without the cuBLASLt path")


# ---------------------------------------------------------------- everywhere (no GPU needed)

def test_binding_surface_exists_in_every_build():
    assert isinstance(_C.cublaslt_built, bool)
    assert isinstance(_C.cublaslt_available(), bool)
    for name in ("cublaslt_linear_fwd", "cublaslt_linear_wgrad", "cublaslt_linear_dgrad", "cublaslt_load",
                 "cublaslt_unavailable_reason", "cublaslt_version"):
        assert callable(getattr(_C, name)), name
    if _C.cublaslt_built:
        assert _C.cublaslt_header_version // 10000 >= 12
        assert _C.cuda_built
    else:
        assert _C.cublaslt_header_version == 0
        assert not _C.cublaslt_available()
        with pytest.raises(RuntimeError, match="built without the cuBLASLt path"):
            _null_call(_C.cublaslt_linear_fwd, 2)


def test_build_has_the_expected_cublaslt_path():
    """The build has the path exactly when it should: as PYVAE_EXPECT_CUBLASLT says when set (CI);
    else never without the CUDA kernels, and always in a CUDA build on a machine where the build's
    default search finds cublasLt.h (the silent loss CONTRIBUTING.md warns of: e.g. pip's build
    isolation hides the nvidia-cublas wheel's header). Only a CUDA build on a machine with no
    cublasLt.h where the build looks, and no PYVAE_EXPECT_CUBLASLT, has nothing to check."""
    env = os.environ.get("PYVAE_EXPECT_CUBLASLT")
    if env is not None:
        assert _C.cublaslt_built == (env == "1"), (
            f"PYVAE_EXPECT_CUBLASLT={env} but pyvae._C.cublaslt_built is {_C.cublaslt_built}"
            + (": the build did not find cublasLt.h (see CONTRIBUTING.md)" if env == "1" else "")
        )
    elif not _C.cuda_built:
        assert not _C.cublaslt_built, "the cuBLASLt path needs the CUDA build, yet a build without CUDA has it"
    else:
        header = _find_header()
        if header is None:
            if not _C.cublaslt_built:
                pytest.skip("CUDA build without the cuBLASLt path and no cublasLt.h where the build looks "
                            "(nvidia wheels in sys.path, the CUDA toolkit): set PYVAE_EXPECT_CUBLASLT to check")
            return  # built from a header elsewhere (PYVAE_CUBLASLT_INCLUDE)
        assert _C.cublaslt_built, (
            f"cublasLt.h is at {header}, where the CUDA build looks for it, but pyvae._C.cublaslt_built is "
            f"False: the build lost the cuBLASLt path (pip's build isolation? see CONTRIBUTING.md); set "
            f"PYVAE_EXPECT_CUBLASLT=0 if it was built with PYVAE_CUBLASLT=OFF on purpose"
        )


@pytest.mark.skipif(not (torch.cuda.is_available() and _C.cublaslt_built),
                    reason="needs a CUDA device and the build with the cuBLASLt path")
def test_available_wherever_it_can_run():
    # The numerical tests skip when available() is False: on a GPU with the built path that must be
    # a deliberate PYVAE_DISABLE_CUBLASLT, not a library that failed to load.
    if os.environ.get("PYVAE_DISABLE_CUBLASLT", "").strip() not in ("", "0"):
        assert not _cublaslt.available()
        return
    assert _cublaslt.available(), _cublaslt.unavailable_reason()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answer")
def test_unavailable_without_gpu_says_why():
    assert _cublaslt.available() is False
    reason = _cublaslt.unavailable_reason()
    assert isinstance(reason, str) and reason
    assert _C.cublaslt_available() is False
    assert _C.cublaslt_unavailable_reason()


def test_disable_variable(monkeypatch):
    monkeypatch.setenv("PYVAE_DISABLE_CUBLASLT", "1")
    assert not _cublaslt.available()
    assert "PYVAE_DISABLE_CUBLASLT" in _cublaslt.unavailable_reason()


def test_aux_shape_pads_rows_to_128_bits():
    assert _cublaslt.aux_shape(5, 1) == (5, 16)
    assert _cublaslt.aux_shape(5, 128) == (5, 16)
    assert _cublaslt.aux_shape(5, 129) == (5, 32)
    assert _cublaslt.aux_shape(0, 500) == (0, 64)


def test_wrappers_decline_what_they_cannot_take():
    x, w, b = torch.randn(4, 3), torch.randn(5, 3), torch.randn(5)
    assert _cublaslt.linear_fwd(x, w, b, 1) is None  # CPU tensors
    assert _cublaslt.linear_bwd(torch.randn(4, 5), x, w, torch.randn(4, 5), 2, True, True, True) is None
    aux = torch.zeros(_cublaslt.aux_shape(4, 3), dtype=torch.uint8)
    assert _cublaslt.linear_dgrad_relu(torch.randn(4, 5), w, x, aux, True) is None
    assert _cublaslt.linear_bwd(torch.randn(4, 5), x, w, None, 0, False, False, False) == (None, None, None)


def test_wrappers_reject_shapes_that_do_not_fit():
    x, w = torch.randn(4, 3), torch.randn(5, 3)
    with pytest.raises(ValueError, match="in_features"):
        _cublaslt.linear_fwd(x, torch.randn(5, 4), None, 0)
    with pytest.raises(ValueError, match="bias"):
        _cublaslt.linear_fwd(x, w, torch.randn(4), 0)
    with pytest.raises(ValueError, match="activation"):
        _cublaslt.linear_fwd(x, w, None, 7)
    with pytest.raises(ValueError, match="grad"):
        _cublaslt.linear_bwd(torch.randn(4, 4), x, w, None, 0, True, True, True)
    with pytest.raises(ValueError, match="aux"):
        _cublaslt.linear_dgrad_relu(torch.randn(4, 5), w, x, torch.zeros(4, 8, dtype=torch.uint8), False)


@pytest.mark.skipif(GPU, reason="checks the failure without a usable GPU")
def test_raw_entries_fail_loudly_without_gpu():
    # Valid sizes, null pointers: must raise (not built, no library, or no device), never touch memory.
    with pytest.raises(RuntimeError):
        _null_call(_C.cublaslt_linear_fwd, 2, act=1)
    if _C.cublaslt_built:
        with pytest.raises(ValueError, match="positive"):
            _null_call(_C.cublaslt_linear_wgrad, 0)


@needs_lt_build
def test_loader_names_the_missing_file(tmp_path):
    # In a fresh process: this one may have loaded the library already (available() on a GPU machine).
    # Run from an empty directory, so that `python -c` imports the installed pyvae, not a source tree.
    code = (
        "from pyvae import _C\n"
        "assert _C.cublaslt_version() == 0, 'a library was loaded at import'\n"
        "reason = _C.cublaslt_load('/nonexistent/libcublasLt.so.13')\n"
        "assert '/nonexistent/libcublasLt.so.13' in reason, reason\n"
        "assert _C.cublaslt_version() == 0\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr


@needs_lt_build
def test_loader_resolves_every_function_of_the_real_library():
    path = _find_library()
    if path is None:
        pytest.skip(f"no libcublasLt.so.{_C.cublaslt_header_version // 10000} on this machine "
                    f"(PYVAE_TEST_CUBLASLT_LIBRARY, nvidia wheels in sys.path, the CUDA toolkit)")
    assert _C.cublaslt_load(path) == ""
    version = _C.cublaslt_version()
    assert version // 10000 == _C.cublaslt_header_version // 10000, version
    assert _C.cublaslt_load("") == ""  # loaded once, for the process
    if not torch.cuda.is_available():
        assert "device" in _C.cublaslt_unavailable_reason()


# ---------------------------------------------------------------- GPU: numerics

@needs_gpu
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("act", list(ACTS), ids=ACT_IDS.get)
def test_forward(act, dtype, shape, bias):
    x, w, b = _params(shape, dtype, bias)
    y, aux = _require(_cublaslt.linear_fwd(x, w, b, act), dtype, "linear_fwd")
    assert aux is None and y.dtype == dtype and y.shape == (shape[2], shape[1])
    ref = ACTS[act](F.linear(x.double(), w.double(), None if b is None else b.double()))
    _assert_within(y, ACTS[act](F.linear(x, w, b)), ref, dtype, "y")


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES[:3], ids=lambda d: str(d)[6:])
def test_forward_unfused_relu_and_mask_variants_agree(dtype):
    x, w, b = _params((13, 130, 6), dtype)
    ref = torch.relu(F.linear(x.double(), w.double(), b.double()))
    same = torch.relu(F.linear(x, w, b))
    for kwargs in ({"fuse_relu": False}, {"want_aux": True}):
        y, aux = _require(_cublaslt.linear_fwd(x, w, b, 1, **kwargs), dtype, str(kwargs))
        _assert_within(y, same, ref, dtype, str(kwargs))
        if "want_aux" in kwargs and aux is not None:
            assert aux.dtype == torch.uint8 and tuple(aux.shape) == _cublaslt.aux_shape(6, 130)


@needs_gpu
def test_relu_keeps_nan_like_torch():
    # NOTE: [cuBLASLt path]: cublasLt.h does not say what its ReLU epilogue makes of NaN.
    x, w, b = _params((3, 5, 4), torch.float32)
    x[1, 0] = float("nan")
    y, _ = _require(_cublaslt.linear_fwd(x, w, b, 1), torch.float32, "linear_fwd")
    assert torch.isnan(y[1]).all(), "cuBLASLt's ReLU epilogue drops NaN: run with fuse_relu=False"
    assert not torch.isnan(y[[0, 2, 3]]).any()


@needs_gpu
def test_runs_on_the_current_stream():
    x, w, b = _params((784, 500, 37), torch.float32)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        y, _ = _require(_cublaslt.linear_fwd(x, w, b, 2), torch.float32, "linear_fwd")
        grads = _require(_cublaslt.linear_bwd(torch.ones_like(y), x, w, y, 2, True, True, True), torch.float32,
                         "linear_bwd")
    s.synchronize()
    ref = torch.tanh(F.linear(x.double(), w.double(), b.double()))
    _assert_within(y, torch.tanh(F.linear(x, w, b)), ref, torch.float32, "y on a side stream")
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


# Which gradients: all (weight GEMM with BGRADB), input only, weight only (no epilogue), bias only
# (pyvae's column sum, no GEMM).
MASKS = [(True, True, True), (True, False, False), (False, True, False), (False, False, True)]


@needs_gpu
@pytest.mark.parametrize("mask", MASKS, ids=lambda m: "".join("xwb"[i] for i in range(3) if m[i]))
@pytest.mark.parametrize("shape", SHAPES[1:5], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("act", list(ACTS), ids=ACT_IDS.get)
def test_backward(act, dtype, shape, mask):
    x, w, b = _params(shape, dtype)
    gen = torch.Generator().manual_seed(1)
    grad = torch.randn(shape[2], shape[1], generator=gen).to("cuda", dtype)
    y, _ = _require(_cublaslt.linear_fwd(x, w, b, act), dtype, "linear_fwd")
    out = _require(_cublaslt.linear_bwd(grad, x, w, y, act, *mask), dtype, "linear_bwd")

    def autograd(dt):
        leaves = [t.detach().to(dt).requires_grad_() for t in (x, w, b)]
        ACTS[act](F.linear(*leaves)).backward(grad.to(dt))
        return [t.grad for t in leaves]

    ref, same = autograd(torch.float64), autograd(dtype)
    for name, need, got, r, s in zip("xwb", mask, out, ref, same):
        if not need:
            assert got is None, name
            continue
        assert got.dtype == dtype and got.shape == r.shape, name
        _assert_within(got, s, r, dtype, f"grad_{name}")


@needs_gpu
@pytest.mark.parametrize("need_bias", [True, False], ids=["bgrad", "nobgrad"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", [(7, 1, 3), (20, 130, 9), (784, 500, 37), (40, 1007, 5)], ids=str)
def test_dgrad_through_relu_mask(shape, dtype, need_bias):
    # x -> h = x W1^T + b1 -> x2 = relu(h) (mask) -> z = x2 W2^T: dL/dh and dL/db1 from dL/dz in one GEMM.
    in1, hidden, rows = shape
    x, w1, b1 = _params((in1, hidden, rows), dtype)
    _, w2, _ = _params((hidden, 11, rows), dtype, seed=2)
    x2, aux = _require(_cublaslt.linear_fwd(x, w1, b1, 1, want_aux=True), dtype, "linear_fwd")
    if aux is None:
        # Allowed by linear_fwd's contract only where cuBLASLt's types leave the mask epilogue
        # undocumented (float64: NOTE: [cuBLASLt path]); then the layer runs without the mask, and
        # what there is to check is its output.
        assert dtype == torch.float64, f"cuBLASLt wrote no ReLU mask for a {dtype} problem {shape}"
        _assert_within(x2, torch.relu(F.linear(x, w1, b1)), torch.relu(F.linear(x.double(), w1.double(), b1.double())),
                       dtype, "x2 without a mask")
        return
    gz = torch.randn(rows, 11, generator=torch.Generator().manual_seed(3)).to("cuda", dtype)
    got = _require(_cublaslt.linear_dgrad_relu(gz, w2, x2, aux, need_bias), dtype, "linear_dgrad_relu")

    # relu' as [x2 > 0], from our own forward: equal to the mask's [h > 0] except where h rounds to 0,
    # and free of the sign flips a recomputed h could have near 0.
    def chain(dt):
        gh = (gz.to(dt) @ w2.to(dt)) * (x2 > 0)
        return gh, gh.sum(0)

    ref, same = chain(torch.float64), chain(dtype)
    _assert_within(got[0], same[0], ref[0], dtype, "grad_h")
    if need_bias:
        _assert_within(got[1], same[1], ref[1], dtype, "grad_hb")
    else:
        assert got[1] is None
