"""Shared helpers for the op tests: devices, the tolerance table, inputs, comparison with float64.

Every test compares against float64: inputs are made in the test dtype, the oracle (torch.distributions
or pyvae.reference) runs on the very same values converted to float64, and the tolerance comes from
one table keyed by the tested dtype.
"""
import contextlib
import os
import tempfile

# A private torch.compile cache per test session: inductor's on-disk cache does not key on a custom
# op's schema, so graphs compiled against an older pyvae can be replayed with stale calls.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="pyvae-tests-inductor-"))
# Layer routes by measurement (NOTE: [Measured routes] in pyvae/_tune.py) would make a test's path depend
# on the machine's load: the suite runs the cold-start routes, and tests/test_tune.py turns measuring on
# where it is what is tested. Its cache goes to a private directory, never the user's.
os.environ["PYVAE_TUNE"] = "off"
os.environ["PYVAE_CACHE_DIR"] = tempfile.mkdtemp(prefix="pyvae-tests-cache-")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

import pyvae  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and pyvae.cuda_built() else [])
HALF_DTYPES = [torch.float16, torch.bfloat16]
# CPU kernels take float32/float64 (half types are computed in float32 there and tested separately);
# CUDA kernels take all four.
DEVICE_DTYPES = [
    pytest.param(dev, dt, id=f"{dev}-{str(dt)[6:]}")
    for dev in DEVICES
    for dt in [torch.float32, torch.float64] + (HALF_DTYPES if dev == "cuda" else [])
]

# (rtol, atol) by dtype, like torch.testing's _DTYPE_PRECISIONS, loose enough for sums over ~1000
# terms of the kernels' float32 polynomial math, tight enough that a wrong term shows.
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-4),
    torch.float16: (2e-3, 2e-2),
    torch.bfloat16: (1.6e-2, 1e-1),
}

# Event shapes: 1 element, odd, the paper's 784, 1000+7; plus leading batch/sample dims.
SHAPES = [(1,), (3,), (5, 1), (2, 1007), (4, 784), (2, 3, 5)]

# (logits shape, x shape) of the (logits, x) ops: x shared over a leading sample dim, per-feature, broadcast
# middle dims, and x with more dims than the logits.
LOGITS_X_BROADCASTS = [
    ((4, 3, 7), (3, 7)),
    ((4, 3, 7), (7,)),
    ((4, 3, 7), (4, 1, 7)),
    ((2, 5, 784), (5, 784)),
    ((3, 7), (4, 3, 7)),
    ((1, 3, 1007), (2, 1, 1007)),
]

# Activations in float64 for oracles of linear_act: softplus as logaddexp(t, 0), not F.softplus, whose default
# threshold=20 returns t (and derivative 1) above 20, 2e-9 off.
EXACT_ACTIVATIONS = {
    "identity": lambda t: t,
    "relu": torch.relu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "softplus": lambda t: torch.logaddexp(t, torch.zeros_like(t)),
}

ARCHS = pyvae._C.cpu_archs()


def assert_close(actual, expected, dtype, *, scale=1.0):
    """``actual`` (any dtype/device) equals the float64 ``expected`` within TOL[dtype] * scale.

    NaNs must sit at the same places.
    """
    rtol, atol = TOL[dtype]
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    torch.testing.assert_close(actual.detach().double().cpu(), expected.detach().double().cpu(),
                               rtol=rtol * scale, atol=atol * scale, equal_nan=True)


def make(*shape, dtype=torch.float32, device="cpu", kind="normal", scale=1.0, seed=0, grad=False):
    """Deterministic random input: ``normal`` (N(0, scale^2)), ``binary`` ({0, 1}) or ``unit`` ([0, 1])."""
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        t = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    elif kind == "binary":
        t = (torch.rand(shape, generator=g, dtype=torch.float64) < 0.5).double()
    elif kind == "unit":
        t = torch.rand(shape, generator=g, dtype=torch.float64)
    else:
        raise ValueError(kind)
    return t.to(dtype=dtype, device=device).requires_grad_(grad)


def ref(*tensors):
    """The same values as float64 CPU leaves (with requires_grad where the input has it)."""
    out = tuple(None if t is None else t.detach().double().cpu().requires_grad_(t.requires_grad)
                for t in tensors)
    return out if len(out) > 1 else out[0]


def grads(out, inputs, grad_out=None):
    """d(sum(grad_out * out))/d(inputs) for the inputs that require grad (None elsewhere)."""
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    g = torch.autograd.grad(out, wanted, torch.ones_like(out) if grad_out is None else grad_out)
    it = iter(g)
    return [next(it) if (t is not None and t.requires_grad) else None for t in inputs]


def upstream(shape, seed=123):
    """A non-trivial upstream gradient (float64, CPU): catches kernels that ignore grad_out."""
    return make(*shape, dtype=torch.float64, seed=seed) if len(shape) else torch.tensor(0.7, dtype=torch.float64)


def check_op(fn, oracle, inputs, dtype, *, path="eager", scale=1.0):
    """``fn(*inputs)`` and its input gradients (under a random upstream gradient) match the float64
    ``oracle`` on the same values. Returns (out, expected, grads, expected grads)."""
    with op_path(path):
        out = fn(*inputs)
    check_path(out, path)
    assert out.dtype == dtype
    ref_inputs = [ref(t) for t in inputs]
    expected = oracle(*ref_inputs)
    assert_close(out, expected, dtype, scale=scale)
    got, want = [], []
    if any(t is not None and t.requires_grad for t in inputs):
        g = upstream(tuple(expected.shape)).to(dtype).double()  # representable in the tested dtype
        got = grads(out, inputs, g.to(dtype=out.dtype, device=out.device))
        want = grads(expected, ref_inputs, g)
        for a, e in zip(got, want):
            if a is not None:
                assert a.dtype == dtype
                assert_close(a, e, dtype, scale=scale)
    return out, expected, got, want


def assert_double_backward_raises(fn, inputs, path):
    """Gradients are first order: differentiating them again must raise, not silently give zero
    (NOTE: [No double backward]); first-order values under create_graph=True are unchanged."""
    with op_path(path):
        out = fn(*inputs).sum()
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    first = torch.autograd.grad(out, wanted, create_graph=True)
    plain = torch.autograd.grad(fn(*inputs).sum(), wanted)
    for a, b in zip(first, plain):
        assert torch.equal(a, b)
    penalty = sum((g**2).sum() for g in first)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        torch.autograd.grad(penalty, wanted)


# --------------------------------------------------------------------------- op call paths
class _Passthrough(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


PATHS = ["eager", "dispatcher"]


@contextlib.contextmanager
def op_path(path):
    """``eager``: the public functions' direct path; ``dispatcher``: forced through torch.ops.pyvae
    (an active torch-function mode disables the direct path, see NOTE: [Eager fast path])."""
    if path == "dispatcher":
        with _Passthrough():
            yield
    else:
        yield


def check_path(out, path):
    """The result really came from the path the test asked for (when it has a grad_fn)."""
    if out.grad_fn is not None:
        through_dispatcher = "pyvae" in type(out.grad_fn).__name__
        assert through_dispatcher == (path == "dispatcher"), type(out.grad_fn).__name__


# ------------------------------------------------------------------------------ CPU builds
@contextlib.contextmanager
def cpu_arch(name):
    """Runs the block with CPU kernel build ``name``, restoring the one in use afterwards."""
    original = pyvae._C.cpu_arch()
    try:
        pyvae._C.set_cpu_arch(name)
        assert pyvae._C.cpu_arch() == name
        yield
    finally:
        pyvae._C.set_cpu_arch(original)


def per_arch(fn):
    """{arch: fn()} for every CPU kernel build this processor supports."""
    out = {}
    for name in ARCHS:
        with cpu_arch(name):
            out[name] = fn()
    return out


def assert_archs_agree(results, expected, dtype):
    """Every build matches the float64 oracle, and the builds match each other to a few ulps."""
    first = results[ARCHS[-1]]  # the baseline build
    for name, res in results.items():
        for r, e, f in zip(res, expected, first):
            assert_close(r, e, dtype)
            eps = torch.finfo(dtype).eps  # a few ulps of the result's scale
            torch.testing.assert_close(r, f, rtol=8 * eps, atol=8 * eps * f.abs().max().item(), equal_nan=True,
                                       msg=lambda m: f"{name} vs {ARCHS[-1]}: {m}")


@pytest.fixture
def tuning(tmp_path, monkeypatch):
    """Measuring routes on (PYVAE_TUNE=auto), into a private cache, never judged busy or disturbed; this process's
    layer and row-op routes forgotten before and after (NOTE: [Measured routes] in pyvae/_tune.py)."""
    from pyvae import _tune
    from pyvae.ops import forget_routes

    monkeypatch.setenv("PYVAE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("PYVAE_TUNE", "auto")
    monkeypatch.setattr(_tune, "_busy", lambda: False)
    monkeypatch.setattr(_tune, "_measure_undisturbed",
                        lambda c, outcome=None, **kw: (_tune.measure(c, **kw, **({} if outcome is None
                                                                             else {"outcome": outcome})), False))
    _tune.reset_for_tests()
    forget_routes()
    yield tmp_path
    _tune.reset_for_tests()
    forget_routes()


@pytest.fixture(autouse=True)
def _threads_unchanged():
    """torch's thread count is process-wide: a test that changes it gets it restored, so that no later
    test runs with another count than the suite started with (the one-thread layer route is measured
    only where torch runs more than one)."""
    n = torch.get_num_threads()
    yield
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)



def pytest_configure(config):
    config.addinivalue_line("markers", "compile: runs torch.compile (slow: tens of seconds on 2 cores)")
