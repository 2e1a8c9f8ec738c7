"""Property-based tests (hypothesis) of six pyvae ops on random shapes, layouts and values (the continuous
Bernoulli and gather_binarize have their own files).

Each example draws shapes (sizes 0 and 1 included, up to 3 leading dims, operands broadcast as the
README documents), a memory layout per operand (storage offsets, permuted strides, slices with steps,
stride-0 expanded dims), values (ordinary ones plus extremes: logits +-1e4, logvar +-30, subnormals,
x exactly 0 or 1), a dtype (float32/float64), the call path (the public function's direct path or
torch.ops.pyvae through the dispatcher) and which inputs require grad (so the backward ops see every
output_mask). The op's value and input gradients are compared with torch.distributions (or the
formula) evaluated by float64 autograd on the very same values.

Tolerances: TOL[dtype] = (rtol, atol) from conftest.py, applied as |got - want| <= atol + rtol * S,
where S is the sum of the magnitudes of the terms the result is made of (for a single product it is
just |want|). That is the size of a float rounding error of a sum, so a row whose terms cancel is
not held to more digits than its terms have; S comes from the magnitude helpers below (``_mag_*``),
which only size the tolerance and never supply the expected value.

Hypothesis profiles (PYVAE_HYPOTHESIS_PROFILE=ci|long, default ci): ``ci`` runs a few seconds per
op; ``long`` runs 10,000 examples per op (TESTING.md, "Property-based tests").

The defects these tests found (a stepped or stride-0 bias, 0 features with x not 2-D) have tests of
their own with an explicit example.
"""
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import distributions as D

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.database import DirectoryBasedExampleDatabase  # noqa: E402

import pyvae  # noqa: E402
from conftest import EXACT_ACTIVATIONS, TOL, check_path, op_path  # noqa: E402

# ----------------------------------------------------------------------------------- profiles
_DB = DirectoryBasedExampleDatabase(os.path.join(os.path.dirname(__file__), ".hypothesis", "examples"))
# no "explain" phase: it reruns a failure hundreds of times (20 s) to report which lines it always ran
_PHASES = [Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink]
_COMMON = dict(deadline=None, print_blob=True, phases=_PHASES,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# ci: the same examples every run (derandomized), so a red CI run is a change in pyvae, not a new draw
settings.register_profile("pyvae-ci", max_examples=100, derandomize=True, **_COMMON)
settings.register_profile("pyvae-long", max_examples=10_000, database=_DB, **_COMMON)
PROFILE = os.environ.get("PYVAE_HYPOTHESIS_PROFILE", "ci")
if PROFILE not in ("ci", "long"):
    raise ValueError(f"PYVAE_HYPOTHESIS_PROFILE must be ci or long, got {PROFILE!r}")
PROFILE_SETTINGS = settings.get_profile("pyvae-" + PROFILE)
if os.environ.get("PYVAE_HYPOTHESIS_EXAMPLES"):  # e.g. a quick deeper look: PYVAE_HYPOTHESIS_EXAMPLES=500
    PROFILE_SETTINGS = settings(PROFILE_SETTINGS, max_examples=int(os.environ["PYVAE_HYPOTHESIS_EXAMPLES"]))

DTYPES = [torch.float32, torch.float64]
PATHS = ["eager", "dispatcher"]


@pytest.fixture(scope="module")
def fused_linear():
    """Every eager linear_act call runs pyvae's kernel (not F.linear for small identity layers).

    The one documented switch for that; re-point this import if it moves."""
    from pyvae._linear import fused_only

    with fused_only():
        yield


# ---------------------------------------------------------------------------------- strategies
def _tiny(dtype):
    """A subnormal of ``dtype``."""
    return 1e-40 if dtype == torch.float32 else 1e-310


# value kinds: (scales of the bulk, special values injected at random positions)
KINDS = {
    "logits": ([1.0, 10.0, 1e4], [1e4, -1e4, 0.0, 30.0, -30.0, 100.0, -100.0, "tiny", "-tiny"]),
    "logvar": ([1.0, 5.0, 30.0], [30.0, -30.0, 0.0, "tiny", "-tiny"]),
    "loc": ([1.0, 10.0, 100.0], [0.0, 1e3, -1e3, "tiny", "-tiny"]),
    "unit": (["binary", "uniform"], [0.0, 1.0, "tiny", "1-eps"]),
    "lin_x": ([1.0, 100.0, 1e4], [0.0, 1e4, -1e4, "tiny", "-tiny"]),
    "weight": ([0.3, 1.0], [0.0, "tiny", -1.0, 1.0]),
    "bias": ([1.0, 10.0], [0.0, 1e4, -1e4, "tiny"]),
    "grad": ([1.0], [0.0]),
}


def _special(v, dtype):
    if v == "tiny":
        return _tiny(dtype)
    if v == "-tiny":
        return -_tiny(dtype)
    if v == "1-eps":
        return 1.0 - torch.finfo(dtype).eps / 2
    return v


def draw_values(data, shape, kind, dtype, nan=False):
    """A contiguous ``dtype`` tensor of ``shape``: a seeded random bulk plus drawn special values
    (and one NaN when ``nan``)."""
    scales, specials = KINDS[kind]
    seed = data.draw(st.integers(0, 2**31 - 1), label=f"{kind} seed")
    scale = data.draw(st.sampled_from(scales), label=f"{kind} scale")
    g = torch.Generator().manual_seed(seed)
    if scale == "binary":
        t = (torch.rand(shape, generator=g, dtype=torch.float64) < 0.5).double()
    elif scale == "uniform":
        t = torch.rand(shape, generator=g, dtype=torch.float64)
    else:
        t = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    if kind == "logvar":
        t = t.clamp(-30.0, 30.0)
    if kind == "logits":
        t = t.clamp(-1e4, 1e4)
    n = t.numel()
    if n:
        flat = t.view(-1)
        for _ in range(data.draw(st.integers(0, min(n, 6)), label=f"{kind} n_special")):
            i = data.draw(st.integers(0, n - 1))
            flat[i] = _special(data.draw(st.sampled_from(specials)), dtype)
        if nan:
            flat[data.draw(st.integers(0, n - 1), label=f"{kind} NaN at")] = math.nan
    return t.to(dtype)


LAYOUTS = ["contiguous", "offset", "permuted", "stepped", "permuted+stepped"]


def relayout(data, t, layouts=LAYOUTS, label=""):
    """The values of ``t`` in a drawn memory layout; the storage around them holds NaN, so a kernel
    that reads outside the view (or reads it as contiguous) gets NaN or wrong values."""
    layout = data.draw(st.sampled_from(layouts), label=f"{label} layout")
    if layout == "contiguous" or t.dim() == 0:
        return t.clone()
    if layout == "offset":
        k = data.draw(st.integers(1, 5))
        buf = torch.full((k + t.numel(),), math.nan, dtype=t.dtype)
        buf[k:].copy_(t.reshape(-1))
        return buf[k:].view(t.shape)
    perm = list(range(t.dim()))
    if "permuted" in layout:
        perm = data.draw(st.permutations(perm), label=f"{label} perm")
    inv = [perm.index(i) for i in range(t.dim())]
    tp = t.permute(perm)
    if "stepped" in layout:
        steps = [data.draw(st.integers(1, 3)) for _ in range(tp.dim())]
        starts = [data.draw(st.integers(0, 2)) for _ in range(tp.dim())]
        big = torch.full([s0 + n * s for n, s, s0 in zip(tp.shape, steps, starts)], math.nan, dtype=t.dtype)
        view = big[tuple(slice(s0, s0 + n * s, s) for n, s, s0 in zip(tp.shape, steps, starts))]
        view.copy_(tp)
        tp = view
    else:
        tp = tp.contiguous()
    return tp.permute(inv)


def draw_tensor(data, shape, kind, dtype, *, layouts=LAYOUTS, expand=True, nan=False, label=""):
    """A ``dtype`` tensor of ``shape`` with drawn values and layout, possibly with stride-0 dims
    (expanded from size 1: the values are then constant along those dims); one NaN when ``nan``."""
    base_shape = list(shape)
    exp_dims = []
    if expand and any(s > 1 for s in shape) and data.draw(st.booleans(), label=f"{label} expand"):
        exp_dims = [d for d in range(len(shape)) if shape[d] > 1 and data.draw(st.booleans())]
        for d in exp_dims:
            base_shape[d] = 1
    t = relayout(data, draw_values(data, base_shape, kind, dtype, nan), layouts, label)
    if exp_dims:
        t = t.expand(shape)
    return t


def draw_lead(data, max_dims=3, max_rows=96, label="lead"):
    """Leading (batch/sample) dims: 0 to 3 dims, sizes 0..5 or 16/17 (the CPU kernels' row blocks)."""
    nd = data.draw(st.integers(0, max_dims), label=f"{label} ndim")
    dims, rows = [], 1
    for _ in range(nd):
        d = data.draw(st.one_of(st.integers(0, 5), st.sampled_from([16, 17])), label=label)
        if rows * max(d, 1) > max_rows:
            d = 1
        rows *= max(d, 1)
        dims.append(d)
    return tuple(dims)


def draw_event(data, label="event"):
    """Event size: mostly small (0 and 1 included), sometimes past a SIMD width or a block of 64."""
    return data.draw(st.one_of(st.integers(0, 9), st.integers(10, 80)), label=label)


def draw_broadcast_shape(data, full, *, event=False, label=""):
    """A shape that broadcasts to ``full``: leading dims dropped and/or set to 1 (the event dim only
    when ``event``). Always at least 1 dim (the ops need the event dim)."""
    keep = data.draw(st.integers(1, len(full)), label=f"{label} ndim kept")
    shape = list(full[len(full) - keep:])
    for i in range(len(shape)):
        last = i == len(shape) - 1
        if (not last or event) and data.draw(st.booleans(), label=f"{label} dim {i} to 1"):
            shape[i] = 1
    return tuple(shape)


def draw_operand_shape(data, full, *, event=False, label=""):
    """``full`` itself or, about half the time, a shape that broadcasts to it."""
    if data.draw(st.booleans(), label=f"{label} broadcast"):
        return draw_broadcast_shape(data, full, event=event, label=label)
    return tuple(full)


# ---------------------------------------------------------------------------------- checking
def close(got, want, scale, dtype, what, slack=None):
    """|got - want| <= atol + rtol * scale (+ slack) elementwise, NaN exactly where want has NaN,
    infinities equal. ``want``/``scale`` are float64; ``got`` any float dtype."""
    rtol, atol = TOL[dtype]
    got = got.detach().double()
    want = want.detach().double()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    nan_g, nan_w = got.isnan(), want.isnan()
    assert torch.equal(nan_g, nan_w), (
        f"{what}: NaN at {nan_g.nonzero().tolist()[:5]}, expected at {nan_w.nonzero().tolist()[:5]}")
    bound = atol + rtol * scale.detach().double()
    if slack is not None:
        bound = bound + slack
    bound = bound.expand(want.shape)
    err = (got - want).abs()
    bad = ~((got == want) | (err <= bound)) & ~nan_w
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        rows = [(i, got[tuple(i)].item(), want[tuple(i)].item(), bound[tuple(i)].item()) for i in idx]
        raise AssertionError(f"{what} ({dtype}): {int(bad.sum())} of {bad.numel()} elements off; "
                             f"(index, got, expected, bound): {rows}")


def leaf(t, requires_grad):
    """``t`` as an autograd leaf with the same strides and storage offset."""
    return t.detach().requires_grad_(requires_grad)


def f64(t):
    """The same values, float64, contiguous, a fresh leaf with t's requires_grad."""
    return None if t is None else t.detach().double().contiguous().requires_grad_(t.requires_grad)


def draw_nan_in(data, names):
    """In 1 example of 10, the name of the input that gets one NaN (None otherwise). NaN must come out
    in exactly the rows the oracle gives NaN (README: other rows are unaffected); those examples check
    values only."""
    if data.draw(st.integers(0, 9), label="NaN example") != 0:
        return None
    return data.draw(st.sampled_from(names), label="NaN in")


def draw_requires_grad(data, names):
    """Which inputs require grad (each subset, including none)."""
    return {n: data.draw(st.booleans(), label=f"{n} requires_grad") for n in names}


def upstream(data, shape, dtype):
    """A random upstream gradient, representable in ``dtype``."""
    return draw_values(data, shape, "grad", dtype)


def sum_to(t, shape):
    return t.sum_to_size(shape) if tuple(t.shape) != tuple(shape) else t


def check_grads(out, inputs, names, oracle_out, oracle_inputs, g, dtype, scales, op, slack=None):
    """Gradients of sum(g * out) w.r.t. the inputs that require grad, against float64 autograd of
    the oracle. ``scales[name]``: the full-size magnitude (see module doc), reduced here to each
    input's shape like the gradient itself."""
    wanted = [i for i, t in enumerate(inputs) if t is not None and t.requires_grad]
    if not wanted:
        return
    got = torch.autograd.grad(out, [inputs[i] for i in wanted], g)
    want = torch.autograd.grad(oracle_out, [oracle_inputs[i] for i in wanted], g.double(), allow_unused=True)
    for i, a, e in zip(wanted, got, want):
        name = names[i]
        shape = inputs[i].shape
        if e is None:  # the oracle does not depend on it (empty event dim): gradient zero
            e = torch.zeros(shape, dtype=torch.float64)
        assert a.dtype == dtype, f"{op}: grad {name} dtype {a.dtype}"
        sl = None if slack is None or name not in slack else sum_to(slack[name], shape)
        close(a, e, sum_to(scales[name], shape), dtype, f"{op}: d/d{name}", slack=sl)


def call(path, fn, *args, **kwargs):
    with op_path(path):
        out = fn(*args, **kwargs)
    check_path(out, path)
    return out


# ---------------------------------------------------------------------------- magnitude helpers
# Sizes of the terms each result is a sum of (float64, broadcast to the full shape); they only set
# the tolerance, see the module docstring.
def _mag_kl(mu, lv, pm, plv):
    """Per element: 0.5 (|plv| + |lv| + e^(lv - plv) + (mu - pm)^2 e^-plv + 1) and the gradient terms."""
    pm = torch.zeros((), dtype=torch.float64) if pm is None else pm
    plv = torch.zeros((), dtype=torch.float64) if plv is None else plv
    r = (lv - plv).exp()
    q = (mu - pm).pow(2) * (-plv).exp()
    value = 0.5 * (plv.abs() + lv.abs() + r + q + 1)
    d_mu = ((mu - pm) * (-plv).exp()).abs()
    d_lv = 0.5 * (r + 1)
    d_plv = 0.5 * (1 + r + q)
    return value, d_mu, d_lv, d_plv


def _mag_bern(logits, x):
    """Per element: |x l| + softplus(l); gradients |x| + sigmoid(l) (logits) and |l| (x)."""
    value = (x * logits).abs() + F.softplus(logits)
    return value, x.abs() + torch.sigmoid(logits), logits.abs() + 0 * x


def _mag_gauss(x, mean, lv):
    """Per element: 0.5 (log 2 pi + |lv| + (x - mean)^2 e^-lv); gradient terms."""
    q = (x - mean).pow(2) * (-lv).exp()
    value = 0.5 * (math.log(2 * math.pi) + lv.abs() + q)
    d_xm = ((x - mean) * (-lv).exp()).abs()
    d_lv = 0.5 * (1 + q)
    return value, d_xm, d_lv


# ------------------------------------------------------------------------------------ oracles
# Independent(..., 1) sums the event dim; it is written out as .sum(-1) here because Independent's
# own sum cannot reshape 0-element batches (torch 2.13: "cannot reshape tensor of 0 elements").
def kl_oracle(mu, lv, pm, plv):
    """torch.distributions: KL(Normal(mu, e^(lv/2)) || Normal(pm, e^(plv/2))) summed over the event dim."""
    pm = torch.zeros_like(mu) if pm is None else pm
    plv = torch.zeros_like(lv) if plv is None else plv
    shape = torch.broadcast_shapes(mu.shape, lv.shape, pm.shape, plv.shape)
    q = D.Normal(mu.expand(shape), (0.5 * lv).exp().expand(shape), validate_args=False)
    p = D.Normal(pm.expand(shape), (0.5 * plv).exp().expand(shape), validate_args=False)
    return D.kl_divergence(q, p).sum(-1)


def bern_oracle(logits, x):
    """torch.distributions: Bernoulli(logits).log_prob(x) summed over the event dim (x in [0, 1])."""
    shape = torch.broadcast_shapes(logits.shape, x.shape)
    return D.Bernoulli(logits=logits.expand(shape), validate_args=False).log_prob(x.expand(shape)).sum(-1)


def gauss_oracle(x, mean, lv):
    """torch.distributions: Normal(mean, e^(lv/2)).log_prob(x) summed over the event dim."""
    shape = torch.broadcast_shapes(x.shape, mean.shape, lv.shape)
    return D.Normal(mean.expand(shape), (0.5 * lv).exp().expand(shape), validate_args=False).log_prob(
        x.expand(shape)).sum(-1)


def elbo_oracle(logits, x, mu, lv):
    """The SGVB estimator B from torch.distributions: mean over L of log p(x | z_l) - KL(q || N(0, I))."""
    rec = bern_oracle(logits, x)
    if logits.dim() == mu.dim() + 1:
        rec = rec.mean(0)
    return rec - kl_oracle(mu, lv, None, None)


# ------------------------------------------------------------------------------- gaussian_kl
@PROFILE_SETTINGS
@given(data=st.data(), dtype=st.sampled_from(DTYPES), path=st.sampled_from(PATHS))
def test_gaussian_kl(data, dtype, path):
    full = (*draw_lead(data), draw_event(data))
    prior = data.draw(st.sampled_from(["none", "both", "mu", "logvar"]), label="prior")
    shapes = {
        "mu": draw_operand_shape(data, full, label="mu"),
        "logvar": draw_operand_shape(data, full, event=True, label="logvar"),
        # priors: often [Z] (one prior for all rows), else any broadcast
        "prior_mu": data.draw(st.sampled_from([full[-1:], None]), label="prior_mu [Z]")
        or draw_operand_shape(data, full, event=True, label="prior_mu"),
        "prior_logvar": data.draw(st.sampled_from([full[-1:], None]), label="prior_logvar [Z]")
        or draw_operand_shape(data, full, event=True, label="prior_logvar"),
    }
    kinds = {"mu": "loc", "logvar": "logvar", "prior_mu": "loc", "prior_logvar": "logvar"}
    present = {"mu": True, "logvar": True, "prior_mu": prior in ("both", "mu"),
               "prior_logvar": prior in ("both", "logvar")}
    names = list(kinds)
    rg = draw_requires_grad(data, names)
    nan_in = draw_nan_in(data, [n for n in names if present[n]])
    t = {n: leaf(draw_tensor(data, shapes[n], kinds[n], dtype, nan=n == nan_in, label=n), rg[n]) if present[n]
         else None for n in names}
    inputs = [t[n] for n in names]

    out = call(path, pyvae.gaussian_kl, *inputs)
    ref_in = [f64(x) for x in inputs]
    want = kl_oracle(*ref_in)
    assert out.dtype == dtype
    mags = _mag_kl(*[None if x is None else x.detach() for x in ref_in])
    close(out, want, mags[0].sum(-1), dtype, "gaussian_kl value")

    if nan_in is not None:
        return  # values only (see draw_nan_in)
    g = upstream(data, tuple(out.shape), dtype)
    ge = g.double().unsqueeze(-1)
    full_shape = mags[0].shape
    scales = {"mu": ge.abs() * mags[1], "prior_mu": ge.abs() * mags[1],
              "logvar": ge.abs() * mags[2], "prior_logvar": ge.abs() * mags[3]}
    scales = {k: v.expand(full_shape) for k, v in scales.items()}
    check_grads(out, inputs, names, want, ref_in, g, dtype, scales, "gaussian_kl")


# ------------------------------------------------------------------------ bernoulli_log_prob
@PROFILE_SETTINGS
@given(data=st.data(), dtype=st.sampled_from(DTYPES), path=st.sampled_from(PATHS))
def test_bernoulli_log_prob(data, dtype, path):
    full = (*draw_lead(data), draw_event(data))
    # the documented case: x [B, D] against logits [L, B, D]; either operand may be the smaller one
    x_small = data.draw(st.booleans(), label="x is the broadcast operand")
    shapes = {"logits": full if x_small else draw_operand_shape(data, full, event=True, label="logits"),
              "x": draw_operand_shape(data, full, event=True, label="x") if x_small else full}
    names = ["logits", "x"]
    kinds = {"logits": "logits", "x": "unit"}
    rg = draw_requires_grad(data, names)
    nan_in = draw_nan_in(data, names)
    inputs = [leaf(draw_tensor(data, shapes[n], kinds[n], dtype, nan=n == nan_in, label=n), rg[n]) for n in names]

    out = call(path, pyvae.bernoulli_log_prob, *inputs)
    ref_in = [f64(x) for x in inputs]
    want = bern_oracle(*ref_in)
    assert out.dtype == dtype
    lg, xx = torch.broadcast_tensors(*[x.detach() for x in ref_in])
    m_val, m_l, m_x = _mag_bern(lg, xx)
    close(out, want, m_val.sum(-1), dtype, "bernoulli_log_prob value")

    if nan_in is not None:
        return  # values only (see draw_nan_in)
    g = upstream(data, tuple(out.shape), dtype)
    ge = g.double().unsqueeze(-1).abs()
    check_grads(out, inputs, names, want, ref_in, g, dtype, {"logits": ge * m_l, "x": ge * m_x},
                "bernoulli_log_prob")


# ------------------------------------------------------------------------- gaussian_log_prob
@PROFILE_SETTINGS
@given(data=st.data(), dtype=st.sampled_from(DTYPES), path=st.sampled_from(PATHS))
def test_gaussian_log_prob(data, dtype, path):
    full = (*draw_lead(data), draw_event(data))
    # x broadcast over mean's leading sample dims, or the other way; logvar per element or [D]
    x_small = data.draw(st.booleans(), label="x is the broadcast operand")
    shapes = {"x": draw_operand_shape(data, full, event=True, label="x") if x_small else full,
              "mean": full if x_small else draw_operand_shape(data, full, event=True, label="mean"),
              "logvar": data.draw(st.sampled_from([full[-1:], None]), label="logvar [D]")
              or draw_operand_shape(data, full, event=True, label="logvar")}
    names = ["x", "mean", "logvar"]
    kinds = {"x": "loc", "mean": "loc", "logvar": "logvar"}
    rg = draw_requires_grad(data, names)
    nan_in = draw_nan_in(data, names)
    inputs = [leaf(draw_tensor(data, shapes[n], kinds[n], dtype, nan=n == nan_in, label=n), rg[n]) for n in names]

    out = call(path, pyvae.gaussian_log_prob, *inputs)
    ref_in = [f64(x) for x in inputs]
    want = gauss_oracle(*ref_in)
    assert out.dtype == dtype
    xx, mm, lv = torch.broadcast_tensors(*[x.detach() for x in ref_in])
    m_val, m_xm, m_lv = _mag_gauss(xx, mm, lv)
    close(out, want, m_val.sum(-1), dtype, "gaussian_log_prob value")

    if nan_in is not None:
        return  # values only (see draw_nan_in)
    g = upstream(data, tuple(out.shape), dtype)
    ge = g.double().unsqueeze(-1).abs()
    check_grads(out, inputs, names, want, ref_in, g, dtype,
                {"x": ge * m_xm, "mean": ge * m_xm, "logvar": ge * m_lv}, "gaussian_log_prob")


# ---------------------------------------------------------------------------- bernoulli_elbo
@PROFILE_SETTINGS
@given(data=st.data(), dtype=st.sampled_from(DTYPES), path=st.sampled_from(PATHS))
def test_bernoulli_elbo(data, dtype, path):
    batch = draw_lead(data, max_dims=2, max_rows=40, label="batch")
    Dx, Z = draw_event(data, "D"), draw_event(data, "Z")
    samples = data.draw(st.sampled_from([None, 1, 2, 3]), label="L")
    lshape = ((samples,) if samples else ()) + (*batch, Dx)
    # x broadcastable to [*B, D] (not adding dims)
    xshape = draw_operand_shape(data, (*batch, Dx), event=True, label="x")
    shapes = {"logits": lshape, "x": xshape, "mu": (*batch, Z), "logvar": (*batch, Z)}
    names = ["logits", "x", "mu", "logvar"]
    kinds = {"logits": "logits", "x": "unit", "mu": "loc", "logvar": "logvar"}
    rg = draw_requires_grad(data, names)
    nan_in = draw_nan_in(data, names)
    inputs = [leaf(draw_tensor(data, shapes[n], kinds[n], dtype, nan=n == nan_in, label=n), rg[n]) for n in names]

    out = call(path, pyvae.bernoulli_elbo, *inputs)
    ref_in = [f64(x) for x in inputs]
    want = elbo_oracle(*ref_in)
    assert out.dtype == dtype and out.shape == batch
    lg, xx = torch.broadcast_tensors(ref_in[0].detach(), ref_in[1].detach())
    b_val, b_l, b_x = _mag_bern(lg, xx)
    k_val, k_mu, k_lv, _ = _mag_kl(ref_in[2].detach(), ref_in[3].detach(), None, None)
    L = samples or 1
    rec_scale = b_val.sum(-1)
    rec_scale = rec_scale.mean(0) if samples else rec_scale
    close(out, want, rec_scale + k_val.sum(-1), dtype, "bernoulli_elbo value")

    if nan_in is not None:
        return  # values only (see draw_nan_in)
    g = upstream(data, tuple(out.shape), dtype)
    ge = g.double().unsqueeze(-1).abs()
    scales = {"logits": ge * b_l / L, "x": ge * b_x / L, "mu": ge * k_mu, "logvar": ge * k_lv}
    check_grads(out, inputs, names, want, ref_in, g, dtype, scales, "bernoulli_elbo")


# ---------------------------------------------------------------------------- reparameterize
def _gen(seed):
    return torch.Generator().manual_seed(seed)


@PROFILE_SETTINGS
@given(data=st.data(), dtype=st.sampled_from(DTYPES), path=st.sampled_from(PATHS))
def test_reparameterize(data, dtype, path):
    """z = mu + e^(logvar/2) eps; eps depends on the seed and the output index only (not on the
    operands' layout or broadcasting); dz/dmu = 1, dz/dlogvar = (z - mu) / 2."""
    full = (*draw_lead(data), draw_event(data))
    mu_small = data.draw(st.booleans(), label="mu is the broadcast operand")
    shapes = {"mu": draw_operand_shape(data, full, event=True, label="mu") if mu_small else full,
              "logvar": full if mu_small else draw_operand_shape(data, full, event=True, label="logvar")}
    samples = data.draw(st.sampled_from([None, 1, 2, 3]), label="samples")
    seed = data.draw(st.integers(0, 2**63 - 1), label="generator seed")
    names = ["mu", "logvar"]
    kinds = {"mu": "loc", "logvar": "logvar"}
    rg = draw_requires_grad(data, names)
    nan_in = draw_nan_in(data, names)
    mu, lv = [leaf(draw_tensor(data, shapes[n], kinds[n], dtype, nan=n == nan_in, label=n), rg[n]) for n in names]

    z = call(path, pyvae.reparameterize, mu, lv, samples=samples, generator=_gen(seed))
    out_full = ((samples,) if samples else ()) + tuple(torch.broadcast_shapes(mu.shape, lv.shape))
    assert z.dtype == dtype and tuple(z.shape) == out_full
    # eps: the draw of the same seed at mu = 0, logvar = 0 (z = eps), contiguous, full size
    zeros = torch.zeros(out_full[1:] if samples else out_full, dtype=dtype)
    eps = pyvae.reparameterize(zeros, zeros, samples=samples, generator=_gen(seed))
    assert eps.isfinite().all()
    # layout independence: contiguous, materialized (unbroadcast) operands give bitwise the same z
    mu_c = mu.detach().expand(zeros.shape).contiguous()
    lv_c = lv.detach().expand(zeros.shape).contiguous()
    z_c = pyvae.reparameterize(mu_c, lv_c, samples=samples, generator=_gen(seed))
    torch.testing.assert_close(z.detach(), z_c, rtol=0, atol=0, equal_nan=True,
                               msg=lambda m: f"z depends on the operands' layout or broadcasting: {m}")

    mu64, lv64, eps64 = f64(mu), f64(lv), eps.double()
    want = mu64 + (0.5 * lv64).exp() * eps64
    noise = ((0.5 * lv64.detach()).exp() * eps64).abs()
    close(z, want, mu64.detach().abs() + noise, dtype, "reparameterize value")

    if nan_in is not None:
        return  # values only (see draw_nan_in)
    g = upstream(data, out_full, dtype)
    ga = g.double().abs()
    # dz/dmu = 1 and dz/dlogvar = (z - mu) / 2 = e^(logvar/2) eps / 2, summed over samples/broadcast
    check_grads(z, [mu, lv], names, want, [mu64, lv64], g, dtype,
                {"mu": ga.expand(out_full), "logvar": (ga * 0.5 * noise).expand(out_full)}, "reparameterize")


# -------------------------------------------------------------------------------- linear_act
ACTS = EXACT_ACTIVATIONS


def _act_d2(act, pre):
    """|act''(pre)| (float64): how fast the derivative moves with a rounding error in pre."""
    if act == "tanh":
        t = pre.tanh()
        return (2 * t * (1 - t * t)).abs()
    if act in ("sigmoid", "softplus"):
        s = pre.sigmoid()
        return (s * (1 - s) * (1 - 2 * s)).abs() if act == "sigmoid" else s * (1 - s)
    return torch.zeros_like(pre)


def _linear_case(data, dtype, *, strided_bias=False):
    """x [*lead, in], weight [out, in], bias [out] or None, activation. ``strided_bias``: a bias with
    a step or stride 0, an activation and out >= 2 (the known defect's inputs)."""
    lead = draw_lead(data, max_rows=48)
    fin, fout = data.draw(st.integers(0, 40), label="in"), draw_event(data, "out")
    if len(lead) != 1 and not strided_bias:
        # a 0-size feature dim works only for 2-D x today: test_linear_act_zero_features_not_2d
        fin, fout = max(fin, 1), max(fout, 1)
    acts = [a for a in ACTS if a != "identity"] if strided_bias else list(ACTS)
    act = data.draw(st.sampled_from(acts), label="activation")
    has_bias = True if strided_bias else data.draw(st.booleans(), label="bias")
    if strided_bias:
        fout = max(fout, 2)
    names = ["x", "weight", "bias"]
    rg = draw_requires_grad(data, names)
    nan_in = None if strided_bias else draw_nan_in(data, ["x", "weight"])
    x = leaf(draw_tensor(data, (*lead, fin), "lin_x", dtype, nan=nan_in == "x", label="x"), rg["x"])
    w = leaf(draw_tensor(data, (fout, fin), "weight", dtype, nan=nan_in == "weight", label="weight"), rg["weight"])
    b = None
    if strided_bias:
        if data.draw(st.sampled_from(["stepped", "expanded"]), label="bias layout") == "stepped":
            step, start = data.draw(st.integers(2, 3), label="bias step"), data.draw(st.integers(0, 2))
            big = torch.full((start + fout * step,), math.nan, dtype=dtype)
            b = big[start::step][:fout]
            b.copy_(draw_values(data, (fout,), "bias", dtype))
        else:
            b = draw_values(data, (1,), "bias", dtype).expand(fout)
        b = leaf(b, rg["bias"])
    elif has_bias:
        b = leaf(draw_tensor(data, (fout,), "bias", dtype, layouts=["contiguous", "offset"], expand=False,
                             label="bias"), rg["bias"])
    return x, w, b, act, nan_in


def _linear_grad_scales(gp, x64, w64):
    """Magnitudes of the gradients' terms given those of dL/dpre: |gp| |W|, |gp|^T |x|, sum |gp|."""
    rows = math.prod(x64.shape[:-1])
    fin, fout = w64.shape[1], w64.shape[0]
    return {"x": gp @ w64.detach().abs(),
            "weight": gp.reshape(rows, fout).t() @ x64.detach().abs().reshape(rows, fin),
            "bias": gp}


def _check_linear(x, w, b, act, nan_in, dtype, path, data):
    out = call(path, pyvae.linear_act, x, w, b, act)
    x64, w64, b64 = f64(x), f64(w), f64(b)
    pre = F.linear(x64, w64, b64)
    want = ACTS[act](pre)
    assert out.dtype == dtype and out.shape == want.shape
    pre_scale = F.linear(x64.detach().abs(), w64.detach().abs(), None if b64 is None else b64.detach().abs())
    close(out, want, pre_scale + want.detach().abs(), dtype, f"linear_act({act}) value")

    if nan_in is not None:
        return  # values only (see draw_nan_in)
    g = upstream(data, tuple(out.shape), dtype)
    ga = g.double().abs()
    pre = pre.detach()
    pre_r = pre.clone().requires_grad_()
    (dact,) = torch.autograd.grad(ACTS[act](pre_r).sum(), pre_r)
    # dL/dpre = g act'(pre); act' is computed from the rounded output (+1: a few ulps of it) and moves
    # with pre's own rounding error (act'' times pre's scale)
    from_output = 0.0 if act in ("identity", "relu") else 1.0
    gp_scale = ga * (dact.abs() + from_output + _act_d2(act, pre) * pre_scale)
    slack = None
    if act == "relu":
        # within pre's rounding error of 0 (a GEMM's bound: (in + 2) ulps of its magnitude) the kink
        # may fall either way: act' is 0 or 1 there
        kink = (pre.abs() <= (x.shape[-1] + 2) * torch.finfo(dtype).eps * pre_scale).double()
        gp_slack = ga * kink
        slack = _linear_grad_scales(gp_slack, x64, w64)
    scales = _linear_grad_scales(gp_scale, x64, w64)
    check_grads(out, [x, w, b], ["x", "weight", "bias"], want, [x64, w64, b64], g, dtype, scales,
                f"linear_act({act})", slack=slack)


# Bias layouts of every kind but stepped or stride-0 ones, which have their own tests below.
@pytest.mark.usefixtures("fused_linear")
@PROFILE_SETTINGS
@given(data=st.data(), dtype=st.sampled_from(DTYPES), path=st.sampled_from(PATHS))
def test_linear_act(data, dtype, path):
    _check_linear(*_linear_case(data, dtype), dtype, path, data)


# A bias with a step or stride 0 was once read as if contiguous when an activation ran
# (linear_act(zeros(1,5), zeros(3,5), arange(6.)[::2], 'relu') gave [0, 1, 2], not [0, 2, 4]).
@pytest.mark.usefixtures("fused_linear")
@pytest.mark.parametrize("path", PATHS)
def test_linear_act_stepped_bias_example(path):
    out = call(path, pyvae.linear_act, torch.zeros(1, 5), torch.zeros(3, 5), torch.arange(6.0)[::2], "relu")
    torch.testing.assert_close(out, torch.tensor([[0.0, 2.0, 4.0]]), rtol=0, atol=0)


@pytest.mark.usefixtures("fused_linear")
@PROFILE_SETTINGS
@given(data=st.data(), dtype=st.sampled_from(DTYPES), path=st.sampled_from(PATHS))
def test_linear_act_strided_bias(data, dtype, path):
    _check_linear(*_linear_case(data, dtype, strided_bias=True), dtype, path, data)


# x not 2-D with in_features = 0 (or out_features = 0 in backward) once failed in reshape(-1, 0); F.linear
# gives act(bias) broadcast, e.g. [2, 3, 4] for x [2, 3, 0], weight [4, 0].
@pytest.mark.usefixtures("fused_linear")
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("act", ["identity", "tanh"])
@pytest.mark.parametrize("x_shape,out_features", [((0,), 4), ((2, 3, 0), 4), ((2, 0, 0), 4),
                                                   ((5,), 0), ((2, 3, 5), 0)], ids=str)
def test_linear_act_zero_features_not_2d(x_shape, out_features, act, path):
    x = torch.ones(x_shape, dtype=torch.float64, requires_grad=True)
    w = torch.ones(out_features, x_shape[-1], dtype=torch.float64, requires_grad=True)
    b = torch.arange(float(out_features), dtype=torch.float64, requires_grad=True)
    out = call(path, pyvae.linear_act, x, w, b, act)
    want = ACTS[act](F.linear(x, w, b))
    torch.testing.assert_close(out, want.detach(), rtol=0, atol=0)
    g = torch.ones_like(want)
    for a, e in zip(torch.autograd.grad(out, [x, w, b], g), torch.autograd.grad(want, [x, w, b], g)):
        torch.testing.assert_close(a, e, rtol=0, atol=0)
