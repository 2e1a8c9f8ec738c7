"""pyvae.reparameterize: z = mu + exp(logvar / 2) * eps with in-kernel Philox normals.

eps is not torch.randn's, so values are checked against the formula with the op's own eps (read
back by a draw with mu = 0, logvar = 0 from the same seed), and the distribution statistically.
"""
import importlib
import math

import pytest
import torch

import pyvae
from conftest import (ARCHS, DEVICES, DEVICE_DTYPES, HALF_DTYPES, PATHS, SHAPES, assert_close,
                      assert_double_backward_raises, check_path, cpu_arch, grads, make, op_path)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def eps_of(shape, seed, samples=None, device="cpu"):
    """The standard normals behind a draw from generator seed ``seed`` (float32, exact)."""
    zeros = torch.zeros(shape, device=device)
    return pyvae.reparameterize(zeros, zeros, samples=samples, generator=_gen(seed))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("samples", [None, 3])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_formula_and_gradients(device, dtype, shape, samples, path):
    mu = make(*shape, dtype=dtype, device=device, seed=1, grad=True)
    lv = make(*shape, dtype=dtype, device=device, seed=2, grad=True)
    with op_path(path):
        z = pyvae.reparameterize(mu, lv, samples=samples, generator=_gen(7))
    check_path(z, path)
    assert z.dtype == dtype and z.shape == ((samples,) if samples else ()) + shape
    eps = eps_of(shape, 7, samples, device).double().cpu()
    mu64, lv64 = mu.detach().double().cpu(), lv.detach().double().cpu()
    assert_close(z, mu64 + (0.5 * lv64).exp() * eps, dtype)
    g = make(*z.shape, dtype=torch.float64, seed=3).to(dtype)
    g_mu, g_lv = grads(z, [mu, lv], g.to(device))
    g = g.double()
    sum_samples = (lambda t: t.sum(0)) if samples else (lambda t: t)
    assert_close(g_mu, sum_samples(g), dtype)
    assert_close(g_lv, sum_samples(g * 0.5 * (0.5 * lv64).exp() * eps), dtype)


def test_broadcast_mu_and_logvar():
    mu = make(5, 1, 7, dtype=torch.float64, seed=1, grad=True)
    lv = make(7, dtype=torch.float64, seed=2, grad=True)  # one variance per feature
    z = pyvae.reparameterize(mu, lv, samples=2, generator=_gen(3))
    assert z.shape == (2, 5, 1, 7)
    eps = eps_of((5, 1, 7), 3, 2).double()
    assert_close(z, mu.detach() + (0.5 * lv.detach()).exp() * eps, torch.float64)
    g_mu, g_lv = grads(z, [mu, lv])
    assert_close(g_mu, torch.full_like(mu, 2.0), torch.float64)
    assert_close(g_lv, (0.5 * (0.5 * lv.detach()).exp() * eps).sum((0, 1, 2)), torch.float64)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(device, path):
    mu = make(2, 3, dtype=torch.float64, device=device, seed=1, grad=True)
    lv = make(2, 3, dtype=torch.float64, device=device, seed=2, grad=True)
    with op_path(path):
        for samples in (None, 2):
            # a fresh generator per call: every evaluation must see the same eps
            fn = lambda m, v: pyvae.reparameterize(m, v, samples=samples, generator=_gen(5))  # noqa: E731
            assert torch.autograd.gradcheck(fn, (mu, lv))
        assert torch.autograd.gradcheck(lambda m, v: pyvae.reparameterize(m, v, generator=_gen(5)), (mu, lv[0]))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    mu = make(2, 3, 5, dtype=torch.float64, device=device, seed=1, grad=True)
    lv = make(2, 3, 5, dtype=torch.float64, device=device, seed=2, grad=True)
    seed = torch.tensor([1234, 0], dtype=torch.int64)
    for samples in (0, 2):
        torch.library.opcheck(torch.ops.pyvae.reparameterize, (mu, lv, samples, seed))
    torch.library.opcheck(torch.ops.pyvae.reparameterize, (mu, lv[0].detach(), 1, torch.tensor([-5, 3])))


@pytest.mark.parametrize("path", PATHS)
def test_double_backward_raises(path):
    mu, lv = make(3, 4, dtype=torch.float64, seed=1, grad=True), make(3, 4, dtype=torch.float64, seed=2, grad=True)
    fn = lambda m, v: pyvae.reparameterize(m, v, samples=2, generator=_gen(1))  # noqa: E731
    assert_double_backward_raises(fn, [mu, lv], path)

# --------------------------------------------------------------------------- distribution
def test_mean_and_variance():
    n = 400_000
    mu = torch.tensor([1.5, -3.0, 0.0, 10.0], dtype=torch.float64)
    lv = torch.tensor([math.log(4.0), -2.0, 0.0, 3.0], dtype=torch.float64)
    torch.manual_seed(0)
    z = pyvae.reparameterize(mu, lv, samples=n // 4)
    var = lv.exp()
    assert ((z.mean(0) - mu).abs() < 6 * (var / z.shape[0]).sqrt()).all()
    assert ((z.var(0) - var).abs() < 6 * var * math.sqrt(2 / z.shape[0])).all()


def test_gradient_expectations():
    """d mean(z) / d mu = 1 exactly; d mean(z^2) / d logvar = e^logvar and d mean(z^2) / d mu = 2 mu
    in expectation (E[z sigma eps] = sigma^2)."""
    n = 200_000
    mu0, lv0 = 0.7, 0.4
    mu = torch.tensor([mu0], dtype=torch.float64, requires_grad=True)
    lv = torch.tensor([lv0], dtype=torch.float64, requires_grad=True)
    torch.manual_seed(1)
    z = pyvae.reparameterize(mu.expand(n), lv)  # n draws sharing mu and logvar
    (g_mu_mean,) = torch.autograd.grad(z.mean(), mu, retain_graph=True)
    assert g_mu_mean.item() == pytest.approx(1.0, rel=1e-12)
    g_mu, g_lv = torch.autograd.grad(z.pow(2).mean(), (mu, lv))
    s2 = math.exp(lv0)
    # per-draw terms: 2 z (sd 2 sigma) for mu, z sigma eps (variance mu^2 s2 + 2 s2^2) for logvar
    assert abs(g_mu.item() - 2 * mu0) < 6 * 2 * math.sqrt(s2 / n)
    assert abs(g_lv.item() - s2) < 6 * math.sqrt((mu0**2 * s2 + 2 * s2**2) / n)


def test_samples_shape_and_independence():
    mu = make(1000, dtype=torch.float64, seed=1)
    lv = make(1000, dtype=torch.float64, seed=2)
    z = pyvae.reparameterize(mu, lv, samples=4, generator=_gen(11))
    assert z.shape == (4, 1000)
    eps = (z - mu) / (0.5 * lv).exp()  # standardized
    c = torch.corrcoef(eps)  # across the 4 samples
    assert (c - torch.eye(4, dtype=c.dtype)).abs().max() < 6 / math.sqrt(1000)
    # no sample repeats another's eps, even shifted by a few elements (a counter reused)
    for shift in range(5):
        assert (eps[0, shift:] == eps[1, : 1000 - shift]).sum() <= 1


def test_eps_has_no_lag_correlation():
    eps = eps_of((200_000,), 13).double()
    n = eps.numel()
    for lag in (1, 2, 3, 4, 5, 8, 2048):  # lanes, counters, and the CPU chunk size
        r = torch.corrcoef(torch.stack([eps[lag:], eps[:-lag]]))[0, 1]
        assert abs(r) < 6 / math.sqrt(n), lag


# -------------------------------------------------------------------------- reproducibility
def test_reproducible_under_manual_seed_and_generator():
    mu, lv = make(3, 17, seed=1), make(3, 17, seed=2)
    torch.manual_seed(123)
    a = pyvae.reparameterize(mu, lv, samples=2)
    torch.manual_seed(123)
    b = pyvae.reparameterize(mu, lv, samples=2)
    assert torch.equal(a, b)
    c = pyvae.reparameterize(mu, lv, samples=2)  # the global generator moved on
    assert not torch.equal(b, c)
    d = pyvae.reparameterize(mu, lv, generator=_gen(5))
    e = pyvae.reparameterize(mu, lv, generator=_gen(5))
    f = pyvae.reparameterize(mu, lv, generator=_gen(6))
    assert torch.equal(d, e) and (d != f).float().mean() > 0.99
    # an explicit generator does not touch the global one
    torch.manual_seed(123)
    pyvae.reparameterize(mu, lv, generator=_gen(5))
    assert torch.equal(pyvae.reparameterize(mu, lv, samples=2), a)


def test_eager_and_dispatcher_paths_draw_the_same():
    mu, lv = make(4, 9, seed=1), make(4, 9, seed=2)
    a = pyvae.reparameterize(mu, lv, samples=3, generator=_gen(9))
    with op_path("dispatcher"):
        b = pyvae.reparameterize(mu, lv, samples=3, generator=_gen(9))
    assert torch.equal(a, b)


def test_eps_is_the_same_for_float32_and_float64():
    """eps is drawn in float32 for every dtype: float64 z = mu + sigma * (the same eps)."""
    z32 = eps_of((3, 1007), 21)
    zeros = torch.zeros(3, 1007, dtype=torch.float64)
    z64 = pyvae.reparameterize(zeros, zeros, generator=_gen(21))
    assert torch.equal(z64, z32.double())


def test_independent_of_thread_count():  # (conftest restores the thread count)
    mu, lv = make(300, 1001, seed=1, grad=True), make(300, 1001, seed=2, grad=True)
    results = []
    for n in (1, 2):
        torch.set_num_threads(n)
        z = pyvae.reparameterize(mu, lv, samples=2, generator=_gen(17))
        results.append((z, *grads(z, [mu, lv])))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_builds_agree(dtype):
    """Every build gives z and gradients that follow the formula with its eps, and the builds' eps
    agree to the last bit of the float32 Box-Muller arithmetic."""
    mu, lv = make(5, 1007, dtype=dtype, seed=1, grad=True), make(5, 1007, dtype=dtype, seed=2, grad=True)
    g = make(2, 5, 1007, dtype=dtype, seed=3)
    mu64, lv64, g64 = mu.detach().double(), lv.detach().double(), g.double()
    results = {}
    for name in ARCHS:
        with cpu_arch(name):
            z = pyvae.reparameterize(mu, lv, samples=2, generator=_gen(4))
            g_mu, g_lv = grads(z, [mu, lv], g)
            eps = eps_of((5, 1007), 4, 2).double()
        assert_close(z, mu64 + (0.5 * lv64).exp() * eps, dtype)
        assert_close(g_mu, g64.sum(0), dtype)
        assert_close(g_lv, (g64 * 0.5 * (0.5 * lv64).exp() * eps).sum(0), dtype)
        results[name] = eps
    for name, eps in results.items():
        torch.testing.assert_close(eps, results[ARCHS[-1]], rtol=1e-6, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.skipif(len(ARCHS) < 2, reason="one CPU build only")
def test_cpu_builds_draw_bitwise_identical_eps():
    # reparameterize is compiled without FMA contraction, so every build rounds alike.
    zeros = torch.zeros(100_000)
    mu, lv = make(1000, 37, seed=5), make(1000, 37, seed=6)
    results = []
    for name in ARCHS:
        with cpu_arch(name):
            results.append((pyvae.reparameterize(zeros, zeros, generator=_gen(4)),
                            pyvae.reparameterize(mu, lv, samples=3, generator=_gen(5))))
    for eps, z in results[1:]:
        assert torch.equal(eps, results[0][0])
        assert torch.equal(z, results[0][1])


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs CUDA")
def test_same_draw_on_cpu_and_cuda():
    mu, lv = make(3, 1007, seed=1), make(3, 1007, seed=2)
    a = pyvae.reparameterize(mu, lv, samples=2, generator=_gen(8))
    b = pyvae.reparameterize(mu.cuda(), lv.cuda(), samples=2, generator=_gen(8))
    torch.testing.assert_close(b.cpu(), a, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------- backward
def test_backward_regenerates_the_forward_eps():
    mu = make(4, 1007, dtype=torch.float64, seed=1, grad=True)
    lv = make(4, 1007, dtype=torch.float64, seed=2, grad=True)
    torch.manual_seed(3)
    z = pyvae.reparameterize(mu, lv, samples=3)
    torch.manual_seed(99)  # backward must not draw anew
    g_mu, g_lv = grads(z, [mu, lv])
    assert_close(g_lv, 0.5 * (z - mu).detach().sum(0), torch.float64)
    assert_close(g_mu, torch.full_like(mu, 3.0), torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tiny_sigma_gradient_uses_eps_not_z_minus_mu(dtype):
    """mu = 100, sigma = e^-15: z - mu rounds to 0 in float32, yet d z / d logvar = sigma eps / 2."""
    mu = torch.full((4096,), 100.0, dtype=dtype, requires_grad=True)
    lv = torch.full((4096,), -30.0, dtype=dtype, requires_grad=True)
    z = pyvae.reparameterize(mu, lv, generator=_gen(2))
    (g_lv,) = grads(z, [lv])
    expected = 0.5 * math.exp(-15.0) * eps_of((4096,), 2).double()
    torch.testing.assert_close(g_lv.double(), expected, rtol=4 * torch.finfo(dtype).eps, atol=0)
    if dtype == torch.float32:
        assert (z == 100.0).all()  # 0.5 * (z - mu) would be all zeros


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_extreme_logvar(device, dtype):
    if dtype in HALF_DTYPES:
        pytest.skip("e^15 overflows float16")
    lv = torch.tensor([-30.0, 30.0, -30.0, 30.0, 0.0], dtype=dtype, device=device).repeat(40).requires_grad_()
    mu = torch.tensor([0.0, 0.0, 2.0, -2.0, 1.0], dtype=dtype, device=device).repeat(40).requires_grad_()
    z = pyvae.reparameterize(mu, lv, generator=_gen(6))
    eps = eps_of((200,), 6, device=device).double().cpu()
    mu64, lv64 = mu.detach().double().cpu(), lv.detach().double().cpu()
    assert torch.isfinite(z).all()
    assert_close(z, mu64 + (0.5 * lv64).exp() * eps, dtype)
    g_mu, g_lv = grads(z, [mu, lv])
    assert torch.isfinite(g_lv).all()
    assert_close(g_lv, 0.5 * (0.5 * lv64).exp() * eps, dtype)


# ------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("samples", [0, -1, 2.0, True, "3", 2**64])
def test_bad_samples(samples):
    with pytest.raises(ValueError, match=r"samples must be None or an int in \[1, 2\*\*62\)"):
        pyvae.reparameterize(torch.zeros(3), torch.zeros(3), samples=samples)


@pytest.mark.parametrize("args,exc,match", [
    ((torch.tensor(0.0), torch.zeros(3)), ValueError, "mu must have at least 1 dim"),
    ((torch.zeros(3), torch.tensor(0.0)), ValueError, "logvar must have at least 1 dim"),
    ((torch.zeros(3, 4), torch.zeros(3, 5)), ValueError, r"do not broadcast: mu \(3, 4\), logvar \(3, 5\)"),
    ((torch.zeros(3, 4), torch.zeros(3, 4, dtype=torch.int64)), TypeError, "logvar must be a floating-point"),
    ((torch.zeros(3, 4, dtype=torch.bool), torch.zeros(3, 4)), TypeError, "mu must be a floating-point"),
    ((torch.zeros(3, 4), torch.zeros(3, 4, dtype=torch.float64)), TypeError, "logvar has dtype torch.float64 but mu"),
])
def test_bad_input_names_the_argument(args, exc, match):
    with pytest.raises(exc, match=match):
        pyvae.reparameterize(*args)


def test_op_rejects_bad_seed_and_samples():
    mu = torch.zeros(3)
    with pytest.raises(ValueError, match="seed must be an int64 tensor of shape"):
        torch.ops.pyvae.reparameterize(mu, mu, 0, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="seed must be an int64 tensor of shape"):
        torch.ops.pyvae.reparameterize(mu, mu, 0, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="samples must be a non-negative int"):
        torch.ops.pyvae.reparameterize(mu, mu, -1, torch.tensor([1, 2]))


def test_non_contiguous_inputs():
    mu = make(9, 5, dtype=torch.float64, seed=1).t()  # [5, 9] transposed
    lv = make(5, 27, dtype=torch.float64, seed=2)[:, ::3]  # stride 3
    assert not mu.is_contiguous() and not lv.is_contiguous()
    z = pyvae.reparameterize(mu, lv, generator=_gen(3))
    assert_close(z, mu + (0.5 * lv).exp() * eps_of((5, 9), 3).double(), torch.float64)
    assert torch.equal(z, pyvae.reparameterize(mu.contiguous(), lv.contiguous(), generator=_gen(3)))


@pytest.mark.parametrize("samples", [None, 2])
def test_empty_batch(samples):
    mu, lv = make(0, 5, grad=True), make(0, 5, grad=True)
    z = pyvae.reparameterize(mu, lv, samples=samples)
    assert z.shape == ((samples,) if samples else ()) + (0, 5)
    g_mu, g_lv = grads(z, [mu, lv])
    assert g_mu.shape == (0, 5) and g_lv.shape == (0, 5)


def test_nan_stays_in_its_element():
    mu, lv = make(4, 6, grad=True), make(4, 6, seed=1, grad=True)
    with torch.no_grad():
        mu[1, 2] = math.nan
        lv[3, 0] = math.nan
    z = pyvae.reparameterize(mu, lv, generator=_gen(1))
    bad = torch.zeros(4, 6, dtype=torch.bool)
    bad[1, 2] = bad[3, 0] = True
    assert z[bad].isnan().all() and torch.isfinite(z[~bad]).all()
    g_mu, g_lv = grads(z, [mu, lv])
    assert torch.isfinite(g_mu).all()  # d z / d mu = 1 whatever mu is
    assert g_lv[3, 0].isnan() and torch.isfinite(g_lv[~bad]).all()


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_on_cpu_computes_in_float32(dtype):
    mu = make(4, 784, dtype=dtype, seed=1, grad=True)
    lv = make(4, 784, dtype=dtype, seed=2, grad=True)
    z = pyvae.reparameterize(mu, lv, samples=2, generator=_gen(3))
    assert z.dtype == dtype
    eps = eps_of((4, 784), 3, 2).double()
    mu64, lv64 = mu.detach().double(), lv.detach().double()
    assert_close(z, mu64 + (0.5 * lv64).exp() * eps, dtype)
    g_mu, g_lv = grads(z, [mu, lv])
    assert g_mu.dtype == dtype and g_lv.dtype == dtype
    assert_close(g_lv, (0.5 * (0.5 * lv64).exp() * eps).sum(0), dtype)


@pytest.mark.parametrize("samples", [None, 3])
@pytest.mark.parametrize("which", ["mu", "logvar"])
def test_one_input_needing_grad_gets_the_same_gradient(samples, which):
    # The backward kernel skips what is not needed (no eps for a mu-only gradient): the gradient it
    # returns must equal the one computed alongside the other.
    def run(need_mu, need_lv):
        mu = make(4, 6, dtype=torch.float32, seed=1, grad=need_mu)
        lv = make(4, 6, dtype=torch.float32, seed=2, grad=need_lv)
        z = pyvae.reparameterize(mu, lv, samples=samples, generator=_gen(5))
        g = make(*z.shape, dtype=torch.float32, seed=3)
        z.backward(g)
        return mu.grad, lv.grad

    both = run(True, True)
    one = run(which == "mu", which == "logvar")
    k = 0 if which == "mu" else 1
    assert one[1 - k] is None
    assert torch.equal(one[k], both[k])


# ------------------------------------------------------------ NOTE: [Lean reparameterize]
_rp = importlib.import_module("pyvae.ops.reparameterize")


def _draw(mu0, lv0, need, samples, generator_seed, upstream):
    mu, lv = mu0.clone().requires_grad_(0 in need), lv0.clone().requires_grad_(1 in need)
    gen = None
    if generator_seed is None:
        torch.manual_seed(11)
    else:
        gen = torch.Generator().manual_seed(generator_seed)
    z = pyvae.reparameterize(mu, lv, samples=samples, generator=gen)
    if not need:
        return z, type(z.grad_fn).__name__ if z.grad_fn else None, ()
    up = (torch.linspace(-1, 2, z.numel(), dtype=z.dtype).view(z.shape) if upstream == "dense"
          else torch.tensor(0.5, dtype=z.dtype).expand(z.shape))
    grads = torch.autograd.grad(z, [t for i, t in enumerate((mu, lv)) if i in need], up)
    return z, type(z.grad_fn).__name__, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("need", [(0, 1), (0,), (1,), ()])
@pytest.mark.parametrize("samples,generator_seed,upstream", [(None, None, "dense"), (3, 5, "dense"),
                                                              (None, 7, "expanded"), (2, None, "expanded")])
def test_lean_draws_match_the_general_path_bit_for_bit(monkeypatch, dtype, need, samples, generator_seed, upstream):
    """The lean path (same-shape contiguous CPU inputs) draws the same seed from the same generator and runs
    the same kernels: z and its gradients equal the general path's exactly."""
    g = torch.Generator().manual_seed(1)
    mu0, lv0 = torch.randn(7, 12, generator=g, dtype=dtype), torch.randn(7, 12, generator=g, dtype=dtype)
    z, node, grads = _draw(mu0, lv0, need, samples, generator_seed, upstream)
    assert node == ("_LeanDrawFnBackward" if need else None)
    monkeypatch.setattr(_rp, "_lean", lambda *a: None)
    z_ref, node_ref, grads_ref = _draw(mu0, lv0, need, samples, generator_seed, upstream)
    assert node_ref == ("_FnBackward" if need else None)
    assert torch.equal(z, z_ref)
    for a, b in zip(grads, grads_ref):
        assert torch.equal(a, b)


def test_lean_draws_take_strided_views_but_not_broadcasts(monkeypatch):
    h = torch.randn(6, 8, requires_grad=True)

    def draw():
        torch.manual_seed(4)
        z = pyvae.reparameterize(h[:, :4], h[:, 4:])  # GaussianHead's layout: column slices of one output
        return z, torch.autograd.grad(z, h, torch.linspace(-1, 1, 24).view(6, 4))[0]

    z, g = draw()
    assert type(z.grad_fn).__name__ == "_LeanDrawFnBackward"
    monkeypatch.setattr(_rp, "_lean", lambda *a: None)
    z_ref, g_ref = draw()
    assert type(z_ref.grad_fn).__name__ == "_FnBackward"
    assert torch.equal(z, z_ref) and torch.equal(g, g_ref)
    monkeypatch.undo()
    assert type(pyvae.reparameterize(h[:, :4], torch.randn(4)).grad_fn).__name__ == "_FnBackward"


@pytest.mark.parametrize("need", [(0,), (1,)])
@pytest.mark.parametrize("strided", [False, True])
def test_lean_draws_refuse_double_backward(need, strided):
    base = torch.randn(5, 8 if strided else 4)
    mu = (base[:, :4] if strided else base).clone().requires_grad_(0 in need) if not strided else None
    if strided:
        h = base.requires_grad_()
        mu, lv, wrt = (h[:, :4], h[:, 4:].detach(), h) if need == (0,) else (h[:, :4].detach(), h[:, 4:], h)
    else:
        mu, lv = base.clone().requires_grad_(0 in need), torch.randn(5, 4, requires_grad=1 in need)
        wrt = mu if need == (0,) else lv
    z = pyvae.reparameterize(mu, lv)
    assert type(z.grad_fn).__name__ == "_LeanDrawFnBackward"
    (g,) = torch.autograd.grad((z * z).sum(), wrt, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        g.sum().backward()


@pytest.mark.parametrize("seed", [12345, -7, 2**63 - 1, -(2**63)])
def test_shard_draws_take_any_int64_seed_as_the_general_path_does(monkeypatch, seed):
    """reparameterize_shard's host seeds (negative ones too) give the lean path the same 64-bit words as the
    general path's int64 seed tensor; a seed outside int64 is refused on both."""
    mu, lv = torch.randn(6, 4, requires_grad=True), torch.randn(6, 4, requires_grad=True)
    z = pyvae.ops.reparameterize_shard(mu, lv, 2, seed)
    assert type(z.grad_fn).__name__ == "_LeanDrawFnBackward"
    monkeypatch.setattr(_rp, "_lean", lambda *a: None)
    assert torch.equal(z, pyvae.ops.reparameterize_shard(mu, lv, 2, seed))


def test_shard_draws_refuse_a_seed_outside_int64_on_both_paths(monkeypatch):
    mu, lv = torch.randn(6, 4), torch.randn(6, 4)
    with pytest.raises((RuntimeError, OverflowError, ValueError)):
        pyvae.ops.reparameterize_shard(mu, lv, 1, 2**64 + 5)
    monkeypatch.setattr(_rp, "_lean", lambda *a: None)
    with pytest.raises((RuntimeError, OverflowError, ValueError)):
        pyvae.ops.reparameterize_shard(mu, lv, 1, 2**64 + 5)
