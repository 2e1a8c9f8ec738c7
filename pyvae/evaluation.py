"""Evaluating a VAE on a dataset: the test ELBO, KL and reconstruction term (deterministic for a seed,
data-parallel when asked), and the autocast context of each training precision.

Training (``pyvae.train``) calls ``evaluate`` once per epoch, and a finished run (``pyvae.runs``) calls
it on its checkpoint; neither owns it.
"""
from __future__ import annotations

from typing import Dict, Union

import torch
import torch.distributed as dist

from .data import ShardedBatches, mix_seed
from .inference import check_unit_interval
from .models import VAE

__all__ = ["PRECISIONS", "autocast", "evaluate"]

PRECISIONS = ("fp32", "bf16-mixed", "fp16-mixed")


def autocast(precision: str, device: torch.device):
    """The autocast context of a precision: fp32 (off), bf16-mixed, fp16-mixed."""
    if precision not in PRECISIONS:  # (anything else would silently run fp16-mixed)
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def _unwrap(model):
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") else model


@torch.no_grad()
def evaluate(model: VAE, x: torch.Tensor, *, batch_size: int = 1000, samples: int = 1, seed: int = 0,
             device: Union[str, torch.device] = "cpu", precision: str = "fp32", rank: int = 0, world: int = 1
             ) -> Dict[str, float]:
    """Mean test ELBO, KL and reconstruction term over ``x`` (deterministic for a given ``seed``).

    Args:
        model: the VAE.
        x: ``[N, D]`` data (already binarized for Bernoulli models; in [0, 1] for the Bernoulli and
            continuous-Bernoulli likelihoods).
        batch_size: rows per forward pass, an int >= 1.
        samples: L draws per datapoint (SGVB B).
        seed: the eps seed; batch s uses ``(seed, s)``.
        precision: one of ``PRECISIONS``.
        rank, world: data-parallel evaluation (each rank does its slice; sums are all-reduced).

    Returns:
        ``{"elbo", "kl", "recon"}`` floats (per-datapoint means).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    model = _unwrap(model)
    if isinstance(x, torch.Tensor) and x.is_floating_point():  # (else the model says what x must be)
        check_unit_interval(model.likelihood, x)
    was = model.training
    model.eval()
    device = torch.device(device)
    tot = [0.0, 0.0, 0.0]
    batches = ShardedBatches(x, batch_size - batch_size % world or world, shuffle=False, drop_last=False,
                             rank=rank, world=world)
    for s, xb in batches:
        lo, m, size = batches.rows(s)
        if m == 0:
            continue
        g = torch.Generator().manual_seed(mix_seed(seed, 4, s))
        with autocast(precision, device):
            _, elbo, kl = model(xb.to(device, non_blocking=True), samples=samples, generator=g,
                                shard=(lo, size) if world > 1 else None)
        tot[0] += elbo.double().sum().item()
        tot[1] += kl.double().sum().item()
        tot[2] += m
    if world > 1:
        t = torch.tensor(tot, dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        tot = t.tolist()
    model.train(was)
    n = max(tot[2], 1)
    return {"elbo": tot[0] / n, "kl": tot[1] / n, "recon": (tot[0] + tot[1]) / n}
