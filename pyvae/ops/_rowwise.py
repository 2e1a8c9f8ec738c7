"""The row-reduction op family (bernoulli_log_prob, continuous_bernoulli_log_prob, gaussian_log_prob, gaussian_kl,
bernoulli_elbo): input plans, broadcasting operands without copies, and the forward/backward implementations
over the gate.

Every op of the family reduces the last (event) dim of elementwise terms: ``out[r] = sum_c term(row r,
col c)``; leading dims are kept and broadcast as ``torch.distributions`` does.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import _gate, _tune
from . import _checks as V
from ._registry import ROUTING, eager_function, first_order_only, placeholder, register, remember

__all__ = ["plan", "checked_plan", "as_rows", "reduce_grad", "register_rowwise", "forget_row_routes"]

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
    return checked_plan(op, named)


# NOTE: [Fake kernels plan without the fast path]
# ``plan``'s fast path compares the two shapes with ``==``, and Python compares tuples (torch.Size too) item by
# item before it compares their lengths: traced with symbolic shapes (torch.compile, torch.export), logits
# [L, B, D] against x [B, D] evaluates ``L == B``, mu [B, Z] against logvar [Z] ``B == Z``, and each such test
# is a guard on the batch size (for torch.export a violated constraint: "Not all values of B satisfy B != 2").
# The fake kernels, the only ones that see symbolic shapes, therefore plan with the named checks alone, which
# compare shapes by broadcasting from the last dim; the real kernels keep the fast path.
def checked_plan(op: str, named: Sequence[tuple]):
    """``plan`` without its fast path (NOTE: [Fake kernels plan without the fast path])."""
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
    full, dtype, device = checked_plan(op, [(n, t) for n, t in named if t is not None])
    return named[0][1].new_empty(full[:-1])


def _fake_backward(op: str, grad: torch.Tensor, named: Sequence[tuple], mask: Sequence[bool]):
    full, _, device = checked_plan(op, [(n, t) for n, t in named if t is not None])
    V.grad_of(op + "_backward", grad, full[:-1], device)
    return tuple(t.new_empty(t.shape) if (m and t is not None) else placeholder(t, grad)
                 for (_, t), m in zip(named, mask))


# NOTE: [Row op routes]
# At the paper's batch a row op is a few microseconds of arithmetic, and a Python autograd node costs more
# than torch's handful of C++ ones: gaussian_kl at B=100, Z=20 took 0.170 ms forward + backward against
# eager's 0.133 (bench/RESULTS.md, stop 9), while at B=16384 the kernel is 2-8x eager. So an eager CPU
# float32/float64 call of a row op whose reference is exact enough (gaussian_kl, bernoulli_log_prob,
# gaussian_log_prob: pyvae/reference.py, the same formulas in torch's ops; not the continuous Bernoulli,
# whose torch.distributions form loses accuracy beyond |logits| ~ 17) chooses between pyvae's kernel and
# torch's ops by measurement, per op, dtype, input shapes and training/inference, as the layers do (NOTE:
# [Layer routes] in linear_act.py; cache and PYVAE_TUNE in pyvae/_tune.py). Only calls of at most
# _MEASURE_MAX elements are measured: above it the kernel's single pass wins on every machine measured
# (1.9-7.7x eager at B=1024 on the AMD EPYC, 2.4x on the Intel Xeon), and measuring eager there would
# cost seconds. Inputs are checked by pyvae on both routes, so errors are the same; the routes agree to
# rounding (tests/test_row_routes.py), and, as for the layers, torch's route supports double backward.
_MEASURE_MAX = 1 << 17
_ROW_ROUTES: dict = {}
_KEYS_MAX = 1024  # keys kept per process (the measured routes stay cached in pyvae/_tune.py)


def forget_row_routes() -> None:
    """Forgets this process's row-op routes (the measured ones stay in pyvae/_tune.py)."""
    _ROW_ROUTES.clear()


def _measure_row_route(name, key, direct, ref, args, n_tensors, train) -> str:
    """Times torch's ops and pyvae's kernel on copies of this call's inputs (forward, and backward when
    training)."""
    copies = [a.detach().clone().requires_grad_(a.requires_grad and train) if isinstance(a, torch.Tensor) else a
              for a in args[:n_tensors]]
    leaves = [t for t in copies if isinstance(t, torch.Tensor) and t.requires_grad]

    def run(fn):
        def call():
            for t in leaves:
                t.grad = None
            with torch.set_grad_enabled(train):
                out = fn(*copies, *args[n_tensors:])
                if train:  # from a scalar, as a training step's backward starts (no gradient argument)
                    out.sum().backward()
        return call

    return _tune.decide(key, {"torch": run(ref), "pyvae": run(direct)}, what=key)


# NOTE: [Lean row calls]
# Forward + backward of a plain autograd.Function with empty bodies costs ~32 us here; pyvae's general
# path of gaussian_kl at B=100, Z=20 cost ~119 us (eager torch: ~92 us), nearly all of it Python around a
# kernel that runs in about a microsecond: planning the broadcast, checking, building the kernel's
# arguments, in forward and again in backward. So the common case (every given tensor of one shape,
# float32/float64 on the CPU; a strided one is copied first, as the general path does) is planned once
# per key of NOTE: [Row op routes] (which holds everything pyvae's checks look at): a _LeanRow keeps the two kernel calls prepared by the gate (NOTE:
# [Prepared kernel calls] in pyvae/_gate.py) and which gradients backward writes, and a call only
# allocates, passes pointers and runs the kernels. It runs the same kernels on the same operands as the
# general path, so its results are bit for bit the same (tests/test_row_routes.py).
class _LeanRow:
    """A row op's kernel calls for one key (see NOTE: [Lean row calls])."""

    __slots__ = ("name", "shape", "lead", "dtype", "present", "mask", "fwd", "bwd")

    def __init__(self, name: str, tensors: Sequence[Optional[torch.Tensor]], train: bool):
        first = next(t for t in tensors if t is not None)
        self.name, self.shape, self.dtype = name, tuple(first.shape), first.dtype
        self.lead, cols = self.shape[:-1], self.shape[-1]
        rows = V.numel(self.lead)
        self.present = tuple(i for i, t in enumerate(tensors) if t is not None)
        self.mask = tuple(train and tensors[i].requires_grad for i in self.present)
        mods = [None if t is None else rows for t in tensors]
        self.fwd = _gate.prepare_rowwise(name, "fwd", dtype=self.dtype, device=first.device, rows=rows, cols=cols,
                                         mods=mods)
        grads = [False] * len(tensors)
        for i, m in zip(self.present, self.mask):
            grads[i] = m
        self.bwd = (_gate.prepare_rowwise(name, "bwd", dtype=self.dtype, device=first.device, rows=rows, cols=cols,
                                          mods=mods, grads=grads) if any(self.mask) else None)

    @staticmethod
    def eligible(tensors: Sequence[Optional[torch.Tensor]]) -> bool:
        given = [t for t in tensors if t is not None]
        a = given[0]
        return (a.dim() >= 1 and a.numel() > 0 and a.shape[-1] > 0 and a.is_cpu and a.dtype in _PLAN_FAST
                and all(t.shape == a.shape and t.dtype == a.dtype and t.is_cpu for t in given))

    @staticmethod
    def dense(tensors):
        """The tensors the kernels read: strided ones (views such as GaussianHead's mu and logvar) copied."""
        return [t if t.is_contiguous() else t.contiguous() for t in tensors]

    def forward(self, tensors) -> torch.Tensor:
        out = torch.empty(self.lead, dtype=self.dtype)
        self.fwd(*tensors, out)
        return out

    def backward(self, grad: torch.Tensor, inputs):
        tensors = self.dense(inputs)
        if grad.dtype != self.dtype:
            grad = grad.to(self.dtype)
        if not grad.is_contiguous():
            grad = grad.contiguous()
        grads = [torch.empty(self.shape, dtype=self.dtype) for m in self.mask if m]
        self.bwd(*tensors, grad, *grads)
        if torch.is_grad_enabled():  # NOTE: [No double backward]
            grads = list(first_order_only(self.name, tuple(grads), inputs))
        return tuple(grads.pop(0) if m else None for m in self.mask)

    def run(self, args, train: bool):
        tensors = [args[i] for i in self.present]
        if train:
            return _LeanFn.apply(self, *tensors)
        return self.forward(self.dense(tensors))


class _LeanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, lean, *tensors):
        ctx.lean = lean
        ctx.save_for_backward(*tensors)  # the inputs themselves (NOTE: [No double backward] needs their edges)
        return lean.forward(lean.dense(tensors))

    @staticmethod
    def backward(ctx, grad):
        return (None,) + ctx.lean.backward(grad, ctx.saved_tensors)


def _routed(name: str, direct, ref, n_tensors: int, validate, fill):
    """The eager function of a row op: NOTE: [Row op routes] chooses between ``direct`` (pyvae's kernel,
    through NOTE: [Lean row calls] where it applies) and ``ref`` (torch's ops), for calls eligible for
    routing; ``validate(*args)`` (pyvae's checks) runs on the first call of each key. The lean path takes
    only calls whose tensors go to the kernel as given (``fill`` completes none of them)."""

    def torch_route(*args):
        # NOTE: [Infinite inputs] in csrc/ops/bernoulli.h and NOTE: [Tiny variances] in
        # csrc/ops/gaussian_log_prob.h: torch's formulas give NaN or an overflow where the kernel gives the
        # value or its limit (logits of +-inf, logvar = +inf, logvar < -88 in float32); a NaN or inf in the
        # (reduced, small) result sends the call to the kernel, so both routes give the same value.
        out = ref(*args)
        if not torch.isfinite(out).all():
            return direct(*args)
        return out

    def run(*args):
        a = args[0]
        if not isinstance(a, torch.Tensor) or not a.is_cpu or a.dtype not in _PLAN_FAST:
            return direct(*args)
        tensors = args[:n_tensors]
        train = torch.is_grad_enabled() and any(t.requires_grad for t in tensors if isinstance(t, torch.Tensor))
        fused_only = ROUTING["fused_only"]
        # Everything pyvae's checks look at is in the key, so a call whose key was seen passed them.
        k = (name, train, fused_only, torch.get_num_threads()) + tuple(
            (t.dtype, t.shape, t.requires_grad, t.device, t.is_contiguous()) if isinstance(t, torch.Tensor)
            else type(t) for t in tensors)
        r = _ROW_ROUTES.get(k)
        if r is None:
            validate(*args)
            lean = None
            if (all(t is None or isinstance(t, torch.Tensor) for t in tensors) and _LeanRow.eligible(tensors)
                    and all(f is t for f, t in zip(fill(*tensors), tensors))):
                lean = _LeanRow(name, tensors, train)
            kernel = direct if lean is None else (lambda *a, _l=lean, _t=train: _l.run(a, _t))
            big = max((t.numel() for t in tensors if isinstance(t, torch.Tensor)), default=0)
            if ref is None or fused_only or big > _MEASURE_MAX or big == 0:
                r = "pyvae"
            else:
                shapes = " ".join("-" if t is None else "x".join(map(str, t.shape)) + ("*" if t.requires_grad else "")
                                  for t in tensors)
                key = f"{name} {str(a.dtype).replace('torch.', '')} {shapes} {'train' if train else 'infer'}"
                r = _tune.pin(key)  # a resumed run's own routes first (NOTE: [Routes of a run] in pyvae/_tune.py)
                if r not in ("torch", "pyvae"):
                    r = _tune.lookup(key) if _tune.enabled() else "pyvae"
                if r is None:
                    try:
                        r = _measure_row_route(name, key, kernel, torch_route, args, n_tensors, train)
                    except Exception:  # a candidate that cannot run these inputs: the kernel, which checked them
                        r = "pyvae"
                _tune.note(key, r)
            if r != "torch" and lean is not None:
                r = lean
            remember(_ROW_ROUTES, k, r, _KEYS_MAX)
        if r == "torch":
            return torch_route(*args)
        if r == "pyvae":
            return direct(*args)
        return r.run(args, train)

    return run


def register_rowwise(name: str, schema: str, bwd_schema: str, arg_names: Sequence[str],
                     fill=lambda *args: args, n_optional: int = 0, reference=None) -> None:
    """Registers row op ``name`` (its kernels ``<name>_fwd``/``_bwd`` behind the gate) with ``register``.

    ``fill`` maps the op's tensor arguments to the ones the kernel gets (optional ones completed with
    real values, NOTE: [No None in backward ops]). ``reference``: torch's ops for the same function, which
    eager CPU calls may run instead where measured faster (NOTE: [Row op routes]).
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

    def validate(*args):
        check(args)
        plan(name, [(n, t) for n, t in zip(arg_names, fill(*args)) if t is not None])

    eager = _routed(name, eager_function(name, impl, bwd_impl, len(arg_names)), reference, len(arg_names), validate,
                    fill)
    register(name, schema, bwd_schema, impl=impl, bwd_impl=bwd_impl, fake=fake, bwd_fake=bwd_fake,
             n_tensors=len(arg_names), n_optional=n_optional, fill=fill, eager=eager)
