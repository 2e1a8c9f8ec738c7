"""Working with finished runs: evaluate a checkpoint, draw samples and pictures, inpaint and denoise its
test images (``pyvae eval|sample|inpaint|denoise``). Returns numbers and paths; the CLI prints them."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Dict, Optional, Union

import torch

from .checkpoint import load_model, resolve_checkpoint
from .data import load_dataset, resolve_binarize
from .evaluation import evaluate
from .inference import completion_metrics, denoise, flip_noise, inpaint, make_mask
from . import plots

__all__ = ["eval_run", "sample_run", "inpaint_run", "denoise_run", "run_data"]

PathLike = Union[str, os.PathLike]


def run_data(ckpt: dict, data_dir: Optional[str] = None, limit: Optional[int] = None):
    """``(data, test)``: the splits a run trained on (its checkpoint's configuration; ``data_dir`` when the
    files have moved) and the first ``limit`` test rows (all when None)."""
    cfg = ckpt["config"]
    data = load_dataset(cfg["dataset"], data_dir or cfg.get("data_dir"),
                        resolve_binarize(cfg["binarize"], cfg["likelihood"]), cfg.get("limit"))
    test = data.test if limit is None else data.test[:limit]
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
        limit: evaluate only the first ``limit`` test points.
        seed: seeds the eps draws.
        device: "cpu" or "cuda".
        data_dir: where the data files are, when not where the run found them.

    Returns:
        ``{"n", "elbo", "kl", "recon", "iwae", "log_px"}`` (missing keys are skipped estimates).
    """
    for name, v, lo in (("k", k, 0), ("ll_samples", ll_samples, 0), ("ll_batch", ll_batch, 1),
                        ("batch_size", batch_size, 1)):
        _check_count(name, v, lo)
    model, ckpt = load_model(run_or_ckpt, device)
    _, test = run_data(ckpt, data_dir, limit)
    out = {"n": float(test.shape[0])}
    ev = evaluate(model, test, batch_size=batch_size, seed=seed, device=device)
    out.update(elbo=ev["elbo"], kl=ev["kl"], recon=ev["recon"])
    g = torch.Generator().manual_seed(seed + 1)
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
        shape = {"digits": (8, 8), "frey": (28, 20)}.get(ckpt["config"]["dataset"], (28, 28))
    res = {"samples": plots.sample_grid(model, shape, out / "samples.png", n=n, seed=seed)}
    if manifold:
        res["manifold"] = plots.manifold(model, shape, out / "manifold.png")
    if reconstructions:
        res["reconstructions"] = plots.reconstructions(model, test, shape, out / "reconstructions.png", n=20)
    return res


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


def inpaint_run(run: PathLike, mask: str = "top-half", n: int = 16, steps: int = 20, samples: int = 4,
                seed: int = 0, metropolis: bool = False, out: Optional[PathLike] = None, device: str = "cpu",
                data_dir: Optional[str] = None) -> Dict[str, object]:
    """Inpaints the first ``n`` test images of a run and writes a PNG grid; returns the numbers.

    The grid's rows: originals, corrupted inputs (missing pixels gray), ``min(samples, 3)`` completions,
    the mean completion.

    Returns:
        ``{"png": Path, "n", "steps", "samples", "mask", "model": completion_metrics of the mean completion,
        "mean_image": completion_metrics of the training-set mean image, "accept_rate" (metropolis)}``.
    """
    _check_count("n", n, 1)
    _check_count("seed", seed, 0)
    model, data, test, shape = _load_run(run, device, data_dir)
    x = test[_spread(len(test), n)].to(device, next(model.parameters()).dtype)
    g = torch.Generator().manual_seed(seed)
    m = make_mask(mask, (x.shape[0], *shape), generator=g, device=device)
    res = inpaint(model, x, m, steps=steps, samples=samples, generator=g, metropolis=metropolis)
    mean_img = data.train.mean(0).to(x).expand_as(x)
    nums: Dict[str, object] = {
        "n": x.shape[0], "steps": steps, "samples": samples, "mask": mask,
        "model": completion_metrics(res.mean, x, m), "mean_image": completion_metrics(mean_img, x, m),
    }
    if res.accept_rate is not None:
        nums["accept_rate"] = res.accept_rate.mean().item()
    shown = res.completions[: min(samples, 3)]
    rows = [x, torch.where(m.bool(), x, torch.full_like(x, 0.5)), *shown, res.mean]
    nums["png"] = plots.image_grid(torch.cat([r.cpu() for r in rows]), shape, _out_path(run, out, "inpaint.png"),
                             nrow=len(rows))
    return nums


def denoise_run(run: PathLike, flip: float = 0.1, n: int = 16, steps: int = 1, seed: int = 0,
                out: Optional[PathLike] = None, device: str = "cpu", data_dir: Optional[str] = None) -> Dict[str, object]:
    """Flips each pixel of ``n`` (binary) test images spread over the test set with probability ``flip``, denoises them
    through the model with the flip noise model (``denoise(..., flip=flip)``, 8 z draws) and writes a
    PNG grid (originals / noisy / denoised probabilities / thresholded).

    Returns:
        ``{"png": Path, "n", "flip", "steps", "err_noisy": fraction of wrong pixels before,
        "err_reconstruction": after a plain reconstruction, "err_denoised": after denoising (> 0.5), "ll_denoised": mean Bernoulli log-likelihood per pixel
        of the clean image under the denoised probabilities}``.
    """
    _check_count("n", n, 1)
    _check_count("seed", seed, 0)
    model, data, test, shape = _load_run(run, device, data_dir)
    if data.binarize == "none":
        raise ValueError("denoise needs a run on binary images (binarize 'dynamic' or 'static')")
    x = test[_spread(len(test), n)].to(device, next(model.parameters()).dtype)
    g = torch.Generator().manual_seed(seed)
    noisy = flip_noise(x, flip, g)
    plain = denoise(model, noisy, steps=steps)
    den = denoise(model, noisy, steps=steps, samples=8, generator=torch.Generator().manual_seed(seed + 1), flip=flip)
    all_missing = torch.zeros_like(x)
    nums: Dict[str, object] = {
        "n": x.shape[0], "flip": flip, "steps": steps,
        "err_noisy": (noisy != x).double().mean().item(),
        "err_reconstruction": ((plain > 0.5).to(x.dtype) != x).double().mean().item(),
        "err_denoised": ((den > 0.5).to(x.dtype) != x).double().mean().item(),
        "ll_denoised": completion_metrics(den, x, all_missing)["ll"],
    }
    rows = [x, noisy, den, (den > 0.5).to(x.dtype)]
    nums["png"] = plots.image_grid(torch.cat([r.cpu() for r in rows]), shape, _out_path(run, out, "denoise.png"),
                             nrow=len(rows))
    return nums
