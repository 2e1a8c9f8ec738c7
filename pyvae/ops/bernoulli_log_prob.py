"""``bernoulli_log_prob(logits, x)``: log Bern(x | sigmoid(logits)) summed over the last dim.

Math: csrc/ops/bernoulli.h; kernels: csrc/cpu/kernels.cpp, csrc/cuda/elbo.cu; tests:
tests/test_bernoulli_log_prob.py; benchmark key ``bernoulli`` of ``pyvae bench elbo``.
"""
from __future__ import annotations

import torch

from ._registry import call
from .. import reference
from ._rowwise import register_rowwise

__all__ = ["bernoulli_log_prob"]

register_rowwise(
    "bernoulli_log_prob",
    "bernoulli_log_prob(Tensor logits, Tensor x) -> Tensor",
    "bernoulli_log_prob_backward(Tensor grad, Tensor logits, Tensor x, bool[] output_mask) -> (Tensor, Tensor)",
    ("logits", "x"),
    reference=reference.bernoulli_log_prob,
)


def bernoulli_log_prob(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """log Bern(x | sigmoid(logits)) summed over the last dim: ``sum(x * logits - softplus(logits))``.

    Args:
        logits: ``[..., D]`` float tensor.
        x: float tensor broadcastable to ``logits`` (e.g. ``[B, D]`` against logits ``[L, B, D]``);
            binary, or in [0, 1] (then minus the summed BCE-with-logits).

    Returns:
        ``[...]`` tensor, the broadcast leading shape. Finite for all finite logits (stable softplus);
        at logits of +-inf the limit: 0 where x is 1 (+inf) or 0 (-inf), else -inf.
    """
    return call("bernoulli_log_prob", logits, x)
