"""pyvae under torch.jit.trace and torch's dispatch modes (torch.compile and torch.export: test_compile.py).

torch.jit.trace records the registered ops (pyvae::<op>), computes what eager computes, survives
torch.jit.save/load, and a traced draw takes a fresh seed on every call (NOTE: [Eager fast path] in
pyvae/ops/_registry.py, NOTE: [Seeds under torch.compile] in pyvae/ops/reparameterize.py). Under
FakeTensorMode a VAE step runs on shapes alone; under a real-tensor mode it draws what eager draws."""
import io
import warnings

import pytest
import torch

import pyvae
from pyvae import nn as pnn


def _trace(module, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's own warnings about Python values
        return torch.jit.trace(module, args, check_trace=False)


def _reload(traced):
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch 2.13 deprecates torch.jit.save/load for torch.export
        torch.jit.save(traced, buf)
        buf.seek(0)
        return torch.jit.load(buf)


class _Fn(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


class _Elbo(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model  # (a submodule: its parameters are the trace's, not constants)

    def forward(self, x):
        return self.model(x)[0]


def _cases():
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(6, 784, generator=g) < 0.5).float()
    logits, mu, lv = torch.randn(6, 784, generator=g), torch.randn(6, 20, generator=g), torch.randn(6, 20, generator=g)
    return {
        "linear_act": (pnn.FusedLinear(784, 50, "tanh"), (x,), "pyvae::linear_act"),
        "gaussian_head": (pnn.GaussianHead(784, 20), (x,), "pyvae::linear_act"),
        "gaussian_kl": (_Fn(pyvae.gaussian_kl), (mu, lv), "pyvae::gaussian_kl"),
        "bernoulli_log_prob": (_Fn(pyvae.bernoulli_log_prob), (logits, x), "pyvae::bernoulli_log_prob"),
        "bernoulli_elbo": (_Fn(pyvae.bernoulli_elbo), (logits, x, mu, lv), "pyvae::bernoulli_elbo"),
    }


@pytest.mark.parametrize("case", list(_cases()))
def test_trace_records_the_op_and_matches_eager(case):
    """Before, every op raised under torch.jit.trace (the direct path read traced sizes as tensors:
    "'Tensor' object has no attribute 'bit_length'", "operand a has tensor(4) rows")."""
    module, args, op = _cases()[case]
    traced = _trace(module, *args)
    assert op in str(traced.inlined_graph), traced.inlined_graph
    want = module(*args)
    for fn in (traced, _reload(traced)):
        got = fn(*args)
        for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_traced_vae_draws_a_fresh_seed_per_call():
    """A traced VAE.forward draws its eps seed inside the graph: each call a new draw (a host seed would have
    been frozen into the trace: every call the same z), the same one eager takes after the same
    torch.manual_seed, after torch.jit.save/load too; and it takes another batch size."""
    torch.manual_seed(0)
    model = pyvae.VAE(784, 20, 64)
    x = (torch.rand(16, 784) < 0.5).float()
    step = _Elbo(model)
    traced = _trace(step, x)
    assert "pyvae::reparameterize" in str(traced.inlined_graph)
    assert not torch.equal(traced(x), traced(x))
    torch.manual_seed(5)
    want = step(x)
    for fn in (traced, _reload(traced)):
        torch.manual_seed(5)
        torch.testing.assert_close(fn(x), want, rtol=1e-5, atol=1e-3)
    assert traced(x[:7]).shape == (7,)


def test_vae_step_runs_under_fake_tensors_and_modes():
    """FakeTensorMode (shape and memory planning) has no value to read: the draw's seed stays a tensor under
    any dispatch mode, where it used to be read on the host (DataDependentOutputException). Under a
    real-tensor mode the draw is eager's for the same torch.manual_seed."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model = pyvae.VAE(784, 20, 64)
    x = (torch.rand(8, 784) < 0.5).float()
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        elbo, _, kl = model(mode.from_tensor(x))
        elbo.sum().backward()
        assert elbo.shape == kl.shape == (8,)
    torch.manual_seed(3)
    want = model(x)[0]
    torch.manual_seed(3)
    with Passthrough():
        got = model(x)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-3)
