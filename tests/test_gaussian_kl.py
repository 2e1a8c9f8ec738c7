"""pyvae.gaussian_kl against torch.distributions.kl_divergence of diagonal Gaussians."""
import math

import pytest
import torch
from torch.distributions import Independent, Normal, kl_divergence

import pyvae
from pyvae import reference
from conftest import (DEVICES, DEVICE_DTYPES, HALF_DTYPES, PATHS, SHAPES, assert_archs_agree, assert_close,
                      assert_double_backward_raises, check_op, check_path, grads, make, op_path, per_arch, ref)

# standard: N(0, I); full: a prior per element; per_feature: prior [Z] broadcast against mu [..., Z];
# mu_only / logvar_only: the other prior tensor omitted (defaults 0).
PRIORS = ["standard", "full", "per_feature", "mu_only", "logvar_only"]


def _inputs(shape, prior, dtype=torch.float32, device="cpu", grad=True, scale=1.0):
    mu = make(*shape, dtype=dtype, device=device, seed=1, grad=grad, scale=scale)
    lv = make(*shape, dtype=dtype, device=device, seed=2, grad=grad, scale=scale)
    pshape = shape[-1:] if prior in ("per_feature", "mu_only") else shape
    pm = make(*pshape, dtype=dtype, device=device, seed=3, grad=grad, scale=scale)
    plv = make(*pshape, dtype=dtype, device=device, seed=4, grad=grad, scale=scale)
    pm = None if prior in ("standard", "logvar_only") else pm
    plv = None if prior in ("standard", "mu_only") else plv
    return mu, lv, pm, plv


def _dist(m, lv):
    return Independent(Normal(m, (0.5 * lv).exp(), validate_args=False), 1, validate_args=False)


def oracle(mu, lv, pm=None, plv=None):
    """kl_divergence of the two Independent Normals, in float64."""
    pm = torch.zeros_like(mu) if pm is None else pm
    plv = torch.zeros_like(mu) if plv is None else plv
    mu, lv, pm, plv = torch.broadcast_tensors(mu, lv, pm, plv)
    return kl_divergence(_dist(mu, lv), _dist(pm, plv))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("prior", PRIORS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_matches_torch_distributions(device, dtype, shape, prior, path):
    inputs = _inputs(shape, prior, dtype, device)
    out, *_ = check_op(pyvae.gaussian_kl, oracle, inputs, dtype, path=path)
    assert out.shape == shape[:-1] and out.device.type == device


# (mu, logvar, prior_mu, prior_logvar) shapes: every operand broadcasts somewhere
BROADCASTS = [
    ((3, 1, 4), (5, 4), (4,), (1, 4)),
    ((4,), (6, 4), None, None),
    ((2, 3, 7), (7,), (3, 7), (2, 1, 7)),
    ((5, 784), (5, 784), (2, 5, 784), (784,)),
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shapes", BROADCASTS, ids=str)
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_broadcast(device, dtype, shapes, path):
    inputs = [None if s is None else make(*s, dtype=dtype, device=device, seed=i, grad=True)
              for i, s in enumerate(shapes)]
    out, *_ = check_op(pyvae.gaussian_kl, oracle, inputs, dtype, path=path)
    assert out.shape == torch.broadcast_shapes(*(s for s in shapes if s is not None))[:-1]


def test_reference_implementation_agrees_with_oracle():
    for prior in PRIORS:
        inputs = ref(*_inputs((4, 7), prior, torch.float64))
        assert_close(reference.gaussian_kl(*inputs), oracle(*inputs), torch.float64)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("prior", PRIORS)
@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(device, prior, path):
    inputs = _inputs((2, 3), prior, torch.float64, device)
    with op_path(path):
        assert torch.autograd.gradcheck(pyvae.gaussian_kl, inputs)


@pytest.mark.parametrize("prior", PRIORS)
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device, prior):
    inputs = _inputs((2, 3, 5), prior, torch.float64, device)
    torch.library.opcheck(torch.ops.pyvae.gaussian_kl, inputs)
    torch.library.opcheck(torch.ops.pyvae.gaussian_kl, [t.detach() if t is not None else None for t in inputs])


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_extreme_logvar(device, dtype):
    if dtype in HALF_DTYPES:
        pytest.skip("e^30 overflows half types")
    # every combination of posterior / prior log-variance in {-30, 0, 30}
    vals = torch.tensor([-30.0, 0.0, 30.0], dtype=torch.float64)
    lv, plv = torch.cartesian_prod(vals, vals).T
    mu = make(9, 1, dtype=torch.float64, seed=5)
    pm = make(9, 1, dtype=torch.float64, seed=6)
    inputs = [t.view(9, 1).to(dtype=dtype, device=device).requires_grad_() for t in (mu, lv, pm, plv)]
    out, _, got, _ = check_op(pyvae.gaussian_kl, oracle, inputs, dtype)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in got)
    check_op(pyvae.gaussian_kl, oracle, inputs[:2], dtype)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_infinite_logvar_gives_infinite_kl(device, dtype, path):
    """logvar = +inf (an overflowed variance): KL = +inf, the limit of e^lv - lv, not the NaN of inf - inf
    (NOTE: [Infinite inputs] in csrc/ops/bernoulli.h), against N(0, I) and a finite prior; mu's gradient
    stays mu / prior variance. logvar = -inf was already +inf."""
    for d in (1, 37):  # the loop's tail, and a row through the SIMD body
        mu = torch.linspace(-1, 1, 2 * d, dtype=dtype, device=device).view(2, d).requires_grad_()
        lv = torch.full((2, d), math.inf, dtype=dtype, device=device, requires_grad=True)
        pm = torch.full((d,), 0.5, dtype=dtype, device=device)
        plv = torch.full((2, d), 2.0, dtype=dtype, device=device)
        for prior in ((), (pm, plv)):
            with op_path(path):
                out = pyvae.gaussian_kl(mu, lv, *prior)
            check_path(out, path)
            assert torch.equal(out, torch.full_like(out, math.inf)), (d, prior, out)
            g_mu, g_lv = torch.autograd.grad(out.sum(), [mu, lv])
            want_mu = mu.detach() if not prior else (mu.detach() - pm) * math.exp(-2.0)
            assert_close(g_mu, want_mu, dtype)
            assert torch.equal(g_lv, torch.full_like(g_lv, math.inf))
    out = pyvae.gaussian_kl(torch.zeros(1, 2, dtype=dtype, device=device),
                            torch.tensor([[math.inf, math.nan]], dtype=dtype, device=device))
    assert torch.isnan(out).all()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_tiny_prior_variance(device, dtype, path):
    """A learned prior's logvar far below -88 (e^-plv overflows float32): finite KL and gradients wherever
    they are finite; (mu - prior_mu)^2 e^-plv gave 0 * inf = NaN at mu = prior_mu (NOTE: [Tiny variances] in
    csrc/ops/gaussian_log_prob.h)."""
    if dtype in HALF_DTYPES:
        pytest.skip("half inputs and outputs round beyond the tolerance here; their kernels compute in float32")
    for plv, lv, d in [(-100.0, -100.0, 0.0), (-100.0, -99.0, 0.0), (-95.0, -95.0, 1e-10)]:
        q = d * d * math.exp(-plv)
        want = 0.5 * (plv - lv + math.exp(lv - plv) + q - 1.0)
        want_g = dict(mu=d * math.exp(-plv), lv=0.5 * (math.exp(lv - plv) - 1.0),
                      plv=0.5 * (1.0 - math.exp(lv - plv) - q))
        for n in (1, 37):  # the loop's tail, and a row through the SIMD body
            mu = torch.full((2, n), d, dtype=dtype, device=device, requires_grad=True)
            logvar = torch.full((2, n), lv, dtype=dtype, device=device, requires_grad=True)
            pm = torch.zeros(2, n, dtype=dtype, device=device, requires_grad=True)
            plv_t = torch.full((2, n), plv, dtype=dtype, device=device, requires_grad=True)
            with op_path(path):
                out = pyvae.gaussian_kl(mu, logvar, pm, plv_t)
            check_path(out, path)
            g_mu, g_lv, g_pm, g_plv = torch.autograd.grad(out.sum(), [mu, logvar, pm, plv_t])
            torch.testing.assert_close(out.double(), torch.full((2,), n * want, dtype=torch.float64), rtol=1e-5,
                                       atol=1e-5)
            for got, key in ((g_mu, "mu"), (g_lv, "lv"), (g_plv, "plv")):
                torch.testing.assert_close(got.double(), torch.full((2, n), want_g[key], dtype=torch.float64),
                                           rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(g_pm, -g_mu)
    # a point-mass prior (plv = -inf): KL = +inf, not the NaN of -inf + inf; a NaN mean still gives NaN
    for n in (1, 37):
        ones = torch.ones(1, n, dtype=dtype, device=device)
        out = pyvae.gaussian_kl(0.5 * ones, 0 * ones, 0 * ones, -math.inf * ones)
        assert out.item() == math.inf, (n, out)
        nan_mu = torch.cat([torch.full((1, 1), math.nan, dtype=dtype, device=device), ones[:, 1:]], 1)
        assert torch.isnan(pyvae.gaussian_kl(nan_mu, 0 * ones, 0 * ones, -math.inf * ones)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_exp_accuracy_over_full_range(dtype):
    """The kernels' polynomial exp, through KL terms, over log-variances of [-87, 87] (float32 range)."""
    lv = torch.linspace(-87, 87, 200_001, dtype=torch.float64).to(dtype).view(-1, 1)
    mu = torch.full_like(lv, 0.25)
    got = pyvae.gaussian_kl(mu, lv).double()
    lv64 = lv.double()
    exact = 0.5 * (0.0625 + lv64.exp() - 1 - lv64).squeeze(-1)
    # error bound: a few ulps of the largest term (no cancellation hidden by a loose tolerance)
    scale = (0.0625 + lv64.exp() + 1 + lv64.abs()).squeeze(-1)
    err = ((got - exact).abs() / scale).max().item()
    assert err < 4 * torch.finfo(dtype).eps, err
    # prior terms e^(lv - plv) and e^-plv
    plv = lv.flip(0)
    got = pyvae.gaussian_kl(mu, lv, torch.zeros_like(mu), plv).double()
    p64 = plv.double()
    terms = [p64, -lv64, (lv64 - p64).clamp(max=700).exp(), 0.0625 * (-p64).exp(), torch.ones_like(p64)]
    exact = 0.5 * (p64 - lv64 + (lv64 - p64).exp() + 0.0625 * (-p64).exp() - 1).squeeze(-1)
    scale = sum(t.abs() for t in terms).squeeze(-1)
    finite = exact.abs() < torch.finfo(dtype).max / 4
    err = ((got - exact).abs() / scale)[finite].max().item()
    assert err < 8 * torch.finfo(dtype).eps, err


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_builds_agree(dtype):
    inputs = _inputs((4, 784), "per_feature", dtype)
    g = make(4, dtype=dtype, seed=9)

    def run():
        out = pyvae.gaussian_kl(*inputs)
        return (out.detach(), *grads(out, inputs, g))

    ref_inputs = ref(*inputs)
    expected = oracle(*ref_inputs)
    expected = (expected, *grads(expected, ref_inputs, g.double()))
    assert_archs_agree(per_arch(run), expected, dtype)


@pytest.mark.parametrize("path", PATHS)
def test_double_backward_raises(path):
    assert_double_backward_raises(pyvae.gaussian_kl, _inputs((3, 4), "full", torch.float64), path)

# ------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("args,exc,match", [
    ((torch.tensor(0.0), torch.zeros(3)), ValueError, "mu must have at least 1 dim"),
    ((torch.zeros(3), torch.tensor(0.0)), ValueError, "logvar must have at least 1 dim"),
    ((torch.zeros(3), torch.zeros(3), torch.tensor(0.0)), ValueError, "prior_mu must have at least 1 dim"),
    ((torch.zeros(3), torch.zeros(3), None, torch.tensor(0.0)), ValueError, "prior_logvar must have at least 1 dim"),
    ((torch.zeros(3, 4), torch.zeros(3, 5)), ValueError, r"do not broadcast: mu \(3, 4\), logvar \(3, 5\)"),
    ((torch.zeros(3, 4), torch.zeros(2, 4)), ValueError, r"logvar \(2, 4\)"),
    ((torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(5)), ValueError, r"prior_mu \(5,\)"),
    ((torch.zeros(3, 4), torch.zeros(3, 4, dtype=torch.int64)), TypeError, "logvar must be a floating-point"),
    ((torch.zeros(3, 4, dtype=torch.int32), torch.zeros(3, 4)), TypeError, "mu must be a floating-point"),
    ((torch.zeros(3, 4), torch.zeros(3, 4), None, torch.zeros(4, dtype=torch.int64)), TypeError,
     "prior_logvar must be a floating-point"),
    ((torch.zeros(3, 4), torch.zeros(3, 4).double()), TypeError, "logvar has dtype torch.float64 but mu"),
    ((torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(4).double()), TypeError, "prior_mu has dtype torch.float64"),
    ((torch.zeros(3, 4), torch.zeros(3, 4), None, torch.zeros(4).double()), TypeError,
     "prior_logvar has dtype torch.float64"),
])
def test_bad_input_names_the_argument(args, exc, match):
    with pytest.raises(exc, match=match):
        pyvae.gaussian_kl(*args)


def test_non_contiguous_inputs():
    base = make(6, 10, dtype=torch.float64, seed=1)
    mu = base.t().requires_grad_()  # [10, 6], transposed
    lv = make(10, 12, dtype=torch.float64, seed=2)[:, ::2].requires_grad_()  # stride 2
    pm = make(6, dtype=torch.float64, seed=3).expand(10, 6).requires_grad_()  # stride 0
    plv = make(10, 6, dtype=torch.float64, seed=4).requires_grad_()
    assert not any(t.is_contiguous() for t in (mu, lv, pm))
    check_op(pyvae.gaussian_kl, oracle, [mu, lv, pm, plv], torch.float64)


EMPTY_DEVICE_DTYPES = DEVICE_DTYPES + [pytest.param("cpu", dt, id=f"cpu-{str(dt)[6:]}") for dt in HALF_DTYPES]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("device,dtype", EMPTY_DEVICE_DTYPES)
@pytest.mark.parametrize("shape", [(0, 5), (2, 0, 5), (3, 0)], ids=str)
@pytest.mark.parametrize("prior", PRIORS)
def test_empty_inputs(prior, shape, device, dtype, path):
    """No rows, or no event dims: the output has the leading shape, the input's dtype and device, and
    equals pyvae.reference's (the KL over no dims is 0); each input that requires grad gets, under a
    random upstream gradient, a gradient of its own shape, dtype and device equal to the reference's
    through autograd: empty, or zeros where a broadcast prior [Z] is summed over no rows.
    (torch.distributions, the oracle elsewhere, cannot reshape empty batches.)"""
    inputs = _inputs(shape, prior, dtype, device)
    with op_path(path):
        out = pyvae.gaussian_kl(*inputs)
    ref_inputs = ref(*inputs)
    want = reference.gaussian_kl(*ref_inputs)
    assert out.shape == shape[:-1] and out.dtype == dtype and out.device.type == device
    assert torch.equal(out.double().cpu(), want)
    g_out = make(*shape[:-1], dtype=dtype, device=device, seed=5)
    got = grads(out, inputs, g_out)
    expected = grads(want, ref_inputs, g_out.double().cpu())
    for name, t, g, e in zip(("mu", "logvar", "prior_mu", "prior_logvar"), inputs, got, expected):
        if t is None:
            continue
        assert g is not None and g.shape == t.shape and g.dtype == dtype and g.device == t.device, name
        assert torch.equal(g.double().cpu(), e), name
    if prior in ("per_feature", "mu_only") and shape[-1] > 0:
        assert got[2].shape == (shape[-1],) and not got[2].any()  # the [Z] prior: Z zeros, not empty


def test_nan_stays_in_its_row():
    mu, lv, pm, plv = _inputs((4, 6), "full", torch.float64)
    with torch.no_grad():
        mu[1, 2] = math.nan
        plv[3, 0] = math.nan
    out = pyvae.gaussian_kl(mu, lv, pm, plv)
    assert out[[1, 3]].isnan().all()
    expected = oracle(*ref(mu, lv, pm, plv))
    assert_close(out[[0, 2]], expected[[0, 2]], torch.float64)
    g_mu, g_lv, g_pm, g_plv = grads(out, [mu, lv, pm, plv])
    for g in (g_mu, g_lv, g_pm, g_plv):
        assert torch.isfinite(g[[0, 2]]).all()
    assert g_mu[1, 2].isnan() and g_plv[3, 0].isnan()


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_on_cpu_computes_in_float32(dtype):
    inputs = _inputs((4, 784), "per_feature", dtype)
    out, *_ = check_op(pyvae.gaussian_kl, oracle, inputs, dtype, scale=1.0)
    assert out.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows,z", [(15, 20), (16, 20), (17, 1), (1000, 20), (5003, 64), (300, 65)])
@pytest.mark.parametrize("want", ["both", "mu", "logvar"])
def test_many_short_rows(dtype, rows, z, want):
    # The standard-prior CPU kernels take rows in blocks of 16 when Z <= 64 (a partial last block,
    # several threads from 32768 elements on); Z = 65 takes the per-row path. Against the oracle, in
    # every build, with one or both gradients asked for.
    mu = make(rows, z, dtype=dtype, seed=1, grad=want in ("both", "mu"))
    lv = make(rows, z, dtype=dtype, seed=2, grad=want in ("both", "logvar"))
    leaves = [t for t in (mu, lv) if t.requires_grad]
    g = make(rows, dtype=dtype, seed=3)

    def run():
        out = pyvae.gaussian_kl(mu, lv)
        return (out.detach(), *grads(out, leaves, g))

    mu64, lv64 = ref(mu, lv)
    leaves64 = [t for t, w in zip((mu64, lv64), (mu, lv)) if w.requires_grad]
    expected = oracle(mu64, lv64)
    expected = (expected, *grads(expected, leaves64, g.double()))
    assert_archs_agree(per_arch(run), expected, dtype)
