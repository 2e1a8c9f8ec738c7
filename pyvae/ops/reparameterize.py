"""``reparameterize(mu, logvar, *, samples=None, generator=None)``: z = mu + exp(logvar / 2) * eps with eps
drawn inside the kernel (Philox4x32-10, counter-based), and the placement of a data-parallel shard's
draw inside the draw of the whole batch.

Math: csrc/ops/reparameterize.h and csrc/ops/philox.h; kernels: csrc/cpu/reparameterize.cpp,
csrc/cuda/reparameterize.cu; tests: tests/test_reparameterize.py, tests/test_philox.py; benchmark key
``reparam`` of ``pyvae bench elbo``.
"""
from __future__ import annotations

import operator
from typing import Optional, Tuple

import torch

from .. import _gate
from . import _checks as V
from ._registry import call, register
from ._rowwise import plan, reduce_grad

__all__ = ["reparameterize", "draw_seed", "reparameterize_shard"]

_OP = "reparameterize"


def _plan(mu, logvar, samples, seed):
    shape, dtype, device = plan(_OP, [("mu", mu), ("logvar", logvar)])  # (its fast path: same shape)
    if not isinstance(samples, int) or samples < 0:
        raise ValueError(f"pyvae.{_OP}: samples must be a non-negative int (0: no sample dim), got {samples!r}")
    if not isinstance(seed, torch.Tensor) or seed.dtype != torch.int64 or seed.shape != (2,):
        raise ValueError(f"pyvae.{_OP}: seed must be an int64 tensor of shape [2] (seed, offset)")
    shape = tuple(shape)
    return shape, ((samples, *shape) if samples > 0 else shape), dtype, device


def _seed_words(seed: torch.Tensor):
    s, off = seed.tolist()
    return s & 0xFFFFFFFFFFFFFFFF, off & 0xFFFFFFFFFFFFFFFF


def _dense(t: torch.Tensor, dtype: torch.dtype, shape) -> torch.Tensor:
    """``t`` as a contiguous ``dtype`` tensor of ``shape`` (itself when it already is one)."""
    if t.dtype == dtype and t.shape == shape and t.is_contiguous():
        return t
    return t.to(dtype).expand(shape).contiguous()


def _impl(mu, logvar, samples, seed):
    shape, out_shape, dtype, device = _plan(mu, logvar, samples, seed)
    _gate.check_device(_OP, device)
    z = torch.empty(out_shape, dtype=dtype, device=device)
    if z.numel() == 0:
        return z
    cd = _gate.kernel_dtype(dtype, device)
    zc = z if cd == dtype else torch.empty(out_shape, dtype=cd, device=device)
    s, off = _seed_words(seed)
    _gate.reparameterize_fwd(mu=_dense(mu, cd, shape), logvar=_dense(logvar, cd, shape), z=zc,
                             samples=max(samples, 1), seed=s, offset=off)
    if zc is not z:
        z.copy_(zc)
    return z


def _bwd_impl(grad, mu, logvar, samples, seed, mask):
    shape, out_shape, dtype, device = _plan(mu, logvar, samples, seed)
    _gate.check_device(_OP, device)
    cd = _gate.kernel_dtype(dtype, device)
    n = V.numel(shape)
    # The kernel writes every element of each gradient it is given (its first sample assigns), so
    # they need no zero fill unless it does not run.
    runs = n > 0 and (mask[0] or mask[1]) and V.numel(out_shape) > 0
    alloc = torch.empty if runs else torch.zeros
    g_mu = alloc(shape, dtype=cd, device=device) if mask[0] else None
    g_lv = alloc(shape, dtype=cd, device=device) if mask[1] else None
    if runs:
        s, off = _seed_words(seed)
        _gate.reparameterize_bwd(logvar=_dense(logvar, cd, shape), grad_out=_dense(grad, cd, out_shape), grad_mu=g_mu,
                                 grad_logvar=g_lv, samples=max(samples, 1), seed=s, offset=off)
    return (
        reduce_grad(g_mu, mu) if mask[0] else mu.new_zeros(1),
        reduce_grad(g_lv, logvar) if mask[1] else logvar.new_zeros(1),
    )


def _fake(mu, logvar, samples, seed):
    return mu.new_empty(_plan(mu, logvar, samples, seed)[1])


def _bwd_fake(grad, mu, logvar, samples, seed, mask):
    _plan(mu, logvar, samples, seed)
    return tuple(t.new_empty(t.shape) if m else t.new_zeros(1) for t, m in zip((mu, logvar), mask))


register(
    _OP,
    "reparameterize(Tensor mu, Tensor logvar, int samples, Tensor seed) -> Tensor",
    "reparameterize_backward(Tensor grad, Tensor mu, Tensor logvar, int samples, Tensor seed, bool[] output_mask)"
    " -> (Tensor, Tensor)",
    impl=_impl, bwd_impl=_bwd_impl, fake=_fake, bwd_fake=_bwd_fake, n_tensors=2,
)


def draw_seed(generator: Optional[torch.Generator] = None) -> int:
    """One Philox seed in [0, 2**62) drawn from ``generator`` (default: torch's global CPU generator)."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"pyvae.reparameterize: generator must be a torch.Generator or None, "
                        f"got {type(generator).__name__}")
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device, generator=generator).item())


def _seed_tensor(seed: int, offset: int = 0) -> torch.Tensor:
    return torch.tensor([seed, offset], dtype=torch.int64)


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, *, samples: Optional[int] = None,
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """z = mu + exp(logvar / 2) * eps with eps ~ N(0, I) drawn inside the kernel (Philox4x32-10).

    Args:
        mu: ``[...]`` float tensor.
        logvar: float tensor broadcastable with ``mu``.
        samples: ``None`` for one draw of ``mu``'s shape, or ``L >= 1`` for ``[L, *shape]``.
        generator: torch generator to seed from; default torch's global one, so ``torch.manual_seed``
            makes pyvae reproducible. The same seed gives the same z on every device and thread count.

    Returns:
        ``z``, differentiable in ``mu`` and ``logvar`` (eps is regenerated in backward, not stored).
    """
    if samples is not None:
        try:  # integer-like (numpy integers too); not bool, float or str
            n = operator.index(samples) if not isinstance(samples, bool) else None
        except TypeError:
            n = None
        if n is None or n < 1:
            raise ValueError(f"pyvae.reparameterize: samples must be None or an int >= 1, got {samples!r}")
        samples = n
    return call(_OP, mu, logvar, 0 if samples is None else samples, _seed_tensor(draw_seed(generator)))


# NOTE: [Sharded draws]
# Element i of a draw depends only on (seed, i) (csrc/ops/philox.h, NOTE: [Counter-based eps]): it
# takes lane i % NORMALS_PER_COUNTER of counter offset + i // NORMALS_PER_COUNTER. So a process that
# holds rows [row0, row0 + B) of a global batch of ``rows`` rows can draw exactly the eps a single
# process would use for those rows by starting each sample's draw at the counter of its first
# element. That needs the shard's first element, and each sample's, on a counter boundary; when
# they are not, the ranks fall back to independent seeds (same distribution, different draws).
def reparameterize_shard(mu: torch.Tensor, logvar: torch.Tensor, samples: int, seed: int,
                         shard: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """``[samples, B, Z]`` z for ``mu, logvar [B, Z]`` from ``seed``; with ``shard = (row0, rows)`` the
    eps of row b of sample l is the one a single process drawing ``[samples, rows, Z]`` would use for
    row ``row0 + b`` (NOTE: [Sharded draws]). Runs the registered op (``torch.ops.pyvae``)."""
    B, Z = mu.shape[-2], mu.shape[-1]
    row0, rows = (0, B) if shard is None else shard
    k = _gate.NORMALS_PER_COUNTER
    if (row0 * Z) % k or (rows * Z) % k:
        seed = (seed + 0x9E3779B97F4A7C15 * (row0 + 1)) % 2**62
        row0, rows = 0, B
    if row0 == 0 and rows == B:
        return torch.ops.pyvae.reparameterize(mu, logvar, samples, _seed_tensor(seed))
    zs = [torch.ops.pyvae.reparameterize(mu, logvar, 0, _seed_tensor(seed, (l * rows + row0) * Z // k))
          for l in range(samples)]
    return torch.stack(zs)
