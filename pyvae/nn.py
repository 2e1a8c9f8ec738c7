"""Drop-in ``nn.Module`` layers on pyvae's fused linear op.

``FusedLinear`` is an ``nn.Linear`` (same parameters, names, shapes, default initialization and
state dict) whose forward is ``act(x @ weight.T + bias)`` in one fused op, i.e. a drop-in for
``nn.Sequential(nn.Linear(...), act)`` whose state dict loads from an ``nn.Linear``.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
from torch import nn

from .ops import ACTIVATIONS, linear_act

__all__ = ["FusedLinear", "FusedMLP", "GaussianHead"]


def _check_activation(name: str, arg: str) -> str:
    if name not in ACTIVATIONS:
        raise ValueError(f"pyvae.nn: {arg} must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    return name


class FusedLinear(nn.Linear):
    """``act(x @ weight.T + bias)``; parameters exactly as ``nn.Linear(in_features, out_features, bias)``.

    Args:
        in_features: size of the last dim of the input.
        out_features: size of the last dim of the output.
        activation: "identity", "relu", "tanh", "sigmoid" or "softplus".
        bias: learn an additive bias.

    Shapes: ``x [..., in_features] -> [..., out_features]``.
    """

    def __init__(self, in_features: int, out_features: int, activation: str = "tanh", bias: bool = True,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.activation = _check_activation(activation, "activation")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_act(x, self.weight, self.bias, self.activation)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", activation={self.activation}"


class FusedMLP(nn.Sequential):
    """A stack of ``FusedLinear`` layers: ``sizes = [in, h1, ..., out]``.

    Hidden layers use ``activation``, the last one ``out_activation``. State-dict keys are
    ``"0.weight", "0.bias", "1.weight", ...`` (one index per layer).
    """

    def __init__(self, sizes: Sequence[int], activation: str = "tanh", out_activation: str = "identity",
                 bias: bool = True, device=None, dtype=None):
        sizes = list(sizes)
        if len(sizes) < 2 or any((not isinstance(s, int)) or s < 1 for s in sizes):
            raise ValueError(f"pyvae.nn.FusedMLP: sizes must be >= 2 positive ints [in, ..., out], got {sizes}")
        _check_activation(activation, "activation")
        _check_activation(out_activation, "out_activation")
        layers = [
            FusedLinear(a, b, activation if i < len(sizes) - 2 else out_activation, bias=bias, device=device,
                        dtype=dtype)
            for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))
        ]
        super().__init__(*layers)


class GaussianHead(FusedLinear):
    """The (mu, logvar) heads of a Gaussian encoder as one GEMM of width ``2 * z_dim``, then split.

    ``weight`` is ``[2 * z_dim, in_features]``: rows ``[:z_dim]`` produce mu, ``[z_dim:]`` logvar.
    Returns views ``(mu, logvar)``, each ``[..., z_dim]``.
    """

    def __init__(self, in_features: int, z_dim: int, bias: bool = True, device=None, dtype=None):
        super().__init__(in_features, 2 * z_dim, activation="identity", bias=bias, device=device, dtype=dtype)
        self.z_dim = z_dim

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        h = super().forward(x)
        return h[..., : self.z_dim], h[..., self.z_dim:]
