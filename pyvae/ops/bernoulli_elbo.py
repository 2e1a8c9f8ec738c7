"""``bernoulli_elbo(logits, x, mu, logvar)``: the SGVB estimator B of a Bernoulli decoder in one fused pass.

Math: csrc/ops/elbo.h (with bernoulli.h and gaussian_kl.h); kernels: csrc/cpu/kernels.cpp,
csrc/cuda/elbo.cu; tests: tests/test_bernoulli_elbo.py; benchmark keys ``elbo``/``elbo_step`` of
``pyvae bench elbo``.
"""
from __future__ import annotations

import math

import torch

from .. import _gate
from . import _checks as V
from ._registry import call, eager_function, eager_ok, first_order_only, register, remember
from ._rowwise import as_rows, reduce_grad

__all__ = ["bernoulli_elbo"]

_OP = "bernoulli_elbo"


def _plan(logits, x, mu, logvar, mixed: bool = False):
    """Validates the fused ELBO's inputs; returns (lead, samples, D, Z, dtype, device). ``mixed``: logits
    may have another dtype than the rest (NOTE: [bfloat16 logits] in csrc/cpu/kernels.cpp)."""
    named = [("logits", logits), ("x", x), ("mu", mu), ("logvar", logvar)]
    V.required(_OP, [n for n, _ in named], [t for _, t in named])
    for n, t in named:
        V.tensor(n, t, op=_OP)
    dtype, device = V.same_dtype_device(named[1:] if mixed else named, op=_OP)
    if mixed and logits.device != device:
        raise ValueError(f"pyvae.{_OP}: logits is on {logits.device} but x is on {device}")
    if mu.shape != logvar.shape:
        raise ValueError(f"pyvae.{_OP}: mu {tuple(mu.shape)} and logvar {tuple(logvar.shape)} must have the same shape")
    lead = tuple(mu.shape[:-1])
    if logits.dim() == mu.dim() + 1 and tuple(logits.shape[1:-1]) == lead:
        samples = logits.shape[0]
        if samples == 0:
            raise ValueError(f"pyvae.{_OP}: logits {tuple(logits.shape)} has 0 samples; need L >= 1")
    elif tuple(logits.shape[:-1]) == lead:
        samples = 0
    else:
        raise ValueError(
            f"pyvae.{_OP}: logits {tuple(logits.shape)} must be [*B, D] or [L, *B, D] where mu is [*B, Z] = "
            f"{tuple(mu.shape)}"
        )
    D = logits.shape[-1]
    target = (*lead, D)
    full = V.broadcast_shapes(tuple(x.shape), target)
    if full is None or V.numel(full) != V.numel(target):
        raise ValueError(f"pyvae.{_OP}: x {tuple(x.shape)} does not broadcast to {target} (mu's batch, logits' D)")
    return lead, samples, D, mu.shape[-1], dtype, device


def _operands(logits, x, mu, logvar, lead, S, rows, D, cd, logits_dtype=None):
    return [
        (logits.to(logits_dtype or cd).contiguous(), S * rows),
        as_rows(x, lead, D, cd),
        (mu.to(cd).contiguous(), rows),
        (logvar.to(cd).contiguous(), rows),
    ]


def _impl(logits, x, mu, logvar):
    lead, samples, D, Z, dtype, device = _plan(logits, x, mu, logvar)
    _gate.check_device(_OP, device)
    out = torch.empty(lead, dtype=dtype, device=device)
    rows = out.numel()
    if rows == 0:
        return out
    cd = _gate.kernel_dtype(dtype, device)
    S = max(samples, 1)
    o = out if cd == dtype else torch.empty(lead, dtype=cd, device=device)
    _gate.rowwise(_OP, "fwd", dtype=cd, device=device, rows=rows, cols=D, cols2=Z, samples=S,
                  operands=_operands(logits, x, mu, logvar, lead, S, rows, D, cd), out=o)
    if o is not out:
        out.copy_(o)
    return out


def _check_backward(grad, mask, lead, device):
    V.grad_of(_OP + "_backward", grad, lead, device)
    V.output_mask(_OP + "_backward", mask, 4)


def _bwd_impl(grad, logits, x, mu, logvar, mask):
    lead, samples, D, Z, dtype, device = _plan(logits, x, mu, logvar)
    _check_backward(grad, mask, lead, device)
    _gate.check_device(_OP, device)
    rows = V.numel(lead)
    cd = _gate.kernel_dtype(dtype, device)
    S = max(samples, 1)
    g_l = torch.empty(logits.shape, dtype=cd, device=device) if mask[0] else None
    g_x = torch.empty((*lead, D), dtype=cd, device=device) if mask[1] else None
    g_mu = torch.empty(mu.shape, dtype=cd, device=device) if mask[2] else None
    g_lv = torch.empty(mu.shape, dtype=cd, device=device) if mask[3] else None
    if rows > 0:
        g = grad.to(cd).expand(lead).contiguous()
        _gate.rowwise(_OP, "bwd", dtype=cd, device=device, rows=rows, cols=D, cols2=Z, samples=S,
                      operands=_operands(logits, x, mu, logvar, lead, S, rows, D, cd), grad_out=g,
                      grads=(g_l, g_x, g_mu, g_lv))
    return (
        reduce_grad(g_l, logits) if mask[0] else logits.new_zeros(1),
        reduce_grad(g_x, x) if mask[1] else x.new_zeros(1),
        reduce_grad(g_mu, mu) if mask[2] else mu.new_zeros(1),
        reduce_grad(g_lv, logvar) if mask[3] else logvar.new_zeros(1),
    )


def _fake(logits, x, mu, logvar):
    return mu.new_empty(_plan(logits, x, mu, logvar)[0])


def _bwd_fake(grad, logits, x, mu, logvar, mask):
    lead, _, _, _, _, device = _plan(logits, x, mu, logvar)
    _check_backward(grad, mask, lead, device)
    return tuple(t.new_empty(t.shape) if m else t.new_zeros(1) for t, m in zip((logits, x, mu, logvar), mask))


# NOTE: [Expected upstream gradient]
# The one-pass forward writes the gradients for the upstream gradient its backward is expected to bring,
# so that backward can return them untouched. Training losses are a sum or a mean of the ELBO, negated:
# the upstream gradient is then one number for every row (-1, or -1/B), the same number every step. The
# forward uses the last uniform upstream gradient a backward of this shape saw (-1/B before any: the
# ``-elbo.mean()`` of pyvae's trainer); a backward that brings another one rewrites the gradients with
# the two-pass backward kernel into the same buffers, from the saved inputs. Both kernels evaluate the
# same csrc/ops functions of the same scale, so the gradients are the same whichever ran (tested bit for
# bit): the guess decides the speed, never the result.
_EXPECTED: dict = {}
_EXPECTED_MAX = 64


def _expected(key, rows: int, dtype: torch.dtype) -> float:
    c = _EXPECTED.get(key)
    if c is None:  # what -elbo.mean() sends: -1 / rows rounded to the dtype, as torch's mean backward
        c = float(torch.tensor(-1.0, dtype=dtype) / rows)
        _store(key, c)
    return c


def _remember(key, g: torch.Tensor) -> None:
    first = g[0]
    if bool((g == first).all()) and bool(torch.isfinite(first)):
        _store(key, float(first))


def _store(key, c: float) -> None:
    remember(_EXPECTED, key, c, _EXPECTED_MAX)


# NOTE: [Lean one-pass ELBO]
# At the paper's batch the one-pass kernel takes some tens of microseconds, and planning and checking the
# call (the broadcast plan, the operands, the gate's checks, a fresh tensor of the expected upstream
# gradient) took as long again, in forward and backward. As for the row ops (NOTE: [Lean row calls] in
# _rowwise.py), a call whose big inputs need no conversion (logits [*B, D] or [L, *B, D] and x [*B, D],
# contiguous; mu and logvar [*B, Z], copied when strided, as GaussianHead's views are; all in the dtypes the
# one-pass kernel reads) is planned once per key of
# everything pyvae's checks look at: the gate's prepared forward (and two-pass backward) call, the rows
# and sizes, and the expected upstream gradient's tensor, made again only when that value changes. The
# kernels and their operands are the general path's, so the results are bit for bit the same.
_PLANS: dict = {}
_PLANS_MAX = 256


class _Plan:
    __slots__ = ("shape", "key", "dtype", "logits_dtype", "need", "fwd", "bwd", "c", "c_t")

    def __init__(self, logits, x, mu, logvar, need, lead, samples, D, Z, dtype):
        rows, S = V.numel(lead), max(samples, 1)
        self.shape, self.key, self.dtype, self.logits_dtype = (lead, S, rows, D, Z), (rows, S, D, Z, dtype), dtype, logits.dtype
        self.need = (need[0], need[2], need[3])
        common = dict(dtype=dtype, device=logits.device, rows=rows, cols=D, cols2=Z, samples=S,
                      mods=[S * rows, rows, rows, rows], grads=[need[0], False, need[2], need[3]])
        self.fwd = _gate.prepare_rowwise(_OP, "fwd", grad_out=True, logits_dtype=logits.dtype, **common)
        self.bwd = _gate.prepare_rowwise(_OP, "bwd", **common) if logits.dtype == dtype else None
        self.c, self.c_t = None, None

    @staticmethod
    def of(logits, x, mu, logvar, need) -> "_Plan | None":
        """The plan of this call (made on its key's first call), or None where the general one-pass runs."""
        k = (need, logits.dtype, logits.shape, logits.is_contiguous(), x.dtype, x.shape, x.is_contiguous(),
             mu.dtype, mu.shape, mu.is_contiguous(), logvar.dtype, logvar.shape, logvar.is_contiguous())
        plan = _PLANS.get(k)
        if plan is None:
            mixed = logits.dtype != mu.dtype
            lead, samples, D, Z, dtype, _ = _plan(logits, x, mu, logvar, mixed)
            ok = (logits.is_contiguous() and x.is_contiguous()
                  and tuple(x.shape) == (*lead, D) and x.dtype == dtype and mu.dtype == dtype
                  and logvar.dtype == dtype and logits.is_cpu and V.numel(lead) > 0)
            plan = remember(_PLANS, k, _Plan(logits, x, mu, logvar, need, lead, samples, D, Z, dtype) if ok else False,
                            _PLANS_MAX)
        return plan or None

    def expected(self) -> torch.Tensor:
        c = _expected(self.key, self.shape[2], self.dtype)
        if c != self.c:
            self.c, self.c_t = c, torch.full((self.shape[2],), c, dtype=self.dtype)
        return self.c_t


class _OnePass(torch.autograd.Function):
    """The direct eager path (NOTE: [Eager fast path]) with the gradients written by the forward (NOTE:
    [ELBO in one pass] in csrc/cpu/kernels.cpp) for the expected upstream gradient (NOTE: [Expected
    upstream gradient]): backward returns them as they are when the upstream gradient is the expected
    one, and rewrites them with the backward kernel otherwise. A second backward of the same graph
    (retain_graph) or a differentiable one (create_graph) runs the two-pass backward from the saved
    inputs instead. Calls that need no conversion run planned (NOTE: [Lean one-pass ELBO])."""

    @staticmethod
    def forward(ctx, logits, x, mu, logvar, into_logits=False):
        need = ctx.needs_input_grad[:4]
        plan = _Plan.of(logits, x, mu, logvar, need)
        ctx.into_logits = False
        if plan is not None:
            lead, S, rows, D, Z = plan.shape
            out = torch.empty(lead, dtype=plan.dtype)
            expected = plan.expected()
            # NOTE: [ELBO gradient into the logits]: only where the gradient can be rescaled afterwards
            ctx.into_logits = into = (into_logits and plan.need[0] and logits.grad_fn is not None
                                      and plan.c != 0.0 and math.isfinite(plan.c))
            grads = [logits if into and i == 0 else torch.empty(t.shape, dtype=t.dtype)
                     for i, (t, n) in enumerate(zip((logits, mu, logvar), plan.need)) if n]
            plan.fwd(logits, x, mu.contiguous(), logvar.contiguous(), out, expected, *grads)
            g_l = grads.pop(0) if plan.need[0] else None
            g_mu = grads.pop(0) if plan.need[1] else None
            g_lv = grads.pop(0) if plan.need[2] else None
            if into:
                # the logits now hold their gradient: a node that saved them fails its version check
                torch.autograd.graph.increment_version(logits)
                ctx.save_for_backward(x, mu, logvar)
            else:
                ctx.save_for_backward(logits, x, mu, logvar)
            ctx.written, ctx.plan = (g_l, g_mu, g_lv), plan
            ctx.expected, ctx.key, ctx.shape, ctx.dtype = plan.c, plan.key, plan.shape, plan.dtype
            return out
        mixed = logits.dtype != mu.dtype  # bfloat16 logits, the rest float32 (_one_pass_ok)
        lead, samples, D, Z, dtype, device = _plan(logits, x, mu, logvar, mixed)
        rows, S = V.numel(lead), max(samples, 1)
        key = (rows, S, D, Z, dtype)
        c = _expected(key, rows, dtype)
        out = torch.empty(lead, dtype=dtype, device=device)
        g_l = torch.empty(logits.shape, dtype=logits.dtype, device=device) if need[0] else None
        g_mu = torch.empty(mu.shape, dtype=dtype, device=device) if need[2] else None
        g_lv = torch.empty(mu.shape, dtype=dtype, device=device) if need[3] else None
        _gate.rowwise(_OP, "fwd", dtype=dtype, device=device, rows=rows, cols=D, cols2=Z, samples=S,
                      operands=_operands(logits, x, mu, logvar, lead, S, rows, D, dtype, logits.dtype), out=out,
                      grad_out=torch.full((rows,), c, dtype=dtype, device=device), grads=(g_l, None, g_mu, g_lv),
                      logits_dtype=logits.dtype)
        ctx.save_for_backward(logits, x, mu, logvar)
        ctx.written, ctx.plan = (g_l, g_mu, g_lv), None
        ctx.expected, ctx.key, ctx.shape, ctx.dtype = c, key, (lead, S, rows, D, Z), dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        if ctx.into_logits:
            return _OnePass._backward_into_logits(ctx, grad)
        inputs = ctx.saved_tensors
        logits, x, mu, logvar = inputs
        mask = [bool(m) for m in ctx.needs_input_grad[:4]]
        if ctx.written is None or torch.is_grad_enabled():
            # the two-pass backward, in float32 for bfloat16 logits (and its logits gradient narrowed after)
            wide = logits.to(ctx.dtype)
            grads = list(first_order_only(_OP, _bwd_impl(grad, wide, x, mu, logvar, mask), inputs))
            grads[0] = grads[0].to(logits.dtype)
            return tuple(g if m else None for g, m in zip(grads, mask))
        g_l, g_mu, g_lv = ctx.written
        ctx.written = None  # handed out below: a second backward recomputes
        lead, S, rows, D, Z = ctx.shape
        g = grad if grad.dtype == ctx.dtype else grad.to(ctx.dtype)
        if g.dim() > 0 and not any(g.stride()):  # one value for every row (what .mean() / .sum() send)
            same = g.reshape(-1)[:1].item() == ctx.expected
        else:
            same = bool((g == ctx.expected).all())
        if not same:
            g = g.expand(lead).reshape(rows)
            _remember(ctx.key, g)
            plan = ctx.plan
            if plan is not None and plan.bwd is not None:
                plan.bwd(logits, x, mu.contiguous(), logvar.contiguous(), g.contiguous(),
                         *(t for t in (g_l, g_mu, g_lv) if t is not None))
            elif logits.dtype == ctx.dtype:
                _gate.rowwise(_OP, "bwd", dtype=logits.dtype, device=logits.device, rows=rows, cols=D, cols2=Z,
                              samples=S, operands=_operands(logits, x, mu, logvar, lead, S, rows, D, logits.dtype),
                              grad_out=g.contiguous(), grads=(g_l, None, g_mu, g_lv))
            else:  # bfloat16 logits: the float32 backward kernel, its logits gradient narrowed into g_l
                wide = _bwd_impl(grad, logits.to(ctx.dtype), x, mu, logvar, [g_l is not None, False, g_mu is not None,
                                                                             g_lv is not None])
                for buf, w in zip((g_l, g_mu, g_lv), (wide[0], wide[2], wide[3])):
                    if buf is not None:
                        buf.copy_(w)
        return g_l, None, g_mu, g_lv, None

    @staticmethod
    def _backward_into_logits(ctx, grad):
        """Backward of a forward that wrote the logits gradient over the logits (NOTE: [ELBO gradient into
        the logits]): the logits are gone, so the gradients are the written ones, rescaled row by row when
        the upstream gradient is not the expected one, and a second or differentiable backward refuses."""
        if ctx.written is None or torch.is_grad_enabled():
            raise RuntimeError(
                "pyvae.VAE: the ELBO's logits gradient was written over the decoder's logits (NOTE: [ELBO "
                "gradient into the logits]), so this graph can be differentiated once and not with "
                "create_graph=True; set VAE.elbo_into_logits = False for retain_graph or double backward")
        g_l, g_mu, g_lv = ctx.written
        ctx.written = None
        rescale_written(grad, ctx.expected, ctx.key, ctx.shape, ctx.dtype, g_l, g_mu, g_lv)
        return g_l, None, g_mu, g_lv, None


def rescale_written(grad: torch.Tensor, expected: float, key, shape, dtype: torch.dtype, g_l: torch.Tensor,
                    g_mu, g_lv) -> None:
    """Turns gradients a one-pass forward wrote for the upstream gradient ``expected`` into those of ``grad``
    (the ELBO's gradient, broadcastable to its shape), in place: row by row by grad / expected (NOTE: [ELBO
    gradient into the logits]); nothing to do when every row's upstream gradient is ``expected``. ``key``,
    ``shape`` and ``dtype`` as ``forward_into_logits`` returned them."""
    lead, S, rows, D, Z = shape
    g = grad if grad.dtype == dtype else grad.to(dtype)
    if g.dim() > 0 and not any(g.stride()):
        same = g.reshape(-1)[:1].item() == expected
    else:
        same = bool((g == expected).all())
    if not same:  # every gradient is the upstream gradient of its row times a function of the inputs
        g = g.expand(lead).reshape(rows)
        _remember(key, g)
        factor = g / expected
        g_l.view(S, rows, D).mul_(factor.to(g_l.dtype).view(1, rows, 1))
        for t in (g_mu, g_lv):
            if t is not None:
                t.view(rows, Z).mul_(factor.view(rows, 1))


def into_logits_ok(rows: int, D: int, Z: int, dtype: torch.dtype) -> bool:
    """Whether ``forward_into_logits`` of ``[rows, D]`` logits and ``[rows, Z]`` mu and logvar in ``dtype``
    (float32 or float64) can write its gradients for a later rescaling: a nonzero, finite expected upstream
    gradient (NOTE: [Expected upstream gradient])."""
    c = _expected((rows, 1, D, Z, dtype), rows, dtype)
    return c != 0.0 and math.isfinite(c)


def forward_into_logits(logits: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor):
    """The planned one-pass forward for an owner of ``logits`` (a one-node VAE step, NOTE: [One-node VAE step]
    in pyvae/ops/vae_step.py), without autograd: ``(elbo, g_mu, g_lv, (expected, key, shape, dtype))`` with
    d ELBO / d logits times the expected upstream gradient written over ``logits`` and those of mu and logvar
    in g_mu, g_lv (NOTE: [ELBO gradient into the logits]); ``rescale_written`` turns them into another
    upstream gradient's. Contiguous CPU ``logits, x [rows, D]``, ``mu, logvar [rows, Z]`` of one dtype, where
    ``into_logits_ok`` holds; anything else raises."""
    plan = _Plan.of(logits, x, mu, logvar, (True, False, True, True))
    if plan is None or logits.dim() != 2:
        raise RuntimeError("pyvae.bernoulli_elbo: forward_into_logits takes contiguous CPU [rows, D] logits and x "
                           "and [rows, Z] mu and logvar of one dtype")
    lead, S, rows, D, Z = plan.shape
    expected = plan.expected()
    if plan.c == 0.0 or not math.isfinite(plan.c):
        raise RuntimeError("pyvae.bernoulli_elbo: forward_into_logits needs a nonzero, finite expected upstream "
                           "gradient (into_logits_ok)")
    out = torch.empty(lead, dtype=plan.dtype)
    g_mu, g_lv = torch.empty(mu.shape, dtype=plan.dtype), torch.empty(mu.shape, dtype=plan.dtype)
    plan.fwd(logits, x, mu, logvar, out, expected, logits, g_mu, g_lv)
    return out, g_mu, g_lv, (plan.c, plan.key, plan.shape, plan.dtype)


def _mixed(logits, x, mu, logvar) -> bool:
    """bfloat16 logits (autocast's decoder output) with float32 x, mu and logvar."""
    return (isinstance(logits, torch.Tensor) and logits.dtype == torch.bfloat16
            and all(isinstance(t, torch.Tensor) and t.dtype == torch.float32 for t in (x, mu, logvar)))


def _one_pass_ok(logits, x, mu, logvar) -> bool:
    """Where the one-pass path applies: CPU inputs of one float32/float64 dtype, or bfloat16 logits with
    float32 x, mu and logvar (NOTE: [bfloat16 logits] in csrc/cpu/kernels.cpp); x not differentiated,
    gradients wanted, a non-empty batch."""
    return (torch.is_grad_enabled() and all(isinstance(t, torch.Tensor) for t in (logits, x, mu, logvar))
            and logits.is_cpu and not x.requires_grad
            and (logits.requires_grad or mu.requires_grad or logvar.requires_grad)
            and ((logits.dtype in _ONE_PASS_DTYPES and x.dtype == logits.dtype == mu.dtype == logvar.dtype)
                 or _mixed(logits, x, mu, logvar))
            and mu.numel() > 0 and logits.numel() > 0)


def _eager(logits, x, mu, logvar):
    """The one-pass path where it applies (``_one_pass_ok``), else the plain direct path."""
    if _one_pass_ok(logits, x, mu, logvar):
        return _OnePass.apply(logits, x, mu, logvar)
    return _two_pass(logits, x, mu, logvar)


_ONE_PASS_DTYPES = (torch.float32, torch.float64)
_two_pass = eager_function(_OP, _impl, _bwd_impl, 4)


# NOTE: [ELBO gradient into the logits]
# The one-pass forward writes d ELBO / d logits, a fresh [L, B, D] tensor. Inside pyvae.VAE the logits are
# an intermediate the model owns: once the ELBO has read them, nothing needs them (the decoder's last layer
# is linear: its backward needs its input and weight, not its output), so the gradient is written over them
# element by element (read, then write the same place) and no fresh [L, B, D] buffer is allocated and faulted
# in each step. Where this applies: the planned CPU one-pass path (NOTE: [Lean one-pass ELBO]) with a logits
# gradient wanted, logits made by an op (never a leaf: its values are the caller's) and a nonzero expected
# upstream gradient c. Consequences, all checked by tests:
# - the logits' version counter is bumped, so a node that saved the logits (a hook's custom layer) raises
#   torch's "modified by an inplace operation" error in backward instead of reading gradients;
# - the two-pass fallback has no logits to read: an upstream gradient g other than c rescales the written
#   gradients row by row by g / c (each is g times a function of the inputs), which may differ from the
#   two-pass result by one rounding; a second backward of the graph (retain_graph) or create_graph=True
#   raises a RuntimeError naming VAE.elbo_into_logits, the switch that turns this off.
# Anyone else calling pyvae.bernoulli_elbo gets a fresh gradient: only an owner of the logits opts in.
def bernoulli_elbo_into_logits(logits: torch.Tensor, x: torch.Tensor, mu: torch.Tensor,
                               logvar: torch.Tensor) -> torch.Tensor:
    """``bernoulli_elbo`` for a caller that owns ``logits`` and needs nothing of them afterwards: where the
    planned one-pass path runs, their storage receives d ELBO / d logits (NOTE: [ELBO gradient into the
    logits]); elsewhere exactly ``bernoulli_elbo``."""
    if eager_ok(logits, x, mu, logvar) and _one_pass_ok(logits, x, mu, logvar):
        return _OnePass.apply(logits, x, mu, logvar, True)
    return bernoulli_elbo(logits, x, mu, logvar)

register(
    _OP,
    "bernoulli_elbo(Tensor logits, Tensor x, Tensor mu, Tensor logvar) -> Tensor",
    "bernoulli_elbo_backward(Tensor grad, Tensor logits, Tensor x, Tensor mu, Tensor logvar, bool[] output_mask)"
    " -> (Tensor, Tensor, Tensor, Tensor)",
    impl=_impl, bwd_impl=_bwd_impl, fake=_fake, bwd_fake=_bwd_fake, n_tensors=4, eager=_eager,
)


def bernoulli_elbo(logits: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Per-datapoint SGVB estimator B in one fused pass: bernoulli_log_prob - gaussian_kl.

    Args:
        logits: ``[*B, D]``, or ``[L, *B, D]`` for L samples per datapoint (the reconstruction term
            is then averaged over L).
        x: broadcastable to ``[*B, D]``.
        mu: ``[*B, Z]`` posterior mean; logvar: ``[*B, Z]`` posterior log-variance. Prior N(0, I).

        bfloat16 logits with float32 ``x``, ``mu`` and ``logvar`` (what a decoder under CPU autocast
        gives) are computed in float32: on the CPU eager path read as they are, elsewhere widened first;
        the logits gradient comes back in bfloat16 either way.

    Returns:
        ``[*B]`` tensor: mean_l log p(x | z_l) - KL(q(z|x) || p(z)).
    """
    if _mixed(logits, x, mu, logvar) and not (eager_ok(logits, x, mu, logvar) and _one_pass_ok(logits, x, mu, logvar)):
        logits = logits.float()
    return call(_OP, logits, x, mu, logvar)
