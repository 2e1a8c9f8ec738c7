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

from typing import Optional

import torch

from .. import _cublaslt, _gate, _gemm
from . import _checks as V
from ._registry import FirstOrderOnly, LIB, eager_ok, first_order_only, register

__all__ = ["linear_act", "ACTIVATIONS", "fused_only"]

ACTIVATIONS = dict(_gate.ACTIVATIONS)  # name -> the kernels' code (csrc/ops/activation.h)
_IDENTITY = ACTIVATIONS["identity"]
_OP = "linear_act"


_FAST_DTYPES = (torch.float32, torch.bfloat16, torch.float64, torch.float16)


_CASTABLE = (torch.float32, torch.bfloat16, torch.float16)  # what autocast lowers


def _fast_valid(x, weight, bias, activation, autocast: bool = False) -> bool:
    """The common, valid CPU case in one expression (a few us less per call at small batch than the
    named checks of ``_check``). ``autocast``: dtypes may differ if all are ones autocast casts."""
    return (isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor) and activation in ACTIVATIONS
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
    if activation not in ACTIVATIONS:
        raise ValueError(f"pyvae.{op}: activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    _gate.check_device(op, x.device)


def _linear_act_impl(x, weight, bias, activation):
    _check(x, weight, bias, activation)
    return _forward(x, weight, bias, ACTIVATIONS[activation])


def _forward(x, weight, bias, act):
    """The forward of a validated call (``act`` = ACTIVATIONS code)."""
    flat = x.dim() == 2
    x2 = x if flat else x.reshape(-1, x.shape[-1])
    cpu = x2.is_cpu
    if not cpu and _cublaslt.available():
        # cuBLASLt: bias (and ReLU) in the GEMM's epilogue, pyvae's kernel for the other activations.
        r = _cublaslt.linear_fwd(x2.contiguous(), weight.contiguous(),
                                 None if bias is None else bias.contiguous(), act)
        if r is not None:
            return r[0] if flat else r[0].view(*x.shape[:-1], weight.shape[0])
    if act == _IDENTITY and bias is not None:
        # No activation: the library GEMM adds the bias itself, saving our epilogue pass.
        y = _gemm.linear(x2, weight, bias)
        return y if flat else y.view(*x.shape[:-1], weight.shape[0])
    y = _gemm.linear(x2, weight)
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


def _backward_core(grad, x, weight, out, has_bias, act, mask):
    """Gradients (x, weight, bias) of y = act(x @ weight.T + b), None where ``mask`` (or no bias) says
    not needed. Inputs are already validated (by the forward or the op wrapper below)."""
    in_features, out_features = weight.shape[1], weight.shape[0]
    flat = x.dim() == 2
    g2 = grad if grad.dim() == 2 else grad.reshape(-1, out_features)
    if g2.dtype != x.dtype:
        g2 = g2.to(x.dtype)
    if not g2.is_contiguous():
        g2 = g2.contiguous()
    x2 = x if flat else x.reshape(-1, in_features)
    rows = g2.shape[0]
    need_bias = bool(has_bias and mask[2])
    cpu = g2.is_cpu
    if not cpu and _cublaslt.available():
        y2 = None if act == _IDENTITY else out.reshape(-1, out_features).contiguous()
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
    g_t = torch.empty(out_features, rows, dtype=kd, device=x.device) \
        if cpu and mask[1] and kd == g2.dtype and rows > 0 and _gemm.wants_transposed_grad(g2, in_features) else None
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
        yk = out if out.dim() == 2 else out.reshape(-1, out_features)
        if yk.dtype != kd:
            yk = yk.to(kd)
        if not yk.is_contiguous():
            yk = yk.contiguous()
        grad_pre = torch.empty_like(gk) if need_pre else None
        if need_pre or need_bias or g_t is not None:
            _gate.act_bwd(act=act, grad_y=gk, out=yk, grad_pre=grad_pre, grad_bias=grad_bias, grad_pre_t=g_t,
                          workspace=None if cpu or not need_bias else _gate.act_bwd_workspace(gk))
        if grad_pre is not None and grad_pre.dtype != x.dtype:
            grad_pre = grad_pre.to(x.dtype)
    # The weight gradient first, so that g_t is freed before the input gradient is allocated (at
    # B=8192 on dec2: 26 of the 44 MB peak of this backward).
    grad_w = _gemm.grad_weight(grad_pre if grad_pre is not None else g2, x2, g_t) if mask[1] else None
    del g_t
    grad_x = None
    if mask[0]:
        grad_x = _gemm.grad_input(grad_pre, weight)
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


def _save(ctx, x, weight, bias, activation, output):
    """What every backward of linear_act reads (the dispatcher's and both direct functions')."""
    ctx.activation, ctx.act, ctx.has_bias = activation, ACTIVATIONS[activation], bias is not None
    # The output is needed only for the activation's derivative (identity needs nothing of it).
    ctx.save_for_backward(x, weight, output if ctx.act != _IDENTITY else None)


def _setup_context(ctx, inputs, output):
    _save(ctx, *inputs, output)


def _backward(ctx, grad, direct: bool = False):
    x, weight, out = ctx.saved_tensors
    mask = [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1]), bool(ctx.needs_input_grad[2])]
    if out is None:
        out = x.new_zeros(1)
    bwd = _linear_act_backward_impl if direct else torch.ops.pyvae.linear_act_backward
    # NOTE: [No double backward] in pyvae/ops/_registry.py
    gx, gw, gb = first_order_only(
        _OP, bwd(grad, x, weight, out, ctx.has_bias, ctx.activation, mask), (x, weight)
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


def _autocast_cast(t, dtype):
    """What autocast does to one input of a lower-precision op: floating tensors other than float64
    are cast to the autocast dtype; float64 (and None) pass through, as for nn.Linear."""
    if t is None or t.dtype == torch.float64 or not t.is_floating_point():
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


class _LinearActFunction(torch.autograd.Function):
    """The direct eager path (NOTE: [Eager fast path] in pyvae/ops/_registry.py) of pyvae::linear_act, for
    inputs ``linear_act`` has already validated."""

    @staticmethod
    def forward(ctx, x, weight, bias, activation):
        out = _forward(x, weight, bias, ACTIVATIONS[activation])
        _save(ctx, x, weight, bias, activation, out)
        return out

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():  # create_graph=True: the checked path, which refuses double backward
            return _backward(ctx, grad, direct=True)
        x, weight, out = ctx.saved_tensors
        gx, gw, gb = _backward_core(grad, x, weight, out, ctx.has_bias, ctx.act, ctx.needs_input_grad)
        return gx, gw, gb, None


class _LinearActAutocastFunction(torch.autograd.Function):
    """The direct eager path under autocast: casts to ``dtype`` inside, so the graph has one node per
    layer instead of one plus a cast node per input; gradients are cast back to each input's dtype, as
    the cast nodes of the dispatcher path would do."""

    @staticmethod
    def forward(ctx, x, weight, bias, activation, dtype, checked):
        xc, wc, bc = _autocast_cast(x, dtype), _autocast_cast(weight, dtype), _autocast_cast(bias, dtype)
        # checked: linear_act's _fast_valid(autocast=True) passed, so the casts are valid inputs too.
        out = _forward(xc, wc, bc, ACTIVATIONS[activation]) if checked else _linear_act_impl(xc, wc, bc, activation)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        _save(ctx, xc, wc, bc, activation, out)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, out = ctx.saved_tensors
        grads = _backward_core(grad, x, weight, out, ctx.has_bias, ctx.act, ctx.needs_input_grad[:3])
        grads = [g if g is None or g.dtype == dt else g.to(dt) for g, dt in zip(grads, ctx.dtypes)]
        if torch.is_grad_enabled():  # create_graph=True: NOTE: [No double backward] in pyvae/ops/_registry.py
            idx = [i for i, g in enumerate(grads) if g is not None]
            # The casted inputs saved here carry no history, so a fresh leaf gives the node its edge.
            anchor = torch.zeros((), device=grad.device, requires_grad=True)
            wrapped = FirstOrderOnly.apply(_OP, len(idx), *(grads[i] for i in idx), anchor)
            for i, g in zip(idx, wrapped):
                grads[i] = g
        return (*grads, None, None, None)


# NOTE: [Small layers run torch's ops]
# pyvae's fused layer is a Python autograd node: forward + backward cost ~10 us more per layer than
# torch's F.linear, whose autograd node is C++ (bench/RESULTS.md, MLP section). It repays that where
# it has something to win: float32 GEMMs on oneDNN (NOTE: [CPU GEMM backend] in pyvae/_gemm.py, about
# 2x torch's MKL on the VAE's layers) or an activation pass fused into the GEMM's output. An identity
# layer whose GEMMs would run on torch's mm anyway (every bfloat16/float16/float64 one, float32 ones
# under the oneDNN threshold of pyvae/_gemm.py) has neither: there the eager path of ``linear_act`` calls F.linear, which
# adds the bias in the GEMM as pyvae's identity path does. Layers with an activation are always fused:
# measured against F.linear + torch's activation, the fused node is level or faster from batch 100 up,
# in float32 and under bf16 autocast (enc1 784->500 tanh: 1.00x at B=100, 1.05x at 1024; dec1 20->500
# tanh: 1.05x / 1.34x). CUDA calls and the registered op (torch.ops.pyvae.linear_act, torch.compile,
# opcheck) always run pyvae's kernels. One visible difference: F.linear supports double backward,
# pyvae's node refuses it (NOTE: [No double backward] in pyvae/ops/_registry.py). ``fused_only()`` turns the
# routing off (the kernel tests, benchmarks of the kernels themselves).
_route = {"fused_only": False}


def _torch_route(x, weight, activation, dtype) -> bool:
    """NOTE: [Small layers run torch's ops]: True when F.linear runs this valid call, whose GEMMs would
    have ``dtype``."""
    if activation != "identity" or _route["fused_only"] or not x.is_cpu:
        return False
    if dtype not in _gemm.ONEDNN_DTYPES:
        return True
    fin = weight.shape[1]
    rows = x.numel() // fin if fin else 0
    return not _gemm.uses_onednn(dtype, 2.0 * rows * fin * weight.shape[0])


class fused_only:
    """Context manager: every eager ``linear_act`` call runs pyvae's fused node, none torch's ops
    (NOTE: [Small layers run torch's ops]). Not thread-safe; restores the previous setting on exit."""

    def __enter__(self):
        self._saved = _route["fused_only"]
        _route["fused_only"] = True
        return self

    def __exit__(self, *exc):
        _route["fused_only"] = self._saved
        return False


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

    In eager mode, a CPU identity layer that pyvae's GEMM route would not speed up runs F.linear
    (NOTE: [Small layers run torch's ops] in pyvae/ops/linear_act.py); results agree to rounding.
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
            if checked and _torch_route(x, weight, activation, dt):
                return torch.nn.functional.linear(x, weight, bias)  # autocast casts for it
            # Unless checked here, the function checks after its casts.
            return _LinearActAutocastFunction.apply(x, weight, bias, activation, dt, checked)
        if _fast_valid(x, weight, bias, activation):
            if _torch_route(x, weight, activation, x.dtype):
                return torch.nn.functional.linear(x, weight, bias)
        else:
            _check(x, weight, bias, activation)
        return _LinearActFunction.apply(x, weight, bias, activation)
    return torch.ops.pyvae.linear_act(x, weight, bias, activation)
