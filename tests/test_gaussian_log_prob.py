"""pyvae.gaussian_log_prob against torch.distributions.Normal(mean, exp(logvar / 2)).log_prob."""
import math

import pytest
import torch
from torch.distributions import Independent, Normal

import pyvae
from pyvae import reference
from conftest import (DEVICES, DEVICE_DTYPES, HALF_DTYPES, PATHS, SHAPES, assert_archs_agree, assert_close,
                      assert_double_backward_raises, check_op, check_path, grads, make, op_path, per_arch, ref)


def oracle(x, mean, logvar):
    """Independent(Normal(mean, exp(logvar / 2)), 1).log_prob(x) in float64."""
    scale = (0.5 * logvar).exp()
    return Independent(Normal(mean, scale, validate_args=False), 1, validate_args=False).log_prob(x)


def _inputs(x_shape, mean_shape, lv_shape, dtype=torch.float32, device="cpu", lv_scale=1.0):
    x = make(*x_shape, dtype=dtype, device=device, seed=1, grad=True)
    mean = make(*mean_shape, dtype=dtype, device=device, seed=2, grad=True)
    lv = make(*lv_shape, dtype=dtype, device=device, seed=3, scale=lv_scale, grad=True)
    return [x, mean, lv]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_matches_torch_distributions(device, dtype, shape, path):
    inputs = _inputs(shape, shape, shape, dtype, device)
    out, *_ = check_op(pyvae.gaussian_log_prob, oracle, inputs, dtype, path=path)
    assert out.shape == shape[:-1] and out.device.type == device


# (x, mean, logvar) shapes: x shared across leading sample dims of the mean, one learned variance
# per feature ([D]), variance per row ([B, 1]), x with more dims than the mean.
BROADCASTS = [
    ((3, 7), (4, 3, 7), (4, 3, 7)),
    ((3, 7), (4, 3, 7), (7,)),
    ((5, 784), (2, 5, 784), (784,)),
    ((2, 1007), (2, 1007), (2, 1)),
    ((4, 3, 7), (3, 7), (7,)),
    ((1, 3, 5), (2, 1, 5), (5,)),
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shapes", BROADCASTS, ids=str)
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_broadcast(device, dtype, shapes, path):
    out, *_ = check_op(pyvae.gaussian_log_prob, oracle, _inputs(*shapes, dtype, device), dtype, path=path)
    assert out.shape == torch.broadcast_shapes(*shapes)[:-1]


def test_reference_implementation_agrees_with_oracle():
    inputs = ref(*_inputs((3, 7), (4, 3, 7), (7,), torch.float64))
    assert_close(reference.gaussian_log_prob(*inputs), oracle(*inputs), torch.float64)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(device, path):
    with op_path(path):
        for shapes in [((2, 3), (2, 3), (2, 3)), ((3, 4), (2, 3, 4), (4,))]:
            assert torch.autograd.gradcheck(pyvae.gaussian_log_prob, _inputs(*shapes, torch.float64, device))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    inputs = _inputs((3, 5), (2, 3, 5), (5,), torch.float64, device)
    torch.library.opcheck(torch.ops.pyvae.gaussian_log_prob, inputs)
    torch.library.opcheck(torch.ops.pyvae.gaussian_log_prob, [inputs[0].detach(), inputs[1], inputs[2].detach()])


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_extreme_logvar(device, dtype):
    if dtype in HALF_DTYPES:
        pytest.skip("e^30 overflows half types")
    lv = torch.tensor([[-30.0], [30.0], [-30.0], [30.0], [0.0]], dtype=dtype, device=device).requires_grad_()
    x = torch.tensor([[1e-6], [1e6], [3.0], [-2.0], [1.0]], dtype=dtype, device=device).requires_grad_()
    mean = torch.zeros_like(x).requires_grad_()
    out, _, got, _ = check_op(pyvae.gaussian_log_prob, oracle, [x, mean, lv], dtype)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in got)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_tiny_variances(device, dtype, path):
    """logvar far below -88 (a learned variance collapsing onto a constant pixel; e^-lv overflows float32
    there): finite values and gradients wherever they are finite, where (x - m)^2 e^-lv gave NaN at x = m
    and -inf at x - m = 1e-3; and the limits at logvar = -inf, +inf at x = m and -inf elsewhere (NOTE:
    [Tiny variances] in csrc/ops/gaussian_log_prob.h)."""
    if dtype in HALF_DTYPES:
        pytest.skip("half inputs and outputs round beyond the tolerance here; their kernels compute in float32")
    log2pi = math.log(2 * math.pi)
    cases = [(-89.0, 0.0), (-100.0, 0.0), (-150.0, 0.0), (-1e4, 0.0), (-89.0, 1e-3), (-100.0, 1e-16)]
    for lv, d in cases:
        q = d * d * math.exp(-lv) if d else 0.0
        want, want_glv, want_gm = -0.5 * (log2pi + lv + q), 0.5 * (q - 1.0), (d * math.exp(-lv) if d else 0.0)
        for n in (1, 37):  # the loop's tail, and a row through the SIMD body
            x = torch.full((2, n), d, dtype=dtype, device=device, requires_grad=True)
            mean = torch.zeros(2, n, dtype=dtype, device=device, requires_grad=True)
            logvar = torch.full((2, n), lv, dtype=dtype, device=device, requires_grad=True)
            with op_path(path):
                out = pyvae.gaussian_log_prob(x, mean, logvar)
            check_path(out, path)
            gx, gm, glv = torch.autograd.grad(out.sum(), [x, mean, logvar])
            torch.testing.assert_close(out.double(), torch.full((2,), n * want, dtype=torch.float64), rtol=1e-5, atol=0)
            torch.testing.assert_close(glv.double(), torch.full((2, n), want_glv, dtype=torch.float64), rtol=1e-5, atol=0)
            torch.testing.assert_close(gm.double(), torch.full((2, n), want_gm, dtype=torch.float64), rtol=1e-5, atol=0)
            torch.testing.assert_close(gx, -gm)
    for d, want in ((0.0, math.inf), (1e-3, -math.inf), (-2.0, -math.inf)):
        for n in (1, 37):
            out = pyvae.gaussian_log_prob(torch.full((1, n), d, dtype=dtype, device=device),
                                          torch.zeros(1, n, dtype=dtype, device=device),
                                          torch.full((1, n), -math.inf, dtype=dtype, device=device))
            assert out.item() == want, (d, n, out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_math_accuracy_over_logvar_range(dtype):
    """Per element (D = 1), logvar in [-80, 80]: a few ulps of the largest term."""
    lv = torch.linspace(-80, 80, 200_001, dtype=torch.float64).to(dtype).view(-1, 1)
    x = make(lv.shape[0], 1, dtype=dtype, seed=4) * (0.5 * lv).exp()  # (x - m)^2 e^-lv of order 1
    out = pyvae.gaussian_log_prob(x, torch.zeros_like(x), lv).double()
    x64, lv64 = x.double(), lv.double()
    sq = x64.pow(2) * (-lv64).exp()
    want = (-0.5 * (math.log(2 * math.pi) + lv64 + sq)).squeeze(-1)
    scale = (math.log(2 * math.pi) + lv64.abs() + sq).squeeze(-1)
    err = ((out - want).abs() / scale).max().item()
    assert err < 4 * torch.finfo(dtype).eps, err


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_builds_agree(dtype):
    inputs = _inputs((3, 1007), (2, 3, 1007), (1007,), dtype)
    g = make(2, 3, dtype=dtype, seed=9)

    def run():
        out = pyvae.gaussian_log_prob(*inputs)
        return (out.detach(), *grads(out, inputs, g))

    ref_inputs = ref(*inputs)
    expected = oracle(*ref_inputs)
    assert_archs_agree(per_arch(run), (expected, *grads(expected, ref_inputs, g.double())), dtype)


@pytest.mark.parametrize("path", PATHS)
def test_double_backward_raises(path):
    assert_double_backward_raises(pyvae.gaussian_log_prob, _inputs((3, 4), (3, 4), (4,), torch.float64), path)

# ------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("args,exc,match", [
    ((torch.tensor(0.0), torch.zeros(3), torch.zeros(3)), ValueError, "x must have at least 1 dim"),
    ((torch.zeros(3), torch.tensor(0.0), torch.zeros(3)), ValueError, "mean must have at least 1 dim"),
    ((torch.zeros(3), torch.zeros(3), torch.tensor(0.0)), ValueError, "logvar must have at least 1 dim"),
    ((torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(3)), ValueError, r"do not broadcast: .*logvar \(3,\)"),
    ((torch.zeros(3, 4), torch.zeros(2, 4), torch.zeros(4)), ValueError, r"mean \(2, 4\)"),
    ((torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(4, dtype=torch.int64)), TypeError,
     "logvar must be a floating-point"),
    ((torch.zeros(3, 4, dtype=torch.int16), torch.zeros(3, 4), torch.zeros(4)), TypeError,
     "x must be a floating-point"),
    ((torch.zeros(3, 4), torch.zeros(3, 4, dtype=torch.float64), torch.zeros(4)), TypeError,
     "mean has dtype torch.float64 but x"),
    ((torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(4, dtype=torch.float16)), TypeError,
     "logvar has dtype torch.float16 but x"),
])
def test_bad_input_names_the_argument(args, exc, match):
    with pytest.raises(exc, match=match):
        pyvae.gaussian_log_prob(*args)


def test_non_contiguous_inputs():
    x = make(7, 5, dtype=torch.float64, seed=1).t().requires_grad_()  # [5, 7] transposed
    mean = make(5, 21, dtype=torch.float64, seed=2)[:, ::3].requires_grad_()  # stride 3
    lv = make(7, dtype=torch.float64, seed=3).expand(5, 7).requires_grad_()  # stride 0
    assert not any(t.is_contiguous() for t in (x, mean, lv))
    check_op(pyvae.gaussian_log_prob, oracle, [x, mean, lv], torch.float64)


def test_empty_batch():
    inputs = _inputs((0, 5), (0, 5), (5,))
    out = pyvae.gaussian_log_prob(*inputs)
    assert out.shape == (0,)
    g_x, g_m, g_lv = grads(out, inputs)
    assert g_x.shape == (0, 5) and g_m.shape == (0, 5)
    assert g_lv.shape == (5,) and (g_lv == 0).all()


def test_nan_stays_in_its_row():
    x, mean, lv = _inputs((4, 6), (4, 6), (4, 6), torch.float64)
    with torch.no_grad():
        x[1, 0] = math.nan
        lv[2, 5] = math.nan
    out = pyvae.gaussian_log_prob(x, mean, lv)
    assert out[[1, 2]].isnan().all()
    assert_close(out[[0, 3]], oracle(*ref(x, mean, lv))[[0, 3]], torch.float64)
    for g in grads(out, [x, mean, lv]):
        assert torch.isfinite(g[[0, 3]]).all()


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_on_cpu_computes_in_float32(dtype):
    inputs = _inputs((4, 784), (2, 4, 784), (784,), dtype)
    out, *_ = check_op(pyvae.gaussian_log_prob, oracle, inputs, dtype)
    assert out.dtype == dtype
