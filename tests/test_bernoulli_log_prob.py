"""pyvae.bernoulli_log_prob against torch.distributions.Bernoulli(logits=...).log_prob."""
import math

import pytest
import torch
from torch.distributions import Bernoulli, Independent

import pyvae
from pyvae import reference
from conftest import (LOGITS_X_BROADCASTS, DEVICES, DEVICE_DTYPES, HALF_DTYPES, PATHS, SHAPES, assert_archs_agree, assert_close,
                      assert_double_backward_raises, check_op, check_path, grads, make, op_path, per_arch, ref)


def oracle(logits, x):
    """Independent(Bernoulli(logits), 1).log_prob(x) in float64 (x may broadcast either way)."""
    return Independent(Bernoulli(logits=logits, validate_args=False), 1, validate_args=False).log_prob(x)


def exact(logits, x):
    """The same in float64 without cancellation: (x l - max(l, 0)) - log1p(e^-|l|) (torch's BCE loses
    the relative precision of results near 0; this grouping keeps it for binary x)."""
    return (x * logits - logits.clamp(min=0)) - torch.log1p(torch.exp(-logits.abs()))


def exact_grad(logits, x):
    """x - sigmoid(l), without cancellation for binary x."""
    s = torch.exp(-logits.abs()) / (1 + torch.exp(-logits.abs()))  # sigmoid(-|l|)
    return torch.where(logits < 0, x - s, x - 1 + s)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("x_kind", ["binary", "unit"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_matches_torch_distributions(device, dtype, shape, x_kind, path):
    logits = make(*shape, dtype=dtype, device=device, scale=3.0, seed=1, grad=True)
    x = make(*shape, dtype=dtype, device=device, kind=x_kind, seed=2, grad=True)
    out, *_ = check_op(pyvae.bernoulli_log_prob, oracle, [logits, x], dtype, path=path)
    assert out.shape == shape[:-1] and out.device.type == device


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shapes", LOGITS_X_BROADCASTS, ids=str)
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_broadcast_sample_dims(device, dtype, shapes, path):
    logits = make(*shapes[0], dtype=dtype, device=device, scale=3.0, seed=1, grad=True)
    x = make(*shapes[1], dtype=dtype, device=device, kind="binary", seed=2, grad=True)
    out, *_ = check_op(pyvae.bernoulli_log_prob, oracle, [logits, x], dtype, path=path)
    assert out.shape == torch.broadcast_shapes(shapes[0], shapes[1])[:-1]


def test_reference_implementation_agrees_with_oracle():
    logits, x = ref(make(4, 3, 7, scale=3.0, seed=1), make(3, 7, kind="unit", seed=2))
    assert_close(reference.bernoulli_log_prob(logits, x), oracle(logits, x), torch.float64)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(device, path):
    logits = make(2, 3, 4, dtype=torch.float64, device=device, scale=3.0, seed=1, grad=True)
    x = make(3, 4, dtype=torch.float64, device=device, kind="unit", seed=2, grad=True)
    with op_path(path):
        assert torch.autograd.gradcheck(pyvae.bernoulli_log_prob, (logits, x))
        assert torch.autograd.gradcheck(pyvae.bernoulli_log_prob, (logits[0], x))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    logits = make(2, 3, 5, dtype=torch.float64, device=device, seed=1, grad=True)
    x = make(3, 5, dtype=torch.float64, device=device, kind="unit", seed=2, grad=True)
    torch.library.opcheck(torch.ops.pyvae.bernoulli_log_prob, (logits, x))
    torch.library.opcheck(torch.ops.pyvae.bernoulli_log_prob, (logits, x.detach()))
    torch.library.opcheck(torch.ops.pyvae.bernoulli_log_prob, (logits[0].detach(), x.detach()))


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_extreme_logits(device, dtype):
    """Logits of +-1e4 against x of exactly 0 and 1: finite, exact values and gradients."""
    big = 1e4
    logits = torch.tensor([[big, -big, big, -big, 0.0, 30.0, -30.0, 100.0, -100.0]], dtype=dtype, device=device)
    x = torch.tensor([[1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0]], dtype=dtype, device=device)
    for i in range(logits.shape[1]):  # one element per call, so no value hides behind another
        li = logits[:, i:i + 1].clone().requires_grad_()
        out, expected, (g, _), _ = check_op(pyvae.bernoulli_log_prob, oracle, [li, x[:, i:i + 1]], dtype)
        assert torch.isfinite(out).all() and torch.isfinite(g).all()
    # all of them in one row as well (the SIMD body, not only the tail)
    reps = 2 if dtype == torch.float16 else 8  # the float16 row sum must stay below 65504
    row = logits.repeat(1, reps).requires_grad_()
    out, _, (g, _), _ = check_op(pyvae.bernoulli_log_prob, oracle, [row, x.repeat(1, reps)], dtype)
    assert torch.isfinite(out).all() and torch.isfinite(g).all()


# (logit, x, log Bern(x | sigmoid(logit)), x - sigmoid(logit)): the limits at infinite logits
INFINITE = [(math.inf, 1.0, 0.0, 0.0), (math.inf, 0.0, -math.inf, -1.0), (math.inf, 0.5, -math.inf, -0.5),
            (-math.inf, 0.0, 0.0, 0.0), (-math.inf, 1.0, -math.inf, 1.0), (-math.inf, 0.5, -math.inf, 0.5)]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_infinite_logits_give_the_limits(device, dtype, path):
    """Logits of +-inf (float16 logits past 65504, a diverging model's): the density's limit, 0 where x
    sits at the end the logit points to and -inf elsewhere, not the NaN of inf - inf or 0 * inf
    (NOTE: [Infinite inputs] in csrc/ops/bernoulli.h)."""
    for l, xv, want, want_g in INFINITE:
        for d in (1, 37):  # one element (the loop's tail), and a row through the SIMD body
            logits = torch.full((2, d), l, dtype=dtype, device=device, requires_grad=True)
            x = torch.full((2, d), xv, dtype=dtype, device=device)
            with op_path(path):
                out = pyvae.bernoulli_log_prob(logits, x)
            check_path(out, path)
            (g,) = torch.autograd.grad(out.sum(), logits)
            assert torch.equal(out, torch.full_like(out, want)), (l, xv, d, out)
            assert torch.equal(g, torch.full_like(g, want_g)), (l, xv, d, g)
    # a NaN still gives NaN, beside an infinite logit of the same row
    out = pyvae.bernoulli_log_prob(torch.tensor([[math.inf, math.nan]], dtype=dtype, device=device),
                                   torch.tensor([[1.0, 1.0]], dtype=dtype, device=device))
    assert torch.isnan(out).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_math_is_exact_on_a_dense_grid(dtype):
    """Per element (D = 1), logits in [-30, 30]: the float32 polynomial exp/log1p give a relative
    error of a few ulps, in the value and the gradient, for x = 0 and x = 1 alike."""
    logits = torch.linspace(-30, 30, 300_001, dtype=torch.float64).to(dtype).view(-1, 1).requires_grad_()
    eps = torch.finfo(dtype).eps
    for xv in (0.0, 1.0):
        x = torch.full_like(logits, xv)
        out = pyvae.bernoulli_log_prob(logits, x)
        (g,) = torch.autograd.grad(out.sum(), logits)
        l64 = logits.detach().double()
        want = exact(l64, x.double()).squeeze(-1)
        want_g = exact_grad(l64, x.double())
        rel = ((out.double() - want).abs() / want.abs()).max().item()
        rel_g = ((g.double() - want_g).abs() / want_g.abs()).max().item()
        assert rel < 3 * eps, (xv, rel)
        assert rel_g < 3 * eps, (xv, rel_g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_builds_agree(dtype):
    logits = make(5, 1007, dtype=dtype, scale=4.0, seed=1, grad=True)
    x = make(1007, dtype=dtype, kind="unit", seed=2, grad=True)
    g = make(5, dtype=dtype, seed=3)

    def run():
        out = pyvae.bernoulli_log_prob(logits, x)
        return (out.detach(), *grads(out, [logits, x], g))

    rl, rx = ref(logits, x)
    expected = oracle(rl, rx)
    assert_archs_agree(per_arch(run), (expected, *grads(expected, [rl, rx], g.double())), dtype)


@pytest.mark.parametrize("path", PATHS)
def test_double_backward_raises(path):
    logits = make(3, 4, dtype=torch.float64, seed=1, grad=True)
    x = make(3, 4, dtype=torch.float64, kind="unit", seed=2, grad=True)
    assert_double_backward_raises(pyvae.bernoulli_log_prob, [logits, x], path)

# ------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("args,exc,match", [
    ((torch.tensor(0.5), torch.tensor(1.0)), ValueError, "logits must have at least 1 dim"),
    ((torch.zeros(3), torch.tensor(1.0)), ValueError, "x must have at least 1 dim"),
    ((torch.zeros(3, 4), torch.zeros(3, 5)), ValueError, r"do not broadcast: logits \(3, 4\), x \(3, 5\)"),
    ((torch.zeros(2, 3, 4), torch.zeros(2, 4)), ValueError, r"x \(2, 4\)"),
    ((torch.zeros(3, 4), torch.ones(3, 4, dtype=torch.int64)), TypeError, "x must be a floating-point"),
    ((torch.zeros(3, 4), torch.ones(3, 4, dtype=torch.bool)), TypeError, "x must be a floating-point"),
    ((torch.zeros(3, 4, dtype=torch.int32), torch.zeros(3, 4)), TypeError, "logits must be a floating-point"),
    ((torch.zeros(3, 4), torch.zeros(3, 4, dtype=torch.float64)), TypeError, "x has dtype torch.float64 but logits"),
    ((torch.zeros(3, 4), torch.zeros(3, 4, dtype=torch.bfloat16)), TypeError, "x has dtype torch.bfloat16"),
])
def test_bad_input_names_the_argument(args, exc, match):
    with pytest.raises(exc, match=match):
        pyvae.bernoulli_log_prob(*args)


def test_non_contiguous_inputs():
    logits = make(9, 6, dtype=torch.float64, scale=3.0, seed=1).t().requires_grad_()  # [6, 9] transposed
    x = make(6, 18, dtype=torch.float64, kind="binary", seed=2)[:, ::2].requires_grad_()  # stride 2
    assert not logits.is_contiguous() and not x.is_contiguous()
    check_op(pyvae.bernoulli_log_prob, oracle, [logits, x], torch.float64)
    x_rows = make(9, dtype=torch.float64, kind="binary", seed=3).expand(6, 9)  # stride 0
    check_op(pyvae.bernoulli_log_prob, oracle, [logits, x_rows], torch.float64)


def test_empty_batch():
    logits = make(2, 0, 5, grad=True)
    x = make(0, 5, kind="binary", grad=True)
    out = pyvae.bernoulli_log_prob(logits, x)
    assert out.shape == (2, 0)
    g_l, g_x = grads(out, [logits, x])
    assert g_l.shape == logits.shape and g_x.shape == x.shape


def test_nan_stays_in_its_row():
    logits = make(4, 9, dtype=torch.float64, scale=3.0, seed=1, grad=True)
    x = make(4, 9, dtype=torch.float64, kind="binary", seed=2)
    with torch.no_grad():
        logits[1, 4] = math.nan
    x[3, 8] = math.nan
    out = pyvae.bernoulli_log_prob(logits, x)
    assert out[[1, 3]].isnan().all()
    assert_close(out[[0, 2]], oracle(*ref(logits, x))[[0, 2]], torch.float64)
    (g,) = grads(out, [logits])
    assert torch.isfinite(g[[0, 2]]).all() and g[1, 4].isnan() and g[3, 8].isnan()


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_on_cpu_computes_in_float32(dtype):
    logits = make(3, 4, 784, dtype=dtype, scale=3.0, seed=1, grad=True)
    x = make(4, 784, dtype=dtype, kind="binary", seed=2, grad=True)
    out, *_ = check_op(pyvae.bernoulli_log_prob, oracle, [logits, x], dtype)
    assert out.dtype == dtype
