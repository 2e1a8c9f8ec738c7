"""pyvae.inference: inpainting (importance-sampled posterior predictive, pseudo-Gibbs and Metropolis-within-Gibbs),
denoising, masks, baselines, calibration; and the run-level commands on them (pyvae.runs, ``pyvae inpaint|denoise``)."""
import math

import numpy as np
import pytest
import torch

from pyvae.cli import main as cli_main
from pyvae.inference import (METHODS, Inpainting, completion_metrics, denoise, denoise_importance, flip_noise, inpaint,
                             load_mask, make_mask, nearest_neighbour_completion, nearest_neighbours, reliability)
from pyvae.models import VAE

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny Bernoulli VAE trained for a few seconds on the 8x8 digits, as a run directory."""
    from pyvae.train import build_config, train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("inference") / "run"
        cfg = build_config(dict(dataset="digits", hidden=64, latent=4, epochs=60, batch_size=50, threads=1, seed=0,
                                progress=False, plots=False, out=str(out)))
        res = train(cfg)
    finally:
        torch.set_num_threads(threads)  # (process-wide: later tests see the thread count they started with)
    return out, res.model.eval()


@pytest.fixture(scope="module")
def test_x():
    from pyvae.data import load_dataset

    return load_dataset("digits", binarize="static").test[:64]


def tiny(likelihood="bernoulli", device="cpu", x_dim=12):
    torch.manual_seed(0)
    return VAE(x_dim, z_dim=3, hidden=8, likelihood=likelihood).to(device).eval()


def binary(b, d, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, d, generator=g) < 0.4).float().to(device)


# ---------------------------------------------------------------------------------- inpaint
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("likelihood", ["bernoulli", "continuous-bernoulli", "gaussian"])
@pytest.mark.parametrize("method", METHODS)
def test_nothing_missing_returns_input_exactly(device, likelihood, method):
    model = tiny(likelihood, device)
    x = torch.rand(5, 12, device=device)  # not binary: any rounding would show
    res = inpaint(model, x, torch.ones(12, device=device), steps=3, samples=2, method=method, draws=20,
                  generator=torch.Generator().manual_seed(0))
    assert torch.equal(res.completions, x.expand(2, 5, 12))
    assert torch.equal(res.mean, x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["top-half", "left-half", "random:0.3", "random:0.9"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("output", ["mean", "sample"])
def test_observed_pixels_never_change(device, kind, method, output):
    model = tiny("bernoulli", device, x_dim=16)
    x = torch.rand(6, 16, device=device, dtype=torch.float64)
    mask = make_mask(kind, (6, 4, 4), generator=torch.Generator().manual_seed(1), device=device)
    comp, mean = inpaint(model, x, mask, steps=4, samples=3, method=method, output=output, draws=30,
                         generator=torch.Generator().manual_seed(2))
    obs = mask.bool().expand(3, 6, 16)
    assert torch.equal(comp[obs], x.expand(3, 6, 16)[obs])
    miss = ~obs
    assert miss.any() and not torch.equal(comp[miss], x.expand(3, 6, 16)[miss])
    if output == "sample":  # binary draws at the missing pixels
        assert set(comp[miss].unique().tolist()) <= {0.0, 1.0}
    else:
        assert ((comp[miss] > 0) & (comp[miss] < 1)).all()  # decoder probabilities


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shapes_and_dtypes(dtype):
    model = tiny()
    x = binary(5, 12).to(dtype)
    res = inpaint(model, x, make_mask("random:0.5", (5, 3, 4)), steps=2, samples=3, metropolis=True)
    assert isinstance(res, Inpainting)
    assert res.completions.shape == (3, 5, 12) and res.completions.dtype == dtype
    assert res.mean.shape == (5, 12) and res.mean.dtype == dtype
    assert torch.allclose(res.mean, res.completions.mean(0))
    assert res.accept_rate.shape == (5,) and res.accept_rate.dtype == dtype  # values: test_metropolis_acceptance_rate
    assert res.method == "metropolis" and res.ess is None and res.log_px_obs is None
    assert inpaint(model, x, torch.ones(12), steps=2).accept_rate is None
    imp = inpaint(model, x, make_mask("random:0.5", (5, 3, 4)), samples=3, draws=40)
    assert imp.method == "importance" and imp.accept_rate is None
    assert imp.completions.shape == (3, 5, 12) and imp.completions.dtype == dtype and imp.mean.dtype == dtype
    assert imp.ess.shape == (5,) and imp.ess.dtype == dtype
    assert imp.log_px_obs.shape == (5,) and imp.log_px_obs.dtype == torch.float64
    # a [D] mask and the same mask as [B, D] give the same result; bool and int masks are accepted
    m = make_mask("top-half", (3, 4))
    a = inpaint(model, x, m, steps=2, generator=torch.Generator().manual_seed(3)).completions
    for mm in (m.expand(5, 12), m.bool(), m.long()):
        assert torch.equal(inpaint(model, x, mm, steps=2, generator=torch.Generator().manual_seed(3)).completions, a)


def test_seeds_reproduce():
    model = tiny()
    x, m = binary(4, 12), make_mask("random:0.5", (4, 3, 4), generator=torch.Generator().manual_seed(0))
    for method in METHODS:
        run = lambda s: inpaint(model, x, m, steps=5, samples=2, method=method, output="sample",  # noqa: E731
                                draws=50, generator=torch.Generator().manual_seed(s)).completions
        assert torch.equal(run(7), run(7))
        assert not torch.equal(run(7), run(8))
    torch.manual_seed(5)
    a = inpaint(model, x, m, steps=2, output="sample").completions
    torch.manual_seed(5)
    assert torch.equal(a, inpaint(model, x, m, steps=2, output="sample").completions)


def test_bad_arguments_raise():
    model = tiny()
    x = binary(4, 12)
    with pytest.raises(ValueError, match="mask must have shape"):
        inpaint(model, x, torch.ones(11))
    with pytest.raises(ValueError, match="mask must have shape"):
        inpaint(model, x, torch.ones(3, 12))
    with pytest.raises(ValueError, match="mask must be binary"):
        inpaint(model, x, torch.full((12,), 0.5))
    with pytest.raises(ValueError, match="mask must be binary"):
        inpaint(model, x, torch.tensor([float("nan")] + [1.0] * 11))
    with pytest.raises(ValueError, match="different devices"):
        inpaint(model, x, torch.ones(12, device="meta"))
    with pytest.raises(TypeError, match="mask must be a torch.Tensor"):
        inpaint(model, x, np.ones(12))
    with pytest.raises(TypeError, match="x must be a floating-point"):
        inpaint(model, x.long(), torch.ones(12))
    with pytest.raises(ValueError, match=r"x must have shape \[B, 12\]"):
        inpaint(model, x[:, :10], torch.ones(10))
    with pytest.raises(ValueError, match="x is on meta"):
        inpaint(model, x.to("meta"), torch.ones(12, device="meta"))
    with pytest.raises(ValueError, match="steps"):
        inpaint(model, x, torch.ones(12), steps=-1)
    with pytest.raises(ValueError, match="samples"):
        inpaint(model, x, torch.ones(12), samples=0)
    with pytest.raises(ValueError, match="metropolis=True needs chain='sample'"):
        inpaint(model, x, torch.ones(12), metropolis=True, chain="mean")
    with pytest.raises(ValueError, match="method must be one of"):
        inpaint(model, x, torch.ones(12), method="exact")
    with pytest.raises(ValueError, match="metropolis=True means method='metropolis'"):
        inpaint(model, x, torch.ones(12), metropolis=True, method="gibbs")
    for name in ("draws", "components"):
        with pytest.raises(ValueError, match=name):
            inpaint(model, x, torch.ones(12), **{name: 0})
    with pytest.raises(ValueError, match="fit_steps"):
        inpaint(model, x, torch.ones(12), fit_steps=-1)
    with pytest.raises(ValueError, match="fills must be a non-empty sequence"):
        inpaint(model, x, torch.ones(12), fills=())
    with pytest.raises(ValueError, match=r"fills\[1\] must be a number or a \[12\]"):
        inpaint(model, x, torch.ones(12), fills=(0.0, torch.zeros(11)))
    with pytest.raises(ValueError, match="method='importance' needs flip"):
        denoise(model, x, method="importance")
    with pytest.raises(TypeError, match="x_noisy must be a floating-point"):
        denoise(model, x.long())


def test_all_missing_draws_from_the_model(run):
    """Metropolis-within-Gibbs targets p(x, z) exactly: with every pixel missing, the completions' mean
    E[x | z] has the mean of E[x | z], z ~ N(0, I) (within 5 standard errors at every pixel)."""
    _, model = run
    chains, prior_n = 400, 20000
    res = inpaint(model, torch.zeros(1, 64), torch.zeros(64), steps=30, samples=chains, metropolis=True,
                  generator=torch.Generator().manual_seed(0))
    comp = res.completions[:, 0]
    with torch.no_grad():
        prior = model.mean(torch.randn(prior_n, model.z_dim, generator=torch.Generator().manual_seed(1)))
    se = (prior.var(0) / chains + prior.var(0) / prior_n).sqrt()
    z = (comp.mean(0) - prior.mean(0)).abs() / se
    assert z.max() < 5, z.max()
    assert res.accept_rate.item() > 0.05  # the chain moves
    # and the completions are not one image: their spread matches the model's
    assert torch.allclose(comp.var(0).mean(), prior.var(0).mean(), rtol=0.25)


def _independence_mh_rate(mu, logvar, steps, n=4001, lim=12.0):
    """Expected acceptance rate, averaged over ``steps`` steps, of the independence Metropolis-Hastings
    chain with proposal N(mu, e^logvar) and target N(0, 1) started from a proposal draw, computed by
    propagating the chain's distribution on a grid (no sampling)."""
    z = torch.linspace(-lim, lim, n, dtype=torch.float64)
    log_q = -0.5 * (math.log(2 * math.pi) + logvar + (z - mu) ** 2 / math.exp(logvar))
    log_w = -0.5 * (math.log(2 * math.pi) + z ** 2) - log_q  # log target / proposal
    q = log_q.exp() / log_q.exp().sum()
    move = q.view(1, -1) * (log_w.view(1, -1) - log_w.view(-1, 1)).clamp(max=0).exp()  # i -> j proposed, accepted
    accept = move.sum(1)
    p, rates = q, []
    for _ in range(steps):
        rates.append(float(p @ accept))
        p = p @ move + p * (1 - accept)
    return sum(rates) / steps


def test_metropolis_acceptance_rate():
    """accept_rate against known answers. A 2-pixel model whose decoder ignores z (constant logits), so
    p(z | x) is the prior N(0, 1), and whose encoder gives image [0, 0] q = N(0, 1) (the proposal is the
    target: every step is accepted) and images [1, 0], [0, 1] two other Gaussians (the acceptance rate of
    the independence sampler, ~0.60 and ~0.57, from ``_independence_mh_rate``). With every pixel
    observed, x and so q stay fixed. 4000 chains: the standard error is below 0.008; a reversed
    acceptance ratio gives ~0.50 and ~0.63, a rate over steps + 1 five sixths of the answer."""
    model = VAE(2, z_dim=1, hidden=2).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.encoder[0].weight.copy_(50.0 * torch.eye(2))  # h = tanh(50 x): 0 or 1 per pixel
        model.enc_head.weight.copy_(torch.tensor([[1.0, 1.5], [math.log(1.5 ** 2), math.log(0.7 ** 2)]]))
        model.dec_logits.bias.copy_(torch.tensor([0.3, -0.2]))
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    mu, logvar = model.encode(x)
    assert mu[0].item() == 0 and logvar[0].item() == 0
    steps = 5
    res = inpaint(model, x, torch.ones(2), steps=steps, samples=4000, method="metropolis",
                  generator=torch.Generator().manual_seed(0))
    assert res.accept_rate.shape == (3,) and res.accept_rate.dtype == torch.float64
    assert res.accept_rate[0].item() == 1.0
    for b in (1, 2):
        want = _independence_mh_rate(mu[b, 0].item(), logvar[b, 0].item(), steps)
        assert 0.5 < want < 0.65
        assert res.accept_rate[b].item() == pytest.approx(want, abs=0.03), b


@pytest.mark.parametrize("method", ["gibbs", "metropolis"])
def test_completions_improve_with_steps(run, test_x, method):
    _, model = run
    m = make_mask("random:0.6", (test_x.shape[0], 8, 8), generator=torch.Generator().manual_seed(0))
    ll = {s: completion_metrics(inpaint(model, test_x, m, steps=s, samples=8, method=method,
                                        generator=torch.Generator().manual_seed(1)).mean, test_x, m)["ll"]
          for s in (0, 10)}
    assert ll[10] >= ll[0] + 0.01, ll  # measured +0.017..+0.024 over 4 seeds


def test_trained_model_beats_the_mean_image(run, test_x):
    out, model = run
    from pyvae.data import load_dataset

    mean_img = load_dataset("digits", binarize="static").train.mean(0).expand_as(test_x)
    m = make_mask("random:0.5", (test_x.shape[0], 8, 8), generator=torch.Generator().manual_seed(0))
    got = completion_metrics(inpaint(model, test_x, m, steps=10, samples=8, metropolis=True,
                                     generator=torch.Generator().manual_seed(1)).mean, test_x, m)
    base = completion_metrics(mean_img, test_x, m)
    assert got["ll"] > base["ll"] + 0.05 and got["err"] < base["err"], (got, base)


# ------------------------------------------------------------------------ importance sampling
@pytest.mark.parametrize("draws", [1, 7, 200])
def test_ess_is_reported_and_within_one_and_k(run, test_x, draws):
    _, model = run
    m = make_mask("top-half", (8, 8))
    res = inpaint(model, test_x, m, draws=draws, generator=torch.Generator().manual_seed(0))
    assert res.ess.shape == (test_x.shape[0],) and torch.isfinite(res.ess).all()
    assert (res.ess >= 1 - 1e-4).all() and (res.ess <= draws * (1 + 1e-4)).all(), res.ess
    if draws == 200:  # the fitted proposal on this small model: most draws count
        assert res.ess.median() > 50, res.ess.median()
    assert torch.isfinite(res.log_px_obs).all() and (res.log_px_obs < 0).all()


def test_importance_beats_the_mean_image_on_held_out_pixels(run, test_x):
    """The posterior predictive of a trained model, on test digits it has not seen, at the missing pixels only."""
    _, model = run
    from pyvae.data import load_dataset

    train = load_dataset("digits", binarize="static").train
    mean_img = train.mean(0).expand_as(test_x)
    for kind in ("random:0.5", "top-half", "left-half"):
        m = make_mask(kind, (test_x.shape[0], 8, 8), generator=torch.Generator().manual_seed(0))
        got = completion_metrics(inpaint(model, test_x, m, generator=torch.Generator().manual_seed(1)).mean, test_x, m)
        base = completion_metrics(mean_img, test_x, m)
        nn = completion_metrics(nearest_neighbour_completion(test_x, m, train), test_x, m)
        # measured: log-lik -0.352 / -0.368 / -0.358 against the mean image's -0.415 / -0.413 / -0.404,
        # error 0.173 / 0.182 / 0.184 against 0.226 / 0.222 / 0.213
        assert got["ll"] > base["ll"] + 0.02 and got["err"] < base["err"] - 0.01, (kind, got, base)
        assert got["ll"] > nn["ll"], (kind, got, nn)


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_log_px_obs_with_every_pixel_observed_is_log_likelihood(likelihood):
    """With nothing missing, log p(x_obs) is log p(x): the importance estimate (encoder proposal, no fit) and
    ``model.log_likelihood`` (q(z|x) as proposal) agree within their Monte Carlo error."""
    model = tiny(likelihood)
    x = binary(6, 12, seed=3) if likelihood == "bernoulli" else torch.rand(6, 12, generator=torch.Generator().manual_seed(3))
    res = inpaint(model, x, torch.ones(12), draws=20000, fit_steps=0, components=1, screen=0,
                  generator=torch.Generator().manual_seed(0))
    ref = model.log_likelihood(x, samples=20000, generator=torch.Generator().manual_seed(1)).double()
    torch.testing.assert_close(res.log_px_obs, ref, atol=0.02, rtol=0)
    # a different fit and more components estimate the same number
    fitted = inpaint(model, x, torch.ones(12), draws=20000, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(fitted.log_px_obs, ref, atol=0.02, rtol=0)


def _grid_posterior(model, x, obs, half_width=7.0, n=601):
    """Brute force on a 2-D latent space: log p(x_obs) and E[x | x_obs] by a grid over z, with the Bernoulli
    log-likelihood of the observed pixels from torch.distributions."""
    g = torch.linspace(-half_width, half_width, n, dtype=torch.float64)
    z = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        logits = model.decode(z.float()).double()  # [G, D]
    lik = torch.distributions.Bernoulli(logits=logits.unsqueeze(1)).log_prob(x.double())  # [G, B, D]
    log_joint = (lik * obs.double()).sum(-1) + torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1, keepdim=True)
    cell = (g[1] - g[0]) ** 2
    log_px = torch.logsumexp(log_joint, 0) + torch.log(cell)
    w = torch.softmax(log_joint, 0)  # [G, B]
    return log_px, torch.einsum("gb,gd->bd", w, torch.sigmoid(logits))


def test_log_px_obs_and_predictive_match_a_grid_over_a_2d_latent_space():
    torch.manual_seed(0)
    model = VAE(16, z_dim=2, hidden=16).eval()
    with torch.no_grad():  # a sharper decoder than the init's, so that the posterior is far from the prior
        model.dec_logits.weight.mul_(6.0)
    x = binary(5, 16, seed=4)
    mask = make_mask("random:0.4", (5, 4, 4), generator=torch.Generator().manual_seed(2))
    res = inpaint(model, x, mask, draws=4000, generator=torch.Generator().manual_seed(3))
    log_px, pred = _grid_posterior(model, x, mask)
    torch.testing.assert_close(res.log_px_obs, log_px, atol=0.03, rtol=0)
    miss = mask == 0
    torch.testing.assert_close(res.mean.double()[miss], pred[miss], atol=0.03, rtol=0)
    assert (res.log_px_obs > log_px - 1).all() and (pred[miss] - 0.5).abs().max() > 0.2  # not a trivial case


def test_reliability_bins_and_the_diagram(tmp_path):
    g = torch.Generator().manual_seed(0)
    p = torch.rand(200, 50, generator=g, dtype=torch.float64)
    x = (torch.rand(200, 50, generator=g, dtype=torch.float64) < p).double()  # calibrated by construction
    r = reliability(p, x, torch.zeros(50), bins=10)
    assert sum(r["count"]) == 200 * 50 and len(r["confidence"]) == 10 and r["ece"] < 0.02
    mid = r["confidence"][5]
    assert 0.5 <= mid < 0.6 and abs(r["frequency"][5] - mid) < 0.05
    bad = reliability((p > 0.5).double(), x, torch.zeros(50), bins=10)  # overconfident: 0s and 1s only
    assert bad["count"][1:9] == [0] * 8 and bad["ece"] > 0.2 and math.isnan(bad["confidence"][4])
    observed = reliability(p, x, torch.ones(50))  # nothing missing: nothing binned
    assert sum(observed["count"]) == 0 and observed["ece"] == 0.0
    from pyvae.plots import reliability_diagram

    png = reliability_diagram(bad, tmp_path / "r.png", title="t")
    assert png.is_file() and png.stat().st_size > 1000


def test_nearest_neighbours_use_only_observed_pixels():
    g = torch.Generator().manual_seed(0)
    train = torch.rand(30, 12, generator=g)
    x = train[[3, 17]].clone()
    mask = torch.ones(2, 12)
    mask[:, :6] = 0
    x[:, :6] = 5.0  # far off on the missing pixels: must not matter
    assert nearest_neighbours(x, mask, train, 2)[:, 0].tolist() == [3, 17]
    d = ((x[:, None, 6:] - train[None, :, 6:]) ** 2).sum(-1)  # brute force over the observed pixels
    assert torch.equal(nearest_neighbours(x, mask, train, 5), d.topk(5, 1, largest=False).indices)
    comp = nearest_neighbour_completion(x, mask, train)
    assert torch.equal(comp[:, 6:], x[:, 6:]) and torch.equal(comp[:, :6], train[[3, 17], :6])
    with pytest.raises(ValueError, match="k must be at most"):
        nearest_neighbours(x, mask, train, 31)


def test_importance_denoising_beats_the_encoder_denoiser(run, test_x):
    _, model = run
    x = (test_x > 0.5).to(test_x.dtype)
    noisy = flip_noise(x, 0.1, torch.Generator().manual_seed(1))
    r = denoise_importance(model, noisy, 0.1, generator=torch.Generator().manual_seed(2))
    enc = denoise(model, noisy, samples=8, generator=torch.Generator().manual_seed(2), flip=0.1, method="encoder")
    err = lambda p: ((p > 0.5).to(x.dtype) != x).float().mean().item()  # noqa: E731
    # measured: 0.066 (importance), 0.070 (encoder), 0.099 (noisy)
    assert err(r.mean) < err(enc) and err(r.mean) < 0.75 * err(noisy), (err(r.mean), err(enc), err(noisy))
    assert (r.ess >= 1 - 1e-4).all() and (r.ess <= 500 * (1 + 1e-4)).all() and torch.isfinite(r.log_px_noisy).all()
    assert torch.equal(denoise(model, noisy, flip=0.1, generator=torch.Generator().manual_seed(2)), r.mean)


# ---------------------------------------------------------------------------------- denoise
def test_denoise_is_reconstruction_and_flip_noise(run, test_x):
    _, model = run
    assert torch.equal(denoise(model, test_x), model.reconstruct(test_x))
    g = torch.Generator().manual_seed(0)
    x = binary(200, 64)
    assert torch.equal(flip_noise(x, 0.0, g), x) and torch.equal(flip_noise(x, 1.0, g), 1 - x)
    frac = (flip_noise(x, 0.1, g) != x).float().mean().item()
    assert abs(frac - 0.1) < 5 * (0.1 * 0.9 / x.numel()) ** 0.5
    a = denoise(model, test_x, steps=2, samples=4, generator=torch.Generator().manual_seed(0))
    assert a.shape == test_x.shape and torch.equal(
        a, denoise(model, test_x, steps=2, samples=4, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="p must be a probability"):
        flip_noise(x, 1.5)


# ------------------------------------------------------------------------------------ masks
def test_make_mask_kinds(tmp_path):
    top = make_mask("top-half", (5, 4)).reshape(5, 4)
    assert top[:2].sum() == 0 and top[2:].min() == 1
    left = make_mask("left-half", (4, 5)).reshape(4, 5)
    assert left[:, :2].sum() == 0 and left[:, 2:].min() == 1
    r = make_mask("random:0.25", (3, 8, 8), generator=torch.Generator().manual_seed(0))
    assert r.shape == (3, 64) and ((r == 0).sum(1) == 16).all() and not torch.equal(r[0], r[1])
    assert make_mask("random:0", (2, 2)).min() == 1 and make_mask("random:1", (2, 2)).max() == 0
    a = (np.arange(12).reshape(3, 4) % 2).astype(np.float32)
    np.save(tmp_path / "m.npy", a)
    assert torch.equal(make_mask(str(tmp_path / "m.npy"), (3, 4)), torch.from_numpy(a).reshape(12))
    from PIL import Image

    Image.fromarray((a * 255).astype(np.uint8)).save(tmp_path / "m.png")
    assert torch.equal(load_mask(tmp_path / "m.png", (3, 4)), torch.from_numpy(a).reshape(12))
    Image.fromarray(np.full((3, 4), 128, np.uint8)).save(tmp_path / "gray.png")
    with pytest.raises(ValueError, match="black .* and white"):
        load_mask(tmp_path / "gray.png", (3, 4))
    with pytest.raises(ValueError, match=r"must be 5 x 4 pixels"):
        load_mask(tmp_path / "m.png", (4, 5))
    np.save(tmp_path / "bad.npy", a * 2)
    with pytest.raises(ValueError, match="0 \\(missing\\) or 1"):
        load_mask(tmp_path / "bad.npy", (3, 4))
    with pytest.raises(ValueError, match="unknown mask kind"):
        make_mask("middle", (3, 4))
    with pytest.raises(ValueError, match="P in \\[0, 1\\]"):
        make_mask("random:1.5", (3, 4))
    with pytest.raises(FileNotFoundError):
        make_mask(str(tmp_path / "none.png"), (3, 4))


# -------------------------------------------------------------------------------------- CLI
def test_run_functions_end_to_end(run, tmp_path, capsys):
    from pyvae.runs import denoise_run, inpaint_run

    out, _ = run
    r = inpaint_run(out, mask="random:0.5", n=8, steps=3, samples=2, out=tmp_path / "i.png")
    assert r["png"].is_file() and r["png"].stat().st_size > 100 and r["method"] == "importance"
    assert r["reliability_png"] == tmp_path / "i_reliability.png" and r["reliability_png"].stat().st_size > 1000
    assert r["model"]["missing"] == 8 * 32 and r["model"]["ll"] > r["mean_image"]["ll"]
    assert r["nearest_neighbour"]["missing"] == r["mean_image"]["missing"] == 8 * 32
    assert r["model"]["ll"] > r["nearest_neighbour"]["ll"] and 1 <= r["ess"]["min"] <= r["ess"]["median"] <= 500
    assert math.isfinite(r["log_px_obs"]) and sum(r["calibration"]["count"]) == 8 * 32
    g = inpaint_run(out, mask="random:0.5", n=8, steps=3, samples=2, method="gibbs", out=tmp_path / "g.png")
    assert g["method"] == "gibbs" and "ess" not in g and g["mean_image"] == r["mean_image"]
    assert capsys.readouterr().out == ""  # the library returns numbers; the CLI prints them
    d = denoise_run(out, flip=0.1, n=8, out=tmp_path / "d.png")
    assert d["png"].is_file() and 0 < d["err_noisy"] < 0.3 and d["err_denoised"] < 0.8 * d["err_noisy"]
    assert d["method"] == "importance" and 1 <= d["ess"]["min"] and math.isfinite(d["log_px_noisy"])
    from PIL import Image

    with Image.open(r["png"]) as im:  # 5 rows (original, corrupted, 2 completions, mean) of 8 images
        assert im.size[0] * 5 == pytest.approx(im.size[1] * 8, rel=0.05)


def test_denoise_run_numbers_match_an_independent_computation(run, tmp_path):
    """denoise_run's error fractions over the whole test set (n above its size: all 179 images) against
    the same quantities computed here with the public functions and other random draws (4 noise draws,
    averaged): they agree within 0.015 (one draw's spread is ~0.003); the denoised, plain-reconstruction
    and noisy errors are ~0.07, ~0.16 and 0.10, so a number computed from the wrong image shows."""
    from pyvae.data import load_dataset
    from pyvae.runs import denoise_run

    out, model = run
    d = denoise_run(out, flip=0.1, n=1000, seed=5, out=tmp_path / "d.png")
    x = load_dataset("digits", binarize="dynamic").test
    assert d["n"] == x.shape[0]

    def err(p):
        return ((p > 0.5).to(x.dtype) != x).double().mean().item()

    noisy = [flip_noise(x, 0.1, torch.Generator().manual_seed(100 + s)) for s in range(4)]
    plain = np.mean([err(denoise(model, nz)) for nz in noisy])
    den = np.mean([err(denoise(model, nz, samples=8, generator=torch.Generator().manual_seed(200 + s), flip=0.1))
                   for s, nz in enumerate(noisy)])
    assert d["err_noisy"] == pytest.approx(0.1, abs=5 * (0.1 * 0.9 / x.numel()) ** 0.5)
    assert d["err_reconstruction"] == pytest.approx(plain, abs=0.015)
    assert d["err_denoised"] == pytest.approx(den, abs=0.015)
    assert d["err_denoised"] < 0.8 * d["err_noisy"]


def test_inpaint_and_denoise_commands(run, tmp_path, capsys):
    out, _ = run
    png = tmp_path / "cli.png"
    assert cli_main(["inpaint", str(out), "--mask", "left-half", "--n", "4", "--steps", "2", "--samples", "2",
                     "--seed", "3", "--metropolis", "--out", str(png)]) == 0 and png.is_file()
    printed = capsys.readouterr().out
    assert "acceptance" in printed and "log-lik" in printed and "error rate" in printed
    assert "method metropolis" in printed and "reliability" in printed
    assert cli_main(["inpaint", str(out), "--n", "4", "--draws", "50", "--out", str(png)]) == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    assert "method importance" in lines[0]
    for name in ("model:", "mean image:", "nearest neighbour:"):  # one line each, same format
        line = next(ln for ln in lines if ln.strip().startswith(name))
        assert "log-lik" in line and "nats/pixel" in line and "error rate" in line, line
    assert "effective sample size" in printed and "log p(x_obs)" in printed
    assert (tmp_path / "cli_reliability.png").is_file()
    assert cli_main(["inpaint", str(out), "--n", "4", "--method", "gibbs", "--steps", "1", "--out", str(png)]) == 0
    assert "method gibbs" in capsys.readouterr().out
    assert cli_main(["inpaint", str(out), "--n", "4", "--method", "gibbs", "--metropolis", "--out", str(png)]) == 2
    assert "--metropolis is --method metropolis" in capsys.readouterr().err
    assert cli_main(["denoise", str(out), "--flip", "0.2", "--n", "4", "--out", str(tmp_path / "d.png")]) == 0
    assert (tmp_path / "d.png").is_file()
    printed = capsys.readouterr().out
    assert "method importance" in printed and "nearest neighbour" in printed and "effective sample size" in printed
    for bad in (["inpaint", "r", "--mask", "middle"], ["inpaint", "r", "--mask", "random:2"],
                ["denoise", "r", "--flip", "1.5"], ["inpaint", "r", "--n", "0"], ["inpaint", "r", "--method", "exact"],
                ["inpaint", "r", "--draws", "0"]):
        with pytest.raises(SystemExit) as e:
            cli_main(bad)
        assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        cli_main(["inpaint", "--help"])
    helptext = capsys.readouterr().out
    assert e.value.code == 0 and all(f in helptext for f in ("--metropolis", "--method", "--draws"))
    assert cli_main(["inpaint", str(tmp_path / "nowhere")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_denoise_with_the_flip_noise_model(run, test_x):
    _, model = run
    x = (test_x > 0.5).to(test_x.dtype)
    # flip = 0 means the noisy pixels are the truth: the posterior returns them exactly.
    torch.testing.assert_close(denoise(model, x, flip=0.0), x)
    noisy = flip_noise(x, 0.1, torch.Generator().manual_seed(1))
    den = denoise(model, noisy, samples=8, generator=torch.Generator().manual_seed(2), flip=0.1)
    assert den.shape == x.shape and float(den.min()) >= 0 and float(den.max()) <= 1
    err_noisy = (noisy != x).float().mean().item()
    err_den = ((den > 0.5).to(x.dtype) != x).float().mean().item()
    assert err_den < 0.8 * err_noisy, (err_den, err_noisy)
    with pytest.raises(ValueError, match="flip must be a probability"):
        denoise(model, noisy, flip=0.7)
    with pytest.raises(ValueError, match="binary"):
        denoise(model, noisy * 0.5, flip=0.1)


# ------------------------------------------------------------------------- continuous Bernoulli
def test_continuous_bernoulli_draws_are_its_inverse_cdf():
    """x = F^-1(u) of CB(logits): torch's cdf maps the draws back to u (moderate logits, where torch is
    accurate), and the draws' mean is the distribution's mean for logits from 1e-5 to 1e4."""
    from torch.distributions import ContinuousBernoulli

    from pyvae import continuous_bernoulli_mean
    from pyvae.inference import _continuous_bernoulli_icdf

    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([-8.0, -1.5, -0.3, 0.2, 0.9, 2.5, 12.0], dtype=torch.float64).repeat(1000)
    u = torch.rand(logits.shape, generator=g, dtype=torch.float64)
    x = _continuous_bernoulli_icdf(logits, u)
    torch.testing.assert_close(ContinuousBernoulli(logits=logits).cdf(x), u, rtol=0, atol=1e-9)
    for l in (-1e4, -40.0, -1e-5, 0.0, 1e-5, 3.0, 1e4):
        lt = torch.full((200_000,), l, dtype=torch.float64)
        draws = _continuous_bernoulli_icdf(lt, torch.rand(lt.shape, generator=g, dtype=torch.float64))
        assert ((draws >= 0) & (draws <= 1)).all()
        assert abs(draws.mean().item() - continuous_bernoulli_mean(lt[:1]).item()) < 5e-3, l


def test_inpaint_continuous_bernoulli_grey_levels():
    model = tiny("continuous-bernoulli", x_dim=16)
    x = torch.rand(6, 16, dtype=torch.float64)
    mask = make_mask("top-half", (4, 4))
    for metropolis, output in ((False, "mean"), (True, "sample")):
        comp, mean = inpaint(model, x, mask, steps=3, samples=2, metropolis=metropolis, output=output,
                             generator=torch.Generator().manual_seed(2))
        obs = mask.bool().expand(2, 6, 16)
        assert torch.equal(comp[obs], x.expand(2, 6, 16)[obs])
        miss = comp[~obs]
        assert ((miss > 0) & (miss < 1)).all()  # grey levels, not binary draws
        assert len(miss.unique()) > 10


def test_continuous_bernoulli_log_px_obs_against_quadrature():
    """log p(x_obs) of a continuous-Bernoulli model: a missing pixel contributes log CB(1/2 | logit 0) = 0
    (CB(0) is the uniform density), not -log 2. With every pixel missing log p(x_obs | z) is 0 for every z,
    so the estimate is ~0; with half of them missing it matches quadrature over a 1-D latent space."""
    from pyvae import continuous_bernoulli_log_prob
    from pyvae.inference import _Missing

    torch.manual_seed(0)
    model = VAE(6, z_dim=1, hidden=6, likelihood="continuous-bernoulli").double().eval()
    x = torch.rand(2, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    logits = torch.randn(5, 2, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 3
    none = torch.zeros(2, 6, dtype=torch.bool)
    assert _Missing(model, x, none).log_lik(logits).abs().max() < 1e-12  # [5, 2] zeros (was -6 log 2)
    res = inpaint(model, x, torch.zeros(6), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(res.log_px_obs, torch.zeros(2, dtype=torch.float64), atol=0.05, rtol=0)

    obs = torch.tensor([1.0, 1, 1, 0, 0, 0], dtype=torch.float64)
    z = torch.linspace(-12, 12, 100001, dtype=torch.float64)
    with torch.no_grad():
        lp = continuous_bernoulli_log_prob(model.decode(z.view(-1, 1, 1).expand(-1, 2, 1))[..., :3], x[:, :3])
    exact = torch.logsumexp(lp - 0.5 * z.view(-1, 1) ** 2, 0) - 0.5 * math.log(2 * math.pi) + math.log(z[1] - z[0])
    res = inpaint(model, x, obs, draws=4000, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(res.log_px_obs, exact, atol=0.02, rtol=0)  # (3 log 2 = 2.08 low before)


def test_inpaint_continuous_bernoulli_importance_output_sample_draws_from_the_logits():
    """output="sample" with the importance method draws x_mis ~ CB(logits) of the resampled z (it raised an
    AttributeError): a decoder with constant logits l (zero weights) gives draws in [0, 1] whose mean is
    CB(l)'s mean, and different logits give different draws."""
    from pyvae import continuous_bernoulli_mean

    model = tiny("continuous-bernoulli", x_dim=16)
    x = torch.rand(50, 16, generator=torch.Generator().manual_seed(0))
    mask = make_mask("top-half", (4, 4))
    miss = (mask == 0).expand(4, 50, 16)
    with torch.no_grad():
        model.dec_logits.weight.zero_()
    means = []
    for l in (-3.0, 2.0):
        with torch.no_grad():
            model.dec_logits.bias.fill_(l)
        res = inpaint(model, x, mask, samples=4, draws=20, output="sample", generator=torch.Generator().manual_seed(1))
        d = res.completions[miss].double()  # 4 * 50 * 8 = 1600 draws
        assert ((d >= 0) & (d <= 1)).all() and len(d.unique()) == d.numel()  # draws, not the mean
        want = continuous_bernoulli_mean(torch.tensor([l], dtype=torch.float64)).item()
        assert abs(d.mean().item() - want) < 5 * d.std().item() / math.sqrt(d.numel()), (l, d.mean(), want)
        means.append(d.mean().item())
    assert means[1] - means[0] > 0.3


@pytest.mark.parametrize("likelihood", ["bernoulli", "continuous-bernoulli"])
def test_inpaint_and_denoise_refuse_x_outside_the_unit_interval(likelihood):
    """Observed pixels outside [0, 1] (or NaN) gave silently wrong completions and log p(x_obs); missing
    pixels are still ignored (NaN there is fine), and Gaussian models take any x."""
    model = tiny(likelihood)
    x = torch.rand(4, 12, generator=torch.Generator().manual_seed(0))
    mask = make_mask("top-half", (3, 4))
    for bad in (x * 3, x - 1, torch.where(mask.bool(), torch.tensor(float("nan")), x)):
        for method in METHODS:
            with pytest.raises(ValueError, match=r"x \(at its observed pixels\) must hold values in \[0, 1\]"):
                inpaint(model, bad, mask, method=method, draws=5)
        with pytest.raises(ValueError, match=r"x_noisy must hold values in \[0, 1\]"):
            denoise(model, bad)
    nan_missing = torch.where(mask.bool(), x, torch.tensor(float("nan")))
    assert torch.isfinite(inpaint(model, nan_missing, mask, draws=5).mean).all()
    assert torch.isfinite(inpaint(tiny("gaussian"), x * 3 - 1, mask, draws=5).mean).all()


def test_importance_chunks_bound_the_screen_tensors_too(monkeypatch):
    """The images per chunk count every [n, chunk, D] tensor of the sampler, the screen's [screen, chunk, D]
    scores too: with few draws, the chunk was sized by K alone and the screen made it 32x the budget."""
    from pyvae import inference

    model, x = tiny(), binary(10, 12)
    monkeypatch.setattr(inference, "_CHUNK_ELEMENTS", 64 * 3 * 12)  # 3 images at screen=64
    sizes = []
    log_px = model.log_px
    monkeypatch.setattr(model, "log_px", lambda xx, dec: sizes.append(dec.numel()) or log_px(xx, dec))
    res = inpaint(model, x, make_mask("top-half", (3, 4)), draws=2, screen=64, fit_steps=1,
                  generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(res.log_px_obs).all()
    assert max(sizes) <= inference._CHUNK_ELEMENTS, max(sizes)


def test_non_finite_fills_and_init_are_refused_by_name():
    """A NaN in a fill or a chain's init gave NaN encodings: torch's multinomial error (importance) or NaN
    completions (chains), neither naming the argument."""
    model = tiny()
    x = binary(3, 12)
    mask = make_mask("top-half", (3, 4))
    bad = torch.full((12,), 0.5)
    bad[7] = float("nan")
    with pytest.raises(ValueError, match=r"fills\[1\] must hold finite values"):
        inpaint(model, x, mask, fills=[0.0, bad], draws=5)
    for method in ("gibbs", "metropolis"):
        with pytest.raises(TypeError, match="init must be a finite number or a tensor, got nan"):
            inpaint(model, x, mask, method=method, steps=2, init=float("nan"))
        with pytest.raises(ValueError, match="init must hold finite values"):
            inpaint(model, x, mask, method=method, steps=2, init=bad)
        with pytest.raises(ValueError, match=r"init must be a number or a \[12\] / \[3, 12\] tensor"):
            inpaint(model, x, mask, method=method, steps=2, init=torch.zeros(5))
        assert torch.isfinite(inpaint(model, x, mask, method=method, steps=2, init=torch.full((12,), 0.5)).mean).all()
