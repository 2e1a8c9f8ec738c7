"""``gaussian_kl(mu, logvar, prior_mu=None, prior_logvar=None)``: KL between diagonal Gaussians, summed over
the last dim.

Math: csrc/ops/gaussian_kl.h; kernels: csrc/cpu/kernels.cpp, csrc/cuda/elbo.cu; tests:
tests/test_gaussian_kl.py; benchmark key ``kl`` of ``pyvae bench elbo``.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._registry import call
from .. import reference
from ._rowwise import register_rowwise

__all__ = ["gaussian_kl"]


def _fill_prior(mu, logvar, prior_mu=None, prior_logvar=None):
    """The kernel takes both prior tensors or neither: a missing one is N(0, 1)'s 0 (broadcast)."""
    if (prior_mu is None) != (prior_logvar is None):
        given = prior_mu if prior_mu is not None else prior_logvar
        if isinstance(given, torch.Tensor):
            # mu's dtype and device, so that a bad prior is reported under its own name
            zero = (mu if isinstance(mu, torch.Tensor) else given).new_zeros(1)
            prior_mu = zero if prior_mu is None else prior_mu
            prior_logvar = zero if prior_logvar is None else prior_logvar
    return mu, logvar, prior_mu, prior_logvar


register_rowwise(
    "gaussian_kl",
    "gaussian_kl(Tensor mu, Tensor logvar, Tensor? prior_mu=None, Tensor? prior_logvar=None) -> Tensor",
    "gaussian_kl_backward(Tensor grad, Tensor mu, Tensor logvar, Tensor prior_mu, Tensor prior_logvar,"
    " bool[] output_mask) -> (Tensor, Tensor, Tensor, Tensor)",
    ("mu", "logvar", "prior_mu", "prior_logvar"), fill=_fill_prior, n_optional=2,
    reference=reference.gaussian_kl,
)


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor, prior_mu: Optional[torch.Tensor] = None,
                prior_logvar: Optional[torch.Tensor] = None) -> torch.Tensor:
    """KL( N(mu, diag(exp(logvar))) || N(prior_mu, diag(exp(prior_logvar))) ), summed over the last dim.

    Args:
        mu: ``[..., Z]`` float tensor, the posterior mean.
        logvar: ``[..., Z]`` float tensor (broadcastable with ``mu``), the posterior log-variance.
        prior_mu: optional, broadcastable to ``[..., Z]``; default 0.
        prior_logvar: optional, broadcastable to ``[..., Z]``; default 0 (unit variance).

    Returns:
        ``[...]`` tensor: the broadcast leading shape. Equal to ``torch.distributions.kl_divergence``
        of the two ``Independent(Normal(m, exp(lv / 2)), 1)`` distributions; ``+inf`` at ``logvar = +inf``
        (a finite prior), where torch's formula gives NaN.
    """
    return call("gaussian_kl", mu, logvar, prior_mu, prior_logvar)
