"""The row-reduction op family (bernoulli_log_prob, continuous_bernoulli_log_prob, gaussian_log_prob, gaussian_kl,
bernoulli_elbo): input plans, broadcasting operands without copies, and the forward/backward implementations
over the gate.

Every op of the family reduces the last (event) dim of elementwise terms: ``out[r] = sum_c term(row r,
col c)``; leading dims are kept and broadcast as ``torch.distributions`` does.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import _gate
from . import _checks as V
from ._registry import placeholder, register

__all__ = ["plan", "as_rows", "reduce_grad", "register_rowwise"]

_PLAN_FAST = (torch.float32, torch.float64)


def plan(op: str, named: Sequence[tuple]):
    """Validates an op's float tensor inputs (row reductions, reparameterize); returns (full shape,
    dtype, device)."""
    if len(named) == 2:
        # The common valid case (two CPU float32/float64 tensors of one shape: nothing to broadcast)
        # in one expression, ~2 us less per call; anything else gets the checks that name it.
        a, b = named[0][1], named[1][1]
        if (type(a) is type(b) and isinstance(a, torch.Tensor) and a.dtype in _PLAN_FAST and b.dtype == a.dtype
                and a.is_cpu and b.is_cpu and a.dim() >= 1 and a.shape == b.shape):
            return tuple(a.shape), a.dtype, a.device
    for name, t in named:
        V.tensor(name, t, op=op)
    dtype, device = V.same_dtype_device(named, op=op)
    full = V.broadcast(named, op=op)
    return full, dtype, device


def as_rows(t: torch.Tensor, lead: Sequence[int], cols: int, dtype: torch.dtype):
    """``t`` (broadcastable to ``[*lead, cols]``) as a contiguous ``[mod, cols]`` block and ``mod``.

    Row r of the op reads row ``r % mod``: an operand whose leading shape (without leading 1s) is a
    suffix of ``lead`` is used in place; any other broadcast is materialized.
    """
    if t.dtype != dtype:
        t = t.to(dtype)
    if t.shape[-1] != cols:
        t = t.expand(*t.shape[:-1], cols)
    tl = tuple(t.shape[:-1])
    k = 0
    while k < len(tl) and tl[k] == 1:
        k += 1
    tl = tl[k:]
    if not tl:
        return t.reshape(cols).contiguous(), 1
    lead = tuple(lead)
    if tl == lead[len(lead) - len(tl):]:
        return t.contiguous(), V.numel(tl)
    return t.expand(*lead, cols).contiguous(), max(V.numel(lead), 1)


def reduce_grad(g: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Sums a full-size gradient down to ``like``'s (broadcast) shape, in ``like``'s dtype."""
    g = g.sum_to_size(like.shape) if g.shape != like.shape else g
    return g if g.dtype == like.dtype else g.to(like.dtype)


def _forward(op: str, named: Sequence[tuple]) -> torch.Tensor:
    full, dtype, device = plan(op, [(n, t) for n, t in named if t is not None])
    _gate.check_device(op, device)
    lead, cols = full[:-1], full[-1]
    out = torch.empty(lead, dtype=dtype, device=device)
    rows = out.numel()
    if rows == 0:
        return out
    cd = _gate.kernel_dtype(dtype, device)
    operands = [None if t is None else as_rows(t, lead, cols, cd) for _, t in named]
    o = out if cd == dtype else torch.empty(lead, dtype=cd, device=device)
    _gate.rowwise(op, "fwd", dtype=cd, device=device, rows=rows, cols=cols, operands=operands, out=o)
    if o is not out:
        out.copy_(o)
    return out


def _backward(op: str, grad: torch.Tensor, named: Sequence[tuple], mask: Sequence[bool]):
    present = [(n, t) for n, t in named if t is not None]
    full, dtype, device = plan(op, present)
    V.grad_of(op + "_backward", grad, full[:-1], device)
    _gate.check_device(op, device)
    lead, cols = full[:-1], full[-1]
    rows = V.numel(lead)
    cd = _gate.kernel_dtype(dtype, device)
    grads = [torch.empty(full, dtype=cd, device=device) if (m and t is not None) else None
             for (_, t), m in zip(named, mask)]
    if rows > 0 and cols > 0:
        operands = [None if t is None else as_rows(t, lead, cols, cd) for _, t in named]
        g = grad.to(cd).expand(lead).contiguous()
        _gate.rowwise(op, "bwd", dtype=cd, device=device, rows=rows, cols=cols, operands=operands, grad_out=g,
                      grads=grads)
    return tuple(reduce_grad(g, t) if (m and t is not None) else placeholder(t, grad)
                 for g, (_, t), m in zip(grads, named, mask))


def _fake_forward(op: str, named: Sequence[tuple]) -> torch.Tensor:
    full, dtype, device = plan(op, [(n, t) for n, t in named if t is not None])
    return named[0][1].new_empty(full[:-1])


def _fake_backward(op: str, grad: torch.Tensor, named: Sequence[tuple], mask: Sequence[bool]):
    full, _, device = plan(op, [(n, t) for n, t in named if t is not None])
    V.grad_of(op + "_backward", grad, full[:-1], device)
    return tuple(t.new_empty(t.shape) if (m and t is not None) else placeholder(t, grad)
                 for (_, t), m in zip(named, mask))


def register_rowwise(name: str, schema: str, bwd_schema: str, arg_names: Sequence[str],
                     fill=lambda *args: args, n_optional: int = 0) -> None:
    """Registers row op ``name`` (its kernels ``<name>_fwd``/``_bwd`` behind the gate) with ``register``.

    ``fill`` maps the op's tensor arguments to the ones the kernel gets (optional ones completed with
    real values, NOTE: [No None in backward ops]).
    """
    n_req = len(arg_names) - n_optional
    req_names = arg_names[:n_req]

    def check(args, mask=None):
        if any(a is None for a in args[:n_req]):
            V.required(name, req_names, args[:n_req])
        if mask is not None:
            V.output_mask(name + "_backward", mask, len(args))

    def impl(*args):
        check(args)
        return _forward(name, list(zip(arg_names, fill(*args))))

    def bwd_impl(grad, *args):
        *inputs, mask = args
        check(inputs, mask)
        return _backward(name, grad, list(zip(arg_names, fill(*inputs))), mask)

    def fake(*args):
        check(args)
        return _fake_forward(name, list(zip(arg_names, fill(*args))))

    def bwd_fake(grad, *args):
        *inputs, mask = args
        check(inputs, mask)
        return _fake_backward(name, grad, list(zip(arg_names, fill(*inputs))), mask)

    register(name, schema, bwd_schema, impl=impl, bwd_impl=bwd_impl, fake=fake, bwd_fake=bwd_fake,
             n_tensors=len(arg_names), n_optional=n_optional, fill=fill)
