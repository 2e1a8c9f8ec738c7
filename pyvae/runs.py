"""Working with finished runs: evaluate a checkpoint, draw samples and pictures (``pyvae eval|sample``)."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Dict, Optional, Union

import torch

from . import plots as P
from .checkpoint import load_model, resolve_checkpoint
from .data import load_dataset
from .train import TrainConfig, evaluate

__all__ = ["eval_run", "sample_run"]

PathLike = Union[str, os.PathLike]


def _test_data(ckpt: dict, data_dir: Optional[str], limit: Optional[int]):
    cfg = TrainConfig(**ckpt["config"])
    data = load_dataset(cfg.dataset, data_dir or cfg.data_dir, cfg.binarize_mode, cfg.limit)
    test = data.test if limit is None else data.test[:limit]
    return cfg, data, test


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
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    model, ckpt = load_model(run_or_ckpt, device)
    _, _, test = _test_data(ckpt, data_dir, limit)
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
    assert all(math.isfinite(v) for v in out.values()), out
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
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    model, ckpt = load_model(run_or_ckpt, device)
    if manifold and model.z_dim != 2:
        raise ValueError(f"--manifold needs a model with a 2-D latent space; this one has z_dim={model.z_dim}")
    cfg = TrainConfig(**ckpt["config"])
    out = Path(out) if out else resolve_checkpoint(run_or_ckpt).parent
    out.mkdir(parents=True, exist_ok=True)
    if reconstructions:
        _, data, test = _test_data(ckpt, data_dir, None)
        shape = data.image_shape
    else:
        shape = {"digits": (8, 8), "frey": (28, 20)}.get(cfg.dataset, (28, 28))
    res = {"samples": P.sample_grid(model, shape, out / "samples.png", n=n, seed=seed)}
    if manifold:
        res["manifold"] = P.manifold(model, shape, out / "manifold.png")
    if reconstructions:
        res["reconstructions"] = P.reconstructions(model, test, shape, out / "reconstructions.png", n=20)
    return res
