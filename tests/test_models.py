"""pyvae.models.VAE: estimators against hand computation, each other, and exact integration."""
import math

import pytest
import torch
from torch.distributions import Bernoulli, ContinuousBernoulli, Independent, Normal, kl_divergence

import pyvae
from pyvae import models as M

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and pyvae.cuda_built() else [])


def _x(b=6, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, d, generator=g) < 0.4).float()


def _grey(b=6, d=12, seed=2, dtype=torch.float32):
    """Grey levels in [0, 1], with some pixels exactly 0 and 1 (as in images)."""
    x = torch.rand(b, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    x[:, :2] = 0.0
    x[:, 2:3] = 1.0
    return x


def _model(likelihood="bernoulli", z=3, d=12, dtype=torch.float32, seed=0, **kw):
    torch.manual_seed(seed)
    return M.VAE(d, z_dim=z, hidden=7, likelihood=likelihood, **kw).to(dtype)


def _z_for(model, x, samples, seed):
    """The z the model draws for generator seed ``seed`` (same fused reparameterize call)."""
    mu, logvar = model.encode(x)
    return M._reparameterize(mu, logvar, samples, torch.Generator().manual_seed(seed), None), mu, logvar


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("samples", [1, 4])
def test_elbo_analytic_bernoulli_by_hand(samples, device):
    m, x = _model().to(device), _x().to(device)
    z, mu, logvar = _z_for(m, x, samples, 11)
    rec = Independent(Bernoulli(logits=m.decode(z)), 1).log_prob(x).mean(0)
    q = Independent(Normal(mu, (0.5 * logvar).exp()), 1)
    p = Independent(Normal(torch.zeros_like(mu), torch.ones_like(mu)), 1)
    want = rec - kl_divergence(q, p)
    got = m.elbo(x, samples=samples, generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("samples", [1, 4])
def test_elbo_analytic_continuous_bernoulli_by_hand(samples, device):
    """The analytic estimator of a continuous-Bernoulli decoder: E_q[log CB(x | logits)] - KL, on grey levels."""
    m, x = _model("continuous-bernoulli").to(device), _grey().to(device)
    z, mu, logvar = _z_for(m, x, samples, 11)
    rec = Independent(ContinuousBernoulli(logits=m.decode(z)), 1).log_prob(x).mean(0)
    q = Independent(Normal(mu, (0.5 * logvar).exp()), 1)
    p = Independent(Normal(torch.zeros_like(mu), torch.ones_like(mu)), 1)
    want = rec - kl_divergence(q, p)
    got = m.elbo(x, samples=samples, generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    got.sum().backward()  # and it trains: every parameter gets a finite gradient
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def test_continuous_bernoulli_mean_is_not_sigmoid():
    """Reconstructions and samples of a continuous-Bernoulli model show its mean, not sigmoid(logits)."""
    m = _model("continuous-bernoulli")
    with torch.no_grad():
        m.dec_logits.bias.fill_(3.0)  # far from 0, where the two differ most
    z = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    logits = m.decode(z)
    want = ContinuousBernoulli(logits=logits.double()).mean.float()
    torch.testing.assert_close(m.mean(z), want, rtol=1e-5, atol=1e-6)
    assert (m.mean(z) - torch.sigmoid(logits)).abs().max() > 0.1
    s = m.sample(5, generator=torch.Generator().manual_seed(0))
    assert s.shape == (5, 12) and 0 <= s.min() and s.max() <= 1
    with pytest.raises(ValueError, match="bernoulli"):
        m.sample(5, binary=True)
    assert m.reconstruct(_grey()).shape == (6, 12)


@pytest.mark.parametrize("likelihood", ["bernoulli", "continuous-bernoulli", "gaussian"])
def test_elbo_mc_by_hand(likelihood):
    m = _model(likelihood)
    x = _x() if likelihood == "bernoulli" else _grey()
    z, mu, logvar = _z_for(m, x, 3, 5)
    if likelihood == "bernoulli":
        lpx = Independent(Bernoulli(logits=m.decode(z)), 1).log_prob(x)
    elif likelihood == "continuous-bernoulli":
        lpx = Independent(ContinuousBernoulli(logits=m.decode(z)), 1).log_prob(x)
    else:
        mean, lv = m.decode(z)
        assert 0 <= mean.min() and mean.max() <= 1  # sigmoid-constrained mean
        lpx = Independent(Normal(mean, (0.5 * lv).exp()), 1).log_prob(x)
    lpz = Independent(Normal(torch.zeros_like(z), torch.ones_like(z)), 1).log_prob(z)
    lqz = Independent(Normal(mu, (0.5 * logvar).exp()), 1).log_prob(z)
    want = (lpx + lpz - lqz).mean(0)
    got = m.elbo(x, samples=3, estimator="mc", generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("likelihood", ["bernoulli", "continuous-bernoulli", "gaussian"])
def test_estimators_agree_in_expectation(likelihood):
    m, x = _model(likelihood, dtype=torch.float64), _x().double()
    g = torch.Generator().manual_seed(0)
    a = m.elbo(x, samples=4000, estimator="analytic", generator=g).detach()
    b = m.elbo(x, samples=4000, estimator="mc", generator=g).detach()
    torch.testing.assert_close(a, b, rtol=0, atol=0.15)


def test_iwae_k1_is_mc_elbo_and_elbo_in_expectation():
    m, x = _model(dtype=torch.float64), _x().double()
    iw = m.iwae_bound(x, 1, generator=torch.Generator().manual_seed(3))
    mc = m.elbo(x, estimator="mc", generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(iw, mc)  # the same z: identical
    g = torch.Generator().manual_seed(4)
    iw_mean = torch.stack([m.iwae_bound(x, 1, generator=g) for _ in range(2000)]).mean(0).detach()
    an = m.elbo(x, samples=2000, generator=g).detach()
    torch.testing.assert_close(iw_mean, an, rtol=0, atol=0.15)


def test_iwae_tightens_with_k():
    m, x = _model(z=2, dtype=torch.float64), _x(b=20).double()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        bounds = [torch.stack([m.iwae_bound(x, k, generator=g) for _ in range(30)]).mean() for k in (1, 10, 100)]
        ll = m.log_likelihood(x, samples=5000, batch=1000, generator=g).mean()
    assert bounds[0] < bounds[1] < bounds[2] <= ll + 0.02


def _exact_log_px_1d(model, x):
    """log p(x) = log int p(x|z) N(z; 0, 1) dz by the trapezoid rule on a fine grid (Z = 1)."""
    zs = torch.linspace(-12, 12, 24001, dtype=torch.float64)
    dz = (zs[1] - zs[0]).item()
    with torch.no_grad():
        lpx = model.log_px_given_z(x, zs.view(-1, 1, 1).expand(-1, x.shape[0], 1))  # [G, B]
    lp = lpx + Normal(0.0, 1.0).log_prob(zs).unsqueeze(1)
    w = torch.full_like(zs, dz)
    w[0] = w[-1] = dz / 2
    return torch.logsumexp(lp + w.log().unsqueeze(1), 0)


@pytest.mark.parametrize("likelihood", ["bernoulli", "continuous-bernoulli", "gaussian"])
def test_log_likelihood_matches_numerical_integration(likelihood):
    torch.manual_seed(2)
    m = M.VAE(5, z_dim=1, hidden=4, likelihood=likelihood).double()
    x = _x(b=4, d=5).double() if likelihood == "bernoulli" else _grey(4, 5, dtype=torch.float64)
    exact = _exact_log_px_1d(m, x)
    est = m.log_likelihood(x, samples=20000, batch=3000, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(est, exact, rtol=0, atol=0.01)
    assert est.shape == (4,)
    # and the ELBO is a lower bound of the exact value
    elbo = m.elbo(x, samples=5000, generator=torch.Generator().manual_seed(1)).detach()
    assert (elbo <= exact + 0.01).all()


def _log_weights_by_hand(model, x, z):
    """log p(x, z) - log q(z|x) for ``z [S, B, Z]`` with torch.distributions (not pyvae's ops)."""
    mu, logvar = model.encode(x)
    if model.likelihood == "bernoulli":
        lpx = Independent(Bernoulli(logits=model.decode(z)), 1).log_prob(x)
    else:
        mean, lv = model.decode(z)
        lpx = Independent(Normal(mean, (0.5 * lv).exp()), 1).log_prob(x)
    lpz = Independent(Normal(torch.zeros_like(z), torch.ones_like(z)), 1).log_prob(z)
    lqz = Independent(Normal(mu, (0.5 * logvar).exp()), 1).log_prob(z)
    return lpx + lpz - lqz


@pytest.mark.parametrize("batch", [300, 7, 1])  # one chunk; 42 chunks and a partial one of 6; 300 chunks
def test_log_likelihood_chunking_is_exact(batch):
    """The running log-sum-exp over chunks loses nothing: for the draws log_likelihood makes (one seed
    per chunk from the generator, replayed here by the same reparameterize calls), it equals
    log (1/S) sum_s p(x, z_s) / q(z_s|x) over all S draws at once, by hand in float64, to rounding."""
    m, x = _model(dtype=torch.float64), _x().double()
    S = 300
    got = m.log_likelihood(x, samples=S, batch=batch, generator=torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        mu, logvar = m.encode(x)
        z = torch.cat([M._reparameterize(mu, logvar, min(batch, S - i), g, None) for i in range(0, S, batch)])
        assert z.shape == (S, 6, 3)
        want = torch.logsumexp(_log_weights_by_hand(m, x, z), 0) - math.log(S)
    assert got.shape == (6,) and got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
def test_shard_reproduces_global_batch(device):
    m, x = _model(z=4).to(device), _x(b=8).to(device)
    for samples in (1, 3):
        full = m(x, samples=samples, generator=torch.Generator().manual_seed(7))[0]
        parts = [m(x[r * 4:(r + 1) * 4], samples=samples, generator=torch.Generator().manual_seed(7),
                   shard=(r * 4, 8))[0] for r in range(2)]
        torch.testing.assert_close(torch.cat(parts), full, rtol=1e-6, atol=1e-5)


def test_fused_and_eager_layers_same_state_dict_same_result():
    m, x = _model(), _x()
    e = M.VAE(12, z_dim=3, hidden=7, fused=False)
    e.load_state_dict(m.state_dict())
    assert list(e.state_dict()) == list(m.state_dict())
    torch.testing.assert_close(e.elbo(x, generator=torch.Generator().manual_seed(1)),
                               m.elbo(x, generator=torch.Generator().manual_seed(1)), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("likelihood,estimator", [("bernoulli", "analytic"), ("gaussian", "analytic"),
                                                  ("bernoulli", "mc")])
def test_kl_weight_objective(likelihood, estimator):
    """forward(kl_weight=beta) returns the warm-up objective recon - beta * KL (with its gradients), the
    ELBO recon - KL and the unweighted KL, against torch.distributions on an eager copy of the model
    with the same eps (each estimator/likelihood has its own code path)."""
    beta, L = 0.25, 3
    m = _model(likelihood, z=4)
    x = _x() if likelihood == "bernoulli" else torch.rand(6, 12, generator=torch.Generator().manual_seed(2))
    ref = M.VAE(12, z_dim=4, hidden=7, likelihood=likelihood, fused=False)
    ref.load_state_dict(m.state_dict())
    z, mu, logvar = _z_for(m, x, L, 1)
    eps = ((z - mu) / (0.5 * logvar).exp()).detach()
    obj, elbo, kl = m(x, samples=L, estimator=estimator, kl_weight=beta, generator=torch.Generator().manual_seed(1))

    mu_r, lv_r = ref.encode(x)
    z_r = mu_r + (0.5 * lv_r).exp() * eps
    if likelihood == "bernoulli":
        rec_r = Independent(Bernoulli(logits=ref.decode(z_r)), 1).log_prob(x).mean(0)
    else:
        mean, lv = ref.decode(z_r)
        rec_r = Independent(Normal(mean, (0.5 * lv).exp()), 1).log_prob(x).mean(0)
    q = Independent(Normal(mu_r, (0.5 * lv_r).exp()), 1)
    p = Independent(Normal(torch.zeros_like(mu_r), torch.ones_like(mu_r)), 1)
    kl_r = kl_divergence(q, p) if estimator == "analytic" else (q.log_prob(z_r) - p.log_prob(z_r)).mean(0)
    obj_r = rec_r - beta * kl_r

    assert kl_divergence(q, p).min() > 0.02  # a KL term that was dropped or weighted wrongly shows
    torch.testing.assert_close(kl, kl_r.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(elbo, (rec_r - kl_r).detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(obj, obj_r.detach(), rtol=1e-5, atol=1e-4)
    assert obj.requires_grad and not elbo.requires_grad and not kl.requires_grad
    obj.sum().backward()
    obj_r.sum().backward()
    for (name, a), b in zip(m.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_gradients_flow_to_all_parameters():
    m, x = _model("gaussian"), torch.rand(6, 12)
    m.elbo(x, samples=2).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in m.parameters())


def test_generation_shapes_and_ranges():
    m = _model()
    s = m.sample(5, generator=torch.Generator().manual_seed(0))
    assert s.shape == (5, 12) and 0 <= s.min() and s.max() <= 1
    b = m.sample(5, generator=torch.Generator().manual_seed(0), binary=True)
    assert set(b.unique().tolist()) <= {0.0, 1.0}
    r = m.reconstruct(_x())
    assert r.shape == (6, 12)
    mu, lv = m.encode(_x())
    assert mu.shape == lv.shape == (6, 3)


def test_paper_init():
    m = M.VAE(12, z_dim=3, hidden=50, init="paper")
    w = torch.cat([p.flatten() for p in m.parameters()])
    assert abs(w.std().item() - 0.01) < 0.002 and abs(w.mean().item()) < 0.002


@pytest.mark.parametrize("kwargs,match", [
    (dict(likelihood="poisson"), "likelihood"),
    (dict(z_dim=0), "z_dim"),
    (dict(activation="gelu"), "activation"),
    (dict(init="xavier"), "init"),
    (dict(layers=1.5), "layers"),
])
def test_bad_constructor_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        M.VAE(12, **kwargs)


def test_bad_call_args():
    m = _model()
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., 12\]"):
        m.elbo(torch.zeros(3, 11))
    with pytest.raises(TypeError, match="floating-point"):
        m.elbo(torch.zeros(3, 12, dtype=torch.int64))
    with pytest.raises(ValueError, match="estimator"):
        m.elbo(_x(), estimator="c")
    with pytest.raises(ValueError, match="samples"):
        m.elbo(_x(), samples=0)
    with pytest.raises(ValueError, match="k must"):
        m.iwae_bound(_x(), 0)
    with pytest.raises(ValueError, match="z must"):
        m.decode(torch.zeros(2, 5))


def test_bf16_autocast_cpu():
    """Under bf16 autocast the ELBO and the KL come out float32 and within bf16 rounding of the float32
    ones (same eps). The KL is checked on its own, and the ELBO to 0.02 nat: measured errors are at most
    0.0065 (ELBO) and 0.0011 (KL), while the KL is 0.03..0.18 nat per row, so a bf16 path that dropped
    or mis-weighted the KL fails."""
    m, x = _model(), _x()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        e = m.elbo(x, generator=torch.Generator().manual_seed(0))
        _, e_fwd, kl = m(x, generator=torch.Generator().manual_seed(0))
    assert e.dtype == kl.dtype == torch.float32 and torch.isfinite(e).all()
    torch.testing.assert_close(e_fwd, e.detach())
    _, ref, kl_ref = m(x, generator=torch.Generator().manual_seed(0))
    assert kl_ref.min() > 0.025
    torch.testing.assert_close(kl, kl_ref, rtol=0.02, atol=2e-3)
    assert (e - ref).abs().max() < 0.02


@pytest.mark.parametrize("route", ["auto", "fused_only"])
def test_bf16_autocast_gradients_reach_every_parameter(route):
    """Under bf16 autocast every parameter gets the gradient of the unfused model under autocast (same
    eps), with linear_act's routing on and off: a bug once dropped the gradient of a bf16 layer input,
    and bf16-mixed training then never trained the first encoder layer (test ELBO -209 vs -119)."""
    import contextlib

    import pyvae.ops

    m, x = _model(z=4), _x(b=9)
    ref = M.VAE(12, z_dim=4, hidden=7, fused=False)
    ref.load_state_dict(m.state_dict())
    ctx = pyvae.ops.fused_only() if route == "fused_only" else contextlib.nullcontext()
    with ctx, torch.autocast("cpu", dtype=torch.bfloat16):
        m.elbo(x, generator=torch.Generator().manual_seed(3)).sum().backward()
        ref.elbo(x, generator=torch.Generator().manual_seed(3)).sum().backward()
    for (name, p), q in zip(m.named_parameters(), ref.parameters()):
        assert p.grad is not None and q.grad is not None, name
        assert p.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad, q.grad, rtol=0.1, atol=0.1 * q.grad.abs().max().item(), msg=name)


@pytest.mark.parametrize("samples", [1, 3])
def test_gradients_match_plain_torch(samples):
    """The fused training objective has the gradients of the same objective in plain torch (same eps)."""
    from pyvae import reference as R

    m, x = _model(z=4), _x(b=9)
    ref = M.VAE(12, z_dim=4, hidden=7, fused=False)
    ref.load_state_dict(m.state_dict())
    z, mu, logvar = _z_for(m, x, samples, 21)
    eps = ((z - mu) / (0.5 * logvar).exp()).detach()
    m.elbo(x, samples=samples, generator=torch.Generator().manual_seed(21)).sum().backward()
    h = torch.tanh(torch.nn.functional.linear(x, ref.encoder[0].weight, ref.encoder[0].bias))
    mu_r, lv_r = torch.nn.functional.linear(h, ref.enc_head.weight, ref.enc_head.bias).chunk(2, -1)
    z_r = mu_r + (0.5 * lv_r).exp() * eps
    hd = torch.tanh(torch.nn.functional.linear(z_r, ref.decoder[0].weight, ref.decoder[0].bias))
    logits = torch.nn.functional.linear(hd, ref.dec_logits.weight, ref.dec_logits.bias)
    (R.bernoulli_log_prob(logits, x).mean(0) - R.gaussian_kl(mu_r, lv_r)).sum().backward()
    for (name, p), q in zip(m.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)


# ------------------------------------------------------------------------------- argument checks
@pytest.mark.parametrize("likelihood", ["bernoulli", "continuous-bernoulli"])
def test_x_outside_the_unit_interval_is_refused_by_the_evaluation_entry_points(likelihood):
    """Bernoulli and continuous-Bernoulli log-densities are only defined on [0, 1]: elsewhere they were
    silently wrong (a positive "log p(x)" for x - 1). The estimators and evaluate() name x instead; the
    Gaussian likelihood takes any x, and values exactly 0 and 1 are fine."""
    from pyvae.evaluation import evaluate

    m = _model(likelihood)
    ok = _grey()
    for bad in (ok * 3, ok - 1, torch.where(ok > 0.5, torch.tensor(float("nan")), ok)):
        for call in (m.elbo, lambda v: m.elbo(v, estimator="mc"), lambda v: m.iwae_bound(v, 3),
                     lambda v: m.log_likelihood(v, samples=4), lambda v: evaluate(m, v, batch_size=4)):
            with pytest.raises(ValueError, match=rf"x must hold values in \[0, 1\] for the {likelihood} likelihood"):
                call(bad)
    assert torch.isfinite(m.elbo(ok)).all() and torch.isfinite(m.log_likelihood(ok, samples=4)).all()
    g = _model("gaussian")
    assert torch.isfinite(g.elbo(ok * 3 - 1)).all() and torch.isfinite(g.iwae_bound(ok * 3 - 1, 3)).all()


def test_one_row_without_a_batch_dim_is_a_shape_error():
    """A [D] x gave an IndexError from inside the draw; the estimators draw z per row of a [B, D] batch."""
    m, x = _model(), _x()
    for call in (lambda v: m(v)[0], lambda v: m.elbo(v), lambda v: m.elbo(v, estimator="mc"),
                 lambda v: m.iwae_bound(v, 3), lambda v: m.log_likelihood(v, samples=4)):
        with pytest.raises(ValueError, match=r"x must have shape \[B, 12\] \(a batch of rows"):
            call(x[0])
        assert call(x[:1]).shape == (1,)


def test_forward_checks_shard_and_kl_weight():
    """A shard running past its global batch gave its last rows the eps of the next sample's first rows,
    a negative row0 a pybind TypeError, kl_weight=nan a NaN objective: each is now a ValueError."""
    m, x = _model(), _x()  # B = 6
    for shard in ((3, 8), (0, 5), (100, 0), (-2, 4)):
        with pytest.raises(ValueError, match=r"shard=\(row0, global_rows\) must satisfy 0 <= row0 and row0 \+ B "
                                             r"<= global_rows for this batch of B=6 rows"):
            m(x, shard=shard)
    for shard in (5, (1, 2, 3), (0.0, 6), (True, 6), "ab"):
        with pytest.raises(ValueError, match=r"shard must be a pair of ints \(row0, global_rows\)"):
            m(x, shard=shard)
    for w in (float("nan"), float("inf"), "a", True, torch.tensor(0.5)):
        with pytest.raises(ValueError, match="kl_weight must be a finite real number"):
            m(x, kl_weight=w)
    torch.testing.assert_close(m(x, shard=(0, 6), generator=torch.Generator().manual_seed(3))[0],
                               m(x, generator=torch.Generator().manual_seed(3))[0])  # the whole batch
    assert m(x, shard=(2, 8), kl_weight=0)[0].shape == (6,)


def test_evaluate_checks_precision_and_batch_size():
    """Any unknown precision ran fp16 autocast and batch_size=0 ran as 1, silently."""
    from pyvae.evaluation import autocast, evaluate

    m, x = _model(), _x(b=10)
    for p in ("fp16", "bf16", "fp64", "FP32"):
        with pytest.raises(ValueError, match=r"precision must be one of \['fp32', 'bf16-mixed', 'fp16-mixed'\]"):
            evaluate(m, x, batch_size=4, precision=p)
        with pytest.raises(ValueError, match="precision must be one of"):
            autocast(p, torch.device("cpu"))
    for b in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
            evaluate(m, x, batch_size=b)
    assert m.training  # refused before evaluate switched the model to eval mode
    assert evaluate(m, x, batch_size=4, precision="bf16-mixed")["elbo"] < 0


@pytest.mark.parametrize("likelihood", ["bernoulli", "continuous-bernoulli", "gaussian"])
@pytest.mark.parametrize("estimator", ["analytic", "mc"])
def test_a_half_precision_model_runs_its_estimators(likelihood, estimator):
    """A model cast with .to(torch.bfloat16) (no autocast) sampled and reconstructed, but its estimators
    failed: z is drawn in float32 and met the decoder's bfloat16 weights. They now match the float32 model
    of the same (rounded) weights to bfloat16's rounding, and train."""
    import copy

    torch.manual_seed(0)
    half = M.VAE(12, z_dim=2, hidden=8, likelihood=likelihood).to(torch.bfloat16)
    wide = copy.deepcopy(half).float()
    x = (torch.rand(4, 12, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    got = half.elbo(x.bfloat16(), estimator=estimator, generator=torch.Generator().manual_seed(2))
    want = wide.elbo(x, estimator=estimator, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-2)
    got.sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 and bool(torch.isfinite(p.grad).all())
               for p in half.parameters())
    for est in (half.iwae_bound(x.bfloat16(), 3), half.log_likelihood(x.bfloat16(), samples=4)):
        assert torch.isfinite(est).all()
