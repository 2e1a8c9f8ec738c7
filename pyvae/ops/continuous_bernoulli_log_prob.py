"""``continuous_bernoulli_log_prob(logits, x)``: log CB(x | sigmoid(logits)) summed over the last dim, and
``continuous_bernoulli_mean(logits)``: the distribution's mean E[x].

The continuous Bernoulli (Loaiza-Ganem & Cunningham, NeurIPS 2019) is the normalized density
``C(lambda) lambda^x (1 - lambda)^(1 - x)`` on [0, 1]: the Bernoulli likelihood of grey-level data with
its missing normalizer. Math: csrc/ops/continuous_bernoulli.h (NOTE: [Continuous Bernoulli in two
regimes]); kernels: csrc/cpu/kernels.cpp, csrc/cuda/elbo.cu; tests:
tests/test_continuous_bernoulli_log_prob.py; benchmark key ``cbernoulli`` of ``pyvae bench elbo``.
"""
from __future__ import annotations

import torch

from ._registry import call
from ._rowwise import register_rowwise

__all__ = ["continuous_bernoulli_log_prob", "continuous_bernoulli_mean"]

register_rowwise(
    "continuous_bernoulli_log_prob",
    "continuous_bernoulli_log_prob(Tensor logits, Tensor x) -> Tensor",
    "continuous_bernoulli_log_prob_backward(Tensor grad, Tensor logits, Tensor x, bool[] output_mask)"
    " -> (Tensor, Tensor)",
    ("logits", "x"),
)


def continuous_bernoulli_log_prob(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """log CB(x | sigmoid(logits)) summed over the last dim: ``sum(x * l - softplus(l) + log C(l))``,
    ``C(l) = l / tanh(l / 2)`` (2 at ``l = 0``), as
    ``Independent(ContinuousBernoulli(logits=logits), 1).log_prob(x)``.

    Args:
        logits: ``[..., D]`` float tensor.
        x: float tensor broadcastable to ``logits`` (e.g. ``[B, D]`` against logits ``[L, B, D]``), in
            [0, 1] (0 and 1 included).

    Returns:
        ``[...]`` tensor, the broadcast leading shape. Finite for all finite logits, accurate near
        ``logits = 0`` (where torch.distributions switches to a Taylor patch) and for large ``|logits|``
        (where it overflows). At logits of +-inf the limit: +inf where x is 1 (+inf) or 0 (-inf), else
        -inf.
    """
    return call("continuous_bernoulli_log_prob", logits, x)


# Taylor coefficients of K(h) / h = (coth h - 1/h) / h in u = h^2, 2^2n B_2n / (2n)! (csrc/ops/
# continuous_bernoulli.h: the same series, the same split at |l| = 1).
_LANGEVIN = (1 / 3, -1 / 45, 2 / 945, -1 / 4725, 2 / 93555, -1382 / 638512875, 4 / 18243225,
             -3617 / 162820783125, 87734 / 38979295480125, -349222 / 1531329465290625,
             310732 / 13447856940643125, -472728182 / 201919571963756521875)


def continuous_bernoulli_mean(logits: torch.Tensor) -> torch.Tensor:
    """E[x] of CB(sigmoid(logits)), elementwise: ``1/2 + (coth(l/2) - 2/l) / 2`` (not ``sigmoid(l)``).

    Plain torch (it is not on the training path). Near ``l = 0`` the Taylor series ``1/2 + l/12 -
    l^3/720 + ...``; elsewhere ``(l > 0) - 1/l + sign(l) e^-|l| / (1 - e^-|l|)``, which neither cancels nor
    overflows (``e^-|l|`` underflows to 0, in the gradient too: ``1 / (e^|l| - 1)``'s is inf * 0 = NaN
    once ``e^|l|`` overflows). Differentiable (each branch sees only the logits it is used for).

    Args:
        logits: float tensor, any shape.

    Returns:
        Tensor of ``logits``' shape and dtype, values in [0, 1].
    """
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError(f"continuous_bernoulli_mean: logits must be a floating-point tensor, got "
                        f"{getattr(logits, 'dtype', type(logits).__name__)}")
    l = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    a = l.abs()
    small = a < 1
    h = 0.5 * torch.where(small, l, torch.zeros_like(l))
    u = h * h
    k = torch.full_like(u, _LANGEVIN[-1])
    for c in reversed(_LANGEVIN[:-1]):
        k = k * u + c
    series = 0.5 + 0.5 * h * k
    ls = torch.where(small, torch.ones_like(l), l)  # the closed form away from 0 only
    na = -ls.abs()
    closed = (ls > 0).to(l.dtype) - 1.0 / ls + torch.sign(ls) * torch.exp(na) / -torch.expm1(na)
    return torch.where(small, series, closed).to(logits.dtype)
