"""pyvae.inference: inpainting (pseudo-Gibbs and Metropolis-within-Gibbs), denoising, masks; and the run-level
commands on them (pyvae.runs, ``pyvae inpaint|denoise``)."""
import numpy as np
import pytest
import torch

from pyvae.cli import main as cli_main
from pyvae.inference import Inpainting, completion_metrics, denoise, flip_noise, inpaint, load_mask, make_mask
from pyvae.models import VAE

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny Bernoulli VAE trained for a few seconds on the 8x8 digits, as a run directory."""
    from pyvae.train import build_config, train

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("inference") / "run"
    cfg = build_config(dict(dataset="digits", hidden=64, latent=4, epochs=60, batch_size=50, threads=1, seed=0,
                            progress=False, plots=False, out=str(out)))
    res = train(cfg)
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
@pytest.mark.parametrize("metropolis", [False, True])
def test_nothing_missing_returns_input_exactly(device, likelihood, metropolis):
    model = tiny(likelihood, device)
    x = torch.rand(5, 12, device=device)  # not binary: any rounding would show
    res = inpaint(model, x, torch.ones(12, device=device), steps=3, samples=2, metropolis=metropolis,
                  generator=torch.Generator().manual_seed(0))
    assert torch.equal(res.completions, x.expand(2, 5, 12))
    assert torch.equal(res.mean, x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["top-half", "left-half", "random:0.3", "random:0.9"])
@pytest.mark.parametrize("metropolis,output", [(False, "mean"), (True, "mean"), (True, "sample"), (False, "sample")])
def test_observed_pixels_never_change(device, kind, metropolis, output):
    model = tiny("bernoulli", device, x_dim=16)
    x = torch.rand(6, 16, device=device, dtype=torch.float64)
    mask = make_mask(kind, (6, 4, 4), generator=torch.Generator().manual_seed(1), device=device)
    comp, mean = inpaint(model, x, mask, steps=4, samples=3, metropolis=metropolis, output=output,
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
    assert res.accept_rate.shape == (5,) and ((res.accept_rate >= 0) & (res.accept_rate <= 1)).all()
    assert inpaint(model, x, torch.ones(12), steps=2).accept_rate is None
    # a [D] mask and the same mask as [B, D] give the same result; bool and int masks are accepted
    m = make_mask("top-half", (3, 4))
    a = inpaint(model, x, m, steps=2, generator=torch.Generator().manual_seed(3)).completions
    for mm in (m.expand(5, 12), m.bool(), m.long()):
        assert torch.equal(inpaint(model, x, mm, steps=2, generator=torch.Generator().manual_seed(3)).completions, a)


def test_seeds_reproduce():
    model = tiny()
    x, m = binary(4, 12), make_mask("random:0.5", (4, 3, 4), generator=torch.Generator().manual_seed(0))
    for met in (False, True):
        run = lambda s: inpaint(model, x, m, steps=5, samples=2, metropolis=met, output="sample",  # noqa: E731
                                generator=torch.Generator().manual_seed(s)).completions
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


@pytest.mark.parametrize("metropolis", [False, True])
def test_completions_improve_with_steps(run, test_x, metropolis):
    _, model = run
    m = make_mask("random:0.6", (test_x.shape[0], 8, 8), generator=torch.Generator().manual_seed(0))
    ll = {s: completion_metrics(inpaint(model, test_x, m, steps=s, samples=8, metropolis=metropolis,
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
    assert r["png"].is_file() and r["png"].stat().st_size > 100
    assert r["model"]["missing"] == 8 * 32 and r["model"]["ll"] > r["mean_image"]["ll"]
    assert capsys.readouterr().out == ""  # the library returns numbers; the CLI prints them
    d = denoise_run(out, flip=0.1, n=8, out=tmp_path / "d.png")
    assert d["png"].is_file() and 0 < d["err_noisy"] < 0.3 and 0 <= d["err_denoised"] <= 1
    from PIL import Image

    with Image.open(r["png"]) as im:  # 5 rows (original, corrupted, 2 completions, mean) of 8 images
        assert im.size[0] * 5 == pytest.approx(im.size[1] * 8, rel=0.05)


def test_inpaint_and_denoise_commands(run, tmp_path, capsys):
    out, _ = run
    png = tmp_path / "cli.png"
    assert cli_main(["inpaint", str(out), "--mask", "left-half", "--n", "4", "--steps", "2", "--samples", "2",
                     "--seed", "3", "--metropolis", "--out", str(png)]) == 0 and png.is_file()
    printed = capsys.readouterr().out
    assert "acceptance" in printed and "log-lik" in printed and "error rate" in printed
    assert cli_main(["denoise", str(out), "--flip", "0.2", "--n", "4", "--out", str(tmp_path / "d.png")]) == 0
    assert (tmp_path / "d.png").is_file()
    for bad in (["inpaint", "r", "--mask", "middle"], ["inpaint", "r", "--mask", "random:2"],
                ["denoise", "r", "--flip", "1.5"], ["inpaint", "r", "--n", "0"]):
        with pytest.raises(SystemExit) as e:
            cli_main(bad)
        assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        cli_main(["inpaint", "--help"])
    assert e.value.code == 0 and "--metropolis" in capsys.readouterr().out
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
