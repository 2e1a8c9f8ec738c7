"""Row ops routed by measurement (NOTE: [Row op routes] in pyvae/ops/_rowwise.py): the measured winner
runs, torch's route computes the op to rounding (extreme inputs included) and raises pyvae's errors,
large calls and ``fused_only`` always run the kernel, and PYVAE_TUNE=off measures nothing."""
import importlib

import pytest
import torch

import pyvae
from pyvae import _tune, reference
from pyvae.ops import forget_routes, fused_only

_rowwise = importlib.import_module("pyvae.ops._rowwise")

TOL = {torch.float32: dict(rtol=2e-5, atol=2e-4), torch.float64: dict(rtol=1e-12, atol=1e-10)}




def _winner(monkeypatch, winner):
    calls = []

    def measure(candidates, **kw):
        for fn in candidates.values():
            fn()
        calls.append(sorted(candidates))
        return {n: (0.001 if n == winner else 0.002) for n in candidates}

    monkeypatch.setattr(_tune, "measure", measure)
    return calls


def _cases(dtype):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    big = torch.tensor([1e4, -1e4, 30.0, -30.0, 0.0], dtype=dtype)
    return {
        "kl": (pyvae.gaussian_kl, [r(7, 5), r(7, 5)]),
        "kl_prior": (pyvae.gaussian_kl, [r(7, 5), r(7, 5), r(5), r(7, 5)]),
        "kl_extreme": (pyvae.gaussian_kl, [r(3, 5), torch.tensor([30.0, -30.0, 0.0, 20.0, -20.0], dtype=dtype).expand(3, 5).clone()]),
        "bernoulli": (pyvae.bernoulli_log_prob, [r(6, 11) * 3, (torch.rand(6, 11, generator=g) < 0.5).to(dtype)]),
        "bernoulli_extreme": (pyvae.bernoulli_log_prob, [big.expand(4, 5).clone(), torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0], dtype=dtype).expand(4, 5).clone()]),
        "bernoulli_broadcast": (pyvae.bernoulli_log_prob, [r(2, 6, 11), (torch.rand(6, 11, generator=g) < 0.5).to(dtype)]),
        "gaussian": (pyvae.gaussian_log_prob, [r(6, 9), r(6, 9), r(6, 9)]),
        "gaussian_extreme": (pyvae.gaussian_log_prob, [r(2, 5), r(2, 5), torch.tensor([30.0, -30.0, 0.0, 20.0, -20.0], dtype=dtype).expand(2, 5).clone()]),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", list(_cases(torch.float32)))
def test_torch_route_computes_the_op(tuning, monkeypatch, dtype, case):
    fn, args = _cases(dtype)[case]
    results = {}
    for winner in ("torch", "pyvae"):
        forget_routes()
        _tune.reset_for_tests()
        monkeypatch.setenv("PYVAE_CACHE_DIR", str(tuning / winner))
        calls = _winner(monkeypatch, winner)
        leaves = [a.clone().requires_grad_() for a in args]
        out = fn(*leaves)
        assert calls == [["pyvae", "torch"]], calls  # measured once, both candidates
        grads = torch.autograd.grad(out, leaves, torch.linspace(-1, 1, out.numel(), dtype=dtype).view(out.shape))
        # the route ran is the one chosen: torch's ops leave torch's autograd nodes, the kernel pyvae's
        assert ("_Fn" in type(out.grad_fn).__name__) == (winner == "pyvae"), type(out.grad_fn).__name__
        results[winner] = (out, grads)
    (o_t, g_t), (o_p, g_p) = results["torch"], results["pyvae"]
    assert torch.isfinite(o_t).all() and all(torch.isfinite(g).all() for g in g_t)
    torch.testing.assert_close(o_t, o_p, **TOL[dtype])
    for a, b in zip(g_t, g_p):
        torch.testing.assert_close(a, b, **TOL[dtype])


def test_torch_route_raises_pyvae_errors(tuning, monkeypatch):
    _winner(monkeypatch, "torch")
    mu, lv = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    pyvae.gaussian_kl(mu, lv)  # the route of this shape is now torch's
    with pytest.raises(TypeError, match="pyvae.gaussian_kl: logvar has dtype"):
        pyvae.gaussian_kl(mu, torch.randn(4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="pyvae.bernoulli_log_prob"):  # x does not broadcast
        pyvae.bernoulli_log_prob(torch.randn(4, 3), torch.randn(4, 5))


def test_large_calls_and_fused_only_run_the_kernel(tuning, monkeypatch):
    calls = _winner(monkeypatch, "torch")
    n = _rowwise._MEASURE_MAX // 64 + 1
    logits = torch.randn(n, 64, requires_grad=True)
    out = pyvae.bernoulli_log_prob(logits, torch.zeros(n, 64))
    assert calls == [] and "_Fn" in type(out.grad_fn).__name__
    mu, lv = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    assert "_Fn" not in type(pyvae.gaussian_kl(mu, lv).grad_fn).__name__
    with fused_only():
        assert "_Fn" in type(pyvae.gaussian_kl(mu, lv).grad_fn).__name__


def test_off_measures_nothing(tuning, monkeypatch):
    monkeypatch.setenv("PYVAE_TUNE", "off")
    _tune.reset_for_tests()
    calls = _winner(monkeypatch, "torch")
    mu, lv = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    out = pyvae.gaussian_kl(mu, lv)
    assert calls == [] and "_Fn" in type(out.grad_fn).__name__
    torch.testing.assert_close(out, reference.gaussian_kl(mu, lv))


def test_a_failing_candidate_falls_back_to_the_kernel(tuning, monkeypatch):
    def measure(candidates, **kw):
        raise RuntimeError("torch's route cannot run this")

    monkeypatch.setattr(_tune, "measure", measure)
    mu, lv = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    out = pyvae.gaussian_kl(mu, lv)
    assert "_Fn" in type(out.grad_fn).__name__
    torch.testing.assert_close(out, reference.gaussian_kl(mu, lv))
