"""How every pyvae op is registered: ``torch.library`` (namespace ``pyvae``), fake kernels, autograd, and
the direct eager path. One helper, ``register``, serves every op of ``pyvae.ops``.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

from ._checks import output_mask

__all__ = ["LIB", "ROUTING", "register", "call", "remember", "check_no_transform", "eager_ok", "eager_function", "first_order_only", "FirstOrderOnly", "placeholder"]

LIB = torch.library.Library("pyvae", "DEF")

_DEVICE_KEYS = ("CPU", "CUDA")

# Whether eager CPU calls may run torch's own ops where measured faster (NOTE: [Layer routes] in
# linear_act.py, NOTE: [Row op routes] in _rowwise.py); ``pyvae.ops.fused_only()`` sets "fused_only".
ROUTING = {"fused_only": False}


# ------------------------------------------------------------------------ no double backward
# NOTE: [No double backward]
# The backward kernels write raw memory, so the gradients they return carry no autograd history:
# with create_graph=True a second-order gradient (a gradient penalty, a Hessian-vector product)
# would silently miss every path through pyvae. So when backward runs in grad mode and an input
# needs grad, the gradients pass through FirstOrderOnly, whose backward raises (torch.compile's
# CompiledFunctionBackward does the same). Plain backward (grad mode off) skips it.
class FirstOrderOnly(torch.autograd.Function):
    # forward + setup_context (not forward(ctx, ...)): the form torch.func transforms accept (the ops
    # themselves still refuse them: NOTE: [torch.func]).
    @staticmethod
    def forward(op, n, *tensors):
        return tuple(t.clone() for t in tensors[:n])

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.op = inputs[0]

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(f"pyvae.{ctx.op}: double backward is not supported (its gradients are first order)")


def first_order_only(op: str, grads, inputs):
    """``grads``, made to raise if differentiated again; see NOTE: [No double backward]."""
    if not torch.is_grad_enabled() or not any(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs):
        return grads
    return FirstOrderOnly.apply(op, len(grads), *grads, *(t for t in inputs if isinstance(t, torch.Tensor)))


# NOTE: [No None in backward ops]
# Traced by AOTAutograd (torch.compile, opcheck), gaussian_kl's backward crashed inside torch 2.13's
# functionalization (a segfault, or "tensor does not have a device") when absent priors travelled
# into its backward op as placeholders: on every trace with zero-size placeholder gradients; and,
# with 1-element placeholder inputs flagged by a ``bool[] present`` list, in about 1 full test run in
# 3 (never in 2,500 opcheck calls alone: it needs the state earlier tests leave). So backward ops take
# only real inputs: with no optional input at all, autograd calls ``<op>_required_backward`` (the
# required inputs only); otherwise the missing ones are completed with real values (``fill``). A
# gradient that is not wanted still comes back as a 1-element zero tensor (dropped by the autograd
# wrapper), never a zero-size one.
def placeholder(like: Optional[torch.Tensor], fallback: torch.Tensor) -> torch.Tensor:
    """What a backward op returns for an input that gets no gradient (NOTE: [No None in backward ops]):
    a 1-element zero tensor with the input's dtype and device (``fallback``'s for an absent input)."""
    return (fallback if like is None else like).new_zeros(1)


def remember(table: dict, key, value, limit: int):
    """``table[key] = value`` for a per-process table of ops' per-shape state (routes, plans), started over
    once it holds ``limit`` keys: a bound on what many shapes (ragged batches) can leave there. Returns
    ``value``."""
    if len(table) >= limit and key not in table:
        table.clear()
    table[key] = value
    return value


# ------------------------------------------------------------------------- eager fast path
# NOTE: [Eager fast path]
# Through the dispatcher, a custom op with Python autograd costs ~20 us more per forward+backward
# than calling the same implementation from a plain autograd.Function (measured at B=1: 82 vs 62
# us; eager PyTorch's unfused ELBO takes ~61 us). At the paper's batch of 100 that is a visible
# share of a step, so the public functions call the implementations directly when nothing needs
# the dispatcher: plain tensors, no torch.compile or torch.jit.trace tracing, no functorch transform,
# no dispatch or function mode. Otherwise (and always for torch.ops.pyvae.*) the registered op runs
# (a torch.jit.trace graph records it as pyvae::<op>, which runs wherever pyvae is imported). Both
# paths run the same implementation functions, so they give identical results.
_EAGER: Dict[str, Callable] = {}
_Parameter = torch.nn.Parameter


# torch.jit.is_tracing() less its Python frame (~60 ns of eager_ok's ~0.6 us, on every op call)
_jit_tracing = getattr(torch._C, "_is_tracing", torch.jit.is_tracing)


def tracing() -> bool:
    """Whether torch.compile or torch.jit.trace is recording this call: a value read on the host would
    enter the graph as a constant (NOTE: [Seeds under torch.compile] in reparameterize.py)."""
    return torch.compiler.is_compiling() or _jit_tracing()


def eager_ok(*tensors) -> bool:
    """True when the direct path of NOTE: [Eager fast path] is safe for these inputs."""
    if torch.compiler.is_compiling() or _jit_tracing():  # tracing(), inline
        return False
    for t in tensors:
        # nn.Parameter is a subclass without a __torch_function__ of its own: it takes this path too.
        if t is not None and type(t) is not torch.Tensor and type(t) is not _Parameter:
            return False
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    if torch._C._len_torch_dispatch_stack() > 0 or torch._C._is_torch_function_mode_enabled():
        return False
    return True


# NOTE: [torch.func]
# torch 2.13's torch.library.register_autograd builds an autograd.Function without setup_context, which
# torch.func transforms (grad, vjp, jacrev, vmap of a backward, ...) refuse with an error naming neither
# the op nor a way out. pyvae's ops use it (through ``register``), so under a transform they raise first,
# saying so: torch.autograd.grad on the same function computes the same first-order gradients.
def check_no_transform(name: str) -> None:
    # (torch.compile traces with functorch's machinery too: the registered op is what it must see)
    if torch._C._functorch.peek_interpreter_stack() is not None and not torch.compiler.is_compiling():
        raise RuntimeError(
            f"pyvae.{name}: torch.func transforms (grad, vjp, jacrev, jvp, vmap) are not supported by pyvae's "
            "ops; use torch.autograd.grad (or loss.backward()) for their first-order gradients")


def call(name: str, *args):
    """Runs op ``name``: directly in plain eager mode, else through torch.ops.pyvae."""
    if eager_ok(*(a for a in args if isinstance(a, torch.Tensor))):
        return _EAGER[name](*args)
    check_no_transform(name)
    return getattr(torch.ops.pyvae, name)(*args)


def eager_function(name: str, fwd, bwd, n_tensors: int):
    """The direct function of NOTE: [Eager fast path]: an ``autograd.Function.apply`` running ``fwd`` and, in
    backward, ``bwd(grad, *tensor inputs, *extras, mask)``."""
    class _Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            ctx.save_for_backward(*args[:n_tensors])
            ctx.extra = args[n_tensors:]
            return fwd(*args)

        @staticmethod
        def backward(ctx, grad):
            mask = [bool(m) for m in ctx.needs_input_grad[:n_tensors]]
            inputs = ctx.saved_tensors
            grads = first_order_only(name, bwd(grad, *inputs, *ctx.extra, mask), inputs)
            return tuple(g if m else None for g, m in zip(grads, mask)) + (None,) * len(ctx.extra)

    return _Fn.apply


# ---------------------------------------------------------------------------- registration
def register(name: str, schema: str, bwd_schema: str, *, impl, bwd_impl, fake, bwd_fake, n_tensors: int,
             n_optional: int = 0, fill: Optional[Callable] = None, eager=True,
             autograd: Optional[tuple] = None) -> None:
    """Defines ``pyvae::<name>`` and ``pyvae::<name>_backward``: CPU/CUDA kernels, fake kernels, autograd,
    and (``eager``) the direct function ``call`` uses (NOTE: [Eager fast path]).

    Args:
        schema, bwd_schema: the two schemas. The backward op takes ``(grad, *inputs, *extras,
            bool[] output_mask)`` and returns one tensor per tensor input.
        impl, bwd_impl, fake, bwd_fake: the implementations of the two ops.
        n_tensors: the op's leading tensor inputs (the rest, ``extras``, are passed back unchanged).
        n_optional: how many of those are ``Tensor?`` (the last ones). With none of them given, autograd
            calls ``pyvae::<name>_required_backward`` (NOTE: [No None in backward ops]), defined here
            from ``bwd_impl``; otherwise ``fill(*inputs)`` completes them for the backward op.
        autograd: ``(setup_context, backward)`` for an op whose backward op does not have the shape above.
        eager: True (the direct function is made from ``impl`` and ``bwd_impl``), False (none), or the
            direct function itself (an ``autograd.Function.apply`` taking the op's arguments).
    """
    LIB.define(schema)
    LIB.define(bwd_schema)
    for key in _DEVICE_KEYS:
        LIB.impl(name, impl, key)
        LIB.impl(name + "_backward", bwd_impl, key)
    torch.library.register_fake("pyvae::" + name, fake, lib=LIB)
    torch.library.register_fake("pyvae::" + name + "_backward", bwd_fake, lib=LIB)
    if n_optional:
        _define_required_backward(name, bwd_schema, n_tensors, n_optional, bwd_impl, bwd_fake)
    if eager is True:
        _EAGER[name] = eager_function(name, impl, bwd_impl, n_tensors)
    elif eager:
        _EAGER[name] = eager
    if autograd is None:
        autograd = _autograd(name, n_tensors, n_optional, fill)
    setup_context, backward = autograd
    torch.library.register_autograd("pyvae::" + name, backward, setup_context=setup_context, lib=LIB)


def _define_required_backward(name, bwd_schema, n_tensors, n_optional, bwd_impl, bwd_fake):
    """``<name>_required_backward(grad, *required inputs, bool[] output_mask)``: the backward op with every
    optional input absent (NOTE: [No None in backward ops])."""
    n_req = n_tensors - n_optional
    args = bwd_schema[bwd_schema.index("(") + 1:bwd_schema.index(")")].split(", ")
    outs = bwd_schema[bwd_schema.rindex("(") + 1:bwd_schema.rindex(")")].split(", ")
    req = ", ".join(args[:1 + n_req] + args[-1:])
    LIB.define(f"{name}_required_backward({req}) -> ({', '.join(outs[:n_req])})")

    def required_only(fn):
        def op(grad, *args):
            *inputs, mask = args
            output_mask(f"{name}_required_backward", mask, len(inputs))
            return fn(grad, *inputs, *([None] * n_optional), list(mask) + [False] * n_optional)[: len(inputs)]
        return op

    for key in _DEVICE_KEYS:
        LIB.impl(name + "_required_backward", required_only(bwd_impl), key)
    torch.library.register_fake("pyvae::" + name + "_required_backward", required_only(bwd_fake), lib=LIB)


def _autograd(name: str, n_tensors: int, n_optional: int, fill: Optional[Callable]):
    backward_op = getattr(torch.ops.pyvae, name + "_backward")
    required_op = getattr(torch.ops.pyvae, name + "_required_backward") if n_optional else None

    def setup_context(ctx, inputs, output):
        tensors = inputs[:n_tensors]
        ctx.present = [t is not None for t in tensors]
        ctx.save_for_backward(*(t for t in tensors if t is not None))
        ctx.extra = tuple(inputs[n_tensors:])

    def backward(ctx, grad):
        saved = iter(ctx.saved_tensors)
        # Pad to the op's full argument list: torch may hand over fewer entries when trailing optional
        # arguments were left at their default.
        inputs = ([next(saved) if p else None for p in ctx.present] + [None] * n_tensors)[:n_tensors]
        needs = (list(ctx.needs_input_grad) + [False] * n_tensors)[:n_tensors]
        mask = [bool(m) and t is not None for m, t in zip(needs, inputs)]
        if n_optional and all(t is None for t in inputs[-n_optional:]):
            req = inputs[:-n_optional]
            grads = tuple(first_order_only(name, required_op(grad, *req, *ctx.extra, mask[:-n_optional]), req)) \
                + (None,) * n_optional
        else:
            args = list(fill(*inputs)) if fill is not None else inputs
            grads = first_order_only(name, backward_op(grad, *args, *ctx.extra, mask), inputs)
        out = tuple(g if m else None for g, m in zip(grads, mask)) + (None,) * len(ctx.extra)
        return out[: len(ctx.needs_input_grad)]

    return setup_context, backward
