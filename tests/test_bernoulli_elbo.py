"""pyvae.bernoulli_elbo (fused SGVB estimator B) against its composition from torch.distributions."""
import copy
import importlib
import math

import pytest
import torch

import pyvae
from pyvae import reference
from conftest import (DEVICES, DEVICE_DTYPES, HALF_DTYPES, PATHS, assert_archs_agree, assert_close,
                      assert_double_backward_raises, check_op, grads, make, op_path, per_arch, ref)
from conftest import TOL  # noqa: E402
from test_bernoulli_log_prob import oracle as bernoulli_oracle
from test_gaussian_kl import oracle as kl_oracle


def oracle(logits, x, mu, logvar):
    """mean over L of log p(x | z_l) (when logits is [L, *B, D]) minus KL(q || N(0, I)), float64."""
    rec = bernoulli_oracle(logits, x)
    if logits.dim() == mu.dim() + 1:
        rec = rec.mean(0)
    return rec - kl_oracle(mu, logvar)


# (logits, x, mu) shapes; logvar has mu's shape.
CASES = [
    ((1, 1), (1, 1), (1, 1)),
    ((3, 5), (3, 5), (3, 2)),
    ((4, 784), (4, 784), (4, 20)),
    ((2, 1007), (2, 1007), (2, 3)),
    ((5, 3, 7), (3, 7), (3, 4)),  # L = 5 samples, x shared
    ((2, 4, 784), (4, 784), (4, 20)),
    ((3, 2, 6), (6,), (2, 5)),  # x broadcast over the batch
    ((1, 3, 7), (3, 7), (3, 4)),  # L = 1
    ((2, 2, 3, 7), (2, 3, 7), (2, 3, 4)),  # two batch dims
]


def _inputs(case, dtype=torch.float32, device="cpu", x_kind="binary"):
    ls, xs, ms = case
    return [make(*ls, dtype=dtype, device=device, scale=3.0, seed=1, grad=True),
            make(*xs, dtype=dtype, device=device, kind=x_kind, seed=2, grad=True),
            make(*ms, dtype=dtype, device=device, seed=3, grad=True),
            make(*ms, dtype=dtype, device=device, seed=4, grad=True)]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_matches_composition_of_distributions(device, dtype, case, path):
    inputs = _inputs(case, dtype, device)
    out, *_ = check_op(pyvae.bernoulli_elbo, oracle, inputs, dtype, path=path)
    assert out.shape == case[2][:-1]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_equals_log_prob_minus_kl_of_the_pyvae_ops(case):
    """The fused op equals its unfused pyvae parts, values and gradients (float64: to rounding)."""
    inputs = _inputs(case, torch.float64, x_kind="unit")
    logits, x, mu, logvar = inputs
    fused = pyvae.bernoulli_elbo(*inputs)
    rec = pyvae.bernoulli_log_prob(logits, x)
    parts = (rec.mean(0) if logits.dim() == mu.dim() + 1 else rec) - pyvae.gaussian_kl(mu, logvar)
    assert_close(fused, parts, torch.float64)
    g = make(*fused.shape, dtype=torch.float64, seed=5)
    for a, b in zip(grads(fused, inputs, g), grads(parts, inputs, g)):
        assert_close(a, b, torch.float64)


def test_reference_implementation_agrees_with_oracle():
    for case in CASES:
        inputs = ref(*_inputs(case, torch.float64))
        assert_close(reference.bernoulli_elbo(*inputs), oracle(*inputs), torch.float64)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(device, path):
    with op_path(path):
        for case in [((2, 3), (2, 3), (2, 2)), ((3, 2, 4), (4,), (2, 3))]:
            inputs = _inputs(case, torch.float64, device, x_kind="unit")
            assert torch.autograd.gradcheck(pyvae.bernoulli_elbo, inputs)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for case in [((2, 3, 5), (3, 5), (3, 4)), ((3, 5), (5,), (3, 4))]:
        inputs = _inputs(case, torch.float64, device, x_kind="unit")
        torch.library.opcheck(torch.ops.pyvae.bernoulli_elbo, inputs)
    inputs[1] = inputs[1].detach()
    torch.library.opcheck(torch.ops.pyvae.bernoulli_elbo, inputs)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_extreme_inputs(device, dtype):
    """Logits of +-1e4 against x exactly 0 and 1, and logvar of +-30: finite, exact values and grads."""
    if dtype in HALF_DTYPES:
        pytest.skip("e^30 overflows half types")
    logits = torch.tensor([[[1e4, -1e4, 1e4, -1e4, 0.0], [30.0, -30.0, 5.0, -5.0, 1e4]]], dtype=dtype).repeat(2, 1, 1)
    x = torch.tensor([[1.0, 0.0, 0.0, 1.0, 1.0], [1.0, 0.0, 1.0, 0.0, 1.0]], dtype=dtype)
    mu = torch.tensor([[0.5, -1.0, 2.0], [0.0, 3.0, -0.1]], dtype=dtype)
    logvar = torch.tensor([[30.0, -30.0, 0.0], [-30.0, 1.0, 30.0]], dtype=dtype)
    inputs = [t.to(device).requires_grad_() for t in (logits, x, mu, logvar)]
    out, _, got, _ = check_op(pyvae.bernoulli_elbo, oracle, inputs, dtype)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in got)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_infinite_logits_give_the_limits(device, dtype):
    """Logits of +-inf in the fused ELBO (NOTE: [Infinite inputs] in csrc/ops/bernoulli.h): where x sits at
    the end the logit points to, the term's limit is 0, so the ELBO equals the oracle's at logits of +-1e4
    (whose terms are 0 in float64), gradients included; anywhere else the row's ELBO is -inf."""
    g = torch.Generator().manual_seed(0)
    D = 37  # a row through the SIMD body and its tail
    x = (torch.rand(2, D, generator=g) < 0.5).double()
    logits = torch.randn(2, D, generator=g, dtype=torch.float64) * 3
    ends = torch.rand(2, D, generator=g) < 0.4  # these take x's end: +inf where x = 1, -inf where x = 0
    logits_inf = torch.where(ends, torch.where(x == 1, math.inf, -math.inf), logits)
    logits_big = torch.where(ends, torch.where(x == 1, 1e4, -1e4), logits)
    mu, logvar = torch.randn(2, 5, generator=g, dtype=torch.float64), torch.randn(2, 5, generator=g, dtype=torch.float64)
    inputs = [t.to(dtype=dtype, device=device).requires_grad_() for t in (logits_inf, x, mu, logvar)]
    out = pyvae.bernoulli_elbo(*inputs)
    g_l, g_mu, g_lv = torch.autograd.grad(out.sum(), [inputs[0], inputs[2], inputs[3]])
    big = [t.clone().requires_grad_() for t in (logits_big, x, mu, logvar)]
    want = oracle(*big)
    w_l, w_mu, w_lv = torch.autograd.grad(want.sum(), [big[0], big[2], big[3]])
    assert torch.isfinite(out).all()
    assert_close(out, want, dtype)
    for a, b in ((g_l, w_l), (g_mu, w_mu), (g_lv, w_lv)):
        assert_close(a, b, dtype)
    # one logit at the wrong end (+inf against x = 0): that row's ELBO is -inf, its logit gradient -1
    wrong = inputs[0].detach().clone()
    wrong[1, 3] = math.inf
    x_wrong = inputs[1].detach().clone()
    x_wrong[1, 3] = 0.0
    wrong.requires_grad_()
    out = pyvae.bernoulli_elbo(wrong, x_wrong, inputs[2].detach(), inputs[3].detach())
    assert torch.isfinite(out[0]) and out[1].item() == -math.inf
    (gw,) = torch.autograd.grad(out.sum(), wrong)
    assert gw[1, 3].item() == -1.0 and torch.isfinite(gw).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_builds_agree(dtype):
    inputs = _inputs(((3, 4, 784), (4, 784), (4, 20)), dtype)
    g = make(4, dtype=dtype, seed=9)

    def run():
        out = pyvae.bernoulli_elbo(*inputs)
        return (out.detach(), *grads(out, inputs, g))

    ref_inputs = ref(*inputs)
    expected = oracle(*ref_inputs)
    assert_archs_agree(per_arch(run), (expected, *grads(expected, ref_inputs, g.double())), dtype)


def test_thread_count_does_not_change_results():  # (conftest restores the thread count)
    """Rows are split among threads; each row (and the x gradient summed over L) stays on one."""
    inputs = _inputs(((3, 64, 784), (64, 784), (64, 20)), torch.float32)
    results = []
    for n in (1, 2):
        torch.set_num_threads(n)
        out = pyvae.bernoulli_elbo(*inputs)
        results.append((out, *grads(out, inputs)))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("path", PATHS)
def test_double_backward_raises(path):
    inputs = _inputs(((2, 3, 5), (3, 5), (3, 2)), torch.float64, x_kind="unit")
    assert_double_backward_raises(pyvae.bernoulli_elbo, inputs, path)

# ------------------------------------------------------------------------------- bad input
def _z(*shape, dtype=torch.float32):
    return torch.zeros(shape, dtype=dtype)


@pytest.mark.parametrize("args,exc,match", [
    ((torch.tensor(0.0), _z(3), _z(2), _z(2)), ValueError, "logits must have at least 1 dim"),
    ((_z(3), torch.tensor(0.0), _z(2), _z(2)), ValueError, "x must have at least 1 dim"),
    ((_z(3), _z(3), torch.tensor(0.0), torch.tensor(0.0)), ValueError, "mu must have at least 1 dim"),
    ((_z(3, 4), _z(3, 4), _z(3, 2), _z(3, 3)), ValueError, r"mu \(3, 2\) and logvar \(3, 3\)"),
    ((_z(3, 4), _z(3, 4), _z(5, 2), _z(5, 2)), ValueError, r"logits \(3, 4\) must be \[\*B, D\] or \[L, \*B, D\]"),
    ((_z(2, 5, 4), _z(5, 4), _z(3, 2), _z(3, 2)), ValueError, r"logits \(2, 5, 4\)"),
    ((_z(3, 4), _z(3, 5), _z(3, 2), _z(3, 2)), ValueError, r"x \(3, 5\) does not broadcast"),
    ((_z(3, 4), _z(2, 3, 4), _z(3, 2), _z(3, 2)), ValueError, r"x \(2, 3, 4\)"),
    ((_z(0, 3, 4), _z(3, 4), _z(3, 2), _z(3, 2)), ValueError, "0 samples"),
    ((_z(3, 4), _z(3, 4), _z(3, 2), _z(3, 2, dtype=torch.int64)), TypeError, "logvar must be a floating-point"),
    ((_z(3, 4), _z(3, 4, dtype=torch.uint8), _z(3, 2), _z(3, 2)), TypeError, "x must be a floating-point"),
    ((_z(3, 4), _z(3, 4), _z(3, 2, dtype=torch.float64), _z(3, 2)), TypeError, "mu has dtype torch.float64"),
])
def test_bad_input_names_the_argument(args, exc, match):
    with pytest.raises(exc, match=match):
        pyvae.bernoulli_elbo(*args)


def test_non_contiguous_inputs():
    logits = make(2, 7, 3, dtype=torch.float64, scale=3.0, seed=1).transpose(1, 2).requires_grad_()  # [2, 3, 7]
    x = make(3, 14, dtype=torch.float64, kind="binary", seed=2)[:, ::2].requires_grad_()
    mu = make(4, 3, dtype=torch.float64, seed=3).t().requires_grad_()
    logvar = make(3, 12, dtype=torch.float64, seed=4)[:, 1::3].requires_grad_()
    assert not any(t.is_contiguous() for t in (logits, x, mu, logvar))
    check_op(pyvae.bernoulli_elbo, oracle, [logits, x, mu, logvar], torch.float64)


def test_empty_batch():
    inputs = _inputs(((2, 0, 5), (0, 5), (0, 3)))
    out = pyvae.bernoulli_elbo(*inputs)
    assert out.shape == (0,)
    for t, g in zip(inputs, grads(out, inputs)):
        assert g.shape == t.shape


def test_nan_stays_in_its_row():
    logits, x, mu, logvar = _inputs(((2, 4, 6), (4, 6), (4, 3)), torch.float64)
    with torch.no_grad():
        logits[1, 1, 2] = math.nan  # one sample of row 1
        logvar[2, 0] = math.nan
    out = pyvae.bernoulli_elbo(logits, x, mu, logvar)
    assert out[[1, 2]].isnan().all()
    assert_close(out[[0, 3]], oracle(*ref(logits, x, mu, logvar))[[0, 3]], torch.float64)
    g_l, g_x, g_mu, g_lv = grads(out, [logits, x, mu, logvar])
    assert torch.isfinite(g_l[:, [0, 3]]).all() and torch.isfinite(g_x[[0, 3]]).all()
    assert torch.isfinite(g_mu[[0, 3]]).all() and torch.isfinite(g_lv[[0, 3]]).all()
    assert g_l[1, 1, 2].isnan() and g_lv[2, 0].isnan()


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_on_cpu_computes_in_float32(dtype):
    inputs = _inputs(((2, 4, 784), (4, 784), (4, 20)), dtype)
    out, *_ = check_op(pyvae.bernoulli_elbo, oracle, inputs, dtype)
    assert out.dtype == dtype


# ------------------------------------------------------------------ NOTE: [ELBO in one pass]
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("samples", [None, 3])
@pytest.mark.parametrize("wants", [(True, True, True), (True, False, False), (False, True, True)])
def test_one_pass_gradients_equal_the_two_pass_ones(dtype, samples, wants):
    # The eager path computes the gradients in the forward and scales them in backward; the registered op
    # (torch.ops.pyvae) reads logits and x again in its backward op. Both must give the reference's.
    torch.manual_seed(3)
    B, D, Z = 37, 101, 5
    shape = (B, D) if samples is None else (samples, B, D)
    base = [torch.randn(shape, dtype=dtype) * 3, (torch.rand(B, D) < 0.4).to(dtype),
            torch.randn(B, Z, dtype=dtype), torch.randn(B, Z, dtype=dtype)]
    g = torch.randn(B, dtype=dtype)
    results = []
    for fn in (pyvae.bernoulli_elbo, torch.ops.pyvae.bernoulli_elbo, reference.bernoulli_elbo):
        t = [a.clone().requires_grad_(w) for a, w in zip(base[:1] + base[2:], wants)]
        out = fn(t[0], base[1], t[1], t[2])
        grads = torch.autograd.grad(out, [a for a in t if a.requires_grad], g)
        results.append((out, grads))
    (o1, g1), (o2, g2), (o3, g3) = results
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(o1, o3, rtol=rtol, atol=atol)
    torch.testing.assert_close(o1, o2, rtol=0, atol=0)
    for a, b, c in zip(g1, g2, g3):
        torch.testing.assert_close(a, c, rtol=rtol, atol=atol)
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the same csrc/ops functions of the same scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_pass_expected_upstream_gradient(dtype):
    # NOTE: [Expected upstream gradient]: the forward writes the gradients for a guessed upstream
    # gradient; a backward that brings another one must rewrite them. The sequence is a miss (-1: the
    # default guess is -1/B), a hit (-1 again, now remembered), a miss (-0.5) and a per-row gradient,
    # each bit for bit the registered op's two-pass backward.
    E = importlib.import_module("pyvae.ops.bernoulli_elbo")

    torch.manual_seed(5)
    B, D, Z = 29, 67, 3
    logits, mu, logvar = torch.randn(B, D, dtype=dtype) * 4, torch.randn(B, Z, dtype=dtype), torch.randn(B, Z, dtype=dtype)
    x = (torch.rand(B, D) < 0.5).to(dtype)
    E._EXPECTED.clear()
    for step, reduce in enumerate([lambda o: -o.sum(), lambda o: -o.sum(), lambda o: -0.5 * o.sum(),
                                   lambda o: -(o * torch.arange(B, dtype=dtype)).sum(), lambda o: -o.mean()]):
        got, want = [], []
        for fn, res in ((pyvae.bernoulli_elbo, got), (torch.ops.pyvae.bernoulli_elbo, want)):
            t = [a.clone().requires_grad_() for a in (logits, mu, logvar)]
            res.extend(torch.autograd.grad(reduce(fn(t[0], x, t[1], t[2])), t))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m: f"step {step}: {m}")
        if step == 1:
            assert E._EXPECTED[(B, 1, D, Z, dtype)] == -1.0  # the second -sum() ran the hit path


def test_one_pass_survives_a_second_backward():
    torch.manual_seed(4)
    logits = (torch.randn(6, 30) * 2).requires_grad_()
    x = (torch.rand(6, 30) < 0.5).float()
    mu, logvar = torch.randn(6, 4, requires_grad=True), torch.randn(6, 4, requires_grad=True)
    out = pyvae.bernoulli_elbo(logits, x, mu, logvar)
    g = torch.randn(6)
    first = torch.autograd.grad(out, (logits, mu, logvar), g, retain_graph=True)
    second = torch.autograd.grad(out, (logits, mu, logvar), 2 * g)  # recomputed, not the scaled buffers again
    for a, b in zip(first, second):
        torch.testing.assert_close(2 * a, b)
    with pytest.raises(RuntimeError, match="double backward"):
        out = pyvae.bernoulli_elbo(logits, x, mu, logvar)
        (gl,) = torch.autograd.grad(out.sum(), logits, create_graph=True)
        gl.sum().backward()


# ------------------------------------------------------------------ NOTE: [bfloat16 logits]
@pytest.mark.parametrize("samples", [None, 3])
def test_bfloat16_logits_read_as_they_are(samples):
    # CPU autocast's decoder gives bfloat16 logits. The one-pass path reads them as they are and writes
    # their gradient in bfloat16: the gradients must be bit for bit those of widening the logits first
    # (the float32 op) and narrowing the gradient, through a miss, a hit and a per-row upstream gradient,
    # extremes and NaN included; the value agrees to the float32 rounding of its row sums.
    torch.manual_seed(6)
    B, D, Z = 37, 101, 5
    shape = (B, D) if samples is None else (samples, B, D)
    wide = torch.randn(shape) * 4
    wide.view(-1)[:4] = torch.tensor([1e4, -1e4, 30.0, float("nan")])
    logits = wide.to(torch.bfloat16)
    x = (torch.rand(B, D) < 0.4).float()
    mu, lv = torch.randn(B, Z), torch.randn(B, Z) * 3
    for reduce in (lambda o: -o.mean(), lambda o: -o.sum(), lambda o: -o.sum(), lambda o: -(o * torch.arange(B)).sum()):
        got, want = [], []
        for widen, res in ((False, got), (True, want)):
            t = [logits.clone().requires_grad_(), mu.clone().requires_grad_(), lv.clone().requires_grad_()]
            out = pyvae.bernoulli_elbo(t[0].float() if widen else t[0], x, t[1], t[2])
            if not widen:
                assert type(out.grad_fn).__name__ == "_OnePassBackward" and out.dtype == torch.float32
            res.append(out)
            res.extend(torch.autograd.grad(reduce(out), t))
        torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-5, equal_nan=True)
        assert got[1].dtype == torch.bfloat16
        for a, b in zip(got[1:], want[1:]):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_bfloat16_logits_elsewhere_are_widened():
    # Off the one-pass path (no gradient wanted, a differentiated x) the op widens the logits first.
    torch.manual_seed(7)
    logits = (torch.randn(6, 9) * 3).to(torch.bfloat16)
    x, mu, lv = (torch.rand(6, 9) < 0.5).float(), torch.randn(6, 2), torch.randn(6, 2)
    with torch.no_grad():
        torch.testing.assert_close(pyvae.bernoulli_elbo(logits, x, mu, lv),
                                   pyvae.bernoulli_elbo(logits.float(), x, mu, lv), rtol=1e-6, atol=1e-5)
    xr = x.clone().requires_grad_()
    out = pyvae.bernoulli_elbo(logits, xr, mu, lv)
    (gx,) = torch.autograd.grad(out.sum(), xr)
    torch.testing.assert_close(gx, logits.float().expand(6, 9))  # d/dx = logits
    with pytest.raises(TypeError, match="dtype"):
        pyvae.bernoulli_elbo(logits, x.double(), mu, lv)  # only bfloat16 logits with float32 rest


def test_the_gate_takes_other_logits_dtypes_only_for_the_elbo_forward():
    from pyvae import _gate

    t = torch.zeros(2, 3)
    with pytest.raises(RuntimeError, match="bfloat16 with float32 operands"):
        _gate.rowwise("gaussian_kl", "fwd", dtype=torch.float32, device=t.device, rows=2, cols=3,
                      operands=[(t, 2), (t, 2)], out=torch.zeros(2), logits_dtype=torch.bfloat16)


# -------------------------------------------------------------- NOTE: [Lean one-pass ELBO]
_elbo_mod = importlib.import_module("pyvae.ops.bernoulli_elbo")


def _one_pass_run(logits0, x, mu0, lv0, upstream):
    logits, mu, lv = (t.clone().requires_grad_() for t in (logits0, mu0, lv0))
    out = pyvae.bernoulli_elbo(logits, x, mu, lv)
    if upstream == "mean":
        loss = -out.mean()
    elif upstream == "sum":
        loss = -out.sum()
    else:  # one number per row: the backward kernel rewrites the forward's gradients
        loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)).sum()
    return out, torch.autograd.grad(loss, (logits, mu, lv))


@pytest.mark.parametrize("upstream", ["mean", "sum", "per_row"])
@pytest.mark.parametrize("case", ["fp32", "fp64", "samples", "bf16_logits"])
def test_lean_one_pass_matches_the_general_one_pass_bit_for_bit(monkeypatch, upstream, case):
    g = torch.Generator().manual_seed(2)
    dtype = torch.float64 if case == "fp64" else torch.float32
    lead = (6,)
    logits = 3 * torch.randn(*((3,) if case == "samples" else ()), *lead, 13, generator=g, dtype=dtype)
    if case == "bf16_logits":
        logits = logits.to(torch.bfloat16)
    x = (torch.rand(*lead, 13, generator=g) < 0.5).to(dtype)
    mu, lv = torch.randn(*lead, 4, generator=g, dtype=dtype), torch.randn(*lead, 4, generator=g, dtype=dtype)
    _elbo_mod._EXPECTED.clear()
    lean = [_one_pass_run(logits, x, mu, lv, upstream) for _ in range(2)]  # a miss, then (mean, sum) a hit
    assert _elbo_mod._PLANS, "the lean path did not run"
    monkeypatch.setattr(_elbo_mod._Plan, "of", staticmethod(lambda *a: None))
    _elbo_mod._EXPECTED.clear()
    general = [_one_pass_run(logits, x, mu, lv, upstream) for _ in range(2)]
    for (o1, g1), (o2, g2) in zip(lean, general):
        assert torch.equal(o1, o2)
        for a, b in zip(g1, g2):
            assert a.dtype == b.dtype and torch.equal(a, b)


def test_lean_one_pass_takes_strided_mu_logvar_but_not_a_broadcast_x(monkeypatch):
    """GaussianHead's mu and logvar (column slices of one output) take the lean path with the general
    path's exact results; a broadcast x does not take it."""
    g = torch.Generator().manual_seed(5)
    logits0, h0 = torch.randn(5, 8, generator=g), torch.randn(5, 6, generator=g)
    x = (torch.rand(5, 8, generator=g) < 0.5).float()

    def run():
        logits, h = logits0.clone().requires_grad_(), h0.clone().requires_grad_()
        out = pyvae.bernoulli_elbo(logits, x, h[:, :3], h[:, 3:])
        return out, torch.autograd.grad((out * torch.linspace(-1, 1, 5)).sum(), (logits, h))

    _elbo_mod._PLANS.clear()
    lean = [run(), run()]
    assert [type(p).__name__ for p in _elbo_mod._PLANS.values()] == ["_Plan"]
    monkeypatch.setattr(_elbo_mod._Plan, "of", staticmethod(lambda *a: None))
    general = [run(), run()]
    for (o1, g1), (o2, g2) in zip(lean, general):
        assert torch.equal(o1, o2) and all(torch.equal(a, b) for a, b in zip(g1, g2))
    monkeypatch.undo()
    _elbo_mod._PLANS.clear()
    x_row = x[0]  # broadcast over the batch
    logits = logits0.clone().requires_grad_()
    out = pyvae.bernoulli_elbo(logits, x_row, h0[:, :3], h0[:, 3:].clone().requires_grad_())
    (-out.mean()).backward()
    assert list(_elbo_mod._PLANS.values()) == [False]
    want = reference.bernoulli_elbo(logits0.double(), x_row.double(), h0[:, :3].double(), h0[:, 3:].double())
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ NOTE: [ELBO gradient into the logits]
def _into_case(dtype=torch.float32, samples=None, logits_dtype=None):
    g = torch.Generator().manual_seed(11)
    B, D, Z = 9, 23, 4
    shape = (B, D) if samples is None else (samples, B, D)
    w = (3 * torch.randn(*shape, generator=g, dtype=dtype))
    w.view(-1)[1:3] = torch.tensor([1e4, -1e4], dtype=dtype)  # (element 0 random: a stray store there shows)
    x = (torch.rand(B, D, generator=g) < 0.5).to(dtype)
    mu, lv = torch.randn(B, Z, generator=g, dtype=dtype), torch.randn(B, Z, generator=g, dtype=dtype)
    return w.to(logits_dtype or dtype), x, mu, lv


def _through(fn, w, x, mu, lv, reduce):
    """The ELBO of logits made by a differentiable op (as a decoder's), and the gradients of reduce(elbo)
    with respect to the op's input and mu, logvar."""
    src, m, l = w.clone().requires_grad_(), mu.clone().requires_grad_(), lv.clone().requires_grad_()
    logits = src * 1.0  # a non-leaf intermediate, as the decoder's output; MulBackward keeps no logits
    out = fn(logits, x, m, l)
    return out, torch.autograd.grad(reduce(out), (src, m, l)), logits


@pytest.mark.parametrize("case", ["fp32", "fp64", "samples", "bf16_logits"])
def test_gradient_into_logits_matches_a_fresh_gradient(case):
    # Written over the logits, the gradients must be the fresh buffer's bit for bit while the upstream
    # gradient is the expected one (mean), and within one rounding when it is not (sum, per row: rescaled).
    dtype = torch.float64 if case == "fp64" else torch.float32
    args = _into_case(dtype, 3 if case == "samples" else None, torch.bfloat16 if case == "bf16_logits" else None)
    B = args[1].shape[0]
    _elbo_mod._EXPECTED.clear()
    for reduce, exact in ((lambda o: -o.mean(), True), (lambda o: -o.mean(), True), (lambda o: -o.sum(), False),
                          (lambda o: -(o * torch.linspace(0.5, 2, B, dtype=dtype)).sum(), False)):
        o1, g1, logits = _through(pyvae.ops.bernoulli_elbo_into_logits, *args, reduce)
        o2, g2, _ = _through(pyvae.bernoulli_elbo, *args, reduce)
        assert torch.equal(o1, o2)
        assert torch.equal(logits, g1[0]), "the logits' storage holds their gradient"
        for a, b in zip(g1, g2):
            if exact:
                assert torch.equal(a, b)
            else:
                rtol = 1e-2 if a.dtype == torch.bfloat16 else 4 * torch.finfo(a.dtype).eps
                torch.testing.assert_close(a, b, rtol=rtol, atol=0)
                assert not torch.equal(a, torch.zeros_like(a))


def test_gradient_into_logits_at_an_infinite_logit():
    """Written over the logits (pyvae.VAE's default), a row cannot be summed again once its loop has
    overwritten them: a decoder output of +inf (x = 1 there) gave a wrong, finite ELBO (the exact-limit
    re-sum read the gradients as logits). The row is probed first: the ELBO and the gradients are those of
    the fresh-buffer path, and the value is the one at a logit of 1e4, whose term is 0 as the limit's."""
    torch.manual_seed(0)
    x = (torch.rand(4, 784) < 0.5).float()
    x[:, 5] = 1.0
    base = pyvae.VAE(784, 20, 64)
    results = {}
    for into, bias in ((True, math.inf), (False, math.inf), (False, 1e4)):
        vae = copy.deepcopy(base)
        with torch.no_grad():
            vae.dec_logits.bias[5] = bias
        vae.elbo_into_logits = into
        torch.manual_seed(1)
        elbo = vae(x)[0]
        grads = torch.autograd.grad(elbo.sum(), [vae.dec_logits.weight, vae.encoder[0].weight])
        results[(into, bias)] = (elbo.detach(), grads)
    (e_into, g_into), (e_fresh, g_fresh) = results[(True, math.inf)], results[(False, math.inf)]
    assert torch.isfinite(e_into).all()
    assert torch.equal(e_into, e_fresh)
    for a, b in zip(g_into, g_fresh):
        assert torch.equal(a, b)
    torch.testing.assert_close(e_into, results[(False, 1e4)][0], rtol=1e-6, atol=1e-4)


def test_gradient_into_logits_leaves_a_leaf_alone():
    # A leaf's values are its owner's: the gradient goes to a fresh tensor, the leaf keeps its logits.
    w, x, mu, lv = _into_case()
    leaf = w.clone().requires_grad_()
    out = pyvae.ops.bernoulli_elbo_into_logits(leaf, x, mu, lv)
    (g,) = torch.autograd.grad(out.mean(), leaf)
    assert torch.equal(leaf.detach(), w)
    leaf2 = w.clone().requires_grad_()
    (g2,) = torch.autograd.grad(pyvae.bernoulli_elbo(leaf2, x, mu, lv).mean(), leaf2)
    assert torch.equal(g, g2)


def test_gradient_into_logits_refuses_a_second_backward_and_create_graph():
    w, x, mu, lv = _into_case()
    src = w.clone().requires_grad_()
    out = pyvae.ops.bernoulli_elbo_into_logits(src * 1.0, x, mu, lv.clone().requires_grad_())
    out.mean().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="elbo_into_logits"):
        out.mean().backward()
    out = pyvae.ops.bernoulli_elbo_into_logits(src * 1.0, x, mu, lv)
    with pytest.raises(RuntimeError, match="elbo_into_logits"):
        torch.autograd.grad(out.mean(), src, create_graph=True)


def test_gradient_into_logits_is_caught_by_a_node_that_saved_the_logits():
    w, x, mu, lv = _into_case()
    src = w.clone().requires_grad_()
    logits = src * 1.0
    side = logits.pow(2).sum()  # PowBackward saves the logits
    out = pyvae.ops.bernoulli_elbo_into_logits(logits, x, mu, lv)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (side + out.mean()).backward()


def test_vae_writes_the_gradient_into_its_logits_unless_told_not_to():
    torch.manual_seed(0)
    vae = pyvae.VAE(30, z_dim=3, hidden=16)
    vae.one_node = False  # the layered step's ELBO call (the one-node step's: tests/test_vae_step.py)
    x = (torch.rand(8, 30) < 0.5).float()

    def grads(into, reduce=lambda o: -o.mean(), hook=False):
        vae.elbo_into_logits = into
        vae.zero_grad()
        seen = []
        h = vae.dec_logits.register_forward_hook(lambda m, i, o: seen.append(o)) if hook else None
        torch.manual_seed(1)
        reduce(vae(x)[0]).backward()
        if h is not None:
            h.remove()
        return [p.grad.clone() for p in vae.parameters()], seen

    calls = []
    real = pyvae.ops.bernoulli_elbo_into_logits
    pyvae.ops.bernoulli_elbo_into_logits = lambda *a: calls.append(1) or real(*a)
    try:
        _elbo_mod._EXPECTED.clear()
        on, _ = grads(True)
        off, _ = grads(False)
        assert calls == [1]
        assert all(torch.equal(a, b) for a, b in zip(on, off))
        hooked, seen = grads(True, hook=True)  # a hook could keep the logits: a fresh gradient
        assert len(seen) == 1 and calls == [1] and all(torch.equal(a, b) for a, b in zip(hooked, off))
    finally:
        pyvae.ops.bernoulli_elbo_into_logits = real
        vae.elbo_into_logits = True
