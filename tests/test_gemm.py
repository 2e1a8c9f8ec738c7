"""pyvae._gemm: the CPU GEMM routing of the linear layers (NOTE: [CPU GEMM backend])."""
import os
import subprocess
import sys

import pytest
import torch

import pyvae._gemm as G

needs_onednn = pytest.mark.skipif(not G.onednn_enabled(), reason="torch build without a usable oneDNN linear")


def _rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=torch.float64).to(dtype)


@needs_onednn
@pytest.mark.parametrize("rows,fin,fout", [(1, 1, 1), (7, 20, 500), (100, 784, 500), (33, 500, 40), (64, 63, 64),
                                           (64, 64, 63), (5, 500, 784)])
def test_products_match_float64(rows, fin, fout):
    x, w, b, g = _rand(rows, fin), _rand(fout, fin), _rand(fout), _rand(rows, fout)
    xd, wd, bd, gd = (t.double() for t in (x, w, b, g))
    with G.override("onednn", min_flops=0):
        assert G.backend(x, 1.0) == "onednn"
        got = [G.linear(x, w, b), G.linear(x, w), G.grad_input(g, w), G.grad_weight(g, x)]
    want = [xd @ wd.t() + bd, xd @ wd.t(), gd @ wd, gd.t() @ xd]
    for a, r in zip(got, want):
        assert a.dtype == torch.float32 and a.shape == r.shape and a.is_contiguous()
        torch.testing.assert_close(a.double(), r, rtol=1e-5, atol=1e-4 * max(1.0, rows**0.5))


@needs_onednn
def test_strided_inputs():
    # The decoder's input is the mu half of the encoder head's output: a column slice (strides (40, 1)).
    h, w, g = _rand(50, 40), _rand(500, 20), _rand(50, 500)
    mu = h[:, :20]
    with G.override("onednn", min_flops=0):
        torch.testing.assert_close(G.linear(mu, w), mu @ w.t(), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(G.grad_weight(g, mu), g.t() @ mu, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(G.grad_input(g, w), g @ w, rtol=1e-5, atol=1e-4)


def test_routing_rules():
    x = torch.randn(4, 3)
    with G.override("torch"):
        assert G.backend(x) == "torch"
    if G.onednn_enabled():
        with G.override("onednn"):
            assert G.backend(x) == "onednn"  # unbounded flops
            assert G.backend(x, 1e3) == "torch"  # tiny products stay on torch's mm (per-call cost)
            assert G.backend(x.double()) == "torch"  # no float64 matmul in oneDNN
            assert G.backend(x.bfloat16()) == "torch"  # torch's bf16 mm is oneDNN already
    with G.override("onednn", min_flops=0) if G.onednn_enabled() else G.override("torch"):
        empty = torch.empty(0, 3)
        assert G.linear(empty, torch.randn(2, 3)).shape == (0, 2)
        assert torch.equal(G.grad_weight(torch.empty(0, 2), empty), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="backend"):
        G.override("mkl")


def test_env_var_is_validated(tmp_path):
    # Run outside the checkout: there the source tree's pyvae/ (no compiled _C) would shadow the install.
    code = "import pyvae._gemm as G; G.onednn_enabled()"
    env = dict(os.environ, PYVAE_CPU_GEMM="fast")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode != 0 and "PYVAE_CPU_GEMM must be" in r.stderr, r.stderr
    env["PYVAE_CPU_GEMM"] = "torch"
    code = "import torch, pyvae._gemm as G; assert G.backend(torch.randn(2, 2)) == 'torch'"
    assert subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path).returncode == 0


_FIRST_GEMM_CHILD = r"""
import sys
import torch
import pyvae._gemm as G
from pyvae.nn import FusedLinear
from torch._subclasses.fake_tensor import FakeTensorMode

where = sys.argv[1]
if where == "autocast":  # the first GEMM of a bf16-mixed training run: a fused layer under CPU autocast
    layer = FusedLinear(784, 500, "tanh")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(torch.rand(100, 784)).float().sum().backward()
elif where == "fake":  # a first GEMM decision taken while a dispatch mode (fake tensors) is active
    with FakeTensorMode():
        G.onednn_enabled()
elif where == "float64-default":  # float32 layers in a program whose default dtype is float64
    torch.set_default_dtype(torch.float64)
    FusedLinear(784, 500, "tanh", dtype=torch.float32)(torch.rand(100, 784, dtype=torch.float32)).sum().backward()
after = G.onednn_enabled()
G._state.update(onednn=None, enabled=None)  # probe again, outside any mode or autocast
print(after, G.onednn_enabled())
"""


@needs_onednn
@pytest.mark.parametrize("where", ["autocast", "fake", "float64-default"])
def test_first_gemm_context_does_not_turn_onednn_off(tmp_path, where):
    # The probe compares oneDNN's products with torch's; run under CPU autocast, torch's came out in bfloat16
    # and the comparison failed, so a process whose first GEMM ran under autocast (every `pyvae train
    # --precision bf16-mixed`) ran all its layers without oneDNN; under fake tensors, or with float64 as the
    # default dtype (the probe's operands were made in it), it failed too. A fresh process each: the decision
    # is taken once per process.
    r = subprocess.run([sys.executable, "-c", _FIRST_GEMM_CHILD, where], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "True"], r.stdout


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act", ["relu", "tanh", "sigmoid"])
def test_nan_stays_nan_on_every_route(dtype, act):
    # oneDNN's relu post-op is max(y, 0), which turns NaN into 0; torch's relu and pyvae's epilogue keep it.
    # pyvae.ops documents that a NaN input gives NaN in the rows it reaches, whatever route a layer takes.
    from pyvae.ops.linear_act import ROUTES, run_route

    w, b = _rand(300, 300, dtype=dtype) / 17, _rand(300, dtype=dtype)
    x = _rand(100, 300, dtype=dtype)  # 18 MFLOP: the oneDNN product (and its post-op where one exists)
    x[0, 0] = float("nan")
    for route in ROUTES:
        for grad in (False, True):
            with torch.set_grad_enabled(grad):
                y = run_route(route, x.requires_grad_(grad), w, b, act)
            assert torch.isnan(y[0]).all(), (route, grad)
            assert not torch.isnan(y[1:]).any(), (route, grad)


def test_run_route_under_autocast_takes_mixed_dtypes():
    # Under autocast a layer's input is often the previous layer's bfloat16 output while its weight is float32:
    # linear_act takes that, and run_route refused it (TypeError: all inputs must have the same dtype). Bad
    # shapes are still refused, naming the argument.
    from pyvae.ops.linear_act import ROUTES, linear_act, run_route

    x, w, b = _rand(16, 30, dtype=torch.bfloat16), _rand(20, 30) / 30 ** 0.5, _rand(20) / 4  # tanh unsaturated
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = linear_act(x, w, b, "tanh")
        for route in ROUTES:
            y = run_route(route, x, w, b, "tanh")
            assert y.dtype == torch.bfloat16
            torch.testing.assert_close(y, want, rtol=2e-2, atol=2e-2)
        with pytest.raises(ValueError, match="weight"):
            run_route("pyvae", x, _rand(20, 31), b, "tanh")
        with pytest.raises(TypeError, match="x must be a torch.Tensor"):
            run_route("pyvae", x.tolist(), w, b, "tanh")


@needs_onednn
@pytest.mark.parametrize("dtype,fin,act,products", [(torch.float32, 500, "identity", 3), (torch.float32, 20, "tanh", 3),
                                                    (torch.float32, 500, "tanh", 3), (torch.bfloat16, 500, "tanh", 1),
                                                    (torch.bfloat16, 20, "tanh", 1)])
def test_onednn_gets_dense_operands(monkeypatch, dtype, fin, act, products):
    # NOTE: [Dense oneDNN operands]: a layer fed a column slice (a VAE's mu = h[:, :Z]) gave oneDNN operands it
    # runs on a slow generic path (a weight gradient took 16 s instead of 8.5 ms on the Intel Xeon of stop 21).
    # Every operand oneDNN's linear receives is row-major or the transpose of a row-major tensor, and the
    # layer still computes the same values. (bfloat16: only the forward's GEMM with its tanh post-op is oneDNN's.)
    from pyvae.ops.linear_act import run_route

    seen = []
    real = torch.ops.mkldnn._linear_pointwise

    def spy(*args):
        seen.append([(tuple(t.shape), t.stride()) for t in args[:2]])
        for t in args[:2]:
            assert t.is_contiguous() or t.t().is_contiguous(), (t.shape, t.stride())
        return real(*args)

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", spy)
    rows, fout = 512, 784
    h = _rand(rows, 2 * fin, dtype=dtype)
    x = h[:, :fin].requires_grad_()  # strides (2 * fin, 1)
    w, b, g = _rand(fout, fin, dtype=dtype) / fin ** 0.5, _rand(fout, dtype=dtype), _rand(rows, fout, dtype=dtype)
    leaves = [x, w.requires_grad_(), b.requires_grad_()]
    y = run_route("pyvae", *leaves, act)
    got = [y, *torch.autograd.grad(y, leaves, g)]
    assert len(seen) == products, seen  # the products that ran on oneDNN
    xd, wd, bd, gd = (t.detach().double().requires_grad_() for t in (x, w, b, g))
    ref = F_ACT[act](xd @ wd.t() + bd)
    want = [ref, *torch.autograd.grad(ref, (xd, wd, bd), gd)]
    for a, r in zip(got, want):
        scale = r.detach().abs().max().item()  # bfloat16: a few roundings of 2**-8 relative to the values' scale
        tol = dict(rtol=1e-4, atol=1e-5 * scale) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2 * scale)
        torch.testing.assert_close(a.double(), r.detach(), **tol)


F_ACT = {"identity": lambda t: t, "tanh": torch.tanh}


def test_dense_keeps_dense_layouts_and_copies_others():
    # NOTE: [Dense oneDNN operands]: _dense hands back the tensor itself when it or its transpose is contiguous
    # (no copy on the common path; its strides are read, no view is built) and an equal dense copy otherwise,
    # size-1 and size-0 dimensions (whose strides mean nothing) and expanded (stride-0) tensors included.
    import itertools

    n = 0
    for n0, n1 in itertools.product([0, 1, 2, 3, 5], [1, 2, 4]):
        base = torch.arange(64 * max(n0, 1) * n1, dtype=torch.float32).reshape(2 * max(n0, 1), 32 * n1)
        for v in (base[:n0, :n1], base[:n0, :n1].t(), base[::2, :n1][:n0], base.t()[:n1, :n0],
                  torch.randn(n0, n1), torch.randn(n1, n0).t(), base[:n0, ::2][:, :n1],
                  torch.randn(1, n1).expand(n0, n1), torch.randn(n0, 1).expand(n0, n1)):
            d = G._dense(v)
            assert (d is v) == (v.is_contiguous() or v.t().is_contiguous()), (v.shape, v.stride())
            assert (d.is_contiguous() or d.t().is_contiguous()) and torch.equal(d, v)
            n += 1
    assert n == 135
