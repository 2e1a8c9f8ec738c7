"""``gather_binarize(src, index=None, *, seed, first_row=0)``: dynamic binarization of a batch gathered from
a dataset, in one pass, with counter-based random numbers.

Math: csrc/ops/binarize.h and NOTE: [Counter-based binarization] in csrc/ops/philox.h; kernels:
csrc/cpu/reparameterize.cpp, csrc/cuda/reparameterize.cu; tests: tests/test_gather_binarize.py. Not
differentiable (a data-loading step); not a ``torch.library`` op.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch

from .. import _gate

__all__ = ["gather_binarize"]


def gather_binarize(src: torch.Tensor, index: Optional[torch.Tensor] = None, *, seed: int,
                    first_row: int = 0) -> torch.Tensor:
    """``out[r, c] = 1 if u < src[index[r], c] else 0`` with ``u ~ U[0, 1)``: one Bernoulli draw per pixel.

    The uniform of element (r, c) is element ``(first_row + r) * C + c`` of the Philox draw ``seed``, so
    it depends only on (seed, its row in the global batch, c): a data-parallel process holding rows
    ``[first_row, first_row + R)`` of a global batch draws exactly what one process drawing the whole
    batch would, on every device and thread count.

    Args:
        src: ``[N, C]`` float32 probabilities (grey levels in [0, 1]).
        index: ``[R]`` int64 rows of ``src`` (on src's device), or None for all N rows in order.
        seed: the draw's seed (an int; e.g. ``pyvae.data.mix_seed(seed, epoch, step)``).
        first_row: the batch's first row in the global batch.

    Returns:
        ``[R, C]`` float32 tensor of 0s and 1s on src's device.
    """
    if not isinstance(src, torch.Tensor) or src.dtype != torch.float32 or src.dim() != 2:
        raise TypeError(f"pyvae.gather_binarize: src must be a 2-D float32 tensor, got "
                        f"{src.dtype if isinstance(src, torch.Tensor) else type(src).__name__}"
                        f"{'' if not isinstance(src, torch.Tensor) else ' ' + str(tuple(src.shape))}")
    if src.device.type not in ("cpu", "cuda"):
        raise ValueError(f"pyvae.gather_binarize: src is on {src.device}; pyvae has kernels for cpu and cuda")
    if index is not None:
        if not isinstance(index, torch.Tensor) or index.dtype != torch.int64 or index.dim() != 1:
            raise TypeError("pyvae.gather_binarize: index must be a 1-D int64 tensor or None")
        if index.device != src.device:
            raise ValueError(f"pyvae.gather_binarize: index is on {index.device} but src on {src.device}")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= src.shape[0]):
            raise ValueError(f"pyvae.gather_binarize: index must hold rows of src in [0, {src.shape[0]})")
        index = index.contiguous()
    try:
        seed, first_row = operator.index(seed), operator.index(first_row)
    except TypeError:
        raise TypeError("pyvae.gather_binarize: seed and first_row must be integers") from None
    rows = src.shape[0] if index is None else index.shape[0]
    # (the draw's element index (first_row + r) * C + c is a 64-bit signed integer in the kernel)
    if first_row < 0 or (first_row + rows) * max(src.shape[1], 1) >= 2 ** 63:
        raise ValueError(f"pyvae.gather_binarize: first_row must be >= 0 with (first_row + rows) * columns < 2**63, "
                         f"got {first_row}")
    _gate.check_device("gather_binarize", src.device)
    src = src.contiguous()
    out = torch.empty(rows, src.shape[1], dtype=torch.float32, device=src.device)
    _gate.gather_binarize(src=src, index=index, out=out, first_row=first_row, seed=seed)
    return out
