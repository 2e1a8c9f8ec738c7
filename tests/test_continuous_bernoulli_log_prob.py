"""pyvae.continuous_bernoulli_log_prob against torch.distributions.ContinuousBernoulli(logits=...).log_prob,
and against a high-precision oracle where torch's own implementation is inaccurate.

torch computes the normalizer from probs = sigmoid(logits): once probs rounds to (or is clamped at)
1 - eps, |logits| above ~17 (float32) or ~20-36 (float64) give wrong values and gradients (at l = 40 in
float64 its gradient for x = 0 is -1 instead of -0.975). So large logits are checked against
``exact`` below, a float64 formula checked in turn against 60-digit ``decimal`` arithmetic.
"""
import math
import re
from decimal import Decimal, localcontext
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from torch.distributions import ContinuousBernoulli, Independent

import pyvae
from pyvae import reference
from conftest import (LOGITS_X_BROADCASTS, ARCHS, DEVICES, DEVICE_DTYPES, HALF_DTYPES, PATHS, SHAPES, assert_archs_agree, assert_close,
                      assert_double_backward_raises, check_op, check_path, cpu_arch, grads, make, op_path, per_arch,
                      ref)

HEADER = Path(__file__).resolve().parents[1] / "csrc" / "ops" / "continuous_bernoulli.h"


def oracle(logits, x):
    """Independent(ContinuousBernoulli(logits), 1).log_prob(x) in float64 (x may broadcast either way);
    accurate for |logits| up to ~15 (see the module docstring)."""
    cb = ContinuousBernoulli(logits=logits, validate_args=False)
    return Independent(cb, 1, validate_args=False).log_prob(x)


# ------------------------------------------------------------------------- the exact oracle
def _bernoulli_numbers(n):
    b = [Fraction(1)]
    for m in range(1, n + 1):
        b.append(-sum(math.comb(m + 1, k) * b[k] for k in range(m)) / Fraction(m + 1))
    return b


_B = _bernoulli_numbers(64)
# Taylor coefficients, in u = h^2, of G(h) / u = log(sinh h / h) / h^2 and K(h) / h = (coth h - 1/h) / h.
G_SERIES = [Fraction(4**n) * _B[2 * n] / (2 * n * math.factorial(2 * n)) for n in range(1, 31)]
K_SERIES = [Fraction(4**n) * _B[2 * n] / math.factorial(2 * n) for n in range(1, 31)]


def _poly(coeffs, u):
    acc = torch.zeros_like(u)
    for c in reversed(coeffs):
        acc = acc * u + float(c)
    return acc


def exact(logits, x):
    """The summed log-density in float64 by a route of its own: 30 Taylor terms for |l| < 1/2 (error
    < 1e-40), the closed form (x l - max(l, 0)) + log|l| - log1p(-e^-|l|) elsewhere."""
    logits, x = torch.broadcast_tensors(logits, x)
    small = logits.abs() < 0.5
    h = 0.5 * torch.where(small, logits, 0.0)
    series = (x - 0.5) * logits - h * h * _poly(G_SERIES, h * h)
    lc = torch.where(small, 1.0, logits)
    closed = (x * lc - lc.clamp(min=0)) + lc.abs().log() - torch.log1p(-torch.exp(-lc.abs()))
    return torch.where(small, series, closed).sum(-1)


def exact_mean(logits):
    """E[x] in float64: 30 Taylor terms for |l| < 1/2, (l > 0) - 1/l + sign(l) / expm1(|l|) elsewhere."""
    small = logits.abs() < 0.5
    h = 0.5 * torch.where(small, logits, 0.0)
    lc = torch.where(small, 1.0, logits)
    closed = (lc > 0).double() - 1 / lc + torch.sign(lc) / torch.expm1(lc.abs())
    return torch.where(small, 0.5 + 0.5 * h * _poly(K_SERIES, h * h), closed)


def exact_grad(logits, x):
    """d/dlogits of the log-density: x - E[x]."""
    return x - exact_mean(logits)


def decimal_terms(l, digits=60):
    """(l, log p(0 | l), E[x]) of one element as ``digits``-digit Decimals, by the defining formulas:
    log p(x | l) = x l - softplus(l) + log(l / tanh(l / 2)), E[x] = 1/2 + (coth(l/2) - 2/l) / 2."""
    with localcontext() as ctx:
        ctx.prec = digits
        L = Decimal(l)
        if L == 0:
            return L, Decimal(0), Decimal("0.5")
        e = L.exp()
        tanh_half = (e - 1) / (e + 1)
        value0 = (L / tanh_half).ln() - (1 + e).ln()
        mean = Decimal("0.5") + (1 / tanh_half - 2 / L) / 2
        return L, value0, mean


def decimal_value_grad_mean(l, x, digits=60):
    """(log-density, d/dl, E[x]) of one element (x, l floats), rounded to float64 from ``decimal_terms``."""
    L, value0, mean = decimal_terms(l, digits)
    with localcontext() as ctx:
        ctx.prec = digits
        X = Decimal(x)
        return float(value0 + X * L), float(X - mean), float(mean)


def _grid():
    """Logits over 1e-8 .. 1e4 of both signs (near the split at |l| = 1 too) and x in {0, 0.3, 0.5, 1}."""
    mags = [m * 10.0**e for e in range(-8, 4) for m in (1.0, 2.2, 4.7, 7.3)] + [0.99999, 1.0, 1.00001, 40.0, 1e4]
    logits = [0.0] + mags + [-m for m in mags]
    return [(l, x) for l in logits for x in (0.0, 0.3, 0.5, 1.0)]


def test_exact_oracle_against_decimal():
    """The float64 oracles of this file agree with 60-digit arithmetic of the defining formulas."""
    pts = _grid()
    l = torch.tensor([p[0] for p in pts], dtype=torch.float64)
    x = torch.tensor([p[1] for p in pts], dtype=torch.float64)
    want = torch.tensor([decimal_value_grad_mean(a, b) for a, b in pts], dtype=torch.float64)
    got = torch.stack([exact(l.view(-1, 1), x.view(-1, 1)), exact_grad(l, x), exact_mean(l)], 1)
    torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-15)


# ------------------------------------------------------------------- the header's series
def _header_polys():
    """{function name: [coefficients, lowest order first]} of each overload in the header."""
    text = HEADER.read_text()
    out = {}
    for m in re.finditer(r"(float|double) (cb_\w+)\((?:float|double) u\) \{(.*?)\n\}", text, re.S):
        nums = [float(v.rstrip("f")) for v in re.findall(r"[-+]?\s*\d\.\d+(?:e[-+]?\d+)?f?", m.group(3).replace(" ", ""))]
        # Horner from the top: p = c_n; p = p * u + c_k ...; the signs sit before each constant
        out[(m.group(1), m.group(2))] = list(reversed(nums))
    return out


def test_header_series_coefficients():
    """The Taylor coefficients in csrc/ops/continuous_bernoulli.h are 2^2n B_2n / (2n (2n)!) (G) and
    2^2n B_2n / (2n)! (K), to the precision of their type; enough terms for |l| < 1 in each type."""
    polys = _header_polys()
    assert len(polys) == 4, polys.keys()
    for (ty, name), coeffs in polys.items():
        series = G_SERIES if name == "cb_log_sinhc_over_u" else K_SERIES
        rtol = 1e-7 if ty == "float" else 1e-15
        for k, c in enumerate(coeffs):
            assert c == pytest.approx(float(series[k]), rel=rtol), (ty, name, k)
        # first term left out, at u = 1/4 (|l| = 1), relative to the sum
        dropped = abs(float(series[len(coeffs)])) * 0.25 ** len(coeffs) / abs(float(series[0]))
        assert dropped < (1e-8 if ty == "float" else 1e-17), (ty, name, dropped)


def test_series_match_the_claimed_expansions():
    """log C(l) = log 2 + l^2/12 - 7 l^4/1440 + ... and d log C/dl = 1/l - 1/sinh(l) = l/6 - 7 l^3/360
    + ..., E[x] = 1/2 + l/12 - l^3/720 + ... (as written in the header), from the Bernoulli numbers."""
    # log C(l) = log(2 cosh h) - G(h), h = l/2; log cosh h = sum 4^n (4^n - 1) B_2n / (2n (2n)!) h^2n
    logcosh = [Fraction(4**n * (4**n - 1)) * _B[2 * n] / (2 * n * math.factorial(2 * n)) for n in range(1, 4)]
    log_c = [(logcosh[i] - G_SERIES[i]) / 4 ** (i + 1) for i in range(3)]  # in powers of l^2
    assert log_c[:2] == [Fraction(1, 12), Fraction(-7, 1440)]
    assert [2 * (i + 1) * c for i, c in enumerate(log_c[:2])] == [Fraction(1, 6), Fraction(-7, 360)]
    assert [K_SERIES[0] / 4, K_SERIES[1] / 16] == [Fraction(1, 12), Fraction(-1, 720)]
    # and numerically, at l = 1e-2 (the remainder is ~l^6)
    l = 1e-2
    assert math.log(l / math.tanh(l / 2)) - math.log(2) == pytest.approx(l**2 / 12 - 7 * l**4 / 1440, rel=1e-9)
    assert 1 / l - 1 / math.sinh(l) == pytest.approx(l / 6 - 7 * l**3 / 360, rel=1e-8)


# ------------------------------------------------------------------- against torch
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("x_kind", ["binary", "unit"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_matches_torch_distributions(device, dtype, shape, x_kind, path):
    logits = make(*shape, dtype=dtype, device=device, scale=3.0, seed=1, grad=True)
    x = make(*shape, dtype=dtype, device=device, kind=x_kind, seed=2, grad=True)
    out, *_ = check_op(pyvae.continuous_bernoulli_log_prob, oracle, [logits, x], dtype, path=path)
    assert out.shape == shape[:-1] and out.device.type == device


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shapes", LOGITS_X_BROADCASTS, ids=str)
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_broadcast_sample_dims(device, dtype, shapes, path):
    logits = make(*shapes[0], dtype=dtype, device=device, scale=3.0, seed=1, grad=True)
    x = make(*shapes[1], dtype=dtype, device=device, kind="unit", seed=2, grad=True)
    out, *_ = check_op(pyvae.continuous_bernoulli_log_prob, oracle, [logits, x], dtype, path=path)
    assert out.shape == torch.broadcast_shapes(shapes[0], shapes[1])[:-1]


@pytest.mark.parametrize("x_kind", ["binary", "unit"])
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_logits_near_zero(device, dtype, x_kind):
    """|l| ~ 1e-3 (torch's Taylor patch) and the split at |l| = 1 (pyvae's): torch and the exact oracle."""
    for scale in (1e-3, 1.0):
        logits = make(3, 784, dtype=dtype, device=device, scale=scale, seed=1, grad=True)
        x = make(3, 784, dtype=dtype, device=device, kind=x_kind, seed=2, grad=True)
        check_op(pyvae.continuous_bernoulli_log_prob, oracle, [logits, x], dtype)
        check_op(pyvae.continuous_bernoulli_log_prob, exact, [logits, x], dtype)


@pytest.mark.parametrize("scale", [40.0, 1e4])
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_large_logits_against_the_exact_oracle(device, dtype, scale):
    """|l| ~ 40 and ~ 1e4, where torch.distributions is wrong (see the module docstring)."""
    logits = make(2, 3, 784, dtype=dtype, device=device, scale=scale, seed=1, grad=True)
    x = make(3, 784, dtype=dtype, device=device, kind="unit", seed=2, grad=True)
    check_op(pyvae.continuous_bernoulli_log_prob, exact, [logits, x], dtype)


def test_torch_is_wrong_for_large_logits():
    """Why the test above does not use torch: at l = 40 (float64) its value and gradient are off."""
    l = torch.tensor([[40.0]], dtype=torch.float64, requires_grad=True)
    x = torch.zeros(1, 1, dtype=torch.float64)
    value, grad, _ = decimal_value_grad_mean(40.0, 0.0)
    t = oracle(l, x)
    (tg,) = torch.autograd.grad(t.sum(), l)
    assert abs(t.item() - value) > 0.05 and abs(tg.item() - grad) > 0.02
    p = pyvae.continuous_bernoulli_log_prob(l, x)
    (pg,) = torch.autograd.grad(p.sum(), l)
    assert p.item() == pytest.approx(value, rel=1e-14) and pg.item() == pytest.approx(grad, rel=1e-14)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_extreme_logits_and_x_at_the_ends(device, dtype):
    """Logits of +-1e4, +-40, 0, +-1e-3 against x of exactly 0 and 1: finite, exact values and gradients."""
    big = 1e4
    logits = torch.tensor([[big, -big, big, -big, 0.0, 0.0, 40.0, -40.0, 1e-3, -1e-3]], dtype=dtype, device=device)
    x = torch.tensor([[1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0]], dtype=dtype, device=device)
    for i in range(logits.shape[1]):  # one element per call, so no value hides behind another
        li = logits[:, i:i + 1].clone().requires_grad_()
        out, _, (g, _), _ = check_op(pyvae.continuous_bernoulli_log_prob, exact, [li, x[:, i:i + 1]], dtype)
        assert torch.isfinite(out).all() and torch.isfinite(g).all()
    reps = 2 if dtype == torch.float16 else 8  # the float16 row sum must stay below 65504
    row = logits.repeat(1, reps).requires_grad_()
    out, _, (g, _), _ = check_op(pyvae.continuous_bernoulli_log_prob, exact, [row, x.repeat(1, reps)], dtype)
    assert torch.isfinite(out).all() and torch.isfinite(g).all()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_infinite_logits_give_the_limits(device, dtype, path):
    """Logits of +-inf: the density concentrates at x = 1 (+inf) or x = 0 (-inf), so log p is +inf at
    that end and -inf at every other x, and d/dl = x - E[x] tends to x - 1 or x (NOTE: [Infinite inputs]
    in csrc/ops/bernoulli.h); not NaN."""
    inf = math.inf
    cases = [(inf, 1.0, inf, 0.0), (inf, 0.0, -inf, -1.0), (inf, 0.5, -inf, -0.5),
             (-inf, 0.0, inf, 0.0), (-inf, 1.0, -inf, 1.0), (-inf, 0.5, -inf, 0.5)]
    for l, xv, want, want_g in cases:
        for d in (1, 37):  # the loop's tail, and a row through the SIMD body
            logits = torch.full((2, d), l, dtype=dtype, device=device, requires_grad=True)
            with op_path(path):
                out = pyvae.continuous_bernoulli_log_prob(logits, torch.full((2, d), xv, dtype=dtype, device=device))
            check_path(out, path)
            (g,) = torch.autograd.grad(out.sum(), logits)
            assert torch.equal(out, torch.full_like(out, want)), (l, xv, d, out)
            assert torch.equal(g, torch.full_like(g, want_g)), (l, xv, d, g)
    out = pyvae.continuous_bernoulli_log_prob(torch.tensor([[inf, math.nan]], dtype=dtype, device=device),
                                              torch.tensor([[1.0, 1.0]], dtype=dtype, device=device))
    assert torch.isnan(out).all()


def _check_accuracy(dtype, logits, want_fn, ulps):
    """The kernel's value and gradient per element (D = 1) at float64 ``logits`` (representable in
    ``dtype``) against ``want_fn(x) = (log p(x | logits), x - E[x])`` in float64, known to better than
    ``dtype``'s precision, for x in {0, 0.3, 0.5, 1}. Errors count in ulps of ``dtype``:

    - x = 0 or 1, every l: relative to the value and the gradient themselves;
    - x = 1/2, |l| < 1: relative to the value and the gradient (the series regime, where a closed form
      would cancel: the value is -l^2/24 + ..., the gradient -l/12 + ...);
    - every x and l: relative to the size of the terms of the definition, |x l| + softplus(l) + log C(l)
      for the value and |x| + E[x] for the gradient, so cancellation the inputs impose is not counted.
    """
    l = logits.to(dtype).view(-1, 1).requires_grad_()
    eps = torch.finfo(dtype).eps
    softplus = torch.nn.functional.softplus(logits)
    value0, mean = want_fn(0.0)
    mean = -mean
    log_c = value0 + softplus  # log p(0 | l) = -softplus(l) + log C(l)
    small = logits.abs() < 1
    for xv in (0.0, 0.3, 0.5, 1.0):
        xv = float(torch.tensor(xv, dtype=dtype))  # the x the kernel sees
        out = pyvae.continuous_bernoulli_log_prob(l, torch.full_like(l, xv))
        (g,) = torch.autograd.grad(out.sum(), l)
        want, want_g = want_fn(xv)
        err = (out.double() - want).abs() / eps
        err_g = (g.double().squeeze(-1) - want_g).abs() / eps
        terms = (xv * logits).abs() + softplus + log_c.abs()
        assert (err / terms).max() < ulps, (xv, (err / terms).max().item())
        assert (err_g / (xv + mean)).max() < ulps, (xv, (err_g / (xv + mean)).max().item())
        if xv in (0.0, 1.0):
            nz = want != 0
            assert (err[nz] / want[nz].abs()).max() < ulps, (xv, (err[nz] / want[nz].abs()).max().item())
            assert (err_g / want_g.abs()).max() < ulps, (xv, (err_g / want_g.abs()).max().item())
        if xv == 0.5:
            nz = small & (want != 0)
            assert (err[nz] / want[nz].abs()).max() < ulps, (xv, (err[nz] / want[nz].abs()).max().item())
            assert (err_g[nz] / want_g[nz].abs()).max() < ulps, (xv, (err_g[nz] / want_g[nz].abs()).max().item())


def _log_grid(n):
    mags = torch.logspace(-6, 4, n, dtype=torch.float64)
    return torch.cat([-mags.flip(0), torch.zeros(1, dtype=torch.float64), mags])


def test_cpu_math_float32_on_a_dense_grid():
    """float32 polynomial math, logits in +-[1e-6, 1e4] (200,000 log-spaced): a few ulps (see
    ``_check_accuracy``) against the float64 oracle."""
    logits = _log_grid(100_000).float().double()

    def want(x):
        return exact(logits.view(-1, 1), torch.full((logits.numel(), 1), x, dtype=torch.float64)), x - exact_mean(logits)

    for arch in ARCHS:
        with cpu_arch(arch):
            _check_accuracy(torch.float32, logits, want, ulps=4)


def test_cpu_math_float64_against_decimal():
    """float64 (libm) math, logits in +-[1e-6, 1e4] (2,000 log-spaced): a few ulps against 40-digit
    decimal arithmetic (the float64 oracle above is not accurate enough to judge float64)."""
    logits = _log_grid(1000)
    terms = [decimal_terms(v, 40) for v in logits.tolist()]

    def want(x):
        X = Decimal(x)
        with localcontext() as ctx:
            ctx.prec = 40
            return (torch.tensor([float(v0 + X * L) for L, v0, _ in terms], dtype=torch.float64),
                    torch.tensor([float(X - m) for _, _, m in terms], dtype=torch.float64))

    for arch in ARCHS:
        with cpu_arch(arch):
            _check_accuracy(torch.float64, logits, want, ulps=2)


def test_reference_implementation_is_torch_distributions():
    logits, x = ref(make(4, 3, 7, scale=3.0, seed=1), make(3, 7, kind="unit", seed=2))
    assert_close(reference.continuous_bernoulli_log_prob(logits, x), oracle(logits, x), torch.float64)
    assert_close(reference.continuous_bernoulli_log_prob(logits, x), exact(logits, x), torch.float64)


# ---------------------------------------------------------------------- autograd, registration
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(device, path):
    # both regimes: |l| < 1 (series) and |l| >= 1 (closed form), and l near 0
    logits = make(2, 3, 4, dtype=torch.float64, device=device, scale=3.0, seed=1, grad=True)
    x = make(3, 4, dtype=torch.float64, device=device, kind="unit", seed=2, grad=True)
    tiny = make(3, 4, dtype=torch.float64, device=device, scale=1e-3, seed=3, grad=True)
    with op_path(path):
        assert torch.autograd.gradcheck(pyvae.continuous_bernoulli_log_prob, (logits, x))
        assert torch.autograd.gradcheck(pyvae.continuous_bernoulli_log_prob, (logits[0], x))
        assert torch.autograd.gradcheck(pyvae.continuous_bernoulli_log_prob, (tiny, x))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    logits = make(2, 3, 5, dtype=torch.float64, device=device, scale=2.0, seed=1, grad=True)
    x = make(3, 5, dtype=torch.float64, device=device, kind="unit", seed=2, grad=True)
    op = torch.ops.pyvae.continuous_bernoulli_log_prob
    torch.library.opcheck(op, (logits, x))
    torch.library.opcheck(op, (logits, x.detach()))
    torch.library.opcheck(op, (logits[0].detach(), x.detach()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_builds_agree(dtype):
    logits = make(5, 1007, dtype=dtype, scale=4.0, seed=1, grad=True)
    x = make(1007, dtype=dtype, kind="unit", seed=2, grad=True)
    g = make(5, dtype=dtype, seed=3)

    def run():
        out = pyvae.continuous_bernoulli_log_prob(logits, x)
        return (out.detach(), *grads(out, [logits, x], g))

    rl, rx = ref(logits, x)
    expected = exact(rl, rx)
    assert_archs_agree(per_arch(run), (expected, *grads(expected, [rl, rx], g.double())), dtype)


@pytest.mark.parametrize("path", PATHS)
def test_double_backward_raises(path):
    logits = make(3, 4, dtype=torch.float64, seed=1, grad=True)
    x = make(3, 4, dtype=torch.float64, kind="unit", seed=2, grad=True)
    assert_double_backward_raises(pyvae.continuous_bernoulli_log_prob, [logits, x], path)


def test_exported_everywhere():
    assert pyvae.continuous_bernoulli_log_prob is pyvae.ops.continuous_bernoulli_log_prob
    assert pyvae.continuous_bernoulli_mean is pyvae.ops.continuous_bernoulli_mean
    assert hasattr(torch.ops.pyvae, "continuous_bernoulli_log_prob")


# ------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("args,exc,match", [
    ((torch.tensor(0.5), torch.tensor(1.0)), ValueError, "logits must have at least 1 dim"),
    ((torch.zeros(3), torch.tensor(1.0)), ValueError, "x must have at least 1 dim"),
    ((torch.zeros(3, 4), torch.zeros(3, 5)), ValueError, r"do not broadcast: logits \(3, 4\), x \(3, 5\)"),
    ((torch.zeros(3, 4), torch.ones(3, 4, dtype=torch.int64)), TypeError, "x must be a floating-point"),
    ((torch.zeros(3, 4, dtype=torch.int32), torch.zeros(3, 4)), TypeError, "logits must be a floating-point"),
    ((torch.zeros(3, 4), torch.zeros(3, 4, dtype=torch.float64)), TypeError, "x has dtype torch.float64 but logits"),
])
def test_bad_input_names_the_argument(args, exc, match):
    with pytest.raises(exc, match=match):
        pyvae.continuous_bernoulli_log_prob(*args)


def test_non_contiguous_inputs():
    logits = make(9, 6, dtype=torch.float64, scale=3.0, seed=1).t().requires_grad_()  # [6, 9] transposed
    x = make(6, 18, dtype=torch.float64, kind="unit", seed=2)[:, ::2].requires_grad_()  # stride 2
    assert not logits.is_contiguous() and not x.is_contiguous()
    check_op(pyvae.continuous_bernoulli_log_prob, oracle, [logits, x], torch.float64)
    x_rows = make(9, dtype=torch.float64, kind="unit", seed=3).expand(6, 9)  # stride 0
    check_op(pyvae.continuous_bernoulli_log_prob, oracle, [logits, x_rows], torch.float64)


def test_empty_batch():
    logits = make(2, 0, 5, grad=True)
    x = make(0, 5, kind="unit", grad=True)
    out = pyvae.continuous_bernoulli_log_prob(logits, x)
    assert out.shape == (2, 0)
    g_l, g_x = grads(out, [logits, x])
    assert g_l.shape == logits.shape and g_x.shape == x.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nan_stays_in_its_row(dtype):
    """NaN in a small logit (the series regime), a large one (the closed form) or in x."""
    logits = make(4, 9, dtype=dtype, scale=3.0, seed=1, grad=True)
    x = make(4, 9, dtype=dtype, kind="unit", seed=2)
    with torch.no_grad():
        logits[1, 4] = math.nan
        logits[2, 0] = 0.25  # row 2 stays finite
    x[3, 8] = math.nan
    out = pyvae.continuous_bernoulli_log_prob(logits, x)
    assert out[[1, 3]].isnan().all()
    assert_close(out[[0, 2]], exact(*ref(logits, x))[[0, 2]], dtype)
    (g,) = grads(out, [logits])
    assert torch.isfinite(g[[0, 2]]).all() and g[1, 4].isnan() and g[3, 8].isnan()


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_on_cpu_computes_in_float32(dtype):
    logits = make(3, 4, 784, dtype=dtype, scale=3.0, seed=1, grad=True)
    x = make(4, 784, dtype=dtype, kind="unit", seed=2, grad=True)
    out, *_ = check_op(pyvae.continuous_bernoulli_log_prob, oracle, [logits, x], dtype)
    assert out.dtype == dtype


# ------------------------------------------------------------------------------------ mean
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_mean(device, dtype):
    """E[x] against torch's mean (moderate logits) and the exact one (all, incl. 1e-3 and 1e4), and
    the identity d/dl log p(x | l) = x - E[x] with the kernel's gradient."""
    for scale in (1e-3, 3.0, 40.0, 1e4):
        logits = make(5, 7, dtype=dtype, device=device, scale=scale, seed=1)
        m = pyvae.continuous_bernoulli_mean(logits)
        assert m.dtype == dtype and m.device.type == device and m.shape == logits.shape
        l64 = ref(logits)
        assert_close(m, exact_mean(l64), dtype)
        if scale <= 3.0:
            assert_close(m, reference.continuous_bernoulli_mean(l64), dtype)
        assert ((m >= 0) & (m <= 1)).all()
        lg = logits.clone().requires_grad_()
        (g,) = torch.autograd.grad(pyvae.continuous_bernoulli_log_prob(lg, torch.zeros_like(lg)).sum(), lg)
        assert_close(-g, exact_mean(l64), dtype)


def test_mean_against_decimal_and_edges():
    pts = [0.0, 1e-8, -1e-8, 1e-3, 0.999999, 1.0, 1.000001, -1.0, 7.3, -40.0, 88.8, -800.0, 1e4, -1e4]
    got = pyvae.continuous_bernoulli_mean(torch.tensor(pts, dtype=torch.float64))
    want = torch.tensor([decimal_value_grad_mean(p, 0.0)[2] for p in pts], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-15, atol=1e-16)
    edge = pyvae.continuous_bernoulli_mean(torch.tensor([math.inf, -math.inf, math.nan]))
    assert edge[0] == 1 and edge[1] == 0 and edge[2].isnan()
    with pytest.raises(TypeError, match="logits must be a floating-point"):
        pyvae.continuous_bernoulli_mean(torch.zeros(3, dtype=torch.int64))


def test_mean_gradcheck():
    """Both branches (|l| < 1 and beyond), l = 0 itself and |l| past e^|l|'s overflow (~709.8) give finite,
    correct gradients."""
    logits = torch.tensor([0.0, 1e-3, -0.7, 0.999, 1.0, -2.5, 30.0, 800.0, -1e4], dtype=torch.float64,
                          requires_grad=True)
    assert torch.autograd.gradcheck(pyvae.continuous_bernoulli_mean, (logits,))


# Logits around and past where e^|l| overflows: ~88.7 in float32 (half types are computed in it), ~709.8
# in float64 (a gradient of 1 / expm1(|l|) was inf * 0 = NaN there).
_LARGE = {torch.float64: [50.0, -100.0, 709.5, 710.0, -711.0, 1e3, 1e4, -1e4],
          torch.float32: [50.0, 88.5, 88.8, 89.0, -89.0, 100.0, -1e3, 1e4],
          torch.bfloat16: [88.5, 89.0, -100.0, 1e4],
          torch.float16: [88.5, 89.0, -100.0, 120.0]}


@pytest.mark.parametrize("dtype", list(_LARGE))
def test_mean_gradient_for_large_logits(dtype):
    """d E[x] / dl = 1/l^2 - 1/(4 sinh^2(l/2)) (about 1/l^2 here), relative to its size."""
    logits = torch.tensor(_LARGE[dtype], dtype=dtype, requires_grad=True)
    (g,) = torch.autograd.grad(pyvae.continuous_bernoulli_mean(logits).sum(), logits)
    l64 = logits.detach().double()
    want = 1 / l64**2 - 1 / (4 * torch.sinh(l64 / 2) ** 2)
    assert g.dtype == dtype
    # (half types: their rounding of the float32 gradient, at most 2^-8 (bfloat16) or 2^-11 (float16) of it)
    rtol = {torch.float64: 1e-13, torch.float32: 1e-5, torch.bfloat16: 4e-3, torch.float16: 5e-4}[dtype]
    torch.testing.assert_close(g.double(), want, rtol=rtol, atol=0)

