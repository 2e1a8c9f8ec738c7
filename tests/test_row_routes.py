"""Row ops routed by measurement (NOTE: [Row op routes] in pyvae/ops/_rowwise.py): the measured winner
runs, torch's route computes the op to rounding (extreme inputs included) and raises pyvae's errors,
large calls and ``fused_only`` always run the kernel, and PYVAE_TUNE=off measures nothing."""
import importlib
import math

import pytest
import torch

import pyvae
from pyvae import _tune, reference
from pyvae.ops import forget_routes, fused_only

_rowwise = importlib.import_module("pyvae.ops._rowwise")

TOL = {torch.float32: dict(rtol=2e-5, atol=2e-4), torch.float64: dict(rtol=1e-12, atol=1e-10)}


def _kernel_ran(out):
    """Whether ``out`` came from pyvae's kernel (an autograd.Function node: the general eager path's or NOTE:
    [Lean row calls]'s) rather than torch's ops (torch's own nodes)."""
    return type(out.grad_fn).__name__ in ("_FnBackward", "_LeanFnBackward")


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
        assert _kernel_ran(out) == (winner == "pyvae"), type(out.grad_fn).__name__
        results[winner] = (out, grads)
    (o_t, g_t), (o_p, g_p) = results["torch"], results["pyvae"]
    assert torch.isfinite(o_t).all() and all(torch.isfinite(g).all() for g in g_t)
    torch.testing.assert_close(o_t, o_p, **TOL[dtype])
    for a, b in zip(g_t, g_p):
        torch.testing.assert_close(a, b, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", ["bernoulli", "kl", "gaussian"])
def test_both_routes_give_the_limits_at_infinite_inputs(tuning, monkeypatch, dtype, case):
    """Where torch's formulas give NaN at an input whose value or limit exists (logits of +-inf; logvar =
    +inf; x = mean at a logvar whose e^-logvar overflows), the torch route hands the call to the kernel, so
    both routes give it (NOTE: [Infinite inputs] in csrc/ops/bernoulli.h, NOTE: [Tiny variances] in
    csrc/ops/gaussian_log_prob.h): routes differ in speed, never in results."""
    inf = math.inf
    if case == "bernoulli":
        fn, args = pyvae.bernoulli_log_prob, [torch.tensor([[inf, 2.0], [-inf, 1.0], [inf, 0.0]], dtype=dtype),
                                              torch.tensor([[1.0, 1.0], [0.0, 0.0], [0.0, 1.0]], dtype=dtype)]
        want = [reference.bernoulli_log_prob(torch.tensor([[2.0]]), torch.tensor([[1.0]])).item(),
                reference.bernoulli_log_prob(torch.tensor([[1.0]]), torch.tensor([[0.0]])).item(), -inf]
    elif case == "kl":
        fn, args = pyvae.gaussian_kl, [torch.tensor([[0.5, 1.0], [0.0, 0.0]], dtype=dtype),
                                       torch.tensor([[inf, 0.0], [-inf, 0.0]], dtype=dtype)]
        want = [inf, inf]
    else:
        # the first row: torch's -inf, not NaN (e^-lv overflows before d^2 scales it down), against a finite value
        d, lv = (1e-3, -89.0) if dtype == torch.float32 else (1e-160, -710.0)
        fn, args = pyvae.gaussian_log_prob, [torch.tensor([[0.0, d], [0.0, 0.0]], dtype=dtype),
                                             torch.zeros(2, 2, dtype=dtype),
                                             torch.tensor([[0.0, lv], [0.0, 0.0]], dtype=dtype)]
        quad = math.exp(2 * math.log(float(torch.tensor(d, dtype=dtype))) - lv)
        want = [-0.5 * (2 * math.log(2 * math.pi) + lv + quad), -math.log(2 * math.pi)]
    assert not torch.isfinite(reference.__dict__[fn.__name__](*args)).all()  # what torch's ops alone give
    for winner in ("torch", "pyvae"):
        forget_routes()
        _tune.reset_for_tests()
        monkeypatch.setenv("PYVAE_CACHE_DIR", str(tuning / winner))
        calls = _winner(monkeypatch, winner)
        out = fn(*[a.clone().requires_grad_() for a in args])
        assert calls == [["pyvae", "torch"]], calls
        torch.testing.assert_close(out.detach(), torch.tensor(want, dtype=dtype), rtol=1e-6, atol=0)
        # the same call finite runs the winner (torch's ops on the torch route)
        out = fn(*[torch.ones_like(a).requires_grad_() for a in args])
        assert _kernel_ran(out) == (winner == "pyvae")


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
    assert calls == [] and _kernel_ran(out)
    mu, lv = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    assert not _kernel_ran(pyvae.gaussian_kl(mu, lv))
    with fused_only():
        assert _kernel_ran(pyvae.gaussian_kl(mu, lv))


def test_off_measures_nothing(tuning, monkeypatch):
    monkeypatch.setenv("PYVAE_TUNE", "off")
    _tune.reset_for_tests()
    calls = _winner(monkeypatch, "torch")
    mu, lv = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    out = pyvae.gaussian_kl(mu, lv)
    assert calls == [] and _kernel_ran(out)
    torch.testing.assert_close(out, reference.gaussian_kl(mu, lv))


def test_a_failing_candidate_falls_back_to_the_kernel(tuning, monkeypatch):
    def measure(candidates, **kw):
        raise RuntimeError("torch's route cannot run this")

    monkeypatch.setattr(_tune, "measure", measure)
    mu, lv = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    out = pyvae.gaussian_kl(mu, lv)
    assert _kernel_ran(out)
    torch.testing.assert_close(out, reference.gaussian_kl(mu, lv))


# ----------------------------------------------------------------- NOTE: [Lean row calls]
def _lean_cases(dtype):
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    bits = lambda *s: (torch.rand(*s, generator=g) < 0.5).to(dtype)  # noqa: E731
    return {
        "kl": (pyvae.gaussian_kl, [r(9, 5), r(9, 5) * 3], (0, 1)),
        "kl_prior": (pyvae.gaussian_kl, [r(9, 5), r(9, 5), r(9, 5), r(9, 5)], (0, 1, 2, 3)),
        "kl_logvar_only": (pyvae.gaussian_kl, [r(2, 9, 5), r(2, 9, 5)], (1,)),
        "bernoulli": (pyvae.bernoulli_log_prob, [r(6, 11) * 4, bits(6, 11)], (0,)),
        "bernoulli_1d": (pyvae.bernoulli_log_prob, [r(11) * 4, bits(11)], (0,)),
        "cbernoulli": (pyvae.continuous_bernoulli_log_prob, [r(6, 11) * 4, torch.rand(6, 11, generator=g, dtype=dtype)],
                       (0,)),
        "gaussian": (pyvae.gaussian_log_prob, [r(6, 9), r(6, 9), r(6, 9)], (1, 2)),
    }


def _run(fn, args, need, upstream):
    leaves = [a.clone().requires_grad_(i in need) for i, a in enumerate(args)]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, [leaves[i] for i in need], upstream(out))
    return out, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", list(_lean_cases(torch.float32)))
@pytest.mark.parametrize("upstream", ["dense", "expanded"])
def test_lean_calls_match_the_general_path_bit_for_bit(dtype, case, upstream, monkeypatch):
    """The lean path runs for same-shape contiguous inputs and gives exactly the general path's values and
    gradients, for a dense upstream gradient and an expanded one (``out.sum().backward()``'s, stride 0)."""
    monkeypatch.setenv("PYVAE_TUNE", "off")  # the kernel route, without measuring
    _tune.reset_for_tests()
    forget_routes()
    fn, args, need = _lean_cases(dtype)[case]
    up = ((lambda o: torch.linspace(-2, 1, o.numel(), dtype=dtype).view(o.shape)) if upstream == "dense"
          else (lambda o: torch.tensor(0.75, dtype=dtype).expand(o.shape)))
    lean_out, lean_grads = _run(fn, args, need, up)
    assert type(lean_out.grad_fn).__name__ == "_LeanFnBackward"
    monkeypatch.setattr(_rowwise._LeanRow, "eligible", staticmethod(lambda tensors: False))
    forget_routes()
    out, grads = _run(fn, args, need, up)
    assert type(out.grad_fn).__name__ == "_FnBackward"  # the general path this time
    assert torch.equal(lean_out, out)
    for a, b in zip(lean_grads, grads):
        assert torch.equal(a, b)
    with torch.no_grad():  # the lean forward without autograd
        forget_routes()
        monkeypatch.undo()
        monkeypatch.setenv("PYVAE_TUNE", "off")
        _tune.reset_for_tests()
        assert torch.equal(fn(*args), out.detach())


def test_lean_calls_take_strided_views_but_not_broadcasts(monkeypatch):
    """Strided views (GaussianHead's mu and logvar are column slices of one output) take the lean path,
    copied for the kernel, with the general path's exact values and gradients; broadcasts do not take it."""
    monkeypatch.setenv("PYVAE_TUNE", "off")
    _tune.reset_for_tests()
    forget_routes()
    h = torch.randn(8, 10, requires_grad=True)

    def kl_of_views():
        out = pyvae.gaussian_kl(h[:, :5], h[:, 5:])
        return out, torch.autograd.grad(out, h, torch.linspace(-1, 1, 8))[0]

    out, grad = kl_of_views()
    assert type(out.grad_fn).__name__ == "_LeanFnBackward"
    monkeypatch.setattr(_rowwise._LeanRow, "eligible", staticmethod(lambda tensors: False))
    forget_routes()
    out_ref, grad_ref = kl_of_views()
    assert type(out_ref.grad_fn).__name__ == "_FnBackward"
    assert torch.equal(out, out_ref) and torch.equal(grad, grad_ref)
    monkeypatch.undo()
    monkeypatch.setenv("PYVAE_TUNE", "off")
    _tune.reset_for_tests()
    forget_routes()
    mu, lv1 = torch.randn(8, 4, requires_grad=True), torch.randn(4, requires_grad=True)  # a broadcast
    assert type(pyvae.gaussian_kl(mu, lv1).grad_fn).__name__ == "_FnBackward"
    torch.testing.assert_close(pyvae.gaussian_kl(mu, lv1), reference.gaussian_kl(mu, lv1))


def test_lean_calls_refuse_double_backward_and_see_inplace_changes(monkeypatch):
    monkeypatch.setenv("PYVAE_TUNE", "off")
    _tune.reset_for_tests()
    forget_routes()
    mu, lv = torch.randn(5, 3, requires_grad=True), torch.randn(5, 3, requires_grad=True)
    h = torch.randn(5, 6, requires_grad=True)
    for args, wrt in (((mu, lv), mu), ((h[:, :3], h[:, 3:]), h)):  # saved inputs, and saved copies of views
        out = pyvae.gaussian_kl(*args)
        assert type(out.grad_fn).__name__ == "_LeanFnBackward"
        (g,) = torch.autograd.grad(out.sum(), wrt, create_graph=True)
        with pytest.raises(RuntimeError, match="double backward is not supported"):
            g.sum().backward()
    a = torch.randn(5, 3, requires_grad=True)
    b = a * 1.0
    out = pyvae.gaussian_kl(b, lv)
    b.add_(1.0)  # modifies a saved input: autograd must notice
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_per_shape_state_is_bounded(monkeypatch):
    """Ragged batches (a new shape per call) must not grow the per-process route and plan tables without
    bound: past the bound they start over, and calls still compute the op."""
    monkeypatch.setenv("PYVAE_TUNE", "off")
    _tune.reset_for_tests()
    forget_routes()
    monkeypatch.setattr(_rowwise, "_KEYS_MAX", 8)
    rp = importlib.import_module("pyvae.ops.reparameterize")
    monkeypatch.setattr(rp, "_LEAN_MAX", 8)
    for rows in range(1, 30):
        mu, lv = torch.randn(rows, 3, requires_grad=True), torch.randn(rows, 3, requires_grad=True)
        torch.testing.assert_close(pyvae.gaussian_kl(mu, lv), reference.gaussian_kl(mu, lv))
        pyvae.reparameterize(mu, lv).sum().backward()
        assert len(_rowwise._ROW_ROUTES) <= 8 and len(rp._LEAN) <= 8
