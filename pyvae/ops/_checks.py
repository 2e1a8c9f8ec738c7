"""Input checks shared by every op: clear errors before any pointer reaches the kernels."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def tensor(name: str, t, *, op: str) -> torch.Tensor:
    """Checks that ``t`` is a floating-point tensor with at least one dim."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"pyvae.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"pyvae.{op}: {name} must be a floating-point tensor (float32, float64, float16 or bfloat16), "
            f"got dtype {t.dtype}"
        )
    if t.dim() == 0:
        raise ValueError(f"pyvae.{op}: {name} must have at least 1 dim (the event dim), got a 0-dim tensor")
    return t


def same_dtype_device(named: Sequence[tuple], *, op: str) -> tuple:
    """Checks that all (name, tensor) pairs share the first one's dtype and device."""
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.dtype != first.dtype:
            raise TypeError(
                f"pyvae.{op}: {name} has dtype {t.dtype} but {first_name} has dtype {first.dtype}; "
                "all inputs must have the same dtype"
            )
        if t.device != first.device:
            raise ValueError(
                f"pyvae.{op}: {name} is on {t.device} but {first_name} is on {first.device}; "
                "all inputs must be on the same device"
            )
    if first.device.type not in ("cpu", "cuda"):
        raise ValueError(f"pyvae.{op}: tensors on {first.device} are not supported (cpu or cuda)")
    return first.dtype, first.device


def broadcast_shapes(*shapes) -> Optional[tuple]:
    """torch.broadcast_shapes for plain int shapes (~10x cheaper); None if they do not broadcast.

    Symbolic shapes (under torch.compile) go to torch's own function.
    """
    if not all(type(d) is int for s in shapes for d in s):
        try:
            return tuple(torch.broadcast_shapes(*shapes))
        except RuntimeError:
            return None
    n = max(len(s) for s in shapes)
    out = [1] * n
    for s in shapes:
        off = n - len(s)
        for i, d in enumerate(s):
            o = out[off + i]
            if d != o:
                if o == 1:
                    out[off + i] = d
                elif d != 1:
                    return None
    return tuple(out)


def broadcast(named: Sequence[tuple], *, op: str) -> tuple:
    """The broadcast shape of all (name, tensor) pairs, or a ValueError naming them."""
    full = broadcast_shapes(*(tuple(t.shape) for _, t in named))
    if full is None:
        shapes = ", ".join(f"{n} {tuple(t.shape)}" for n, t in named)
        raise ValueError(f"pyvae.{op}: shapes do not broadcast: {shapes}")
    return full


def numel(shape) -> int:
    return math.prod(shape)


def grad_of(op: str, grad, shape, device) -> torch.Tensor:
    """A backward op's upstream gradient: a floating-point tensor of the output's shape on the inputs' device
    (backward ops are public through torch.ops.pyvae)."""
    if not isinstance(grad, torch.Tensor):
        raise TypeError(f"pyvae.{op}: grad must be a torch.Tensor, got {type(grad).__name__}")
    if grad.dtype not in FLOAT_DTYPES:
        raise TypeError(f"pyvae.{op}: grad must be a floating-point tensor, got dtype {grad.dtype}")
    if tuple(grad.shape) != tuple(shape) or grad.device != device:
        raise ValueError(f"pyvae.{op}: grad must have the output's shape {tuple(shape)} on {device}, got "
                         f"{tuple(grad.shape)} on {grad.device}")
    return grad


def output_mask(op: str, mask, n: int) -> None:
    """A backward op's output_mask: one entry per tensor input."""
    if len(mask) != n:
        raise ValueError(f"pyvae.{op}: output_mask must have {n} entries (one per tensor input), got {len(mask)}")


def required(op: str, names: Sequence[str], values: Sequence) -> None:
    """Tensor arguments that may not be None (torch.ops passes None through for a Tensor argument)."""
    for name, v in zip(names, values):
        if v is None:
            raise TypeError(f"pyvae.{op}: {name} must be a torch.Tensor, got None")
