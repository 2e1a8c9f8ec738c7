"""Working with finished runs: evaluate a checkpoint, draw samples and pictures, inpaint and denoise its
test images (``pyvae eval|sample|inpaint|denoise``). Returns numbers and paths; the CLI prints them."""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch

from .checkpoint import load_model, resolve_checkpoint
from .data import SEED_RANGE, check_seed, limit_rows, load_dataset, resolve_binarize
from .evaluation import evaluate
from .inference import (completion_metrics, denoise, denoise_importance, flip_noise, image_shape_for, inpaint,
                        make_mask, nearest_neighbours, reliability)
from . import plots

__all__ = ["eval_run", "sample_run", "inpaint_run", "denoise_run", "run_data"]

PathLike = Union[str, os.PathLike]


def run_data(ckpt: dict, data_dir: Optional[str] = None, limit: Optional[int] = None):
    """``(data, test)``: the splits a run trained on (its checkpoint's configuration; ``data_dir`` when the
    files have moved) and ``limit`` of the test rows, a fixed random subset in the split's order (all when
    None: NOTE: [Limited splits] in pyvae/data.py)."""
    cfg = ckpt["config"]
    data = load_dataset(cfg["dataset"], data_dir or cfg.get("data_dir"),
                        resolve_binarize(cfg["binarize"], cfg["likelihood"]), cfg.get("limit"))
    keep = limit_rows(len(data.test), limit)
    test = data.test if keep is None else data.test[keep]
    return data, test


def _check_count(name: str, v, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    return v


@torch.no_grad()
def eval_run(run_or_ckpt: PathLike, *, k: int = 50, ll_samples: int = 1000, ll_batch: int = 250,
             batch_size: int = 100, limit: Optional[int] = None, seed: int = 0, device: str = "cpu",
             data_dir: Optional[str] = None) -> Dict[str, float]:
    """Test-set ELBO, IWAE bound and importance-sampled log p(x) of a trained model (nats per datapoint).

    Args:
        run_or_ckpt: run directory or checkpoint file.
        k: importance samples of the IWAE bound (0: skip).
        ll_samples: importance samples of the log p(x) estimate (0: skip; the paper uses 5000 with
            q as proposal, this takes ~ll_samples forward passes per datapoint).
        ll_batch: draws per chunk in the log p(x) estimate (memory ~ ll_batch * batch_size * D floats).
        batch_size: datapoints per pass.
        limit: evaluate only ``limit`` test points, a fixed random subset (NOTE: [Limited splits] in
            pyvae/data.py); None: all.
        seed: seeds the eps draws.
        device: "cpu" or "cuda".
        data_dir: where the data files are, when not where the run found them.

    Returns:
        ``{"n", "elbo", "kl", "recon", "iwae", "log_px"}`` (missing keys are skipped estimates).
    """
    for name, v, lo in (("k", k, 0), ("ll_samples", ll_samples, 0), ("ll_batch", ll_batch, 1),
                        ("batch_size", batch_size, 1)):
        _check_count(name, v, lo)
    if limit is not None:  # (0 scored nothing as a perfect 0 nats; a negative one dropped rows from the end)
        _check_count("limit", limit, 1)
    check_seed(seed)
    model, ckpt = load_model(run_or_ckpt, device)
    _, test = run_data(ckpt, data_dir, limit)
    out = {"n": float(test.shape[0])}
    ev = evaluate(model, test, batch_size=batch_size, seed=seed, device=device)
    out.update(elbo=ev["elbo"], kl=ev["kl"], recon=ev["recon"])
    g = torch.Generator().manual_seed((seed + 1) % SEED_RANGE)
    tot_iw = tot_ll = 0.0
    for i in range(0, test.shape[0], batch_size):
        x = test[i:i + batch_size].to(device)
        if k:
            tot_iw += model.iwae_bound(x, k, generator=g).double().sum().item()
        if ll_samples:
            tot_ll += model.log_likelihood(x, ll_samples, ll_batch, generator=g).double().sum().item()
    if k:
        out["iwae"] = tot_iw / test.shape[0]
    if ll_samples:
        out["log_px"] = tot_ll / test.shape[0]
    bad = sorted(k for k, v in out.items() if not math.isfinite(v))
    if bad:
        raise ValueError(f"{resolve_checkpoint(run_or_ckpt)}: the estimates {bad} are not finite "
                         f"({ {k: out[k] for k in bad} })")
    return out


def sample_run(run_or_ckpt: PathLike, *, n: int = 100, manifold: bool = False, reconstructions: bool = True,
               out: Optional[PathLike] = None, seed: int = 0, data_dir: Optional[str] = None,
               device: str = "cpu") -> Dict[str, Path]:
    """Writes a grid of samples (and optionally the 2-D manifold and reconstructions) as PNG.

    Args:
        run_or_ckpt: run directory or checkpoint file.
        n: number of samples in the grid.
        manifold: also draw the paper's Figure 4 (needs z_dim == 2).
        reconstructions: also draw test originals beside their reconstructions.
        out: output directory (default: the run directory).
        seed: seeds the samples.

    Returns:
        name -> path of each PNG written.
    """
    _check_count("n", n, 1)
    check_seed(seed)
    model, ckpt = load_model(run_or_ckpt, device)
    if manifold and model.z_dim != 2:
        raise ValueError(f"--manifold needs a model with a 2-D latent space; this one has z_dim={model.z_dim}")
    out = Path(out) if out else resolve_checkpoint(run_or_ckpt).parent
    if out.exists() and not out.is_dir():
        raise ValueError(f"out must be a directory, but {out} is a file")
    out.mkdir(parents=True, exist_ok=True)
    if reconstructions:
        data, test = run_data(ckpt, data_dir, None)
        shape = data.image_shape
    else:
        shape = _image_shape(ckpt, model.x_dim)
    res = {"samples": plots.sample_grid(model, shape, out / "samples.png", n=n, seed=seed)}
    if manifold:
        res["manifold"] = plots.manifold(model, shape, out / "manifold.png")
    if reconstructions:
        res["reconstructions"] = plots.reconstructions(model, test, shape, out / "reconstructions.png", n=20)
    return res


def _image_shape(ckpt: dict, x_dim: int) -> Tuple[int, int]:
    """(H, W) of a run's images without loading its data: the checkpoint's own (written since it has one),
    else ``image_shape_for``'s guess from the dataset's name and x_dim."""
    shape = ckpt.get("image_shape")
    if shape is not None and len(shape) == 2 and shape[0] * shape[1] == x_dim:
        return int(shape[0]), int(shape[1])
    return image_shape_for(x_dim, ckpt["config"]["dataset"])


def _load_run(run_or_ckpt: PathLike, device: str, data_dir: Optional[str]):
    """Model, splits, test set and image shape of a run."""
    model, ckpt = load_model(run_or_ckpt, device)
    data, test = run_data(ckpt, data_dir, None)
    return model, data, test, tuple(data.image_shape)


def _out_path(run_or_ckpt: PathLike, out: Optional[PathLike], name: str) -> Path:
    p = Path(out) if out else resolve_checkpoint(run_or_ckpt).parent / name
    if p.suffix.lower() != ".png":
        raise ValueError(f"out must be a .png file, got {str(p)!r}")
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


def _spread(total: int, n: int) -> torch.Tensor:
    """Indices of ``n`` test images spread evenly over the test set (splits are ordered by label)."""
    n = min(n, total)
    return torch.linspace(0, total - 1, n).round().long() if n > 1 else torch.zeros(n, dtype=torch.long)


_SHOWN = 32  # images in a completion grid at most (spread over the n)


def _sibling(png: Path, suffix: str) -> Path:
    """``dir/name.png`` -> ``dir/name_<suffix>.png``."""
    return png.with_name(f"{png.stem}_{suffix}.png")


def inpaint_run(run: PathLike, mask: str = "top-half", n: int = 16, steps: int = 20, samples: int = 4,
                seed: int = 0, metropolis: bool = False, out: Optional[PathLike] = None, device: str = "cpu",
                data_dir: Optional[str] = None, *, method: Optional[str] = None, draws: int = 500,
                fit_steps: int = 20, components: int = 2, neighbours: int = 6) -> Dict[str, object]:
    """Inpaints ``n`` test images of a run (spread over the test set), scores the model against two baselines
    on the same missing pixels, and writes the completion grid and a reliability diagram (PNG).

    Methods (``pyvae.inference.inpaint``): ``"importance"`` (default; the proposal's candidates are the
    encoder on the observed pixels filled with 0, the training-set mean image and the ``neighbours``
    training images nearest on the observed pixels (all of them where there are fewer), plus the model's
    own screened prior draws),
    ``"gibbs"``, ``"metropolis"`` (``metropolis=True`` is the same). Baselines: the training-set mean image,
    and the nearest training image on the observed pixels (its pixels copied).

    The grid's rows (``min(n, 32)`` of the images, spread over them): originals, corrupted inputs (missing pixels gray),
    ``min(samples, 3)`` completions, the mean completion. The reliability diagram (``<grid>_reliability.png``)
    bins the model's predicted P(x = 1) at the missing pixels against the observed frequency.

    Returns:
        ``{"png", "reliability_png": Path, "n", "mask", "method", "steps", "samples", "draws", "fit_steps",
        "components", "model", "mean_image", "nearest_neighbour": completion_metrics of each on the same
        pixels, "calibration": pyvae.inference.reliability of the model, "seconds": the inference's wall time,
        and for importance "ess": {"mean", "median", "min"}, "log_px_obs": mean estimate of log p(x_obs)
        per image (nats); for metropolis "accept_rate"}``.
    """
    _check_count("n", n, 1)
    check_seed(seed)
    _check_count("neighbours", neighbours, 0)
    if method is None:
        method = "metropolis" if metropolis else "importance"
    model, data, test, shape = _load_run(run, device, data_dir)
    dt = next(model.parameters()).dtype
    x = test[_spread(len(test), n)].to(device, dt)
    g = torch.Generator().manual_seed(seed)
    m = make_mask(mask, (x.shape[0], *shape), generator=g, device=device)
    train = data.train.to(device, dt)
    mean_img = train.mean(0)
    neighbours = min(neighbours, len(train))  # (a run trained on fewer images than that: all of them)
    near = nearest_neighbours(x, m, train, max(1, neighbours))
    nn_img = torch.where(m.bool(), x, train[near[:, 0]])
    fills = [0.0, mean_img] + [train[near[:, j]] for j in range(neighbours)]
    t0 = time.perf_counter()
    res = inpaint(model, x, m, steps=steps, samples=samples, generator=g, metropolis=metropolis, method=method,
                  draws=draws, fit_steps=fit_steps, components=components, fills=fills)
    seconds = time.perf_counter() - t0
    nums: Dict[str, object] = {
        "n": x.shape[0], "mask": mask, "method": res.method, "steps": steps, "samples": samples, "draws": draws,
        "fit_steps": fit_steps, "components": components, "seconds": seconds,
        "model": completion_metrics(res.mean, x, m), "mean_image": completion_metrics(mean_img.expand_as(x), x, m),
        "nearest_neighbour": completion_metrics(nn_img, x, m), "calibration": reliability(res.mean, x, m),
    }
    if res.accept_rate is not None:
        nums["accept_rate"] = res.accept_rate.mean().item()
    if res.ess is not None:
        e = res.ess.double()
        nums["ess"] = {"mean": e.mean().item(), "median": e.median().item(), "min": e.min().item()}
        nums["log_px_obs"] = res.log_px_obs.mean().item()
    k = _spread(x.shape[0], _SHOWN).to(x.device)
    shown = res.completions[: min(samples, 3), k]
    rows = [x[k], torch.where(m.bool(), x, torch.full_like(x, 0.5))[k], *shown, res.mean[k]]
    png = _out_path(run, out, "inpaint.png")
    nums["png"] = plots.image_grid(torch.cat([r.cpu() for r in rows]), shape, png, nrow=len(rows))
    nums["reliability_png"] = plots.reliability_diagram(
        nums["calibration"], _sibling(png, "reliability"),
        title=f"{data.name} {mask}: {res.method}, {x.shape[0]} images")
    return nums


def denoise_run(run: PathLike, flip: float = 0.1, n: int = 16, steps: int = 1, seed: int = 0,
                out: Optional[PathLike] = None, device: str = "cpu", data_dir: Optional[str] = None, *,
                method: str = "importance", draws: int = 500, fit_steps: int = 20, components: int = 2,
                neighbours: int = 6) -> Dict[str, object]:
    """Flips each pixel of ``n`` (binary) test images spread over the test set with probability ``flip``, denoises
    them with the flip noise model and writes a PNG grid (originals / noisy / denoised probabilities /
    thresholded).

    Methods: ``"importance"`` (default): ``denoise_importance``, the posterior predictive of the clean image by
    importance sampling; the proposal's candidates are the encoder on the noisy image, on the encoder-based
    denoised image and on the ``neighbours`` training images nearest to the noisy image, plus screened prior
    draws. ``"encoder"``: ``denoise(..., flip=flip, samples=8)``, the flip posterior under 8 draws from the
    encoder on the noisy image (``steps`` times).

    Returns:
        ``{"png": Path, "n", "flip", "steps", "method", "err_noisy": fraction of wrong pixels before,
        "err_reconstruction": after a plain reconstruction, "err_mean_image", "err_nearest_neighbour": the
        training-set mean image and the training image nearest to the noisy one, thresholded at 0.5,
        "err_denoised": after denoising (> 0.5), "ll_denoised": mean Bernoulli log-likelihood per pixel of the
        clean image under the denoised probabilities, "seconds": the denoiser's wall time; for importance
        "ess": {"mean", "median", "min"} and "log_px_noisy": mean estimate of log p(x_noisy) per image}``.
    """
    _check_count("n", n, 1)
    check_seed(seed)
    _check_count("neighbours", neighbours, 0)
    if method not in ("importance", "encoder"):
        raise ValueError(f"method must be 'importance' or 'encoder', got {method!r}")
    model, data, test, shape = _load_run(run, device, data_dir)
    if data.binarize == "none":
        raise ValueError("denoise needs a run on binary images (binarize 'dynamic' or 'static')")
    dt = next(model.parameters()).dtype
    x = test[_spread(len(test), n)].to(device, dt)
    g = torch.Generator().manual_seed(seed)
    noisy = flip_noise(x, flip, g)
    train = data.train.to(device, dt)
    everything = torch.ones(x.shape[1], device=device)
    neighbours = min(neighbours, len(train))  # (a run trained on fewer images than that: all of them)
    near = nearest_neighbours(noisy, everything, train, max(1, neighbours))
    plain = denoise(model, noisy, steps=steps, method="encoder")
    g2 = torch.Generator().manual_seed((seed + 1) % SEED_RANGE)
    t0 = time.perf_counter()
    extra: Dict[str, object] = {}
    if method == "importance":
        starts = [noisy, denoise(model, noisy, flip=flip, method="encoder")] + [train[near[:, j]]
                                                                               for j in range(neighbours)]
        r = denoise_importance(model, noisy, flip, draws=draws, fit_steps=fit_steps, components=components,
                               starts=starts, generator=g2)
        den = r.mean
        e = r.ess.double()
        extra = {"ess": {"mean": e.mean().item(), "median": e.median().item(), "min": e.min().item()},
                 "log_px_noisy": r.log_px_noisy.mean().item()}
    else:
        den = denoise(model, noisy, steps=steps, samples=8, generator=g2, flip=flip, method="encoder")
    seconds = time.perf_counter() - t0
    all_missing = torch.zeros_like(x)

    def err(p):
        return ((p > 0.5).to(x.dtype) != x).double().mean().item()

    nums: Dict[str, object] = {
        "n": x.shape[0], "flip": flip, "steps": steps, "method": method, "seconds": seconds,
        "err_noisy": (noisy != x).double().mean().item(),
        "err_reconstruction": err(plain),
        "err_mean_image": err(train.mean(0).expand_as(x)),
        "err_nearest_neighbour": err(train[near[:, 0]]),
        "err_denoised": err(den),
        "ll_denoised": completion_metrics(den, x, all_missing)["ll"],
        **extra,
    }
    k = _spread(x.shape[0], _SHOWN).to(x.device)
    rows = [x[k], noisy[k], den[k], (den[k] > 0.5).to(x.dtype)]
    nums["png"] = plots.image_grid(torch.cat([r.cpu() for r in rows]), shape, _out_path(run, out, "denoise.png"),
                                   nrow=len(rows))
    return nums
