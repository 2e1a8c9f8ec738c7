"""Plain-PyTorch reference implementations of pyvae's ops.

The tests check the fused kernels against these (and against ``torch.distributions``), and the
benchmarks time these as the ``torch-eager`` and ``torch-compile`` providers: both compare against
the same code. Each follows the semantics of the fused op of the same name in ``pyvae.ops``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

_LOG_2PI = math.log(2.0 * math.pi)

ACTIVATIONS = {
    "identity": lambda t: t,
    "relu": torch.relu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "softplus": F.softplus,
}
"""Activation name (as ``pyvae.ops.linear_act`` takes it) -> torch's function of it."""


def linear_act(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
               activation: str = "identity") -> torch.Tensor:
    """act(x @ weight.T + bias) with torch's ``F.linear`` and activation."""
    return ACTIVATIONS[activation](F.linear(x, weight, bias))


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor, prior_mu: Optional[torch.Tensor] = None,
                prior_logvar: Optional[torch.Tensor] = None) -> torch.Tensor:
    """KL(N(mu, e^logvar) || N(prior_mu, e^prior_logvar)) summed over the last dim."""
    if prior_mu is None and prior_logvar is None:
        return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)
    pm = torch.zeros_like(mu) if prior_mu is None else prior_mu
    plv = torch.zeros_like(logvar) if prior_logvar is None else prior_logvar
    return 0.5 * (plv - logvar + (logvar - plv).exp() + (mu - pm).pow(2) * (-plv).exp() - 1.0).sum(-1)


def bernoulli_log_prob(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sum(x * logits - softplus(logits)) over the last dim (minus summed BCE-with-logits)."""
    logits, x = torch.broadcast_tensors(logits, x)
    return -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)


def continuous_bernoulli_log_prob(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``Independent(ContinuousBernoulli(logits=logits), 1).log_prob(x)``: torch.distributions' own
    continuous Bernoulli, the baseline pyvae's fused op is measured against.

    Numerically it is torch's: it goes through ``probs = sigmoid(logits)``, so once that rounds to 0
    or 1 (``|logits|`` above ~17 in float32, ~37 in float64) the normalizer becomes inf or NaN; near
    ``logits = 0`` (probs in (0.499, 0.501)) it uses a Taylor patch. The tests therefore also compare
    against a high-precision oracle of their own.
    """
    cb = torch.distributions.ContinuousBernoulli(logits=logits, validate_args=False)
    return torch.distributions.Independent(cb, 1, validate_args=False).log_prob(x)


def continuous_bernoulli_mean(logits: torch.Tensor) -> torch.Tensor:
    """``ContinuousBernoulli(logits=logits).mean`` (torch.distributions; same limits as above)."""
    return torch.distributions.ContinuousBernoulli(logits=logits, validate_args=False).mean


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(x | mean, e^logvar) summed over the last dim."""
    return -0.5 * (_LOG_2PI + logvar + (x - mean).pow(2) * (-logvar).exp()).sum(-1)


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, *, samples: Optional[int] = None,
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """z = mu + exp(logvar / 2) * eps, eps from torch.randn (not the same draws as pyvae's Philox)."""
    shape = torch.broadcast_shapes(mu.shape, logvar.shape)
    if samples is not None:
        shape = (samples, *shape)
    eps = torch.randn(shape, dtype=mu.dtype, device=mu.device, generator=generator)
    return mu + (0.5 * logvar).exp() * eps


def bernoulli_elbo(logits: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """SGVB estimator B: reconstruction log-likelihood (averaged over a leading sample dim) - KL."""
    rec = bernoulli_log_prob(logits, x)
    if logits.dim() == mu.dim() + 1:
        rec = rec.mean(0)
    return rec - gaussian_kl(mu, logvar)
