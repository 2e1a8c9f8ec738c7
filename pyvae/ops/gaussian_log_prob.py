"""``gaussian_log_prob(x, mean, logvar)``: log N(x | mean, diag(exp(logvar))) summed over the last dim.

Math: csrc/ops/gaussian_log_prob.h; kernels: csrc/cpu/kernels.cpp, csrc/cuda/elbo.cu; tests:
tests/test_gaussian_log_prob.py.
"""
from __future__ import annotations

import torch

from ._registry import call
from .. import reference
from ._rowwise import register_rowwise

__all__ = ["gaussian_log_prob"]

register_rowwise(
    "gaussian_log_prob",
    "gaussian_log_prob(Tensor x, Tensor mean, Tensor logvar) -> Tensor",
    "gaussian_log_prob_backward(Tensor grad, Tensor x, Tensor mean, Tensor logvar, bool[] output_mask)"
    " -> (Tensor, Tensor, Tensor)",
    ("x", "mean", "logvar"),
    reference=reference.gaussian_log_prob,
)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(x | mean, diag(exp(logvar))) summed over the last dim.

    Args:
        x: ``[..., D]`` float tensor (broadcast over leading sample dims of ``mean``).
        mean: ``[..., D]`` float tensor.
        logvar: broadcastable to ``[..., D]``: per element, or ``[D]`` for one learned variance per
            feature.

    Returns:
        ``[...]`` tensor: the broadcast leading shape. Finite wherever the value is, also for a logvar far
        below -88 (where ``e^-logvar`` overflows float32), down to -177 in float32; x = mean gives
        ``-(log 2 pi + logvar) / 2`` for any logvar, and at ``logvar = -inf`` the limit, +inf at x = mean and
        -inf elsewhere.
    """
    return call("gaussian_log_prob", x, mean, logvar)
