"""The fused linear layer op ``pyvae::linear_act``: y = act(x @ weight.T + bias).

Math: csrc/ops/activation.h; epilogue kernels: csrc/cpu/linear.cpp, csrc/cuda/linear.cu; tests:
tests/test_linear_act.py; benchmark: ``pyvae bench mlp``.

GEMMs are library GEMMs: on CPU oneDNN for float32 (NOTE: [CPU GEMM backend] in pyvae/_gemm.py),
torch's mm otherwise; on CUDA cuBLASLt with its bias / ReLU / bias-gradient epilogues
(pyvae/_cublaslt.py, NOTE: [cuBLASLt path] in csrc/cuda/linear_lt.cu), or torch's cuBLAS mm where
that path is unavailable; the bias + activation epilogue (forward) and
the activation-gradient + bias-gradient pass (backward) are pyvae kernels (csrc/cpu/linear.cpp,
csrc/cuda/linear.cu) with the math of csrc/ops/activation.h. The backward needs only x, weight and
the output y (NOTE: [Derivative from the output] in that header): no pre-activation is saved.

Mixed precision: under ``torch.autocast`` (CPU bfloat16, CUDA float16/bfloat16) x, weight and bias
are cast to the autocast dtype, the GEMMs run in it, the epilogue computes in float32 and the
output has the autocast dtype; parameters stay float32 (their gradients are cast back by autograd).
"""
from __future__ import annotations

import contextlib
import threading
from typing import Optional

import torch

from .. import _cublaslt, _gate, _gemm, _tune, reference
from . import _checks as V
from ._rowwise import forget_row_routes
from ._registry import ROUTING, LIB, check_no_transform, eager_ok, first_order_only, register, remember

__all__ = ["linear_act", "ACTIVATIONS", "fused_only", "forget_routes", "ROUTES", "run_route", "release_workspace"]

ACTIVATIONS = dict(_gate.ACTIVATIONS)  # name -> the kernels' code (csrc/ops/activation.h)
_IDENTITY = ACTIVATIONS["identity"]
_ACT_NAMES = {code: name for name, code in ACTIVATIONS.items()}
_OP = "linear_act"


_FAST_DTYPES = (torch.float32, torch.bfloat16, torch.float64, torch.float16)


_CASTABLE = (torch.float32, torch.bfloat16, torch.float16)  # what autocast lowers


def _fast_valid(x, weight, bias, activation, autocast: bool = False) -> bool:
    """The common, valid CPU case in one expression (a few us less per call at small batch than the
    named checks of ``_check``). ``autocast``: dtypes may differ if all are ones autocast casts."""
    return (isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor) and type(activation) is str
            and activation in ACTIVATIONS
            and weight.dim() == 2 and x.dim() >= 1 and x.shape[-1] == weight.shape[1] and x.is_cpu and weight.is_cpu
            and ((x.dtype in _CASTABLE and weight.dtype in _CASTABLE) if autocast
                 else (x.dtype in _FAST_DTYPES and weight.dtype == x.dtype))
            and (bias is None or (isinstance(bias, torch.Tensor) and bias.dim() == 1
                                  and ((bias.dtype in _CASTABLE) if autocast else (bias.dtype == x.dtype))
                                  and bias.shape[0] == weight.shape[0] and bias.is_cpu)))


def _check(x, weight, bias, activation):
    if _fast_valid(x, weight, bias, activation):
        return
    # Anything else (including every invalid input): checks that name the problem.
    op = _OP
    V.tensor("x", x, op=op)
    V.tensor("weight", weight, op=op)
    if weight.dim() != 2:
        raise ValueError(f"pyvae.{op}: weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    named = [("x", x), ("weight", weight)]
    if bias is not None:
        V.tensor("bias", bias, op=op)
        if bias.dim() != 1 or bias.shape[0] != weight.shape[0]:  # (not Size == tuple: slow sym_eq)
            raise ValueError(
                f"pyvae.{op}: bias must have shape [out_features] = [{weight.shape[0]}], got {tuple(bias.shape)}"
            )
        named.append(("bias", bias))
    V.same_dtype_device(named, op=op)
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"pyvae.{op}: x has {x.shape[-1]} features (last dim of shape {tuple(x.shape)}) but weight expects "
            f"in_features = {weight.shape[1]}"
        )
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"pyvae.{op}: activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    _gate.check_device(op, x.device)


def _linear_act_impl(x, weight, bias, activation):
    _check(x, weight, bias, activation)
    return _forward(x, weight, bias, ACTIVATIONS[activation])


def _rows(t: torch.Tensor) -> int:
    """The rows of ``t`` as a 2-D [rows, features] matrix (its leading dims' product)."""
    return V.numel(t.shape[:-1])


def _forward(x, weight, bias, act, onednn=None):
    """The forward of a validated call (``act`` = ACTIVATIONS code; ``onednn=False``: torch's GEMMs)."""
    flat = x.dim() == 2
    x2 = x if flat else x.reshape(_rows(x), x.shape[-1])  # (not -1: a dim may be 0)
    cpu = x2.is_cpu
    if not cpu and _cublaslt.available():
        # cuBLASLt: bias (and ReLU) in the GEMM's epilogue, pyvae's kernel for the other activations.
        r = _cublaslt.linear_fwd(x2.contiguous(), weight.contiguous(),
                                 None if bias is None else bias.contiguous(), act)
        if r is not None:
            return r[0] if flat else r[0].view(*x.shape[:-1], weight.shape[0])
    if act != _IDENTITY and cpu:
        # oneDNN fuses bias and activation into the GEMM where it can (tanh, sigmoid; not relu: POST_OPS in _gemm.py).
        y = _gemm.linear_post_op(x2, weight, bias, _ACT_NAMES[act], onednn)
        if y is not None:
            return y if flat else y.view(*x.shape[:-1], weight.shape[0])
    if act == _IDENTITY and bias is not None:
        # No activation: the library GEMM adds the bias itself, saving our epilogue pass.
        y = _gemm.linear(x2, weight, bias, onednn)
        return y if flat else y.view(*x.shape[:-1], weight.shape[0])
    y = _gemm.linear(x2, weight, None, onednn)
    if act != _IDENTITY and y.numel() > 0:
        # The epilogue kernels' dtypes (float16 on CPU is computed in float32); the kernel reads the
        # bias as a dense vector, so a strided one (a view with steps, an expanded one) is packed first.
        kd = _gate.kernel_dtype(y.dtype, y.device, "linear")
        yk = y if kd == y.dtype else y.to(kd)
        bk = None if bias is None else bias.to(kd).contiguous()
        _gate.bias_act_fwd(y=yk, bias=bk, act=act)
        if yk is not y:
            y.copy_(yk)
    return y if flat else y.view(*x.shape[:-1], weight.shape[0])


# NOTE: [Backward workspace]
# Two temporaries of a layer's CPU backward never leave it: dL/d(pre) of an activated layer (read by the
# input- and weight-gradient GEMMs) and its transposed copy for the weight-gradient GEMM (NOTE: [CPU GEMM
# backend]); both are dead once the GEMMs return, which on the CPU is when their results exist. Taken
# fresh each step, their pages are faulted in again on every step (at B=8192 ~75 MB a step for the paper's
# model, where glibc maps blocks over its threshold afresh). So each thread keeps one buffer per (role,
# shape, dtype) and the next backward of that shape reuses it: the layers of a backward run one after
# another on a thread, and a role never serves two tensors of one call. Measured on the AMD EPYC (one
# process, on/off alternated, medians of 6): the fp32 training step 29.85 -> 29.25 ms at B=1024 and
# 191.1 -> 187.2 ms at B=8192. Bounded: at most 16 buffers and 256 MB a thread (beyond that, fresh
# tensors); CUDA (stream-ordered memory, its own caching allocator) always takes fresh ones.
_WORKSPACE = threading.local()
WORKSPACE = {"enabled": True, "max_bytes": 256 << 20, "max_buffers": 16}


def _scratch(role: str, shape, dtype, device) -> torch.Tensor:
    """A CPU buffer for a temporary of ``_backward_core`` that never leaves it (NOTE: [Backward
    workspace]); a fresh tensor on CUDA, with the workspace disabled, or past its bounds."""
    if device.type != "cpu" or not WORKSPACE["enabled"]:
        return torch.empty(shape, dtype=dtype, device=device)
    bufs = getattr(_WORKSPACE, "bufs", None)
    if bufs is None:
        bufs = _WORKSPACE.bufs = {}
    key = (role, shape, dtype)
    t = bufs.get(key)
    if t is None:
        t = torch.empty(shape, dtype=dtype)
        held = sum(b.nbytes for b in bufs.values())
        if len(bufs) < WORKSPACE["max_buffers"] and held + t.nbytes <= WORKSPACE["max_bytes"]:
            bufs[key] = t
    return t


def release_workspace() -> None:
    """Frees this thread's backward workspace (NOTE: [Backward workspace]); it refills on the next backward."""
    _WORKSPACE.bufs = {}


def _backward_core(grad, x, weight, out, has_bias, act, mask, onednn=None):
    """Gradients (x, weight, bias) of y = act(x @ weight.T + b), None where ``mask`` (or no bias) says
    not needed. Inputs are already validated (by the forward or the op wrapper below)."""
    in_features, out_features = weight.shape[1], weight.shape[0]
    flat = x.dim() == 2
    g2 = grad if grad.dim() == 2 else grad.reshape(_rows(grad), out_features)
    if g2.dtype != x.dtype:
        g2 = g2.to(x.dtype)
    if not g2.is_contiguous():
        g2 = g2.contiguous()
    x2 = x if flat else x.reshape(_rows(x), in_features)
    rows = g2.shape[0]
    need_bias = bool(has_bias and mask[2])
    cpu = g2.is_cpu
    if not cpu and _cublaslt.available():
        y2 = None if act == _IDENTITY else out.reshape(_rows(out), out_features).contiguous()
        r = _cublaslt.linear_bwd(g2, x2.contiguous(), weight.contiguous(), y2, act, bool(mask[0]), bool(mask[1]),
                                 need_bias)
        if r is not None:
            gx, gw, gb = r
            return (None if gx is None else (gx if flat else gx.view(*x.shape[:-1], in_features)), gw,
                    None if gb is None else gb.to(weight.dtype))
    # The epilogue kernels' dtypes (float16 on CPU is computed in float32).
    kd = _gate.kernel_dtype(g2.dtype, g2.device, "linear")
    grad_bias = torch.empty(out_features, dtype=kd, device=x.device) if need_bias else None
    # The weight gradient's GEMM wants dL/d(pre) transposed (NOTE: [CPU GEMM backend]): the epilogue
    # kernel writes it too, in the same pass.
    g_t = _scratch("g_t", (out_features, rows), kd, x.device) \
        if cpu and mask[1] and kd == g2.dtype and rows > 0 and _gemm.wants_transposed_grad(g2, in_features, onednn) else None
    # dL/d(pre) row-major is for the input gradient, and for the weight gradient unless g_t serves it.
    need_pre = mask[0] or (mask[1] and g_t is None)
    if act == _IDENTITY:
        grad_pre = g2
        if need_bias or g_t is not None:
            gk = g2 if kd == g2.dtype else g2.to(kd)  # kept alive until the kernel has run
            _gate.act_bwd(act=act, grad_y=gk, grad_bias=grad_bias, grad_pre_t=g_t,
                          workspace=None if cpu or not need_bias else _gate.act_bwd_workspace(gk))
    else:
        gk = g2 if kd == g2.dtype else g2.to(kd)
        yk = out if out.dim() == 2 else out.reshape(_rows(out), out_features)
        if yk.dtype != kd:
            yk = yk.to(kd)
        if not yk.is_contiguous():
            yk = yk.contiguous()
        grad_pre = _scratch("pre", tuple(gk.shape), kd, x.device) if need_pre else None
        if need_pre or need_bias or g_t is not None:
            _gate.act_bwd(act=act, grad_y=gk, out=yk, grad_pre=grad_pre, grad_bias=grad_bias, grad_pre_t=g_t,
                          workspace=None if cpu or not need_bias else _gate.act_bwd_workspace(gk))
        if grad_pre is not None and grad_pre.dtype != x.dtype:
            grad_pre = grad_pre.to(x.dtype)
    # The weight gradient first, so that g_t is freed before the input gradient is allocated (at
    # B=8192 on dec2: 26 of the 44 MB peak of this backward).
    grad_w = _gemm.grad_weight(grad_pre if grad_pre is not None else g2, x2, g_t, onednn) if mask[1] else None
    del g_t
    grad_x = None
    if mask[0]:
        grad_x = _gemm.grad_input(grad_pre, weight, onednn)
        if not flat:
            grad_x = grad_x.view(*x.shape[:-1], in_features)
    grad_b = None
    if need_bias:
        grad_b = grad_bias if grad_bias.dtype == weight.dtype else grad_bias.to(weight.dtype)
    return grad_x, grad_w, grad_b


def _check_backward(grad, x, weight, out, activation, output_mask):
    """The backward op's inputs (public through torch.ops.pyvae): x and weight as the forward's, grad of
    the output's shape, out too (unless identity, which does not read it), three mask entries."""
    op = _OP + "_backward"
    _check(x, weight, None, activation)
    want = (*x.shape[:-1], weight.shape[0])
    V.tensor("grad", grad, op=op)
    if tuple(grad.shape) != want or grad.device != x.device:
        raise ValueError(f"pyvae.{op}: grad must have the output's shape {want} on {x.device} (x {tuple(x.shape)}, "
                         f"weight {tuple(weight.shape)}), got {tuple(grad.shape)} on {grad.device}")
    if ACTIVATIONS[activation] != _IDENTITY:
        V.tensor("out", out, op=op)
        if out.dtype != x.dtype:
            raise TypeError(f"pyvae.{op}: out (the forward's output) must have x's dtype {x.dtype}, got {out.dtype}")
        if tuple(out.shape) != want or out.device != x.device:
            raise ValueError(f"pyvae.{op}: out (the forward's output) must have shape {want} on {x.device}, got "
                             f"{tuple(out.shape)} on {out.device}")
    if len(output_mask) != 3:
        raise ValueError(f"pyvae.{op}: output_mask must have 3 entries (x, weight, bias), got {len(output_mask)}")


def _linear_act_backward_impl(grad, x, weight, out, has_bias, activation, output_mask):
    _check_backward(grad, x, weight, out, activation, output_mask)
    gx, gw, gb = _backward_core(grad, x, weight, out, has_bias, ACTIVATIONS[activation], output_mask)
    # NOTE: [No None in backward ops] in pyvae/ops/_registry.py: 1-element placeholders for unneeded gradients.
    return (x.new_zeros(1) if gx is None else gx, weight.new_zeros(1) if gw is None else gw,
            weight.new_zeros(1) if gb is None else gb)


def _linear_act_fake(x, weight, bias, activation):
    _check(x, weight, bias, activation)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _linear_act_backward_fake(grad, x, weight, out, has_bias, activation, output_mask):
    _check_backward(grad, x, weight, out, activation, output_mask)
    return (
        x.new_empty(x.shape) if output_mask[0] else x.new_zeros(1),
        weight.new_empty(weight.shape) if output_mask[1] else weight.new_zeros(1),
        weight.new_empty(weight.shape[0]) if (has_bias and output_mask[2]) else weight.new_zeros(1),
    )


def _save(ctx, x, weight, bias, activation, output, onednn=None, uncast=()):
    """What every backward of linear_act reads (the dispatcher's and both direct functions'): x, weight,
    the output, then for the double-backward guard only the bias and ``uncast`` (the autocast function's
    own x and weight)."""
    ctx.activation, ctx.act, ctx.has_bias = activation, ACTIVATIONS[activation], bias is not None
    ctx.onednn = onednn
    # The output is needed only for the activation's derivative (identity needs nothing of it). The
    # gradients never read the bias, but FirstOrderOnly must take it (NOTE: [No double backward] in
    # pyvae/ops/_registry.py): autograd runs a node only where it leads to a tensor being differentiated,
    # so a guard on x and weight alone is skipped (or not made, both frozen) when only the bias is.
    ctx.save_for_backward(x, weight, output if ctx.act != _IDENTITY else None, bias, *uncast)


def _setup_context(ctx, inputs, output):
    _save(ctx, *inputs, output)


def _backward(ctx, grad, direct: bool = False):
    x, weight, out, bias = ctx.saved_tensors
    mask = [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1]), bool(ctx.needs_input_grad[2])]
    if out is None:
        out = x.new_zeros(1)
    bwd = _linear_act_backward_impl if direct else torch.ops.pyvae.linear_act_backward
    # NOTE: [No double backward] in pyvae/ops/_registry.py
    gx, gw, gb = first_order_only(
        _OP, bwd(grad, x, weight, out, ctx.has_bias, ctx.activation, mask), (x, weight, bias)
    )
    return (gx if mask[0] else None, gw if mask[1] else None, gb if (mask[2] and ctx.has_bias) else None, None)


register(
    _OP,
    "linear_act(Tensor x, Tensor weight, Tensor? bias, str activation) -> Tensor",
    "linear_act_backward(Tensor grad, Tensor x, Tensor weight, Tensor out, bool has_bias, str activation,"
    " bool[] output_mask) -> (Tensor, Tensor, Tensor)",
    impl=_linear_act_impl, bwd_impl=_linear_act_backward_impl, fake=_linear_act_fake,
    bwd_fake=_linear_act_backward_fake, n_tensors=3, eager=False, autograd=(_setup_context, _backward),
)


# NOTE: [FLOP counts]
# torch.utils.flop_counter.FlopCounterMode counts the matrix products of torch's own ops and 0 for a custom op
# without a formula: a pyvae model counted 0 FLOPs. (Under the mode, a dispatch mode, the layers run the
# registered ops.) Forward is one [rows, in] x [in, out] product; backward one for each of x's and weight's
# gradients it computes. Like torch's formula for addmm, the bias and activation count nothing.
def _shape_rows(x_shape) -> int:
    n = 1
    for d in x_shape[:-1]:
        n *= d
    return n


def _linear_act_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * _shape_rows(x_shape) * w_shape[0] * w_shape[1]


def _linear_act_backward_flops(grad_shape, x_shape, w_shape, out_like, has_bias, activation, output_mask, *args,
                               out_shape=None, **kwargs) -> int:
    return 2 * _shape_rows(x_shape) * w_shape[0] * w_shape[1] * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


try:
    from torch.utils.flop_counter import register_flop_formula as _register_flop_formula
except ImportError:  # an older torch: nothing to register with
    _register_flop_formula = None
if _register_flop_formula is not None:
    _register_flop_formula(torch.ops.pyvae.linear_act)(_linear_act_flops)
    _register_flop_formula(torch.ops.pyvae.linear_act_backward)(_linear_act_backward_flops)


def _autocast_cast(t, dtype):
    """What autocast does to one input of a lower-precision op: floating tensors other than float64
    are cast to the autocast dtype; float64 (and None, and anything not a tensor, for the checks to name) pass
    through, as for nn.Linear."""
    if not isinstance(t, torch.Tensor) or t.dtype == torch.float64 or not t.is_floating_point():
        return t
    return t.to(dtype)


def _make_autocast(device_type: str):
    key = {"cpu": torch._C.DispatchKey.AutocastCPU, "cuda": torch._C.DispatchKey.AutocastCUDA}[device_type]

    def autocast_impl(x, weight, bias, activation):
        dt = torch.get_autocast_dtype(device_type)
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            return torch.ops.pyvae.linear_act(
                _autocast_cast(x, dt), _autocast_cast(weight, dt), _autocast_cast(bias, dt), activation
            )

    return autocast_impl


LIB.impl(_OP, _make_autocast("cpu"), "AutocastCPU")
LIB.impl(_OP, _make_autocast("cuda"), "AutocastCUDA")


def _on_threads(threads, fn, *args):
    """``fn(*args)`` with torch's intra-op thread count lowered to ``threads`` for the call (None: as is);
    see NOTE: [Layer routes] ("pyvae-1t"). torch.set_num_threads costs ~0.1 us a call here."""
    if threads is None:
        return fn(*args)
    prev = torch.get_num_threads()
    if threads >= prev:
        return fn(*args)
    torch.set_num_threads(threads)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(prev)


class _LinearActFunction(torch.autograd.Function):
    """The direct eager path (NOTE: [Eager fast path] in pyvae/ops/_registry.py) of pyvae::linear_act, for
    inputs ``linear_act`` has already validated."""

    @staticmethod
    def forward(ctx, x, weight, bias, activation, onednn=None, threads=None):
        out = _on_threads(threads, _forward, x, weight, bias, ACTIVATIONS[activation], onednn)
        _save(ctx, x, weight, bias, activation, out, onednn)
        ctx.threads = threads
        return out

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():  # create_graph=True: the checked path, which refuses double backward
            return (*_backward(ctx, grad, direct=True), None, None)
        x, weight, out, _ = ctx.saved_tensors
        gx, gw, gb = _on_threads(ctx.threads, _backward_core, grad, x, weight, out, ctx.has_bias, ctx.act,
                                 ctx.needs_input_grad, ctx.onednn)
        return gx, gw, gb, None, None, None


class _LinearActAutocastFunction(torch.autograd.Function):
    """The direct eager path under autocast: casts to ``dtype`` inside, so the graph has one node per
    layer instead of one plus a cast node per input; gradients are cast back to each input's dtype, as
    the cast nodes of the dispatcher path would do."""

    @staticmethod
    def forward(ctx, x, weight, bias, activation, dtype, checked, onednn=None, threads=None):
        xc, wc, bc = _autocast_cast(x, dtype), _autocast_cast(weight, dtype), _autocast_cast(bias, dtype)
        # checked: linear_act's _fast_valid(autocast=True) passed, so the casts are valid inputs too.
        if not checked:
            _check(xc, wc, bc, activation)
        out = _on_threads(threads, _forward, xc, wc, bc, ACTIVATIONS[activation], onednn)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        # The casts carry no autograd history: the guard of backward needs the inputs themselves (the uncast
        # bias is saved; x and weight only if they need grad, so a float32 batch is not kept alive for it).
        _save(ctx, xc, wc, bias, activation, out, onednn,
              (x if x.requires_grad else None, weight if weight.requires_grad else None))
        ctx.threads = threads
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, out, *guard = ctx.saved_tensors  # guard: the uncast bias, x and weight
        grads = _on_threads(ctx.threads, _backward_core, grad, x, weight, out, ctx.has_bias, ctx.act,
                            ctx.needs_input_grad[:3], ctx.onednn)
        grads = [g if g is None or g.dtype == dt else g.to(dt) for g, dt in zip(grads, ctx.dtypes)]
        if torch.is_grad_enabled():  # create_graph=True: NOTE: [No double backward] in pyvae/ops/_registry.py
            idx = [i for i, g in enumerate(grads) if g is not None]
            wrapped = first_order_only(_OP, [grads[i] for i in idx], guard)
            for i, g in zip(idx, wrapped):
                grads[i] = g
        return (*grads, None, None, None, None, None)


# NOTE: [Layer routes]
# An eager CPU call of linear_act can run three ways, all computing act(x @ W.T + b):
#   "torch"     torch's own F.linear + activation (C++ autograd, MKL or oneDNN as torch picks);
#   "pyvae"     pyvae's fused node: GEMMs on oneDNN for float32 products of 8 MFLOP and more
#               (NOTE: [CPU GEMM backend] in pyvae/_gemm.py), the epilogue kernels of csrc/cpu/linear.cpp;
#   "pyvae-mm"  the same node with every GEMM on torch's mm (float32 only: else it is "pyvae");
#   "pyvae-1t"  the "pyvae" node with its GEMMs and kernels on one thread (a candidate only where torch runs
#               more than one): a narrow layer's products at small batch can be too small to share. In
#               separate processes on the AMD EPYC one thread ran 20->500 tanh at B=100 in 0.27 ms against
#               two threads' 0.44 (stop 10); lowered inside a two-thread process it never won a layer there
#               (stop 11: 1.2-1.9x slower, bench/RESULTS.md), so it stays a measured candidate, for
#               machines where it wins. The count is torch's process-wide setting, lowered for the node's
#               forward and backward calls and restored after; torch's own route cannot take it (its
#               backward runs in torch's engine).
# Which is fastest depends on the CPU (on a Zen 5 AMD EPYC "pyvae" is 2x eager in float32, on a Zen 4 one
# 1.05-1.3x from B=1024, on an Intel Xeon with AVX-512 MKL it loses 8-15%), the shape, the dtype and
# autocast. So the route of each shape class
# (dtype, autocast dtype, in/out features, activation, bias, rows rounded up to a power of two, training
# or inference) is measured the first time it is seen (NOTE: [Measured routes] in pyvae/_tune.py) and
# kept; "torch" is always a candidate, so a layer is never slower than eager beyond measurement noise.
# With PYVAE_TUNE=off the cold-start rule applies: "torch" for identity layers whose GEMMs pyvae would
# run on torch's mm anyway (bf16/fp16/fp64, float32 under the oneDNN threshold: nothing to fuse, and
# torch's C++ autograd node costs ~10 us less per layer than pyvae's Python one), "pyvae" otherwise.
# CUDA calls and the registered op (torch.ops.pyvae.linear_act, torch.compile, opcheck) always run
# pyvae's kernels. One visible difference: the "torch" route supports double backward, pyvae's node
# refuses it (NOTE: [No double backward] in pyvae/ops/_registry.py). ``fused_only()`` turns the routing
# off ("pyvae" always: the kernel tests, benchmarks of the kernels themselves). A pinned route (a resumed
# training run's own, NOTE: [Routes of a run] in pyvae/_tune.py) comes before all of these. Inside
# ``pyvae.VAE``'s one-node step, a mix of routes is raced once more as a whole (NOTE: [Step routes] in
# pyvae/ops/vae_step.py).
_route = ROUTING  # shared with the row ops (NOTE: [Row op routes] in _rowwise.py)
_ROUTES: dict = {}  # shape class -> route, this process (pyvae/_tune.py holds the measured ones)
ROUTES = ("torch", "pyvae", "pyvae-mm", "pyvae-1t")
# A one-node VAE step's layer routes (NOTE: [Step routes] in pyvae/ops/vae_step.py), by its shape class and
# its layers' own routes, this process; forgotten with the layers'.
STEP_ROUTES: dict = {}


def _cold_route(rows, fin, fout, activation, dtype) -> str:
    """The route without measurements (PYVAE_TUNE=off); see NOTE: [Layer routes]."""
    if activation != "identity":
        return "pyvae"
    if dtype not in _gemm.ONEDNN_DTYPES:
        return "torch"
    return "pyvae" if _gemm.uses_onednn(dtype, 2.0 * rows * fin * fout) else "torch"


def _route_for(x, weight, bias, activation, dtype, amp) -> str:
    """The route of this valid eager call (NOTE: [Layer routes]); ``dtype``: its GEMMs' dtype, ``amp``: the
    autocast dtype or None."""
    if _route["fused_only"] or not x.is_cpu:
        return "pyvae"
    fin = weight.shape[1]
    rows = x.numel() // fin if fin else 0
    train = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                         or (bias is not None and bias.requires_grad))
    return _route_of(rows, x.dtype, x.requires_grad, weight, bias, activation, dtype, amp, train)


def route_of(rows: int, x_requires_grad: bool, weight: torch.Tensor, bias: Optional[torch.Tensor],
             activation: str, amp: Optional[torch.dtype] = None, x_dtype: Optional[torch.dtype] = None) -> str:
    """The route (NOTE: [Layer routes]) ``linear_act`` would take in a training step for a float CPU input of
    ``rows`` rows (of ``x_dtype``, default weight's dtype), with CPU autocast to ``amp`` or without autocast
    (None): the layer routes of a one-node VAE step (NOTE: [One-node VAE step] in pyvae/ops/vae_step.py), so
    that it runs each layer as the layer itself would run."""
    if _route["fused_only"]:
        return "pyvae"
    return _route_of(rows, x_dtype or weight.dtype, x_requires_grad, weight, bias, activation, amp or weight.dtype,
                     amp, True)


def route_key(rows: int, weight: torch.Tensor, bias: Optional[torch.Tensor], activation: str,
              amp: Optional[torch.dtype] = None) -> str:
    """The route cache's key of the shape class of ``route_of``'s call (pyvae/_tune.py)."""
    return _key(weight.shape[1], weight.shape[0], activation, bias is not None, amp or weight.dtype, amp,
                1 << max(rows - 1, 0).bit_length(), True)


def _key(fin, fout, activation, has_bias, dtype, amp, bucket, train) -> str:
    return (f"linear_act {fin}->{fout} {activation}{'' if has_bias else ' nobias'} "
            f"{str(dtype).replace('torch.', '')}{' autocast' if amp is not None else ''} "
            f"rows<={bucket} {'train' if train else 'infer'}")


def _route_of(rows, x_dtype, x_requires_grad, weight, bias, activation, dtype, amp, train) -> str:
    fin, fout = weight.shape[1], weight.shape[0]
    bucket = 1 << max(rows - 1, 0).bit_length()
    # (the thread count too: a route raced on two threads is not the answer on one, NOTE: [Measured routes])
    k = (dtype, amp, fin, fout, activation, bias is not None, bucket, train, torch.get_num_threads())
    r = _ROUTES.get(k)
    if r is None:
        key = _key(fin, fout, activation, bias is not None, dtype, amp, bucket, train)
        r = _tune.pin(key)  # a resumed run's own routes first (NOTE: [Routes of a run] in pyvae/_tune.py)
        if r not in ROUTES:
            if rows == 0 or not _tune.enabled():
                r = _cold_route(rows, fin, fout, activation, dtype)
            else:
                r = _tune.lookup(key) or _measure_route(key, x_dtype, x_requires_grad, weight, bias, activation,
                                                        dtype, amp, rows, train)
        _tune.note(key, r)
        remember(_ROUTES, k, r, 1024)  # (the measured routes stay cached in pyvae/_tune.py)
    return r


_ENGINE = getattr(torch.autograd.Variable, "_execution_engine", None)


def _backward_from(y, gy) -> None:
    """``y.backward(gy)`` straight into autograd's engine, for timing routes (NOTE: [Measured routes] in
    pyvae/_tune.py). ``Tensor.backward`` with a gradient runs Python shape checks first: ~20 us a call
    (10% of a 500->40 layer at B=100, a cost no layer has inside a training step, whose backward starts
    from a scalar loss), and on its first call they import torch's symbolic shapes and with them sympy,
    0.3-0.45 s of ``pyvae tune`` (torch 2.13) that the training step itself never imports."""
    if _ENGINE is None:  # not in this torch: the public call
        y.backward(gy)
    else:
        _ENGINE.run_backward((y,), (gy,), False, False, (), allow_unreachable=True, accumulate_grad=True)


def _measure_route(key, x_dtype, x_requires_grad, weight, bias, activation, dtype, amp, rows, train) -> str:
    """Times the routes of NOTE: [Layer routes] on tensors of this call's shape and dtypes."""
    gen = torch.Generator().manual_seed(0)
    fin, fout = weight.shape[1], weight.shape[0]
    xs = torch.randn(rows, fin, generator=gen).to(x_dtype).requires_grad_(x_requires_grad and train)
    ws = (torch.randn(fout, fin, generator=gen) * fin ** -0.5).to(weight.dtype).requires_grad_(train)
    bs = None if bias is None else torch.randn(fout, generator=gen).to(bias.dtype).requires_grad_(train)
    gy = torch.randn(rows, fout, generator=gen).to(amp or dtype)
    torch_act = reference.ACTIVATIONS[activation]
    leaves = [t for t in (xs, ws, bs) if t is not None and t.requires_grad]

    def run(fn):
        def call():
            for t in leaves:
                t.grad = None
            with torch.set_grad_enabled(train), (torch.autocast("cpu", dtype=amp) if amp is not None
                                                 else contextlib.nullcontext()):
                y = fn()
                if train:
                    _backward_from(y, gy)
        return call

    def pyvae(onednn, threads=None):
        if amp is not None:
            return lambda: _LinearActAutocastFunction.apply(xs, ws, bs, activation, amp, True, onednn, threads)
        return lambda: _LinearActFunction.apply(xs, ws, bs, activation, onednn, threads)

    candidates = {"torch": run(lambda: torch_act(torch.nn.functional.linear(xs, ws, bs))), "pyvae": run(pyvae(None))}
    if dtype in _gemm.ONEDNN_DTYPES and _gemm.onednn_enabled():
        candidates["pyvae-mm"] = run(pyvae(False))
    if torch.get_num_threads() > 1:
        candidates["pyvae-1t"] = run(pyvae(None, 1))
    return _tune.decide(key, candidates, what=key)


_TORCH_ACT_BACKWARD = {  # what torch's autograd runs for each activation's backward (from its output)
    "tanh": torch.ops.aten.tanh_backward,
    "sigmoid": torch.ops.aten.sigmoid_backward,
    "relu": lambda g, y: torch.ops.aten.threshold_backward(g, y, 0),
}


def forward_on_route(route: str, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     activation: str):
    """``(y, pre)``: y = act(x @ weight.T + bias) computed as ``route`` computes it, without autograd, for a
    valid 2-D float CPU call whose tensors have the dtype its GEMMs run in (the layers of a one-node VAE step,
    NOTE: [One-node VAE step] in pyvae/ops/vae_step.py; under autocast, the node's casts); ``pre`` is the
    pre-activation where ``backward_on_route`` needs it (torch's softplus), else None."""
    if route == "torch":  # F.linear and the activation, as torch's own route runs them
        y = torch.nn.functional.linear(x, weight, bias)
        if activation == "identity":
            return y, None
        if activation == "softplus":
            return torch.nn.functional.softplus(y), y
        return getattr(torch, activation + "_")(y), None  # in place: y's values are torch's out-of-place ones
    return _on_threads(1 if route == "pyvae-1t" else None, _forward, x, weight, bias, ACTIVATIONS[activation],
                       False if route == "pyvae-mm" else None), None


def backward_on_route(route: str, grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, y: torch.Tensor,
                      pre: Optional[torch.Tensor], has_bias: bool, activation: str, mask):
    """``(grad_x, grad_weight, grad_bias)`` of ``forward_on_route``'s call from the gradient of its output (None
    where ``mask`` says not needed), as ``route`` computes them: torch's route with the ops of torch's autograd
    formulas (addmm's and the activation's), pyvae's with its node's backward."""
    if route != "torch":
        return _on_threads(1 if route == "pyvae-1t" else None, _backward_core, grad, x, weight, y, has_bias,
                           ACTIVATIONS[activation], mask, False if route == "pyvae-mm" else None)
    if activation == "identity":
        gp = grad
    elif activation == "softplus":
        gp = torch.ops.aten.softplus_backward(grad, pre, 1.0, 20.0)
    else:
        gp = _TORCH_ACT_BACKWARD[activation](grad, y)
    gw = gp.t().mm(x) if mask[1] else None
    gb = gp.sum(0) if has_bias and mask[2] else None
    gx = gp.mm(weight) if mask[0] else None
    return gx, gw, gb


class fused_only:
    """Context manager: every eager ``linear_act`` call runs pyvae's fused node and every row op (KL, Bernoulli
    and Gaussian log-densities) pyvae's kernel, none torch's ops (NOTE: [Layer routes], NOTE: [Row op
    routes] in _rowwise.py). Not thread-safe; restores the previous setting on exit."""

    def __enter__(self):
        self._saved = _route["fused_only"]
        _route["fused_only"] = True
        return self

    def __exit__(self, *exc):
        _route["fused_only"] = self._saved
        return False


def forget_routes() -> None:
    """Forgets this process's layer and row-op routes (tests, ``pyvae tune``); the measured ones stay in
    pyvae/_tune.py."""
    _ROUTES.clear()
    STEP_ROUTES.clear()
    forget_row_routes()


def run_route(route: str, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
              activation: str = "identity") -> torch.Tensor:
    """``linear_act`` on one named route of NOTE: [Layer routes] (``ROUTES``), whatever is measured or
    cached: for benchmarks and tests that compare the routes. Eager CPU calls only; under autocast the
    route runs in the autocast dtype as ``linear_act`` would."""
    if route not in ROUTES:
        raise ValueError(f"pyvae.run_route: route must be one of {ROUTES}, got {route!r}")
    amp = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
    if amp is None:
        _check(x, weight, bias, activation)
    elif not _fast_valid(x, weight, bias, activation, autocast=True):
        # Under autocast the inputs' dtypes may differ (a bfloat16 activation into a float32 layer), as for
        # linear_act: the checks are of what the casts give.
        _check(_autocast_cast(x, amp), _autocast_cast(weight, amp), _autocast_cast(bias, amp), activation)
    return _run_route(route, x, weight, bias, activation, amp)


def _run_route(route, x, weight, bias, activation, amp, checked=True):
    if route == "torch":  # autocast (when on) casts for F.linear
        return reference.ACTIVATIONS[activation](torch.nn.functional.linear(x, weight, bias))
    onednn = False if route == "pyvae-mm" else None
    threads = 1 if route == "pyvae-1t" else None
    if amp is not None:
        return _LinearActAutocastFunction.apply(x, weight, bias, activation, amp, checked, onednn, threads)
    return _LinearActFunction.apply(x, weight, bias, activation, onednn, threads)


def linear_act(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
               activation: str = "identity") -> torch.Tensor:
    """y = act(x @ weight.T + bias), fused epilogue, differentiable in x, weight and bias.

    Args:
        x: ``[..., in_features]`` float tensor.
        weight: ``[out_features, in_features]`` (``nn.Linear`` layout).
        bias: ``[out_features]`` or None.
        activation: one of "identity", "relu", "tanh", "sigmoid", "softplus".

    Returns:
        ``[..., out_features]``.

    In eager mode on CPU, each shape class runs the fastest of pyvae's fused layer and torch's own
    F.linear + activation, measured on this machine the first time it is seen (NOTE: [Layer routes] in
    pyvae/ops/linear_act.py); results agree to rounding.
    """
    if eager_ok(x, weight, bias):
        if torch._C._is_any_autocast_enabled():
            # What the Autocast kernels registered above do, without the dispatcher round trip
            # (which costs ~50 us per layer forward + backward): cast, then the direct path.
            # Inside the function, autocast still sees the GEMMs, but their inputs already have
            # the autocast dtype (a no-op for it).
            dev = "cpu" if x.is_cpu else x.device.type  # (is_cpu: no device object built)
            if dev not in ("cpu", "cuda") or not torch.is_autocast_enabled(dev):
                return torch.ops.pyvae.linear_act(x, weight, bias, activation)
            dt = torch.get_autocast_dtype(dev)
            checked = _fast_valid(x, weight, bias, activation, autocast=True)
            # Unless checked here, the function checks after its casts (and runs pyvae's node).
            route = _route_for(x, weight, bias, activation, dt, dt) if checked else "pyvae"
            return _run_route(route, x, weight, bias, activation, dt, checked)
        if not _fast_valid(x, weight, bias, activation):
            _check(x, weight, bias, activation)
        return _run_route(_route_for(x, weight, bias, activation, x.dtype, None), x, weight, bias, activation, None)
    check_no_transform(_OP)  # NOTE: [torch.func] in pyvae/ops/_registry.py
    return torch.ops.pyvae.linear_act(x, weight, bias, activation)
